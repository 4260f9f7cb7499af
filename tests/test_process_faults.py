"""Faults on the process backend: crashes, kills, segfaults, timeouts, pickling, initializers,
recycling, large data and orphans, on every start method.

Every fault is real: ``os._exit``, ``SIGKILL`` (from the call itself and from outside), a
segfault, a call that never returns, objects whose pickling or unpickling raises or exits. A
call that must stay busy talks to the test through a named pipe (``_process_funcs.Channel``),
so the test waits on events, never on sleeps. ``fork`` and ``forkserver`` run every scenario;
``spawn`` (the slowest to start) runs the core ones.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path
from typing import Any

import _process_funcs as funcs
import numpy as np
import psutil
import pytest
from _process_funcs import WAIT, Channel, read_line, wait_gone

import conveyor
from conveyor._backends._workers import WorkerSet

#: A per-call timeout long enough for any call that is not stuck, even on a loaded machine.
TIMEOUT = 3.0

# Python 3.12 warns when a multi-threaded process forks (the pool's dispatcher is a thread);
# with warnings as errors that would break every fork test on 3.12, for a known trade-off.
_FORK_OK = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


def start_methods(*names: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        "method", [pytest.param(name, marks=_FORK_OK if name == "fork" else ()) for name in names]
    )


EVERY_METHOD = start_methods("fork", "forkserver", "spawn")
FORKING = start_methods("fork", "forkserver")


def context(method: str) -> Any:
    return multiprocessing.get_context(method)


def outcomes(futures: list[Future[Any]]) -> list[Any]:
    """Each future's result, or its exception."""
    return [f.exception(WAIT) or f.result(0) for f in futures]


def assert_counts_add_up(stats: conveyor.PoolStatistics) -> None:
    assert stats.submitted == stats.completed + stats.failed + stats.cancelled, stats
    assert stats.busy == stats.pending == 0, stats


def assert_runs_calls_side_by_side(pool: conveyor.Pool, started: Channel, release: Channel) -> None:
    """The pool has all its workers: as many calls run at once (each waits for the others)."""
    call = partial(funcs.report_and_wait, started.path, release.path)
    futures = [pool.submit(call, i) for i in range(pool.workers)]
    try:
        pids = started.read_pids(pool.workers)
    finally:
        release.release(pool.workers)
    assert len(set(pids)) == pool.workers
    assert [f.result(WAIT) for f in futures] == list(range(pool.workers))


def shm_files(pids: set[int] | list[int]) -> list[str]:
    """The shared-memory files conveyor's wire created for these processes."""
    return [name for pid in pids for name in glob.glob(f"/dev/shm/conveyor-{pid}-*")]


# -- crashes --------------------------------------------------------------------------------


@EVERY_METHOD
@pytest.mark.parametrize(
    ("how", "exitcode"), [("exit", 7), ("sigkill", -signal.SIGKILL), ("segfault", -signal.SIGSEGV)]
)
def test_a_crashing_call_fails_alone_and_the_pool_goes_on(
    method: str, how: str, exitcode: int, started: Channel, release: Channel
) -> None:
    with conveyor.Pool("process", 2, mp_context=context(method)) as pool:
        # one batch of eight calls, the fourth of which kills its worker
        seen: list[int] = []
        with pytest.raises(conveyor.WorkerCrashed) as info:
            for value in pool.map(funcs.crash_on, range(8), [3] * 8, [how] * 8, chunksize=8):
                seen.append(value)
        assert seen == [0, 1, 2]
        error = info.value
        assert isinstance(error, BrokenProcessPool)
        assert error.exitcode == exitcode
        assert error.attempts == 1
        assert "pid" in str(error)
        # the calls after it in its batch ran elsewhere: the batch ended with one failure
        stats = pool.statistics()
        assert (stats.completed, stats.failed) == (7, 1)

        futures = [pool.submit(funcs.crash_on, i, 5, how) for i in range(8)]
        results = outcomes(futures)
        assert isinstance(results[5], conveyor.WorkerCrashed)
        assert results[5].exitcode == exitcode
        assert results[:5] + results[6:] == [0, 1, 2, 3, 4, 6, 7]

        # the crashed workers were replaced: both run calls at once again
        assert_runs_calls_side_by_side(pool, started, release)
        assert list(pool.map(funcs.double, range(100))) == [2 * x for x in range(100)]
        stats = pool.statistics()
    assert (stats.failed, stats.cancelled) == (2, 0)
    assert_counts_add_up(stats)


@EVERY_METHOD
def test_a_call_that_closes_every_descriptor_of_its_worker_fails_alone(method: str) -> None:
    # Its sentinel closes with them while the worker runs on: multiprocessing would take that
    # for an exit and wait for the process without end.
    with conveyor.Pool("process", 2, mp_context=context(method)) as pool:
        assert pool.submit(funcs.double, 1).result(WAIT) == 2
        error = pool.submit(funcs.close_every_descriptor, 2).exception(WAIT)
        assert isinstance(error, conveyor.WorkerCrashed), error
        assert [pool.submit(funcs.double, x).result(WAIT) for x in range(4)] == [0, 2, 4, 6]


