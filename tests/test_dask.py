"""The Dask backend on a real ``distributed.LocalCluster`` of worker processes.

One cluster serves the module (a pool given its client, or its address); the tests of a pool's
own cluster and of worker faults start their own, since a crash restarts a worker process.
Calls that must stay busy talk to the test through the named pipes of ``_process_funcs``.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import psutil
import pytest
from _process_funcs import (
    Boom,
    Channel,
    double,
    double_or_crash_once,
    exit_on,
    raise_on,
    report_and_hang,
    report_and_wait,
)

distributed = pytest.importorskip("distributed")

import conveyor  # noqa: E402

WAIT = 60.0


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A cluster of two one-thread worker processes, set up as a pool's own would be."""
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"allowed_failures": 0, "dashboard_address": "127.0.0.1:0"},
    )
    client = distributed.Client(cluster, set_as_default=False)
    # Dask's own helper threads (its callback thread, say) start on first use and live as
    # long as the interpreter: started here, before any test counts threads.
    with conveyor.Pool(backend="dask", client=client) as pool:
        assert list(pool.map(double, range(3))) == [0, 2, 4]
    yield client
    client.close()
    cluster.close()


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


# -- everything Pool promises ---------------------------------------------------------------


def test_pool_api_on_a_client_of_the_user(client: Any) -> None:
    with conveyor.Pool(backend="dask", client=client) as pool:
        assert pool.workers == 2  # the cluster's threads, read at the start
        assert pool.submit(double, 21).result(timeout=WAIT) == 42
        assert list(pool.map(double, range(100))) == [2 * x for x in range(100)]
        assert sorted(pool.imap_unordered(double, range(50))) == [2 * x for x in range(50)]
        assert pool.starmap(max, [(1, 5), (7, 2)]) == [5, 7]
        assert pool.apply_async(sum, ([1, 2, 3],)).get(timeout=WAIT) == 6
        with pytest.raises(Boom):
            list(pool.map(raise_on, range(10), itertools.repeat(4)))
        stats = pool.statistics()
    assert stats.completed + stats.failed + stats.cancelled == stats.submitted
    assert stats.failed == 1 and stats.busy == 0 and stats.pending == 0
    # The pool never closes a client it was given.
    assert client.submit(double, 2, pure=False).result(timeout=WAIT) == 4


def test_a_map_is_batched_and_bounded(client: Any) -> None:
    pulled = itertools.count()

    def endless() -> Iterator[int]:
        for n in itertools.count():
            next(pulled)
            yield n

    with conveyor.Pool(backend="dask", client=client) as pool:
        assert sum(pool.map(double, range(20_000))) == 2 * sum(range(20_000))
        tasks_for_the_map = next(pool._backend._tokens)  # type: ignore[attr-defined]
        results = pool.imap(double, endless(), buffersize=1000)
        assert [next(results) for _ in range(5000)] == [2 * x for x in range(5000)]
        results.close()  # type: ignore[attr-defined]
    # A batch of calls is one Dask task: never one task per item.
    assert tasks_for_the_map < 200
    # The endless input was pulled only a window ahead of what was consumed.
    assert next(pulled) <= 5000 + 1000 + 1


