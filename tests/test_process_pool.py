"""``conveyor.Pool`` on the process backend, without faults: every method, every start method,
functions that travel by reference or by value, laziness, bounds, stopping and options.

Calls that must stay busy talk to the test through a named pipe (``_process_funcs.Channel``),
so every wait is on an event with a generous bound, never a sleep.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import itertools
import multiprocessing
import os
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any

import _process_funcs as funcs
import pytest
from _process_funcs import WAIT, Channel, counting, wait_gone

import conveyor

_FORK_OK = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
EVERY_METHOD = pytest.mark.parametrize(
    "method",
    [pytest.param("fork", marks=_FORK_OK), "forkserver", "spawn"],
)


def _square(x: int) -> int:
    """A function of this test module: workers import the module to find it."""
    return x * x


@dataclass(frozen=True)
class Point:
    x: int
    y: int


def _swap(p: Point) -> Point:
    return Point(p.y, p.x)


# -- every method, every start method -------------------------------------------------------


@EVERY_METHOD
def test_every_method_gives_the_builtin_answer(method: str) -> None:
    context = multiprocessing.get_context(method)
    callbacks: list[Any] = []
    called_back = threading.Event()

    def note(value: Any) -> None:
        callbacks.append(value)
        called_back.set()

    with conveyor.Pool("process", 2, mp_context=context) as pool:
        assert pool.workers == 2
        future = pool.submit(funcs.add, 1, 2, z=3)
        assert type(future) is cf.Future
        assert future.result(WAIT) == 6
        assert list(pool.map(funcs.double, range(100))) == [2 * x for x in range(100)]
        assert list(pool.map(funcs.add, range(10), range(5))) == [2 * x for x in range(5)]
        assert list(pool.map(funcs.double, range(50), chunksize=7)) == [2 * x for x in range(50)]
        assert list(pool.map(funcs.double, range(50), buffersize=3)) == [2 * x for x in range(50)]
        assert list(pool.map(funcs.double, [])) == []
        assert list(pool.imap(funcs.double, iter(range(30)), chunksize=4)) == [
            2 * x for x in range(30)
        ]
        assert sorted(pool.imap_unordered(funcs.double, range(30))) == [2 * x for x in range(30)]
        assert pool.starmap(funcs.add, [(1, 2), (3, 4)]) == [3, 7]
        assert pool.apply(funcs.add, (1,), {"y": 5, "z": 1}) == 7
        assert pool.apply_async(funcs.double, (21,), callback=note).get(WAIT) == 42
        assert called_back.wait(WAIT)
        futures = [pool.submit(funcs.double, i) for i in range(10)]
        assert sorted(f.result() for f in cf.as_completed(futures, timeout=WAIT)) == [
            2 * i for i in range(10)
        ]
        done, not_done = cf.wait(futures, timeout=WAIT)
        assert not not_done and len(done) == 10
        stats = pool.statistics()
    assert callbacks == [42]
    assert stats.workers == 2
    assert stats.completed == stats.submitted == 3 + 100 + 5 + 50 + 50 + 30 + 30 + 2 + 10
    assert (stats.failed, stats.cancelled, stats.busy, stats.pending) == (0, 0, 0, 0)


@EVERY_METHOD
def test_calls_run_in_other_processes_started_by_the_method_asked_for(method: str) -> None:
    with conveyor.Pool("process", 2, mp_context=multiprocessing.get_context(method)) as pool:
        pids = set(pool.map(funcs.pid, range(20)))
        parents = {pool.submit(os.getppid).result(WAIT) for _ in range(4)}
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2
    if method == "forkserver":
        # forkserver workers are children of the fork server, not of this process
        assert os.getpid() not in parents
    else:
        assert parents == {os.getpid()}


def test_the_default_start_method_is_forkserver() -> None:
    with conveyor.Pool("process", 1) as pool:
        parent = pool.submit(os.getppid).result(WAIT)
    assert parent != os.getpid()


@EVERY_METHOD
def test_lambdas_closures_and_test_module_functions_run_in_workers(method: str) -> None:
    offset = 1000

    class Local:  # a class of a test function: it travels by value
        def __init__(self, value: int) -> None:
            self.value = value

    def closure(x: int) -> int:
        return x + offset

    def make_local(x: int) -> Local:
        return Local(x * 2)

    with conveyor.Pool("process", 2, mp_context=multiprocessing.get_context(method)) as pool:
        assert list(pool.map(lambda x: x * 3, range(5))) == [0, 3, 6, 9, 12]
        assert pool.submit(closure, 1).result(WAIT) == 1001
        assert list(pool.map(_square, range(6))) == [0, 1, 4, 9, 16, 25]
        assert pool.submit(_swap, Point(1, 2)).result(WAIT) == Point(2, 1)
        local = pool.submit(make_local, 21).result(WAIT)
        assert type(local).__name__ == "Local" and local.value == 42
        assert pool.submit(lambda p: p.value + 1, Local(5)).result(WAIT) == 6
        assert pool.starmap(lambda a, b: a - b, [(5, 3), (1, 1)]) == [2, 0]


def test_many_distinct_functions_overflow_the_function_caches_correctly() -> None:
    def adder(i: int) -> Any:
        return lambda x: x + i

    functions = [adder(i) for i in range(600)]  # more than the pool and a worker cache
    with conveyor.Pool("process", 1) as pool:
        assert [pool.submit(fn, 1).result(WAIT) for fn in functions] == list(range(1, 601))
        again = range(0, 600, 7)  # some were evicted, some are still cached
        assert [pool.submit(functions[i], 1).result(WAIT) for i in again] == [i + 1 for i in again]
        assert [list(pool.map(functions[i], range(3))) for i in range(500, 600, 9)] == [
            [i, i + 1, i + 2] for i in range(500, 600, 9)
        ]


# -- laziness and bounds --------------------------------------------------------------------


def test_imap_over_an_endless_input_pulls_only_what_its_window_allows() -> None:
    pulled: list[int] = []
    with conveyor.Pool("process", 2) as pool:
        results = pool.imap(funcs.double, counting(itertools.count(), pulled), buffersize=8)
        assert list(itertools.islice(results, 50)) == [2 * x for x in range(50)]
        assert len(pulled) <= 50 + 8
        results.close()  # type: ignore[attr-defined]
        assert pool.submit(funcs.double, 1).result(WAIT) == 2
    stats = pool.statistics()
    assert stats.submitted == stats.completed + stats.failed + stats.cancelled
    assert stats.failed == 0


def test_breaking_out_of_a_map_cancels_what_it_queued_and_the_pool_goes_on() -> None:
    with conveyor.Pool("process", 2) as pool:
        for value in pool.map(funcs.double, range(10_000)):
            if value >= 100:
                break
        assert list(pool.map(funcs.double, range(10))) == [2 * x for x in range(10)]
    stats = pool.statistics()
    assert stats.submitted == stats.completed + stats.cancelled
    assert stats.failed == 0


def test_map_timeout_raises_timeout_error_and_the_pool_goes_on(
    started: Channel, release: Channel
) -> None:
    call = partial(funcs.report_and_wait, started.path, release.path)
    with conveyor.Pool("process", 1) as pool:
        results = pool.map(call, ["slow"], timeout=0.2)
        try:
            started.read_line()
            with pytest.raises(TimeoutError):
                next(results)
        finally:
            release.release(1)
        assert list(pool.map(funcs.double, range(5), timeout=WAIT)) == [0, 2, 4, 6, 8]


def test_submit_nowait_raises_pool_full_once_max_pending_calls_wait(
    started: Channel, release: Channel
) -> None:
    with conveyor.Pool("process", 1, max_pending=2) as pool:
        try:
            running = pool.submit(funcs.report_and_wait, started.path, release.path, "first")
            started.read_line()
            queued = [pool.submit(funcs.double, 1), pool.submit_nowait(funcs.double, 2)]
            # a short call handed on to a busy worker (queued in its pipe) frees its place
            for i in range(3, 5):
                try:
                    queued.append(pool.submit_nowait(funcs.double, i))
                except conveyor.PoolFull:
                    break
            else:
                pytest.fail("submit_nowait() never raised PoolFull")
            assert len(queued) <= 3
            assert pool.statistics().busy == 1
        finally:
            release.release(1)
        assert running.result(WAIT) == "first"
        assert [f.result(WAIT) for f in queued] == [2 * i for i in range(1, len(queued) + 1)]


def test_max_pending_counts_every_call_that_waits_for_a_worker(
    started: Channel, release: Channel
) -> None:
    second: list[cf.Future[int]] = []
    returned = threading.Event()

    def submit_another() -> None:
        second.append(pool.submit(funcs.double, 2))
        returned.set()

    with conveyor.Pool("process", 1, max_pending=1) as pool:
        submitter = threading.Thread(target=submit_another)
        try:
            running = pool.submit(funcs.report_and_wait, started.path, release.path, "first")
            started.read_line()
            first = pool.submit(funcs.double, 1)  # the one place for a waiting call
            submitter.start()
            # the only worker is busy and one call waits: submit() must block until it starts
            assert not returned.wait(5.0), "submit() returned with max_pending calls waiting"
            assert not first.running()
        finally:
            release.release(1)
            submitter.join(WAIT)
        assert running.result(WAIT) == "first"
        assert first.result(WAIT) == 2
        assert second[0].result(WAIT) == 4


def test_apply_async_callbacks_see_results_and_errors() -> None:
    results: list[Any] = []
    errors: list[BaseException] = []
    with conveyor.Pool("process", 2) as pool:
        ok = pool.apply_async(funcs.double, (4,), callback=results.append)
        bad = pool.apply_async(funcs.raise_boom, (5,), error_callback=errors.append)
        assert ok.get(WAIT) == 8
        bad.wait(WAIT)
        assert bad.ready() and not bad.successful()
        with pytest.raises(funcs.Boom):
            bad.get(WAIT)
    assert results == [8]
    assert len(errors) == 1 and isinstance(errors[0], funcs.Boom)


def test_futures_work_with_asyncio() -> None:
    with conveyor.Pool("process", 2) as pool:

        async def main() -> list[int]:
            return list(
                await asyncio.gather(
                    asyncio.wrap_future(pool.submit(funcs.double, 1)),
                    asyncio.wrap_future(pool.submit(funcs.double, 2)),
                )
            )

        assert asyncio.run(main()) == [2, 4]


# -- stopping -------------------------------------------------------------------------------


def test_close_and_join_let_queued_calls_finish() -> None:
    pool = conveyor.Pool("process", 2)
    try:
        with pytest.raises(ValueError, match="close"):
            pool.join()
        futures = [pool.submit(funcs.pid_and_value, i) for i in range(20)]
        pool.close()
        with pytest.raises(RuntimeError):
            pool.submit(funcs.double, 1)
        pool.join()
    finally:
        pool.terminate()
    results = [f.result(0) for f in futures]
    assert [value for _, value in results] == list(range(20))
    assert not wait_gone({pid for pid, _ in results}, timeout=0)


def test_shutdown_with_wait_returns_once_running_calls_end() -> None:
    pool = conveyor.Pool("process", 2)
    futures = [pool.submit(funcs.sleep_then_pid, 0.3) for _ in range(4)]
    pool.shutdown(wait=True)
    assert all(f.done() for f in futures)
    pids = {f.result(0) for f in futures}
    # every worker has exited by the time shutdown(wait=True) returns
    assert not wait_gone(pids, timeout=0)
    assert not [t for t in threading.enumerate() if t.name.startswith("conveyor-")]


def test_shutdown_with_cancel_futures_cancels_queued_calls(
    started: Channel, release: Channel
) -> None:
    pool = conveyor.Pool("process", 1)
    try:
        running = pool.submit(funcs.report_and_wait, started.path, release.path, "done")
        started.read_line()
        queued = [pool.submit(funcs.double, i) for i in range(6)]
        pool.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(RuntimeError):
            pool.submit(funcs.double, 1)
    finally:
        release.release(1)
        pool.shutdown(wait=True)
    assert running.result(0) == "done"
    cancelled = [f for f in queued if f.cancelled()]
    # like the stdlib's executor, at most one call already handed on to the worker still runs
    assert len(cancelled) >= len(queued) - 1
    for index, future in enumerate(queued):
        assert future.cancelled() or future.result(0) == 2 * index
    stats = pool.statistics()
    assert stats.cancelled == len(cancelled)
    assert stats.submitted == stats.completed + stats.cancelled


@pytest.mark.parametrize("method", [pytest.param("fork", marks=_FORK_OK), "forkserver"])
def test_terminate_stops_a_call_that_never_returns(method: str, started: Channel) -> None:
    pool = conveyor.Pool("process", 1, mp_context=multiprocessing.get_context(method))
    try:
        stuck = pool.submit(funcs.report_and_hang, started.path)
        (pid,) = started.read_pids(1)
        queued = [pool.submit(funcs.double, i) for i in range(3)]
        also_stuck = pool.submit(funcs.never_returns)
    finally:
        pool.terminate()
    # terminate() returned: the worker is gone and every call has ended
    assert not wait_gone([pid], timeout=0)
    for future in [stuck, *queued, also_stuck]:
        assert future.done()
        assert future.cancelled() or future.exception(0) is not None
    stats = pool.statistics()
    assert stats.completed == 0
    assert stats.submitted == stats.failed + stats.cancelled == 5
    with pytest.raises(RuntimeError):
        pool.submit(funcs.double, 1)


def test_a_pool_dropped_without_shutdown_stops_its_workers() -> None:
    pool = conveyor.Pool("process", 2)
    pids = set(pool.map(funcs.pid, range(10)))
    del pool
    gc.collect()
    assert not wait_gone(pids), "the workers of a dropped pool still run"


# -- options --------------------------------------------------------------------------------


def test_mp_context_must_be_a_context() -> None:
    with pytest.raises(TypeError, match="mp_context"):
        conveyor.Pool("process", 1, mp_context="spawn")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_max_tasks_per_worker_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_tasks_per_worker"):
        conveyor.Pool("process", 1, max_tasks_per_worker=bad)


def test_thread_options_are_refused_by_the_process_backend() -> None:
    with pytest.raises(TypeError, match="thread_name_prefix"):
        conveyor.Pool("process", 1, thread_name_prefix="x")


def test_an_initializer_that_cannot_be_pickled_is_refused_at_once() -> None:
    lock = threading.Lock()
    with pytest.raises(conveyor.PicklingFailed, match="initializer"):
        conveyor.Pool("process", 1, initializer=print, initargs=(lock,))


def test_the_default_worker_count_is_the_usable_cpu_count() -> None:
    with conveyor.Pool("process") as pool:
        assert pool.workers == len(os.sched_getaffinity(0))


@_FORK_OK
@pytest.mark.parametrize("backend", ["process", "thread"])
def test_a_child_forked_from_the_pools_process_is_told_it_cannot_use_the_pool(
    backend: str,
) -> None:
    with conveyor.Pool(backend, 2) as pool:
        assert pool.submit(funcs.double, 1).result(WAIT) == 2
        report_r, report_w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            code = 1
            try:
                try:
                    pool.submit(funcs.double, 2)
                except RuntimeError as exc:
                    if "child forked from it" in str(exc):
                        code = 2
                # Each returns at once: nothing of the pool's runs here.
                pool.close()
                pool.terminate()
                pool.shutdown()
                if code == 2:
                    code = 3
            finally:
                os.write(report_w, bytes([code]))
                os._exit(0)
        os.close(report_w)
        try:
            with os.fdopen(report_r, "rb") as report:
                assert report.read() == bytes([3])
        finally:
            os.waitpid(child, 0)
        # The parent's pool goes on.
        assert pool.submit(funcs.double, 3).result(WAIT) == 6