@EVERY_METHOD
def test_a_thread_that_a_call_leaves_running_does_not_hold_its_worker_at_shutdown(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    signals: list[int] = []
    send = WorkerSet.signal

    def recording(crew: WorkerSet, proc: Any, signum: int) -> None:
        signals.append(signum)
        send(crew, proc, signum)

    monkeypatch.setattr(WorkerSet, "signal", recording)
    with conveyor.Pool("process", 1, mp_context=context(method)) as pool:
        assert pool.submit(funcs.leave_a_thread, 5).result(WAIT) == 5
    # Told to stop, the worker exited without waiting for that thread: it was not killed.
    assert signals == []


@EVERY_METHOD
def test_a_worker_killed_from_outside_fails_only_the_call_it_ran(
    method: str, started: Channel, release: Channel
) -> None:
    with conveyor.Pool("process", 2, mp_context=context(method)) as pool:
        futures = [
            pool.submit(funcs.report_and_wait, started.path, release.path, name)
            for name in ("a", "b")
        ]
        victim, _ = started.read_pids(2)
        os.kill(victim, signal.SIGKILL)
        assert not wait_gone([victim])
        release.release(1)
        results = outcomes(futures)
        crashed = [r for r in results if isinstance(r, conveyor.WorkerCrashed)]
        assert len(crashed) == 1
        assert crashed[0].exitcode == -signal.SIGKILL
        assert f"pid {victim}" in str(crashed[0])
        assert "SIGKILL" in str(crashed[0])
        assert [r for r in results if r is not crashed[0]] in (["a"], ["b"])
        pids = {pool.submit(funcs.pid).result(WAIT) for _ in range(10)}
        assert victim not in pids
        assert_runs_calls_side_by_side(pool, started, release)
        stats = pool.statistics()
    assert (stats.completed, stats.failed) == (13, 1)
    assert_counts_add_up(stats)


@FORKING
def test_an_idle_worker_killed_from_outside_is_replaced_without_a_failure(
    method: str, started: Channel, release: Channel
) -> None:
    with conveyor.Pool("process", 2, mp_context=context(method)) as pool:
        victim = pool.submit(funcs.pid).result(WAIT)
        os.kill(victim, signal.SIGKILL)
        assert not wait_gone([victim])
        futures = [pool.submit(funcs.pid_and_value, i) for i in range(20)]
        results = [f.result(WAIT) for f in futures]
        assert [value for _, value in results] == list(range(20))
        assert victim not in {pid for pid, _ in results}
        assert_runs_calls_side_by_side(pool, started, release)
        stats = pool.statistics()
    assert stats.failed == 0
    assert stats.completed == stats.submitted == 23


def test_a_call_never_waits_behind_a_running_call_while_a_worker_is_idle(
    started: Channel, release: Channel
) -> None:
    call = partial(funcs.maybe_block, started.path, release.path)
    with conveyor.Pool("process", 2) as pool:
        # the pool measures the function: microseconds per call (over many calls, so that a
        # worker descheduled by a busy machine does not spoil the measure)
        assert len(set(pool.map(call, [False] * 2000, chunksize=1000))) <= 2
        running = pool.submit(call, True)  # this time it takes long (blocked on the test)
        (busy,) = started.read_pids(1)
        try:
            # the other worker is idle; a sound pool runs this at once (5 s is generous)
            quick = pool.submit(call, False).result(5.0)
        finally:
            release.release(1)
        assert quick != busy
        assert running.result(WAIT) == busy


def test_a_crash_among_calls_too_fast_to_mark_one_by_one_is_found() -> None:
    # Calls measured to take microseconds run in the worker's fast loop, which only knows
    # which chunk of calls is running; the crash must still fail exactly its own call.
    call = partial(funcs.increment_or_exit, bad=2500)
    with conveyor.Pool("process", 2) as pool:
        assert list(pool.map(call, range(2000))) == [x + 1 for x in range(2000)]  # measured
        seen: list[int] = []
        with pytest.raises(conveyor.WorkerCrashed) as info:
            for value in pool.map(call, range(4000)):
                seen.append(value)
        assert info.value.exitcode == 5
        assert seen == [x + 1 for x in range(2500)]
        assert list(pool.map(call, range(100))) == [x + 1 for x in range(100)]
    stats = pool.statistics()  # after shutdown: the batches the map left behind have ended
    assert stats.failed == 1
    assert_counts_add_up(stats)


# -- retries --------------------------------------------------------------------------------


@EVERY_METHOD
def test_a_call_that_crashes_every_worker_fails_after_its_retries(method: str) -> None:
    with conveyor.Pool("process", 2, mp_context=context(method), retries=2) as pool:
        error = pool.submit(funcs.exit_now, 11).exception(WAIT)
        assert isinstance(error, conveyor.WorkerCrashed)
        assert error.exitcode == 11
        assert error.attempts == 3
        assert "3 times" in str(error)
        assert pool.submit(funcs.double, 4).result(WAIT) == 8
        stats = pool.statistics()
    assert (stats.completed, stats.failed, stats.retried) == (1, 1, 2)


@FORKING
def test_a_call_that_crashes_once_succeeds_on_its_retry(method: str, tmp_path: Path) -> None:
    with conveyor.Pool("process", 2, mp_context=context(method), retries=1) as pool:
        marker = tmp_path / "crashed-once"
        assert pool.submit(funcs.crash_first_time, str(marker), "second time lucky").result(
            WAIT
        ) == ("second time lucky")
        assert marker.exists()
        # in a map: the crash-once call is one of a batch; every call gets its value
        markers = [str(tmp_path / f"item-{i}") if i % 3 == 1 else str(marker) for i in range(9)]
        assert list(pool.map(funcs.crash_first_time, markers, range(9), chunksize=9)) == list(
            range(9)
        )
        stats = pool.statistics()
    assert (stats.completed, stats.failed, stats.retried) == (10, 0, 4)


def test_without_retries_a_call_that_would_crash_once_fails(tmp_path: Path) -> None:
    marker = str(tmp_path / "crashed-once")
    with conveyor.Pool("process", 1) as pool:
        error = pool.submit(funcs.crash_first_time, marker, 1).exception(WAIT)
        assert isinstance(error, conveyor.WorkerCrashed)
        assert error.attempts == 1
        assert "times" not in str(error)
        assert pool.submit(funcs.crash_first_time, marker, 2).result(WAIT) == 2


def test_a_task_error_is_retried_as_its_own_type() -> None:
    with conveyor.Pool("process", 2, retries=2, retry_on=funcs.Boom) as pool:
        error = pool.submit(funcs.raise_boom, 1).exception(WAIT)
        assert type(error) is funcs.Boom
        assert error.attempts == 3  # type: ignore[attr-defined]
        stats = pool.statistics()
    assert stats.retried == 2


# -- timeouts -------------------------------------------------------------------------------


@EVERY_METHOD
def test_a_call_past_its_timeout_is_killed_and_fails_alone(
    method: str, started: Channel, release: Channel
) -> None:
    with conveyor.Pool("process", 2, mp_context=context(method), timeout=TIMEOUT) as pool:
        stuck = pool.submit(funcs.report_and_hang, started.path)
        (stuck_pid,) = started.read_pids(1)
        others = [pool.submit(funcs.double, i) for i in range(6)]
        error = stuck.exception(WAIT)
        assert isinstance(error, conveyor.TaskTimeout)
        assert isinstance(error, TimeoutError)
        assert f"{TIMEOUT:g} s" in str(error)
        assert not wait_gone([stuck_pid]), "the worker running the stuck call still runs"
        assert [f.result(WAIT) for f in others] == [2 * i for i in range(6)]
        assert list(pool.map(funcs.double, range(20))) == [2 * i for i in range(20)]
        assert_runs_calls_side_by_side(pool, started, release)
        stats = pool.statistics()
    assert (stats.completed, stats.failed, stats.timed_out) == (28, 1, 1)
    assert_counts_add_up(stats)


@FORKING
def test_a_worker_that_ignores_sigterm_is_killed_at_its_timeout(
    method: str, started: Channel
) -> None:
    with conveyor.Pool("process", 2, mp_context=context(method), timeout=TIMEOUT) as pool:
        stuck = pool.submit(funcs.report_ignore_sigterm_and_hang, started.path)
        (stuck_pid,) = started.read_pids(1)
        assert isinstance(stuck.exception(WAIT), conveyor.TaskTimeout)
        assert not wait_gone([stuck_pid]), "SIGKILL never followed the ignored SIGTERM"
        assert pool.submit(funcs.double, 21).result(WAIT) == 42
        stats = pool.statistics()
    assert (stats.completed, stats.failed, stats.timed_out) == (1, 1, 1)


def test_a_timeout_counts_only_the_time_the_call_runs() -> None:
    # A worker whose initializer takes longer than the timeout (loading a model, say): the
    # call has not started when its deadline, counted from when it was sent, passes.
    with conveyor.Pool("process", 1, timeout=0.5, initializer=time.sleep, initargs=(2.0,)) as pool:
        assert pool.submit(funcs.double, 21).result(WAIT) == 42


# -- pickling faults ------------------------------------------------------------------------


def test_an_argument_that_cannot_be_pickled_fails_its_call_alone() -> None:
    items: list[Any] = list(range(10))
    items[5] = threading.Lock()
    with conveyor.Pool("process", 2) as pool:
        error = pool.submit(funcs.type_name, threading.Lock()).exception(WAIT)
        assert isinstance(error, conveyor.PicklingFailed)
        assert isinstance(error, pickle.PicklingError)
        assert "lock" in str(error)
        assert isinstance(error.__cause__, TypeError)
        seen: list[str] = []
        with pytest.raises(conveyor.PicklingFailed):
            for name in pool.map(funcs.type_name, items, chunksize=10):
                seen.append(name)
        assert seen == ["int"] * 5
        assert pool.statistics().completed == 9
        assert pool.submit(funcs.type_name, 1.5).result(WAIT) == "float"
        # a keyword argument that cannot be pickled: the same
        error = pool.submit(funcs.add, 1, y=threading.Lock()).exception(WAIT)  # type: ignore[arg-type]
        assert isinstance(error, conveyor.PicklingFailed)
        stats = pool.statistics()
    assert (stats.completed, stats.failed) == (10, 3)


def test_an_argument_whose_reduce_raises_fails_its_call_alone() -> None:
    with conveyor.Pool("process", 2) as pool:
        error = pool.submit(funcs.type_name, funcs.ReduceRaises()).exception(WAIT)
        assert isinstance(error, conveyor.PicklingFailed)
        assert "refuses to be pickled" in str(error)
        assert isinstance(error.__cause__, ValueError)
        assert pool.submit(funcs.type_name, "x").result(WAIT) == "str"


def test_a_pool_sent_to_its_workers_fails_that_call_with_a_clear_error() -> None:
    with conveyor.Pool("process", 2) as pool:
        with pytest.raises(TypeError, match=r"a conveyor\.Pool cannot be pickled"):
            pickle.dumps(pool)
        error = pool.submit(funcs.type_name, pool).exception(WAIT)
        assert isinstance(error, conveyor.PicklingFailed)
        assert "create a pool where it is used" in str(error)
        assert pool.submit(funcs.type_name, "x").result(WAIT) == "str"


def test_a_function_that_cannot_be_pickled_fails_its_calls() -> None:
    lock = threading.Lock()

    def holds_a_lock(x: int) -> int:
        with lock:
            return x

    with conveyor.Pool("process", 2) as pool:
        error = pool.submit(holds_a_lock, 1).exception(WAIT)
        assert isinstance(error, conveyor.PicklingFailed)
        assert "function" in str(error)
        with pytest.raises(conveyor.PicklingFailed):
            list(pool.map(holds_a_lock, range(5)))
        assert pool.submit(funcs.double, 2).result(WAIT) == 4


@EVERY_METHOD
def test_an_argument_whose_unpickling_raises_in_the_worker_fails_its_call_alone(
    method: str,
) -> None:
    items: list[Any] = list(range(10))
    items[5] = funcs.UnpicklingRaises()
    with conveyor.Pool("process", 2, mp_context=context(method)) as pool:
        error = pool.submit(funcs.type_name, funcs.UnpicklingRaises()).exception(WAIT)
        assert isinstance(error, conveyor.UnpicklingFailed)
        assert isinstance(error, pickle.UnpicklingError)
        assert "refuses to be unpickled" in str(error)
        assert isinstance(error.__cause__, LookupError)
        seen: list[str] = []
        with pytest.raises(conveyor.UnpicklingFailed):
            for name in pool.map(funcs.type_name, items, chunksize=10):
                seen.append(name)
        assert seen == ["int"] * 5
        stats = pool.statistics()
        assert (stats.completed, stats.failed) == (9, 2)
        assert pool.submit(funcs.type_name, b"").result(WAIT) == "bytes"


@FORKING
def test_an_argument_whose_unpickling_exits_the_worker_fails_its_call_alone(method: str) -> None:
    # os._exit while unpickling kills the worker: that is a crash, blamed on that call only
    items: list[Any] = list(range(6))
    items[2] = funcs.UnpicklingExits(5)
    with conveyor.Pool("process", 2, mp_context=context(method)) as pool:
        error = pool.submit(funcs.type_name, funcs.UnpicklingExits(6)).exception(WAIT)
        assert isinstance(error, conveyor.WorkerCrashed)
        assert error.exitcode == 6
        with pytest.raises(conveyor.WorkerCrashed) as info:
            list(pool.map(funcs.type_name, items, chunksize=6))
        assert info.value.exitcode == 5
        stats = pool.statistics()
        assert (stats.completed, stats.failed) == (5, 2)
        assert pool.submit(funcs.type_name, None).result(WAIT) == "NoneType"


def test_an_argument_whose_unpickling_calls_sys_exit_fails_its_call_alone() -> None:
    items: list[Any] = list(range(6))
    items[4] = funcs.UnpicklingCallsSysExit()
    with conveyor.Pool("process", 2) as pool:
        error = pool.submit(funcs.type_name, funcs.UnpicklingCallsSysExit()).exception(WAIT)
        assert isinstance(error, conveyor.UnpicklingFailed)
        assert isinstance(error.__cause__, SystemExit)
        seen: list[str] = []
        with pytest.raises(conveyor.UnpicklingFailed):
            for name in pool.map(funcs.type_name, items, chunksize=6):
                seen.append(name)
        assert seen == ["int"] * 4
        assert pool.statistics().completed == 5
        assert pool.submit(funcs.type_name, 1).result(WAIT) == "int"


def test_a_result_that_cannot_be_pickled_fails_its_call_alone() -> None:
    with conveyor.Pool("process", 2) as pool:
        error = pool.submit(funcs.lock_on, 1, 1).exception(WAIT)
        assert isinstance(error, conveyor.PicklingFailed)
        assert "result" in str(error)
        # Its cause is the worker's traceback of the pickling error.
        assert "Traceback" in str(error.__cause__)
        assert "pickle" in str(error.__cause__)
        seen: list[int] = []
        with pytest.raises(conveyor.PicklingFailed):
            for value in pool.map(funcs.lock_on, range(10), [6] * 10, chunksize=10):
                seen.append(value)
        assert seen == list(range(6))
        assert pool.statistics().completed == 9
        assert pool.submit(funcs.lock_on, 1, 2).result(WAIT) == 1


def test_an_exception_that_cannot_be_pickled_fails_its_call_with_a_clear_error() -> None:
    with conveyor.Pool("process", 2) as pool:
        error = pool.submit(funcs.raise_unpicklable_on, 3, 3).exception(WAIT)
        assert isinstance(error, conveyor.PicklingFailed)
        assert "ErrorHoldingALock" in str(error)
        assert "locked 3" in str(error)
        seen: list[int] = []
        with pytest.raises(conveyor.PicklingFailed):
            for value in pool.map(funcs.raise_unpicklable_on, range(8), [4] * 8, chunksize=8):
                seen.append(value)
        assert seen == [0, 1, 2, 3]
        assert pool.statistics().completed == 7


def test_a_result_that_cannot_be_unpickled_fails_its_call() -> None:
    with conveyor.Pool("process", 2) as pool:
        error = pool.submit(funcs.unbuildable_on, 1, 1).exception(WAIT)
        assert isinstance(error, conveyor.UnpicklingFailed)
        assert isinstance(error.__cause__, LookupError)
        error = pool.submit(funcs.raise_two_argument_error_on, 1, 1).exception(WAIT)
        assert isinstance(error, conveyor.UnpicklingFailed)
        assert isinstance(error.__cause__, TypeError)
        assert [pool.submit(funcs.double, i).result(WAIT) for i in range(4)] == [0, 2, 4, 6]
        stats = pool.statistics()
    assert (stats.completed, stats.failed) == (4, 2)


@pytest.mark.parametrize("fn", [funcs.unbuildable_on, funcs.raise_two_argument_error_on])
def test_a_result_that_cannot_be_unpickled_fails_only_its_own_call_in_a_batch(
    fn: Any,
) -> None:
    with conveyor.Pool("process", 1) as pool:
        seen: list[int] = []
        with pytest.raises(conveyor.UnpicklingFailed):
            for value in pool.map(fn, range(10), [5] * 10, chunksize=10):
                seen.append(value)
        stats = pool.statistics()
    assert (stats.completed, stats.failed) == (9, 1)
    assert seen == [0, 1, 2, 3, 4]


def test_a_result_only_the_pool_cannot_unpickle_fails_only_its_own_call() -> None:
    # The worker could read it back; the pool cannot: the calls whose results came with it
    # run again, each on its own, and only the one at fault fails.
    pid, n = os.getpid(), 12
    with conveyor.Pool("process", 2) as pool:
        error = pool.submit(funcs.unreadable_in_pool_on, 7, 7, pid).exception(WAIT)
        assert isinstance(error, conveyor.UnpicklingFailed)
        assert isinstance(error.__cause__, LookupError)
        seen: list[int] = []
        with pytest.raises(conveyor.UnpicklingFailed) as caught:
            for value in pool.map(
                funcs.unreadable_in_pool_on, range(n), [7] * n, [pid] * n, chunksize=n
            ):
                seen.append(value)
        assert isinstance(caught.value.__cause__, LookupError)
        stats = pool.statistics()
    assert seen == list(range(7))
    assert (stats.completed, stats.failed) == (n - 1, 2)


#: What the pool unpickled of ``Recorded`` results: (x, the mean of its data).
RECORDED: list[tuple[int, float]] = []


class Recorded:
    """A result holding an array of ``size`` floats (of 1 MiB or more, it travels out of
    band) that notes, in the process unpickling it, what it holds; with ``refuse``, its state
    is refused there."""

    def __init__(self, x: int, refuse: bool, size: int) -> None:
        self.x = x
        self.refuse = refuse
        self.data = np.full(size, x, dtype=np.float64)

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state["refuse"]:
            raise LookupError("this result refuses to be unpickled")
        self.__dict__.update(state)
        RECORDED.append((self.x, float(self.data.mean())))


def _recorded_refusing_at(x: int, bad: int, size: int) -> Recorded:
    return Recorded(x, x == bad, size)


@pytest.mark.parametrize("size", [4, 1 << 17], ids=["in-band", "out-of-band"])
@pytest.mark.parametrize("bad", [0, 2])
def test_results_sent_with_one_that_cannot_be_unpickled_keep_what_they_share_with_it(
    bad: int, size: int
) -> None:
    # At 0, the failing result is the first to carry the class, its attribute names and the
    # arrays' dtype: the others refer back to them. Large arrays come in their own buffers.
    RECORDED.clear()
    with conveyor.Pool("process", 1) as pool:
        seen: list[int] = []
        with pytest.raises(conveyor.UnpicklingFailed) as caught:
            for value in pool.map(
                _recorded_refusing_at, range(5), [bad] * 5, [size] * 5, chunksize=5
            ):
                seen.append(value.x)
        stats = pool.statistics()
    assert isinstance(caught.value.__cause__, LookupError)
    assert seen == list(range(bad))
    assert (stats.completed, stats.failed) == (4, 1)
    # Those before the failing one may be unpickled twice (whole, then one by one).
    assert set(RECORDED) == {(x, float(x)) for x in range(5) if x != bad}


@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt])
def test_system_exit_and_keyboard_interrupt_in_a_task_fail_that_task_only(
    kind: type[BaseException],
) -> None:
    with conveyor.Pool("process", 2) as pool:
        error = pool.submit(funcs.raise_base_exception_on, 1, 1, kind.__name__).exception(WAIT)
        assert type(error) is kind
        seen: list[int] = []
        with pytest.raises(kind):
            for value in pool.map(
                funcs.raise_base_exception_on, range(8), [3] * 8, [kind.__name__] * 8, chunksize=8
            ):
                seen.append(value)
        assert seen == [0, 1, 2]
        futures = [pool.submit(funcs.double, i) for i in range(4)]
        assert [f.result(WAIT) for f in futures] == [0, 2, 4, 6]
        stats = pool.statistics()
    assert (stats.completed, stats.failed) == (11, 2)