def test_progress_and_kwargs_and_large_shared_argument(
    client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    big = client.scatter(list(range(1000)))  # sent to the workers once
    with conveyor.Pool(backend="dask", client=client) as pool:
        assert pool.submit(len, big).result(timeout=WAIT) == 1000
        assert pool.apply(int, ("ff",), {"base": 16}) == 255
        assert list(pool.map(double, range(5), progress=True)) == [0, 2, 4, 6, 8]
    assert "/5 " in capsys.readouterr().err  # done/total


def test_cancel_and_max_pending_wait_for_the_real_start(
    client: Any, started: Channel, release: Channel
) -> None:
    with conveyor.Pool(backend="dask", client=client, max_pending=1) as pool:
        # submit() blocks until the call before it has started on a worker.
        running = [pool.submit(report_and_wait, started.path, release.path, n) for n in range(2)]
        started.read_pids(2)
        queued = pool.submit(report_and_wait, started.path, release.path, 99)
        # Both worker threads are busy: the queued call holds the one pending place.
        with pytest.raises(conveyor.PoolFull):
            pool.submit_nowait(double, 1)
        assert not queued.running()
        assert queued.cancel()
        release.release(2)
        assert [f.result(timeout=WAIT) for f in running] == [0, 1]
        assert pool.submit(double, 4).result(timeout=WAIT) == 8
        stats = pool.statistics()
    assert queued.cancelled() and stats.cancelled == 1
    # The cancelled call's Dask task never ran: it would have written a line.
    with pytest.raises(AssertionError):
        started.read_line(timeout=0.5)


def test_shutdown_cancel_futures_and_a_map_left_early(
    client: Any, started: Channel, release: Channel
) -> None:
    pool = conveyor.Pool(backend="dask", client=client, max_pending=1)
    # Each blocking submit returns once the call before it started on a worker.
    running = [pool.submit(report_and_wait, started.path, release.path, n) for n in range(2)]
    started.read_pids(2)
    queued = pool.submit(report_and_wait, started.path, release.path, 99)
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    release.release(2)
    assert [f.result(timeout=WAIT) for f in running] == [0, 1]
    pool.shutdown(wait=True)
    assert pool.statistics().cancelled == 1

    with conveyor.Pool(backend="dask", client=client) as pool:
        results = pool.map(report_and_wait, [started.path] * 6, [release.path] * 6, range(6))
        started.read_pids(2)
        results.close()  # type: ignore[attr-defined]
        release.release(2)
        pool.shutdown(wait=True)
        stats = pool.statistics()
    # The two started calls may end either way (a start report may come after the close).
    assert 2 <= stats.cancelled <= 4
    assert stats.completed + stats.cancelled == stats.submitted
    with pytest.raises(AssertionError):  # the calls not started never started
        started.read_line(timeout=0.5)


def test_a_done_callback_may_wait_for_the_same_pool(
    client: Any, started: Channel, release: Channel
) -> None:
    inner: list[int] = []
    called = threading.Event()

    def callback(_: Any) -> None:
        inner.append(pool.submit(double, 2).result(timeout=WAIT))
        called.set()

    with conveyor.Pool(backend="dask", client=client) as pool:
        first = pool.submit(report_and_wait, started.path, release.path, 1)
        first.add_done_callback(callback)
        started.read_pids(1)
        release.release(1)
        assert called.wait(WAIT)
    assert inner == [4]


def test_a_call_past_its_timeout_fails_and_the_pool_goes_on(
    client: Any, started: Channel, release: Channel
) -> None:
    with conveyor.Pool(backend="dask", client=client, timeout=0.5) as pool:
        late = pool.submit(report_and_wait, started.path, release.path, 1)
        started.read_pids(1)
        with pytest.raises(conveyor.TaskTimeout):
            late.result(timeout=WAIT)
        assert pool.submit(double, 5).result(timeout=WAIT) == 10
        assert pool.statistics().timed_out == 1
        release.release(1)  # the abandoned call may now end


def set_variable(name: str, value: str) -> None:
    os.environ[name] = value


def get_variable(name: str) -> str | None:
    return os.environ.get(name)


def test_initializer_runs_in_every_worker(client: Any) -> None:
    with conveyor.Pool(
        backend="dask", client=client, initializer=set_variable, initargs=("CV_INIT", "1")
    ) as pool:
        assert set(pool.map(get_variable, ["CV_INIT"] * 20)) == {"1"}


def test_address_connects_and_closes_only_its_own_connection(client: Any) -> None:
    address = client.scheduler.address
    with conveyor.Pool(backend="dask", address=address) as pool:
        assert pool.workers == 2
        assert list(pool.map(double, range(10))) == [2 * x for x in range(10)]
    assert client.submit(double, 3, pure=False).result(timeout=WAIT) == 6


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this object refuses to be pickled")


def unpicklable_at(x: int, bad: int) -> Any:
    return Unpicklable() if x == bad else x


def refuse(*_: Any) -> None:
    raise ValueError("this initializer fails")


def test_what_cannot_cross_fails_only_its_own_call(client: Any) -> None:
    with conveyor.Pool(backend="dask", client=client) as pool:
        with pytest.raises(conveyor.PicklingFailed):
            pool.submit(double, Unpicklable()).result(timeout=WAIT)
        with pytest.raises(conveyor.PicklingFailed):
            pool.submit(unpicklable_at, 3, 3).result(timeout=WAIT)
        # In a batch of six, the one result that cannot travel fails alone.
        results = pool.map(unpicklable_at, range(6), [3] * 6, chunksize=6)
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(conveyor.PicklingFailed):
            next(results)
        assert pool.statistics().completed == 5


def test_a_failing_initializer_breaks_the_pool(client: Any) -> None:
    pool = conveyor.Pool(backend="dask", client=client, initializer=refuse)
    with pytest.raises(conveyor.InitializerFailed):
        pool.submit(double, 2).result(timeout=WAIT)
    pool.shutdown()
    assert client.submit(double, 2, pure=False).result(timeout=WAIT) == 4


# -- bad input --------------------------------------------------------------------------------


def test_bad_arguments_name_the_fix(client: Any) -> None:
    with pytest.raises(TypeError, match="not both"):
        conveyor.Pool(backend="dask", client=client, address="tcp://127.0.0.1:1")
    with pytest.raises(TypeError, match=r"distributed\.Client"):
        conveyor.Pool(backend="dask", client="tcp://127.0.0.1:1")
    with pytest.raises(TypeError, match="address, client"):
        conveyor.Pool(backend="dask", mp_context=None)
    with pytest.raises(TypeError, match="address"):
        conveyor.Pipeline([1]).map(double, backend="thread", address="tcp://127.0.0.1:1")


def test_without_distributed_the_error_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['distributed'] = None\n"
        "import conveyor\n"
        "try:\n    conveyor.Pool(backend='dask')\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=True
    )
    assert "pip install 'conveyor[dask]'" in out.stdout


