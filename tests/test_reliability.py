"""The pool's promises around its own bookkeeping, on both backends.

Leaving a map early and stopping the pool ends (nothing waits for batches that never start);
every call is counted once; the pool keeps no reference to a call's function, arguments or
result once the caller has dropped them; a slow done callback does not stall the pool.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import threading
import weakref
from collections.abc import Callable
from typing import Any

import _process_funcs as funcs
import pytest
from _process_funcs import WAIT, Channel

import conveyor

BACKENDS = ["thread", "process"]


def _watch(obj: object) -> threading.Event:
    """An event set once ``obj`` is freed."""
    freed = threading.Event()
    _watched.append(weakref.ref(obj, lambda _: freed.set()))
    return freed


_watched: list[weakref.ref[Any]] = []


def _freed(event: threading.Event) -> bool:
    """Whether the object ``event`` watches is freed: at once, or once another thread lets go
    of it (a worker or dispatcher thread may still be leaving the function that handled it)."""
    gc.collect()
    return event.wait(WAIT)


def _ends_within(action: Callable[[], object], timeout: float = WAIT) -> bool:
    """Run ``action`` on a thread of its own; whether it returned within ``timeout``."""
    done = threading.Event()

    def run() -> None:
        action()
        done.set()

    threading.Thread(target=run, daemon=True, name="ends-within").start()
    return done.wait(timeout)


# -- leaving a map early, then stopping ------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_terminate_after_leaving_an_imap_early_returns(backend: str) -> None:
    pool = conveyor.Pool(backend, 2)
    it = pool.imap(funcs.sleep_then_pid, [0.002] * 1000)
    next(it)

    def stop() -> None:
        pool.terminate()
        pool.join()

    assert _ends_within(stop)
    del it


@pytest.mark.parametrize("backend", BACKENDS)
def test_terminate_after_breaking_out_of_a_map_returns(backend: str) -> None:
    pool = conveyor.Pool(backend, 2)
    for _ in pool.map(funcs.sleep_then_pid, [0.002] * 1000):
        break  # the iterator is dropped here: it cancels what it queued
    assert _ends_within(lambda: (pool.terminate(), pool.join()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shutdown_cancelling_futures_after_taking_one_result_of_a_map_returns(
    backend: str,
) -> None:
    pool = conveyor.Pool(backend, 2)
    assert isinstance(next(iter(pool.map(funcs.sleep_then_pid, [0.002] * 1000))), int)
    assert _ends_within(lambda: pool.shutdown(cancel_futures=True))
    stats = pool.statistics()
    assert stats.completed + stats.failed + stats.cancelled == stats.submitted


@pytest.mark.parametrize("executor", ["ThreadPoolExecutor", "ProcessPoolExecutor"])
def test_a_drop_in_shut_down_with_cancel_futures_after_one_result_of_map_returns(
    executor: str,
) -> None:
    pool = getattr(conveyor, executor)(max_workers=2)
    results = pool.map(funcs.sleep_then_pid, [0.002] * 200)
    assert isinstance(next(results), int)
    assert _ends_within(lambda: pool.shutdown(cancel_futures=True))
    del results


# -- counting every call once --------------------------------------------------------------


def test_a_map_batch_cancelled_by_leaving_early_and_then_broken_counts_once() -> None:
    gate = threading.Event()

    def initializer() -> None:
        assert gate.wait(WAIT)
        raise RuntimeError("the initializer fails")

    pool = conveyor.Pool("thread", 1, initializer=initializer)
    it = pool.imap(abs, range(10), chunksize=5)  # queued: no worker is ready yet
    it.close()  # type: ignore[attr-defined]
    gate.set()  # the pool breaks now...
    pool.shutdown()  # ... and has once its worker has ended
    with pytest.raises(conveyor.InitializerFailed):
        pool.submit(abs, 1)
    stats = pool.statistics()
    assert stats.submitted == 10
    assert (stats.completed, stats.failed, stats.cancelled) == (0, 0, 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pending_counts_calls_not_started(backend: str, started: Channel, release: Channel) -> None:
    with conveyor.Pool(backend, 1) as pool:
        args = [(started.path, release.path, i == 0) for i in range(10)]
        # One batch of ten calls, on the only worker: none waits for a worker.
        results = pool.imap(_maybe_block_star, args, chunksize=10)
        started.read_line()
        stats = pool.statistics()
        assert (stats.busy, stats.pending, stats.submitted) == (1, 0, 10)
        queued = [pool.submit(abs, -i) for i in range(3)]
        assert pool.statistics().pending == 3
        release.release(1)
        assert len(list(results)) == 10
        assert [f.result(WAIT) for f in queued] == [0, 1, 2]
        stats = pool.statistics()
    assert (stats.pending, stats.completed, stats.submitted) == (0, 13, 13)


def _maybe_block_star(args: tuple[str, str, bool]) -> int:
    return funcs.maybe_block(*args)


# -- no references kept ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_map_keeps_no_reference_to_results_it_handed_out(backend: str) -> None:
    with conveyor.Pool(backend, 2) as pool:
        for obj in pool.map(funcs.make_dummy, range(50)):
            freed = _watch(obj)
            del obj
            assert _freed(freed)


@pytest.mark.parametrize("executor", ["ThreadPoolExecutor", "ProcessPoolExecutor"])
def test_a_drop_in_map_keeps_no_reference_to_results_it_handed_out(executor: str) -> None:
    with getattr(conveyor, executor)(max_workers=2) as pool:
        for obj in pool.map(funcs.make_dummy, range(10)):
            freed = _watch(obj)
            del obj
            assert _freed(freed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_pool_keeps_no_reference_to_a_finished_calls_function(backend: str) -> None:
    with conveyor.Pool(backend, 2) as pool:
        obj = funcs.Dummy()
        freed = _watch(obj)
        future = pool.submit(obj.method, 1)
        assert future.result(WAIT) == 2
        assert list(pool.map(obj.method, range(100))) == list(range(1, 101))
        del obj
        assert _freed(freed)  # while the pool and the future live on
        assert future.result(0) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_pool_keeps_no_reference_to_a_finished_calls_arguments_or_result(
    backend: str,
) -> None:
    with conveyor.Pool(backend, 2) as pool:
        arg = funcs.Dummy()
        arg_freed = _watch(arg)
        future = pool.submit(funcs.identity, arg)
        result = future.result(WAIT)
        result_freed = _watch(result)
        del arg, result, future
        assert _freed(arg_freed)
        assert _freed(result_freed)


# -- user code does not stall the pool -----------------------------------------------------


def test_a_slow_done_callback_does_not_stall_the_process_pool(
    started: Channel, release: Channel
) -> None:
    other_done = threading.Event()
    callback_saw: list[bool] = []

    def slow_callback(_: cf.Future[Any]) -> None:
        callback_saw.append(other_done.wait(2 * WAIT))

    with conveyor.Pool("process", 2) as pool:
        assert pool.submit(funcs.double, 1).result(WAIT) == 2  # a worker is ready
        first = pool.submit(funcs.report_and_wait, started.path, release.path, "first")
        started.read_line()
        first.add_done_callback(slow_callback)  # runs where the pool's loop ends the call
        release.release(1)
        done, _ = cf.wait([first], WAIT)  # (waits without running the pool's loop)
        assert done == {first}
        # The callback may be running now; the pool must go on meanwhile.
        assert pool.submit(funcs.double, 21).result(WAIT) == 42
        other_done.set()
    assert callback_saw == [True]


def test_a_result_slow_to_unpickle_does_not_stall_the_process_pool(
    started: Channel, release: Channel
) -> None:
    # The dispatcher thread reads the result (cf.wait runs none of the pool's loop): its
    # unpickling must hold up neither another call nor a deadline.
    with conveyor.Pool("process", 2, timeout=3.0) as pool:
        assert pool.submit(funcs.double, 1).result(WAIT) == 2  # a worker is ready
        try:
            slow = pool.submit(funcs.slow_to_unpickle, started.path, release.path, "slow")
            assert started.read_line() == "unpickling"
            other = pool.submit(funcs.double, 21)
            hung = pool.submit(funcs.never_returns)
            done, _ = cf.wait([other, hung], WAIT)
            assert done == {other, hung}
            assert other.result(0) == 42
            assert isinstance(hung.exception(0), conveyor.TaskTimeout)
            assert not slow.done()  # its unpickling still waits for us
        finally:
            release.release()
        assert slow.result(WAIT) == "slow"


def test_a_result_slow_to_unpickle_delays_only_the_thread_that_waits_for_it(
    started: Channel, release: Channel
) -> None:
    # The thread that waits for the result reads it itself (the dispatcher thread is
    # parked): it unpickles it once it has let go of the pool's loop.
    with conveyor.Pool("process", 2) as pool:
        assert pool.submit(funcs.double, 1).result(WAIT) == 2  # a worker is ready
        outcome: list[Any] = []

        def wait_for_slow() -> None:
            future = pool.submit(funcs.slow_to_unpickle, started.path, release.path, "slow")
            outcome.append(future.result(WAIT))

        waiter = threading.Thread(target=wait_for_slow, name="waiter")
        waiter.start()
        try:
            assert started.read_line() == "unpickling"
            assert pool.submit(funcs.double, 21).result(WAIT) == 42
            assert not outcome
        finally:
            release.release()
            waiter.join(WAIT)
        assert outcome == ["slow"]