# -- a task's own exception -----------------------------------------------------------------


class LocalError(Exception):
    """Defined in this test module: workers import it by name."""


def _raise_local_error(x: int) -> None:
    raise LocalError(f"local {x}")


@EVERY_METHOD
def test_a_task_exception_is_reraised_as_itself_with_the_worker_traceback(method: str) -> None:
    class NestedError(Exception):  # a local class: it travels by value
        pass

    def raise_nested(x: int) -> None:
        raise NestedError(x)

    with conveyor.Pool("process", 2, mp_context=context(method)) as pool:
        error = pool.submit(funcs.raise_boom, 7).exception(WAIT)
        assert type(error) is funcs.Boom
        assert error.args == ("boom 7",)
        cause = error.__cause__
        assert cause is not None
        assert "raise_boom" in str(cause)
        assert 'raise Boom(f"boom {x}")' in str(cause)
        with pytest.raises(LocalError, match="local 3") as info:
            pool.submit(_raise_local_error, 3).result(WAIT)
        assert "_raise_local_error" in str(info.value.__cause__)
        nested = pool.submit(raise_nested, 5).exception(WAIT)
        assert type(nested).__name__ == "NestedError"
        assert nested.args == (5,)  # type: ignore[union-attr]
        assert "raise_nested" in str(nested.__cause__)  # type: ignore[union-attr]
        assert pool.submit(funcs.double, 1).result(WAIT) == 2