# -- faults, on a pool's own cluster ------------------------------------------------------------


# (These tests take the module's client only so that Dask's helper threads exist already.)


def test_own_cluster_faults_stay_local_and_leave_no_process(client: Any, started: Channel) -> None:
    before = _children()
    with conveyor.Pool(backend="dask", workers=2) as pool:
        assert len(_children() - before) >= 2  # its own worker processes
        # os._exit in a call: only the calls of its batch fail, the pool goes on.
        crash = pool.submit(exit_on, 3, 3)
        fine = pool.submit(double, 4)
        with pytest.raises(conveyor.WorkerCrashed):
            crash.result(timeout=WAIT)
        assert fine.result(timeout=WAIT) == 8
        # SIGKILL of the worker process running a call.
        hung = pool.submit(report_and_hang, started.path)
        os.kill(started.read_pids(1)[0], signal.SIGKILL)
        with pytest.raises(conveyor.WorkerCrashed):
            hung.result(timeout=WAIT)
        assert list(pool.map(double, range(50))) == [2 * x for x in range(50)]
        stats = pool.statistics()
    assert stats.failed == 2
    assert not (_children() - before)  # the cluster is closed: no worker, no nanny


def test_own_cluster_stops_a_call_past_its_timeout(client: Any, started: Channel) -> None:
    before = _children()
    with conveyor.Pool(backend="dask", workers=1, timeout=0.5) as pool:
        hung = pool.submit(report_and_hang, started.path)
        worker = psutil.Process(started.read_pids(1)[0])
        with pytest.raises(conveyor.TaskTimeout, match="stopped"):
            hung.result(timeout=WAIT)
        worker.wait(timeout=WAIT)  # its process was stopped, not left running the call
        assert pool.submit(double, 3).result(timeout=WAIT) == 6  # on a new worker process
    assert not (_children() - before)  # the cluster is closed: no worker, no nanny


def test_a_crash_runs_again_only_under_retries(client: Any, tmp_path: Path) -> None:
    with conveyor.Pool(backend="dask", workers=1, retries=1) as pool:
        marker = str(tmp_path / "crashed")
        assert pool.submit(double_or_crash_once, 5, 5, marker).result(timeout=WAIT) == 10
        assert pool.statistics().retried == 1


# -- pipelines and the command line -----------------------------------------------------------


def test_a_pipeline_mixes_threads_processes_and_dask(client: Any) -> None:
    out = list(
        conveyor.Pipeline(range(40))
        .map(double, backend="dask", client=client, workers=2, buffer=16)
        .map(double, backend="process", workers=1)
        .map(str)
    )
    assert out == [str(4 * x) for x in range(40)]


def test_cli_runs_on_a_scheduler_and_resumes(client: Any, tmp_path: Path) -> None:
    address = client.scheduler.address
    output, journal = tmp_path / "out.jsonl", tmp_path / "run.journal"
    command = [sys.executable, "-m", "conveyor", "run", "conveyor.examples:fib", "-b", "dask"]
    command += ["--scheduler", address, "-o", str(output), "--journal", str(journal)]
    first = subprocess.run(command, input="10\n20\n", text=True, capture_output=True, timeout=WAIT)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(
        [*command, "--resume"], input="10\n20\n30\n", text=True, capture_output=True, timeout=WAIT
    )
    assert again.returncode == 0, again.stderr
    assert output.read_text().splitlines() == [
        '{"input": "10", "output": 55}',
        '{"input": "20", "output": 6765}',
        '{"input": "30", "output": 832040}',
    ]
    usage = subprocess.run(
        [sys.executable, "-m", "conveyor", "run", "conveyor.examples:fib", "--scheduler", address],
        input="",
        text=True,
        capture_output=True,
        timeout=WAIT,
    )
    assert usage.returncode == 2 and "-b dask" in usage.stderr


def test_cancelled_error_is_what_a_queued_call_of_a_terminated_pool_gets(
    client: Any, started: Channel, release: Channel
) -> None:
    pool = conveyor.Pool(backend="dask", client=client)
    running = [pool.submit(report_and_wait, started.path, release.path, n) for n in range(2)]
    started.read_pids(2)
    queued = pool.submit(double, 1)
    release.release(2)
    pool.terminate()
    assert queued.cancelled() or queued.result(timeout=WAIT) == 2
    for future in running:
        try:
            assert future.result(timeout=WAIT) in (0, 1)
        except CancelledError:
            pass  # abandoned by terminate(): Dask cannot stop a running call