# -- initializers ---------------------------------------------------------------------------


def _submit_outcome(pool: conveyor.Pool, fn: Any, *args: Any) -> Any:
    """The call's outcome, whether the pool refused it at once or failed it later."""
    try:
        future = pool.submit(fn, *args)
    except BrokenProcessPool as exc:
        return exc
    return future.exception(WAIT) or future.result(0)


@EVERY_METHOD
def test_an_initializer_that_raises_breaks_the_pool_with_its_error(method: str) -> None:
    with conveyor.Pool(
        "process", 2, mp_context=context(method), initializer=funcs.failing_init
    ) as pool:
        errors = [_submit_outcome(pool, funcs.double, i) for i in range(3)]
        for error in errors:
            assert isinstance(error, conveyor.InitializerFailed), error
            assert isinstance(error, BrokenProcessPool)
            assert "the initializer broke" in str(error)
            assert isinstance(error.__cause__, ValueError)
        with pytest.raises(conveyor.InitializerFailed):
            pool.submit(funcs.double, 1)
        with pytest.raises(conveyor.InitializerFailed):
            list(pool.map(funcs.double, range(3)))
    assert_counts_add_up(pool.statistics())


def test_an_initializer_that_exits_breaks_the_pool_without_a_hang() -> None:
    with conveyor.Pool("process", 2, initializer=funcs.exiting_init) as pool:
        error = _submit_outcome(pool, funcs.double, 1)
        assert isinstance(error, conveyor.BrokenPool)
        assert isinstance(error, BrokenProcessPool)
        assert "exit code 3" in str(error)
        with pytest.raises(BrokenProcessPool):
            pool.submit(funcs.double, 2)


def test_terminate_is_not_held_up_by_a_large_call_for_a_worker_whose_initializer_hangs(
    started: Channel,
) -> None:
    # The call's message is far larger than a pipe: had the pool sent it to the worker while
    # the initializer ran, it would wait for the worker to read it, deaf to terminate().
    pool = conveyor.Pool("process", 1, initializer=funcs.report_and_hang, initargs=(started.path,))
    future = pool.submit(funcs.identity, list(range(300_000)))
    started.read_pids(1)
    stopper = threading.Thread(target=pool.terminate)
    stopper.start()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert future.done()


@EVERY_METHOD
def test_an_initializer_runs_once_in_every_worker(method: str) -> None:
    with conveyor.Pool(
        "process",
        2,
        mp_context=context(method),
        initializer=funcs.record_init,
        initargs=("ready",),
        max_tasks_per_worker=3,
    ) as pool:
        records = [pool.submit(funcs.init_record).result(WAIT) for _ in range(9)]
        records += list(pool.map(funcs.init_record, range(9)))
    assert all(record == ["ready"] for _, record in records), records
    assert len({pid for pid, _ in records}) >= 6  # recycled workers ran it too
    assert funcs._initialized == []  # never in the pool's own process


# -- recycling ------------------------------------------------------------------------------


@EVERY_METHOD
def test_max_tasks_per_worker_recycles_workers(method: str) -> None:
    with conveyor.Pool("process", 2, mp_context=context(method), max_tasks_per_worker=3) as pool:
        pids = [pool.submit(funcs.pid_and_value, i).result(WAIT)[0] for i in range(7)]
        results = list(pool.map(funcs.pid_and_value, range(20)))
        assert [value for _, value in results] == list(range(20))
        pids += [pid for pid, _ in results]
        stats = pool.statistics()
    per_worker = Counter(pids)
    assert len(per_worker) >= 9  # 27 calls, at most 3 each
    assert max(per_worker.values()) <= 3, per_worker
    assert (stats.completed, stats.failed) == (27, 0)


def test_recycling_and_crashes_together() -> None:
    with conveyor.Pool("process", 2, max_tasks_per_worker=2) as pool:
        futures = [
            pool.submit(funcs.crash_on, i, i if i % 4 == 0 else -1, "exit") for i in range(12)
        ]
        results = outcomes(futures)
    for i, result in enumerate(results):
        if i % 4 == 0:
            assert isinstance(result, conveyor.WorkerCrashed)
        else:
            assert result == i


# -- large data -----------------------------------------------------------------------------


def _big(kind: str) -> Any:
    data = np.random.default_rng(7).bytes(3 << 20)
    if kind == "numpy":
        return np.frombuffer(data, dtype=np.float64).copy().reshape(-1, 8)
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    return memoryview(bytearray(data))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and (a.dtype, a.shape) == (b.dtype, b.shape)
            and a.tobytes() == b.tobytes()
        )
    return type(a) is type(b) and bytes(a) == bytes(b)


@FORKING
@pytest.mark.parametrize("kind", ["numpy", "bytes", "bytearray", "memoryview"])
def test_large_data_round_trips_exactly_and_leaves_no_shared_memory(method: str, kind: str) -> None:
    data = _big(kind)
    with conveyor.Pool("process", 2, mp_context=context(method)) as pool:
        pid, back = pool.submit(funcs.pid_and_value, data).result(WAIT)
        assert _same(data, back)
        several = list(pool.map(funcs.pid_and_value, [data, data[:10], data]))
        assert all(_same(a, b) for a, (_, b) in zip([data, data[:10], data], several, strict=True))
        pids = {os.getpid(), pid} | {p for p, _ in several}
    del back, several
    assert shm_files(pids) == []


def test_large_data_on_spawn_workers() -> None:
    data = _big("numpy")
    with conveyor.Pool("process", 2, mp_context=context("spawn")) as pool:
        pid, back = pool.submit(funcs.pid_and_value, data).result(WAIT)
        assert _same(data, back)
    assert shm_files({os.getpid(), pid}) == []


def test_large_arguments_of_crashed_and_timed_out_calls_leave_no_shared_memory(
    started: Channel,
) -> None:
    data = _big("bytes")
    with conveyor.Pool("process", 2, timeout=TIMEOUT) as pool:
        error = pool.submit(funcs.exit_with, data, 3).exception(WAIT)
        assert isinstance(error, conveyor.WorkerCrashed)
        stuck = pool.submit(funcs.report_and_hang, started.path)
        (stuck_pid,) = started.read_pids(1)
        assert isinstance(stuck.exception(WAIT), conveyor.TaskTimeout)
        pid, back = pool.submit(funcs.pid_and_value, data).result(WAIT)
        assert back == data
    assert shm_files({os.getpid(), pid, stuck_pid}) == []


# -- no orphans -----------------------------------------------------------------------------

_ORPHAN_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os, sys, tempfile, threading
    import conveyor

    def meet(fifo, end):
        # Opening one end of a named pipe waits until the other end is opened: each of two
        # calls waits for the other, so they run in two workers at once.
        os.close(os.open(fifo, end))
        return os.getpid()

    def start_both(pool):
        # A pool starts workers as calls come: make it start both.
        fifo = os.path.join(tempfile.mkdtemp(dir="."), "fifo")
        os.mkfifo(fifo)
        calls = [pool.submit(meet, fifo, end) for end in (os.O_RDONLY, os.O_WRONLY)]
        assert len({call.result(60) for call in calls} - {os.getpid()}) == 2

    method, pools = sys.argv[1], int(sys.argv[2])
    context = multiprocessing.get_context(method)
    first = conveyor.Pool("process", 2, mp_context=context)
    start_both(first)
    if pools == 2:
        second = conveyor.Pool("process", 2, mp_context=context)
        start_both(second)
        # the first pool replaces a worker while the second one exists
        assert isinstance(first.submit(os._exit, 9).exception(60), conveyor.WorkerCrashed)
        assert first.submit(os.getpid).result(60) != os.getpid()
    print("ready", flush=True)
    threading.Event().wait()
    """
)


def _orphan_check(method: str, pools: int, tmp_path: Path, deadline: float) -> None:
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "wb") as err:
        parent = subprocess.Popen(
            [sys.executable, "-c", _ORPHAN_SCRIPT, method, str(pools)],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=tmp_path,
        )
    workers: list[psutil.Process] = []
    try:
        assert parent.stdout is not None
        line = read_line(parent.stdout, WAIT)
        assert line.strip() == "ready", (line, stderr.read_text())
        # Every process it started, however (workers, fork servers, ...), must go with it.
        workers = psutil.Process(parent.pid).children(recursive=True)
        pids = [worker.pid for worker in workers]
        assert len(pids) >= 2 * pools, pids
        parent.kill()
        parent.wait(WAIT)
        # The promise is about 2 s; the bound here is generous: tests do not time things.
        left = wait_gone(pids, deadline)
        assert not left, f"workers {sorted(left)} outlived their pool's process"
    finally:
        parent.kill()
        parent.wait(WAIT)
        if parent.stdout is not None:
            parent.stdout.close()
        for worker in workers:
            try:
                worker.kill()  # checks that it is still the same process first
            except psutil.NoSuchProcess:
                pass


@EVERY_METHOD
def test_workers_exit_when_the_pools_process_is_killed(method: str, tmp_path: Path) -> None:
    _orphan_check(method, 1, tmp_path, deadline=20.0)


def test_workers_of_two_fork_pools_exit_when_the_pools_process_is_killed(
    tmp_path: Path,
) -> None:
    _orphan_check("fork", 2, tmp_path, deadline=5.0)


@start_methods("forkserver", "spawn")
def test_workers_of_two_pools_exit_when_the_pools_process_is_killed(
    method: str, tmp_path: Path
) -> None:
    _orphan_check(method, 2, tmp_path, deadline=20.0)


_LEFT_OPEN_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os
    import conveyor

    pool = conveyor.Pool("process", 8, mp_context=multiprocessing.get_context("forkserver"))
    assert pool.submit(os.getpid).result(60) != os.getpid()
    # the script ends with the pool still open: the pool's exit hook stops it
    """
)


def test_a_pool_left_open_at_exit_stops_quietly(tmp_path: Path) -> None:
    # A race, so several runs: with eight workers each run shows the fault nineteen times in
    # twenty on this machine, idle or loaded.
    for _ in range(12):
        done = subprocess.run(
            [sys.executable, "-c", _LEFT_OPEN_SCRIPT],
            capture_output=True,
            cwd=tmp_path,
            timeout=WAIT,
            check=False,
        )
        assert (done.returncode, done.stderr.decode()) == (0, "")


def test_shutdown_leaves_no_worker_and_no_thread() -> None:
    with conveyor.Pool("process", 2) as pool:
        pids = set(pool.map(funcs.pid, range(50)))
    assert not wait_gone(pids)
    assert not [t for t in threading.enumerate() if t.name.startswith("conveyor-")]
