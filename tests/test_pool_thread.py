"""``conveyor.Pool`` on the thread backend: submitting, mapping, stopping, faults and counters.

Calls that must stay busy wait on a ``threading.Event`` that the test sets before it ends, so
no thread outlives its test. Every wait has a generous bound (``WAIT``) instead of a sleep.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import gc
import inspect
import itertools
import multiprocessing
import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures.thread import BrokenThreadPool
from typing import Any

import pytest

import conveyor

#: Upper bound on every wait for something that should happen promptly.
WAIT = 30.0
#: How long a test watches for something that must not happen (a blocked call returning).
GLANCE = 0.2


class Blocker:
    """A call that blocks until ``release()``; ``started`` is set once it runs."""

    def __init__(self, value: object = "released") -> None:
        self.value = value
        self.started = threading.Event()
        self.release_event = threading.Event()
        self.finished = threading.Event()

    def __call__(self) -> object:
        self.started.set()
        try:
            if not self.release_event.wait(WAIT):
                raise AssertionError("the test never released this call")
            return self.value
        finally:
            self.finished.set()

    def release(self) -> None:
        self.release_event.set()


class Recorder:
    """Records, thread-safely, every argument it was called with."""

    def __init__(self, fn: Callable[[Any], Any] = lambda x: x) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self.calls: list[Any] = []

    def __call__(self, x: Any) -> Any:
        with self._lock:
            self.calls.append(x)
        return self._fn(x)


def counting(source: Iterator[Any], pulled: list[Any]) -> Iterator[Any]:
    """Yield from ``source``, appending each item to ``pulled`` as it is taken."""
    for item in source:
        pulled.append(item)
        yield item


def outcome_counts(stats: conveyor.PoolStatistics) -> int:
    return stats.completed + stats.failed + stats.cancelled


@pytest.fixture
def old_garbage_collected() -> None:
    """Collect what earlier tests left behind, so that a ``gc.collect()`` in this test meets
    only this test's garbage (an unclosed file of another test would warn here otherwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


# -- construction ---------------------------------------------------------------------------


def test_signature_matches_the_specification() -> None:
    params = inspect.signature(conveyor.Pool).parameters
    assert list(params)[:2] == ["backend", "workers"]
    assert params["backend"].default == "thread"
    assert params["workers"].default is None
    keyword_only = {
        "max_pending": None,
        "timeout": None,
        "retries": 0,
        "retry_on": (Exception,),
        "initializer": None,
        "initargs": (),
    }
    for name, default in keyword_only.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name


def test_default_worker_count_is_the_stdlib_thread_default() -> None:
    cpus = getattr(os, "process_cpu_count", os.cpu_count)() or 1
    expected = min(32, cpus + 4)
    with conveyor.Pool() as pool:
        assert pool.workers == expected
        assert pool.statistics().workers == expected


def test_backend_defaults_to_thread() -> None:
    with conveyor.Pool(workers=1) as pool:
        pid, ident = pool.submit(lambda: (os.getpid(), threading.get_ident())).result(WAIT)
    assert pid == os.getpid()
    assert ident != threading.get_ident()


def test_thread_name_prefix_names_the_workers() -> None:
    with conveyor.Pool("thread", 2, thread_name_prefix="pfx-test") as pool:
        names = {pool.submit(lambda: threading.current_thread().name).result(WAIT)}
        names |= set(pool.map(lambda _: threading.current_thread().name, range(20)))
    assert names
    assert all(name.startswith("pfx-test") for name in names), names


def test_calls_run_on_at_most_workers_threads_at_once() -> None:
    lock = threading.Lock()
    running = 0
    peak = 0
    barrier = threading.Barrier(3, timeout=WAIT)

    def call(_: int) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            barrier.wait()  # three at a time: all three workers are needed
        finally:
            with lock:
                running -= 1

    with conveyor.Pool(workers=3) as pool:
        futures = [pool.submit(call, i) for i in range(12)]
        for future in futures:
            assert future.result(WAIT) is None
    assert peak == 3


# -- bad arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"workers": 0}, ValueError, "workers"),
        ({"workers": -3}, ValueError, "workers"),
        ({"workers": 2.5}, TypeError, "workers"),
        ({"workers": "4"}, TypeError, "workers"),
        ({"workers": True}, TypeError, "workers"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"timeout": "soon"}, TypeError, "timeout"),
        ({"retries": -1}, ValueError, "retries"),
        ({"retries": 1.5}, TypeError, "retries"),
        ({"max_pending": 0}, ValueError, "max_pending"),
        ({"retry_on": ValueError("not a class")}, TypeError, "retry_on"),
        ({"retry_on": (ValueError, int)}, TypeError, "retry_on"),
        ({"initializer": 42}, TypeError, "initializer"),
        ({"no_such_option": 1}, TypeError, "no_such_option"),
    ],
)
def test_bad_constructor_arguments_are_refused_by_name(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        conveyor.Pool(**kwargs)


@pytest.mark.parametrize("backend", ["gpu", "threads", "", None, 3])
def test_unknown_backend_names_the_known_ones(backend: object) -> None:
    with pytest.raises(ValueError, match="backend") as info:
        conveyor.Pool(backend)  # type: ignore[arg-type]
    assert "'thread'" in str(info.value)
    assert "'process'" in str(info.value)


def test_bad_call_arguments_are_refused_at_the_call() -> None:
    with conveyor.Pool(workers=1) as pool:
        with pytest.raises(TypeError, match="fn"):
            pool.submit(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="fn"):
            pool.submit_nowait("abs")  # type: ignore[arg-type]
        # map, imap and friends check at the call, not when first iterated
        with pytest.raises(TypeError, match="fn"):
            pool.map(None, [1])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="fn"):
            pool.imap(None, [1])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="fn"):
            pool.imap_unordered(None, [1])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="fn"):
            pool.starmap(None, [(1,)])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="fn"):
            pool.apply(None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="fn"):
            pool.apply_async(None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            pool.map(abs, [1], timeout=-0.5)
        with pytest.raises(ValueError, match="chunksize"):
            pool.map(abs, [1], chunksize=0)
        with pytest.raises(ValueError, match="buffersize"):
            pool.map(abs, [1], buffersize=0)
        with pytest.raises(ValueError, match="chunksize"):
            pool.imap(abs, [1], chunksize=0)
        with pytest.raises(TypeError, match="callback"):
            pool.apply_async(abs, (1,), callback=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="error_callback"):
            pool.apply_async(abs, (1,), error_callback=1)  # type: ignore[arg-type]
        # nothing of the refused calls was counted, and the pool still works
        assert pool.statistics().submitted == 0
        assert pool.submit(abs, -1).result(WAIT) == 1


# -- submit ---------------------------------------------------------------------------------


def test_submit_returns_a_standard_future_with_the_result() -> None:
    with conveyor.Pool(workers=2) as pool:
        future = pool.submit(divmod, 17, 5)
        assert type(future) is cf.Future
        assert future.result(WAIT) == (3, 2)
        # fn is positional-only: a keyword called "fn" goes to the call
        assert pool.submit(dict, fn=1, x=2).result(WAIT) == {"fn": 1, "x": 2}


def test_submit_after_shutdown_raises_runtime_error() -> None:
    pool = conveyor.Pool(workers=1)
    assert pool.submit(abs, -2).result(WAIT) == 2
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(abs, -1)
    with pytest.raises(RuntimeError):
        pool.submit_nowait(abs, -1)
    with pytest.raises(RuntimeError):
        list(pool.map(abs, [1, 2]))
    with pytest.raises(RuntimeError):
        pool.apply_async(abs, (1,))


def test_submit_blocks_at_max_pending_and_submit_nowait_raises_pool_full() -> None:
    blocker = Blocker()
    returned = threading.Event()
    late: list[cf.Future[int]] = []

    def submit_one_more() -> None:
        late.append(pool.submit(abs, -4))
        returned.set()

    with conveyor.Pool(workers=1, max_pending=2) as pool:
        running = pool.submit(blocker)
        assert blocker.started.wait(WAIT)
        queued = [pool.submit(abs, -1), pool.submit_nowait(abs, -2)]  # the two places
        with pytest.raises(conveyor.PoolFull):
            pool.submit_nowait(abs, -3)
        assert isinstance(conveyor.PoolFull(), RuntimeError)
        submitter = threading.Thread(target=submit_one_more)
        submitter.start()
        try:
            assert not returned.wait(GLANCE), "submit() returned while the pool was full"
            assert pool.statistics().submitted == 3
        finally:
            blocker.release()
        assert returned.wait(WAIT)
        submitter.join(WAIT)
        assert running.result(WAIT) == "released"
        assert [f.result(WAIT) for f in queued] == [1, 2]
        assert late[0].result(WAIT) == 4
    assert pool.statistics().submitted == 4


def test_shutdown_wakes_a_submit_blocked_at_max_pending() -> None:
    blocker = Blocker()
    errors: list[BaseException] = []
    returned = threading.Event()

    def submit_one_more() -> None:
        try:
            pool.submit(abs, -9)
        except BaseException as exc:
            errors.append(exc)
        returned.set()

    pool = conveyor.Pool(workers=1, max_pending=1)
    try:
        pool.submit(blocker)
        assert blocker.started.wait(WAIT)
        queued = pool.submit(abs, -1)
        submitter = threading.Thread(target=submit_one_more)
        submitter.start()
        assert not returned.wait(GLANCE)
        pool.shutdown(wait=False)
        assert returned.wait(WAIT)
        submitter.join(WAIT)
        assert len(errors) == 1
        assert isinstance(errors[0], RuntimeError)
        assert not isinstance(errors[0], conveyor.PoolFull)
    finally:
        blocker.release()
        pool.shutdown()
    assert queued.result(WAIT) == 1  # shutdown without cancel_futures lets it run


def test_a_pending_place_frees_when_a_queued_future_is_cancelled() -> None:
    blocker = Blocker()
    with conveyor.Pool(workers=1, max_pending=1) as pool:
        pool.submit(blocker)
        assert blocker.started.wait(WAIT)
        queued = pool.submit(abs, -1)
        with pytest.raises(conveyor.PoolFull):
            pool.submit_nowait(abs, -2)
        assert queued.cancel()
        blocker.release()
        # the cancelled call gives its place back once the worker drops it
        late = pool.submit(abs, -3)
        assert late.result(WAIT) == 3
        assert queued.cancelled()


def test_futures_work_with_as_completed_wait_and_asyncio() -> None:
    blocker = Blocker(value="slow")
    with conveyor.Pool(workers=2) as pool:
        slow = pool.submit(blocker)
        fast = pool.submit(pow, 2, 5)
        try:
            done, not_done = cf.wait([slow, fast], timeout=WAIT, return_when=cf.FIRST_COMPLETED)
            assert done == {fast}
            assert not_done == {slow}
            order = []
            for future in cf.as_completed([slow, fast], timeout=WAIT):
                order.append(future.result())
                blocker.release()
            assert order == [32, "slow"]
        finally:
            blocker.release()

        async def main() -> list[Any]:
            return await asyncio.gather(
                asyncio.wrap_future(pool.submit(pow, 3, 3)),
                asyncio.wrap_future(pool.submit(str.upper, "ok")),
            )

        assert asyncio.run(main()) == [27, "OK"]
        done, not_done = cf.wait(
            [pool.submit(abs, -i) for i in range(10)], timeout=WAIT, return_when=cf.ALL_COMPLETED
        )
        assert not not_done
        assert sorted(f.result() for f in done) == list(range(10))


def test_done_callbacks_run_once_per_future() -> None:
    seen: Counter[int] = Counter()
    lock = threading.Lock()

    def note(future: cf.Future[int]) -> None:
        with lock:
            seen[future.result()] += 1

    with conveyor.Pool(workers=3) as pool:
        for i in range(50):
            pool.submit(abs, i).add_done_callback(note)
    assert seen == Counter(range(50))


# -- map ------------------------------------------------------------------------------------


def test_map_yields_in_input_order_even_when_calls_end_out_of_order() -> None:
    last_done = threading.Event()

    def call(x: int) -> int:
        # the first item ends only after the last one has ended
        if x == 0 and not last_done.wait(WAIT):
            raise AssertionError("the last item never ran")
        if x == 3:
            last_done.set()
        return 10 * x

    with conveyor.Pool(workers=4) as pool:
        assert list(pool.map(call, range(4), chunksize=1)) == [0, 10, 20, 30]


def test_map_over_several_iterables_stops_at_the_shortest() -> None:
    with conveyor.Pool(workers=2) as pool:
        assert list(pool.map(pow, [2, 3, 4], [5, 2])) == [32, 9]
        assert list(pool.map(pow, [], [])) == []
        with pytest.raises(TypeError):
            pool.map(abs)


def test_map_of_many_items_matches_the_builtin() -> None:
    with conveyor.Pool(workers=4) as pool:
        assert list(pool.map(str, range(20000))) == list(map(str, range(20000)))


def test_map_raises_the_first_failing_item_at_its_position() -> None:
    later_failed = threading.Event()

    def call(x: int) -> int:
        if x == 5:
            # let item 8 fail first: its error must still not be the one raised
            if not later_failed.wait(WAIT):
                raise AssertionError("item 8 never ran")
            raise ValueError(x)
        if x == 8:
            later_failed.set()
            raise KeyError(x)
        return x

    seen: list[int] = []
    with conveyor.Pool(workers=3) as pool:
        with pytest.raises(ValueError) as info:
            for value in pool.map(call, range(20), chunksize=1):
                seen.append(value)
        assert info.value.args == (5,)
    assert seen == [0, 1, 2, 3, 4]


def test_map_raises_an_input_error_after_the_results_before_it() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        yield 3
        raise LookupError("the input broke")

    seen: list[int] = []
    with conveyor.Pool(workers=2) as pool:
        with pytest.raises(LookupError, match="the input broke"):
            for value in pool.map(lambda x: -x, source()):
                seen.append(value)
        assert seen == [-1, -2, -3]
        # the pool is still fine
        assert list(pool.map(abs, [-1])) == [1]


def test_map_pulls_input_only_as_capacity_frees() -> None:
    pulled: list[int] = []
    gate = threading.Event()

    def call(x: int) -> int:
        if not gate.wait(WAIT):
            raise AssertionError("never released")
        return x * 2

    with conveyor.Pool(workers=2) as pool:
        results = pool.map(call, counting(iter(range(1000)), pulled), buffersize=3)
        try:
            # workers are blocked: the map holds at most its buffer of inputs
            assert len(pulled) <= 3
            stats = pool.statistics()
            assert stats.submitted <= 3
        finally:
            gate.set()
        consumed = list(itertools.islice(results, 10))
        assert consumed == [2 * x for x in range(10)]
        # consumed items, the batch being yielded from, and at most a buffer more
        assert len(pulled) <= 10 + 3 + 3
        assert list(results) == [2 * x for x in range(10, 1000)]
    assert pulled == list(range(1000))


def test_map_over_an_endless_generator_can_be_consumed_in_part() -> None:
    pulled: list[int] = []
    with conveyor.Pool(workers=3) as pool:
        results = pool.map(lambda x: x * x, counting(itertools.count(), pulled), buffersize=16)
        first = list(itertools.islice(results, 200))
        results.close()
        assert first == [x * x for x in range(200)]
        assert len(pulled) <= 200 + 2 * 16
        # and with the default window too: it ends, and gives the right values
        default = pool.map(lambda x: x + 1, itertools.count())
        assert list(itertools.islice(default, 1000)) == list(range(1, 1001))
        default.close()


@pytest.mark.parametrize("leave", ["break", "close", "del"])
@pytest.mark.usefixtures("old_garbage_collected")
def test_leaving_a_map_early_cancels_what_it_queued(leave: str) -> None:
    blocker = Blocker()
    ran = Recorder()

    def call(x: int) -> int:
        ran(x)
        if x == 1:
            blocker()
        return x

    with conveyor.Pool(workers=1) as pool:
        try:
            if leave == "break":
                for value in pool.map(call, range(100), chunksize=1, buffersize=50):
                    assert value == 0
                    break
            else:
                results = pool.map(call, range(100), chunksize=1, buffersize=50)
                assert next(results) == 0
                if leave == "close":
                    results.close()
                    with pytest.raises(StopIteration):
                        next(results)
                else:
                    del results
                    gc.collect()
            # item 1 holds the only worker (or was cancelled before it started): what the
            # map queued behind it is cancelled at once, without waiting for the worker
            stats = pool.statistics()
            assert stats.cancelled >= 1
        finally:
            blocker.release()
        assert pool.submit(abs, -7).result(WAIT) == 7
    stats = pool.statistics()
    assert set(ran.calls) <= {0, 1}
    assert stats.submitted < 100  # lazy: the map never queued all of its input
    # every call the map queued either ran or was cancelled (the last call is abs(-7))
    assert stats.cancelled == stats.submitted - 1 - len(ran.calls)
    assert outcome_counts(stats) == stats.submitted


@pytest.mark.usefixtures("old_garbage_collected")
def test_a_map_dropped_before_it_was_read_cancels_what_it_queued() -> None:
    blocker = Blocker()
    ran = Recorder()

    def call(x: int) -> int:
        ran(x)
        if x == 0:
            blocker()
        return x

    with conveyor.Pool(workers=1) as pool:
        try:
            results = pool.map(call, range(100), chunksize=1)
            assert pool.statistics().submitted > 1  # the map started at the call
            del results
            gc.collect()
            stats = pool.statistics()
            assert stats.cancelled >= 1
        finally:
            blocker.release()
    stats = pool.statistics()
    assert set(ran.calls) <= {0}
    assert stats.cancelled == stats.submitted - len(ran.calls)


def test_map_timeout_raises_timeout_error() -> None:
    blocker = Blocker()
    with conveyor.Pool(workers=1) as pool:
        try:
            results = pool.map(lambda _: blocker(), [0, 1], timeout=0.05)
            with pytest.raises(TimeoutError) as raised:
                next(results)
            # Before Python 3.11 the two were different classes: old except clauses catch it.
            assert isinstance(raised.value, cf.TimeoutError)
        finally:
            blocker.release()


class _Clock:
    """A stand-in for the ``time`` module inside ``conveyor._map``: a clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0

    def monotonic(self) -> float:
        self.reads += 1
        return self.now


def test_map_timeout_counts_from_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    import conveyor._map

    clock = _Clock()
    monkeypatch.setattr(conveyor._map, "time", clock)
    blocker = Blocker()
    ran = Recorder()

    def call(x: int) -> int:
        ran(x)
        if x == 1:
            blocker()
        return x

    with conveyor.Pool(workers=1) as pool:
        try:
            results = pool.map(call, range(3), timeout=500, chunksize=1)
            assert clock.reads >= 1
            clock.now = 400.0  # time passes before the caller asks for anything
            assert next(results) == 0  # 100 s are left: the first result is yielded
            clock.now = 600.0
            # the deadline (500 s after the call) has passed; counted from the first next()
            # or from each next(), this would wait for real instead
            with pytest.raises(TimeoutError):
                next(results)
            with pytest.raises(StopIteration):
                next(results)
        finally:
            blocker.release()
    assert 2 not in ran.calls  # queued behind the blocked call and cancelled
    assert pool.statistics().cancelled >= 1


# -- imap, imap_unordered, starmap, apply ---------------------------------------------------


def test_imap_is_lazy_and_ordered() -> None:
    pulled: list[int] = []
    with conveyor.Pool(workers=2) as pool:
        results = pool.imap(lambda x: x * 3, counting(iter(range(100)), pulled), buffersize=4)
        assert len(pulled) <= 4
        assert list(results) == [x * 3 for x in range(100)]
        assert list(pool.imap(abs, [-1, -2], chunksize=2)) == [1, 2]


def test_imap_unordered_yields_in_completion_order() -> None:
    blocker = Blocker(value=0)

    def call(x: int) -> int:
        if x == 0:
            return blocker()  # type: ignore[return-value]
        return x

    seen: list[int] = []
    with conveyor.Pool(workers=2) as pool:
        try:
            for value in pool.imap_unordered(call, [0, 1], chunksize=1):
                seen.append(value)
                blocker.release()  # item 0 may end only once item 1 was yielded
        finally:
            blocker.release()
    assert seen == [1, 0]


def test_imap_unordered_gives_every_result_once() -> None:
    with conveyor.Pool(workers=4) as pool:
        results = list(pool.imap_unordered(lambda x: x * x, range(3000)))
    assert sorted(results) == [x * x for x in range(3000)]


def test_imap_unordered_raises_a_task_error() -> None:
    def call(x: int) -> int:
        if x == 7:
            raise ArithmeticError("seven")
        return x

    with conveyor.Pool(workers=2) as pool, pytest.raises(ArithmeticError, match="seven"):
        list(pool.imap_unordered(call, range(20)))


def test_starmap_returns_a_list() -> None:
    with conveyor.Pool(workers=2) as pool:
        result = pool.starmap(pow, iter([(2, 3), (3, 2), (10, 0)]))
        assert result == [8, 9, 1]
        assert type(result) is list
        assert pool.starmap(max, []) == []
        with pytest.raises(ZeroDivisionError):
            pool.starmap(divmod, [(1, 1), (1, 0)])


def test_apply_waits_and_returns_the_result() -> None:
    with conveyor.Pool(workers=1) as pool:
        assert pool.apply(divmod, (7, 2)) == (3, 1)
        assert pool.apply(int, ("ff",), {"base": 16}) == 255
        assert pool.apply(dict, kwds={"a": 1}) == {"a": 1}
        with pytest.raises(ZeroDivisionError):
            pool.apply(divmod, (1, 0))


# -- apply_async ----------------------------------------------------------------------------


def test_apply_async_result_before_and_after_the_call_ends() -> None:
    blocker = Blocker(value=99)
    results: list[Any] = []
    with conveyor.Pool(workers=1) as pool:
        try:
            async_result = pool.apply_async(blocker, callback=results.append)
            assert isinstance(async_result, conveyor.AsyncResult)
            assert blocker.started.wait(WAIT)
            assert not async_result.ready()
            with pytest.raises(ValueError):
                async_result.successful()
            with pytest.raises(multiprocessing.TimeoutError):
                async_result.get(timeout=0.01)
            assert async_result.wait(0.01) is None
            assert not async_result.ready()
        finally:
            blocker.release()
        async_result.wait(WAIT)
        assert async_result.ready()
        assert async_result.successful()
        assert async_result.get(timeout=WAIT) == 99
        assert results == [99]
        assert isinstance(async_result.future, cf.Future)


def test_apply_async_passes_args_and_kwds() -> None:
    with conveyor.Pool(workers=1) as pool:
        assert pool.apply_async(int, ("11",), {"base": 2}).get(WAIT) == 3
        assert pool.apply_async(max, [4, 9]).get(WAIT) == 9


def test_apply_async_error_goes_to_error_callback_and_get() -> None:
    errors: list[BaseException] = []
    called: list[Any] = []
    problem = OSError(5, "disk on fire")

    def fail() -> None:
        raise problem

    with conveyor.Pool(workers=1) as pool:
        async_result = pool.apply_async(fail, callback=called.append, error_callback=errors.append)
        with pytest.raises(OSError) as info:
            async_result.get(WAIT)
        assert info.value is problem
        assert async_result.ready()
        assert not async_result.successful()
    assert errors == [problem]
    assert called == []


def test_a_failing_callback_makes_get_raise_its_error() -> None:
    oops = RuntimeError("callback broke")

    def bad_callback(_: object) -> None:
        raise oops

    with conveyor.Pool(workers=1) as pool:
        async_result = pool.apply_async(abs, (-1,), callback=bad_callback)
        with pytest.raises(RuntimeError) as info:
            async_result.get(WAIT)
        assert info.value is oops
        # the pool was not disturbed
        assert pool.apply(abs, (-2,)) == 2


def test_a_failing_error_callback_makes_get_raise_its_error() -> None:
    def fail() -> None:
        raise ValueError("task")

    def bad_error_callback(_: BaseException) -> None:
        raise KeyError("error callback")

    with conveyor.Pool(workers=1) as pool:
        async_result = pool.apply_async(fail, error_callback=bad_error_callback)
        with pytest.raises(KeyError, match="error callback"):
            async_result.get(WAIT)


# -- close, join, terminate, shutdown -------------------------------------------------------


def test_join_needs_close_first() -> None:
    pool = conveyor.Pool(workers=1)
    try:
        assert pool.submit(abs, -1).result(WAIT) == 1
        with pytest.raises(ValueError, match="close"):
            pool.join()
    finally:
        pool.shutdown()


def test_close_lets_queued_calls_run_and_join_waits_for_the_workers() -> None:
    blocker = Blocker()
    pool = conveyor.Pool("thread", 1, thread_name_prefix="close-join-test")
    try:
        first = pool.submit(blocker)
        assert blocker.started.wait(WAIT)
        queued = [pool.submit(abs, -i) for i in range(5)]
        pool.close()
        with pytest.raises(RuntimeError):
            pool.submit(abs, 1)
        assert not any(f.done() for f in queued)
    finally:
        blocker.release()
    pool.join()
    assert first.result(0) == "released"
    assert [f.result(0) for f in queued] == [0, 1, 2, 3, 4]
    alive = [t.name for t in threading.enumerate() if t.name.startswith("close-join-test")]
    assert alive == []


def test_terminate_cancels_queued_calls_and_stops_the_pool() -> None:
    blocker = Blocker()
    pool = conveyor.Pool("thread", 1, thread_name_prefix="terminate-test")
    terminator = threading.Thread(target=pool.terminate)
    try:
        running = pool.submit(blocker)
        assert blocker.started.wait(WAIT)
        queued = [pool.submit(abs, -i) for i in range(5)]
        terminator.start()
        _, not_done = cf.wait(queued, timeout=WAIT)
        assert not not_done
        assert all(f.cancelled() for f in queued)
        with pytest.raises(RuntimeError):
            pool.submit(abs, 1)
    finally:
        blocker.release()
    terminator.join(WAIT)
    assert not terminator.is_alive()
    # a thread cannot be killed: the running call finished normally
    assert running.result(0) == "released"
    stats = pool.statistics()
    assert stats.cancelled == 5
    assert stats.completed == 1
    alive = [t.name for t in threading.enumerate() if t.name.startswith("terminate-test")]
    assert alive == []


def test_shutdown_cancel_futures_cancels_queued_and_lets_running_calls_finish() -> None:
    blocker = Blocker()
    pool = conveyor.Pool(workers=1)
    try:
        running = pool.submit(blocker)
        assert blocker.started.wait(WAIT)
        queued = [pool.submit(abs, -i) for i in range(5)]
        pool.shutdown(wait=False, cancel_futures=True)
        assert all(f.cancelled() for f in queued)
        assert not running.done()
        with pytest.raises(RuntimeError):
            pool.submit(abs, 1)
    finally:
        blocker.release()
    assert running.result(WAIT) == "released"
    pool.shutdown(wait=True)
    stats = pool.statistics()
    assert (stats.submitted, stats.completed, stats.cancelled) == (6, 1, 5)


@pytest.mark.parametrize("stop", ["shutdown", "terminate"])
def test_futures_cancelled_by_the_pool_wake_wait_and_as_completed(stop: str) -> None:
    blocker = Blocker()
    pool = conveyor.Pool(workers=1)
    try:
        running = pool.submit(blocker)
        assert blocker.started.wait(WAIT)
        queued = [pool.submit(abs, -i) for i in range(3)]
        waiter_result: list[set[cf.Future[int]]] = []

        def wait_for_queued() -> None:
            done, _ = cf.wait(queued, timeout=WAIT)
            waiter_result.append(done)

        waiter = threading.Thread(target=wait_for_queued)
        waiter.start()
        stopper = threading.Thread(
            target=pool.terminate
            if stop == "terminate"
            else lambda: pool.shutdown(wait=False, cancel_futures=True)
        )
        stopper.start()
        # both a wait() that started before the cancellation and one that starts after it
        assert len(list(cf.as_completed(queued, timeout=WAIT))) == 3
        waiter.join(WAIT)
        assert waiter_result == [set(queued)]
        assert all(f.cancelled() for f in queued)
    finally:
        blocker.release()
    stopper.join(WAIT)
    assert running.result(WAIT) == "released"
    pool.shutdown()


@pytest.mark.parametrize("stop", ["shutdown", "terminate"])
def test_a_map_read_on_another_thread_ends_when_its_queued_calls_are_cancelled(
    stop: str,
) -> None:
    gate = threading.Event()
    first_started = threading.Event()

    def gated(x: int) -> int:
        first_started.set()
        if not gate.wait(WAIT):
            raise AssertionError("the test never opened the gate")
        return x

    all_queued = threading.Event()

    def inputs() -> Iterator[int]:
        yield from range(10)
        # The map asks for more only once it has queued the tenth call: the stop must find
        # every call queued (the first may start while the map is still queueing the rest).
        all_queued.set()

    pool = conveyor.Pool(workers=1)
    seen: list[int] = []
    outcome: list[BaseException] = []

    def consume() -> None:
        try:
            seen.extend(pool.map(gated, inputs(), chunksize=1))
        except BaseException as exc:
            outcome.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    stopper = threading.Thread(
        target=pool.terminate if stop == "terminate" else lambda: pool.shutdown(cancel_futures=True)
    )
    try:
        assert first_started.wait(WAIT)
        assert all_queued.wait(WAIT)
        stopper.start()
    finally:
        gate.set()
    consumer.join(WAIT)
    stopper.join(WAIT)
    assert not consumer.is_alive(), "the map waited forever for calls that were cancelled"
    assert not stopper.is_alive()
    assert seen[:1] == [0]
    assert len(outcome) == 1
    assert isinstance(outcome[0], cf.CancelledError)
    stats = pool.statistics()
    assert stats.completed + stats.cancelled == stats.submitted == 10


def test_a_retry_still_queued_at_shutdown_with_cancel_futures_fails_its_call() -> None:
    first_gate, second_gate, third_gate = (threading.Event() for _ in range(3))
    started = {name: threading.Event() for name in "abc"}
    attempts: list[int] = []

    def held(name: str, gate: threading.Event) -> str:
        started[name].set()
        if not gate.wait(WAIT):
            raise AssertionError("the test never opened the gate")
        return name

    def fails_once() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            started["b"].set()
            if not second_gate.wait(WAIT):
                raise AssertionError("the test never opened the gate")
            raise ValueError("first attempt")
        return "retried"

    pool = conveyor.Pool(workers=2, retries=1)
    try:
        a = pool.submit(held, "a", first_gate)
        assert started["a"].wait(WAIT)
        b = pool.submit(fails_once)
        assert started["b"].wait(WAIT)
        c = pool.submit(held, "c", third_gate)  # queued: both workers are busy
        second_gate.set()  # b fails; its retry is queued behind c, which takes the worker
        assert started["c"].wait(WAIT)
        pool.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(cf.CancelledError):
            b.result(WAIT)
    finally:
        first_gate.set()
        second_gate.set()
        third_gate.set()
    pool.shutdown(wait=True)
    assert (a.result(0), c.result(0)) == ("a", "c")
    assert attempts == [1]
    stats = pool.statistics()
    assert (stats.submitted, stats.completed, stats.failed) == (3, 2, 1)


def test_shutdown_with_wait_inside_a_call_of_the_same_pool_raises_instead_of_hanging() -> None:
    pool = conveyor.Pool(workers=2)
    future = pool.submit(lambda: pool.shutdown(wait=True))
    with pytest.raises(RuntimeError, match="inside one of this pool's own calls"):
        future.result(WAIT)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(abs, 1)
    pool.shutdown()


def test_a_done_callback_may_use_the_pool_when_shutdown_cancels_its_future() -> None:
    blocker = Blocker()
    seen: list[conveyor.PoolStatistics] = []
    pool = conveyor.Pool(workers=1)
    try:
        pool.submit(blocker)
        assert blocker.started.wait(WAIT)
        queued = pool.submit(abs, -1)
        queued.add_done_callback(lambda _: seen.append(pool.statistics()))
        stopper = threading.Thread(target=pool.shutdown, kwargs={"cancel_futures": True})
        stopper.start()
        assert cf.wait([queued], timeout=WAIT).done == {queued}
    finally:
        blocker.release()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert queued.cancelled()
    assert len(seen) == 1
    assert pool.statistics().cancelled == 1


def test_shutdown_wait_returns_only_after_running_and_queued_calls_end() -> None:
    blocker = Blocker()
    returned = threading.Event()
    pool = conveyor.Pool(workers=1)

    def stop() -> None:
        pool.shutdown(wait=True)
        returned.set()

    stopper = threading.Thread(target=stop)
    try:
        running = pool.submit(blocker)
        assert blocker.started.wait(WAIT)
        queued = pool.submit(abs, -3)
        stopper.start()
        assert not returned.wait(GLANCE), "shutdown(wait=True) returned during a call"
    finally:
        blocker.release()
    assert returned.wait(WAIT)
    stopper.join(WAIT)
    assert running.done()
    assert queued.done()
    assert queued.result(0) == 3


def test_shutdown_without_wait_returns_at_once_and_calls_still_finish() -> None:
    blocker = Blocker()
    pool = conveyor.Pool(workers=1)
    try:
        running = pool.submit(blocker)
        queued = pool.submit(abs, -3)
        pool.shutdown(wait=False)  # returns while the call is blocked
        assert not running.done()
    finally:
        blocker.release()
    assert running.result(WAIT) == "released"
    assert queued.result(WAIT) == 3
    pool.shutdown(wait=True)


def test_the_with_block_waits_for_every_call() -> None:
    blocker = Blocker()
    left = threading.Event()
    futures: list[cf.Future[Any]] = []

    def use_pool() -> None:
        with conveyor.Pool(workers=2) as pool:
            assert isinstance(pool, conveyor.Pool)
            futures.append(pool.submit(blocker))
            futures.extend(pool.submit(abs, -i) for i in range(10))
        left.set()

    user = threading.Thread(target=use_pool)
    user.start()
    try:
        assert blocker.started.wait(WAIT)
        assert not left.wait(GLANCE), "the with block ended during a call"
    finally:
        blocker.release()
    assert left.wait(WAIT)
    user.join(WAIT)
    assert all(f.done() for f in futures)
    assert [f.result(0) for f in futures] == ["released", *range(10)]


def test_shutdown_is_idempotent() -> None:
    pool = conveyor.Pool(workers=2)
    future = pool.submit(abs, -5)
    pool.shutdown()
    pool.shutdown()
    pool.shutdown(wait=False, cancel_futures=True)
    pool.close()
    pool.join()
    assert future.result(0) == 5


@pytest.mark.usefixtures("old_garbage_collected")
def test_a_pool_dropped_without_shutdown_stops_its_threads() -> None:
    pool = conveyor.Pool("thread", 2, thread_name_prefix="dropped-pool-test")
    assert pool.submit(abs, -1).result(WAIT) == 1
    threads = [t for t in threading.enumerate() if t.name.startswith("dropped-pool-test")]
    assert threads
    del pool
    gc.collect()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()


# -- per-call timeout -----------------------------------------------------------------------


def test_a_call_past_its_timeout_fails_and_its_thread_is_replaced() -> None:
    blocker = Blocker(value="late")
    with conveyor.Pool(workers=1, timeout=0.5) as pool:
        try:
            stuck = pool.submit(blocker)
            assert blocker.started.wait(WAIT)
            queued = pool.submit(pow, 2, 8)  # waits: the pool's one thread is taken
            error = stuck.exception(WAIT)
            assert isinstance(error, conveyor.TaskTimeout)
            assert isinstance(error, TimeoutError)
            # the first call is still blocked on its thread, yet the one-worker pool runs
            # the queued call and new ones: its thread was replaced
            assert queued.result(WAIT) == 256
            assert not blocker.finished.is_set()
            assert pool.submit(pow, 2, 9).result(WAIT) == 512
            assert list(pool.map(abs, [-1, -2])) == [1, 2]
            assert not blocker.finished.is_set()
            stats = pool.statistics()
            assert stats.timed_out == 1
            assert stats.failed == 1
        finally:
            blocker.release()
        assert blocker.finished.wait(WAIT)
        # the late result is discarded: the outcome decided at the deadline stands
        assert stuck.exception(0) is error
        assert pool.submit(abs, -3).result(WAIT) == 3
    stats = pool.statistics()
    assert stats.timed_out == 1
    assert stats.completed == 5
    assert outcome_counts(stats) == stats.submitted


def test_a_timeout_inside_a_map_is_raised_at_its_position() -> None:
    blocker = Blocker()

    def call(x: int) -> int:
        if x == 2:
            blocker()
        return x

    seen: list[int] = []
    with conveyor.Pool(workers=2, timeout=0.5) as pool:
        try:
            with pytest.raises(conveyor.TaskTimeout):
                for value in pool.map(call, range(6)):
                    seen.append(value)
        finally:
            blocker.release()
    assert seen == [0, 1]
    assert pool.statistics().timed_out == 1


def test_timeouts_are_not_retried_unless_asked() -> None:
    blocker = Blocker()
    with conveyor.Pool(workers=1, timeout=0.3, retries=2, retry_on=(ValueError,)) as pool:
        try:
            assert isinstance(pool.submit(blocker).exception(WAIT), conveyor.TaskTimeout)
        finally:
            blocker.release()
    stats = pool.statistics()
    assert stats.retried == 0
    assert stats.timed_out == 1


def test_a_timed_out_call_is_retried_when_retry_on_matches() -> None:
    blocker = Blocker()
    attempts: list[int] = []

    def call() -> str:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            blocker()  # the first attempt hangs past its deadline
            return "late"
        return "second attempt"

    with conveyor.Pool(workers=1, timeout=0.5, retries=1, retry_on=conveyor.TaskTimeout) as pool:
        try:
            assert pool.submit(call).result(WAIT) == "second attempt"
        finally:
            blocker.release()
        assert blocker.finished.wait(WAIT)
    stats = pool.statistics()
    assert attempts == [1, 2]
    assert (stats.retried, stats.completed, stats.failed, stats.timed_out) == (1, 1, 0, 0)


# -- retries --------------------------------------------------------------------------------


class Flaky:
    """Raises ``error_type`` on the first ``failures`` calls per argument, then returns it."""

    def __init__(self, failures: int, error_type: type[Exception] = ValueError) -> None:
        self.failures = failures
        self.error_type = error_type
        self.calls: Counter[Any] = Counter()
        self.raised: list[BaseException] = []
        self._lock = threading.Lock()

    def __call__(self, x: Any = None) -> Any:
        with self._lock:
            self.calls[x] += 1
            attempt = self.calls[x]
        if attempt <= self.failures:
            error = self.error_type(f"{x} failed on attempt {attempt}")
            with self._lock:
                self.raised.append(error)
            raise error
        return x


def test_a_failing_call_is_retried_until_it_succeeds() -> None:
    flaky = Flaky(failures=2)
    with conveyor.Pool(workers=2, retries=2) as pool:
        assert pool.submit(flaky, "a").result(WAIT) == "a"
    assert flaky.calls["a"] == 3
    stats = pool.statistics()
    assert stats.retried == 2
    assert (stats.submitted, stats.completed, stats.failed) == (1, 1, 0)


def test_the_last_exception_is_raised_with_its_attempts() -> None:
    flaky = Flaky(failures=10)
    with conveyor.Pool(workers=2, retries=2) as pool:
        error = pool.submit(flaky, "b").exception(WAIT)
    assert flaky.calls["b"] == 3
    assert isinstance(error, ValueError)
    assert error is flaky.raised[-1]
    assert "attempt 3" in str(error)
    assert error.attempts == 3  # type: ignore[attr-defined]
    stats = pool.statistics()
    assert (stats.retried, stats.failed, stats.completed) == (2, 1, 0)


def test_exceptions_not_in_retry_on_are_not_retried() -> None:
    flaky = Flaky(failures=1, error_type=KeyError)
    with conveyor.Pool(workers=1, retries=3, retry_on=ValueError) as pool:
        error = pool.submit(flaky, "c").exception(WAIT)
        assert isinstance(error, KeyError)
        assert flaky.calls["c"] == 1
        # a listed class is retried, subclasses included
        matching = Flaky(failures=1, error_type=UnicodeError)
        assert pool.submit(matching, "d").result(WAIT) == "d"
        assert matching.calls["d"] == 2
    assert pool.statistics().retried == 1


def test_without_retries_a_call_runs_once() -> None:
    flaky = Flaky(failures=1)
    with conveyor.Pool(workers=1) as pool:
        error = pool.submit(flaky, "e").exception(WAIT)
    assert isinstance(error, ValueError)
    assert flaky.calls["e"] == 1
    assert pool.statistics().retried == 0


def test_retries_inside_a_map_keep_order() -> None:
    flaky = Flaky(failures=1)
    with conveyor.Pool(workers=3, retries=1) as pool:
        assert list(pool.map(flaky, range(50))) == list(range(50))
        assert pool.statistics().retried == 50
        # beyond its retries, the first failing item is raised at its position
        stubborn = Flaky(failures=5)
        with pytest.raises(ValueError) as info:
            list(pool.map(stubborn, range(3)))
        assert info.value.attempts == 2  # type: ignore[attr-defined]
    assert all(count == 2 for count in flaky.calls.values())


def test_retries_with_apply_async_and_starmap() -> None:
    flaky = Flaky(failures=1)
    with conveyor.Pool(workers=2, retries=1) as pool:
        assert pool.apply_async(flaky, ("x",)).get(WAIT) == "x"
        assert pool.starmap(flaky, [(1,), (2,)]) == [1, 2]
    assert flaky.calls == Counter({"x": 2, 1: 2, 2: 2})


# -- statistics -----------------------------------------------------------------------------


def test_statistics_is_an_immutable_snapshot() -> None:
    with conveyor.Pool(workers=2) as pool:
        before = pool.statistics()
        assert isinstance(before, conveyor.PoolStatistics)
        assert dataclasses.is_dataclass(before)
        assert [f.name for f in dataclasses.fields(before)] == [
            "workers",
            "busy",
            "pending",
            "submitted",
            "completed",
            "failed",
            "cancelled",
            "timed_out",
            "retried",
        ]
        with pytest.raises(dataclasses.FrozenInstanceError):
            before.completed = 5  # type: ignore[misc]
        assert list(pool.map(abs, range(10))) == list(range(10))
        after = pool.statistics()
    assert before.submitted == before.completed == 0
    assert after.submitted == after.completed == 10
    assert after is not before


def test_statistics_counts_busy_pending_and_outcomes() -> None:
    blocker = Blocker()

    def fail() -> None:
        raise ValueError("no")

    with conveyor.Pool(workers=1) as pool:
        try:
            running = pool.submit(blocker)
            assert blocker.started.wait(WAIT)
            queued = [pool.submit(abs, -1), pool.submit(fail), pool.submit(abs, -2)]
            stats = pool.statistics()
            assert (stats.workers, stats.busy, stats.pending, stats.submitted) == (1, 1, 3, 4)
            assert stats.completed == stats.failed == stats.cancelled == 0
            assert queued[2].cancel()
        finally:
            blocker.release()
        assert running.result(WAIT) == "released"
        assert isinstance(queued[1].exception(WAIT), ValueError)
        assert queued[0].result(WAIT) == 1
    stats = pool.statistics()
    assert (stats.busy, stats.pending) == (0, 0)
    assert (stats.submitted, stats.completed, stats.failed, stats.cancelled) == (4, 2, 1, 1)
    assert (stats.timed_out, stats.retried) == (0, 0)


# -- faults inside calls --------------------------------------------------------------------


class CustomError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"code {code}")
        self.code = code


def test_a_task_exception_keeps_its_type_and_identity() -> None:
    raised: list[BaseException] = []

    def fail(code: int) -> None:
        error = CustomError(code)
        raised.append(error)
        raise error

    with conveyor.Pool(workers=2) as pool:
        error = pool.submit(fail, 7).exception(WAIT)
        assert type(error) is CustomError
        assert error is raised[0]
        assert error.code == 7
        with pytest.raises(CustomError) as info:
            list(pool.map(fail, [8]))
        assert info.value.code == 8


@pytest.mark.parametrize("error_type", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_base_exceptions_fail_only_their_own_call(error_type: type[BaseException]) -> None:
    raised: list[BaseException] = []

    def fail() -> None:
        error = error_type(3)
        raised.append(error)
        raise error

    with conveyor.Pool(workers=1) as pool:
        future = pool.submit(fail)
        assert future.exception(WAIT) is raised[0]
        # the only worker survived, and the pool goes on
        assert pool.submit(pow, 2, 3).result(WAIT) == 8
        assert list(pool.map(abs, [-1, -2, -3])) == [1, 2, 3]
        with pytest.raises(error_type):
            list(pool.map(lambda _: fail(), [1]))
    stats = pool.statistics()
    assert stats.failed == 2
    assert stats.completed == 4


def test_a_base_exception_is_not_retried_by_default() -> None:
    flaky = Flaky(failures=1, error_type=KeyboardInterrupt)  # type: ignore[arg-type]
    with conveyor.Pool(workers=1, retries=2) as pool:
        assert isinstance(pool.submit(flaky, 1).exception(WAIT), KeyboardInterrupt)
    assert flaky.calls[1] == 1


def test_the_initializer_runs_once_in_each_worker_with_its_args() -> None:
    lock = threading.Lock()
    inits: list[tuple[str, str]] = []
    barrier = threading.Barrier(2, timeout=WAIT)

    def init(tag: str) -> None:
        with lock:
            inits.append((tag, threading.current_thread().name))

    def meet() -> str:
        barrier.wait()  # both workers must exist at once
        return threading.current_thread().name

    with conveyor.Pool(workers=2, initializer=init, initargs=("tag",)) as pool:
        names = {f.result(WAIT) for f in [pool.submit(meet), pool.submit(meet)]}
        names |= set(pool.map(lambda _: threading.current_thread().name, range(50)))
    assert len(names) == 2
    assert sorted(inits) == sorted(("tag", name) for name in names)


def test_a_failing_initializer_breaks_the_pool() -> None:
    problem = ZeroDivisionError("no setup today")
    go = threading.Event()

    def init() -> None:
        if not go.wait(WAIT):
            raise AssertionError("never released")
        raise problem

    pool = conveyor.Pool(workers=2, initializer=init)
    try:
        try:
            # queued while both workers are still starting
            futures = [pool.submit(abs, -i) for i in range(3)]
        finally:
            go.set()
        for future in futures:
            error = future.exception(WAIT)
            assert isinstance(error, conveyor.InitializerFailed)
            assert isinstance(error, BrokenThreadPool)
            assert error.__cause__ is problem
        with pytest.raises(conveyor.InitializerFailed):
            pool.submit(abs, -1)
        with pytest.raises(BrokenThreadPool):
            pool.submit_nowait(abs, -1)
        with pytest.raises(conveyor.InitializerFailed):
            list(pool.map(abs, [1, 2]))
    finally:
        pool.shutdown()
    stats = pool.statistics()
    assert stats.completed == 0
    assert outcome_counts(stats) == stats.submitted


def test_a_failing_initializer_wakes_a_submit_blocked_at_max_pending() -> None:
    go = threading.Event()
    errors: list[BaseException] = []

    def init() -> None:
        if not go.wait(WAIT):
            raise AssertionError("never released")
        raise ValueError("setup failed")

    def submit_one_more() -> None:
        try:
            pool.submit(abs, -2)
        except BaseException as exc:
            errors.append(exc)

    pool = conveyor.Pool(workers=1, max_pending=1, initializer=init)
    submitter = threading.Thread(target=submit_one_more)
    try:
        first = pool.submit(abs, -1)  # waits for the worker that is still starting
        submitter.start()
    finally:
        go.set()
    submitter.join(WAIT)
    assert not submitter.is_alive()
    pool.shutdown()
    assert isinstance(first.exception(WAIT), conveyor.InitializerFailed)
    assert len(errors) == 1
    assert isinstance(errors[0], conveyor.InitializerFailed)


def test_a_failing_initializer_fails_a_running_map() -> None:
    def init() -> None:
        raise OSError("no")

    with conveyor.Pool(workers=2, initializer=init) as pool:
        with pytest.raises(conveyor.InitializerFailed) as info:
            list(pool.map(abs, range(100)))
        assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize("submitters", [1, 4])
def test_a_burst_on_a_cold_pool_gets_every_worker_thread(submitters: int) -> None:
    # All 24 calls wait for each other: they end only if 24 threads run them at once, so the
    # threads owed to the burst must all be started, whoever submits.
    workers = 24
    barrier = threading.Barrier(workers, timeout=WAIT)
    with conveyor.Pool(workers=workers) as pool:
        futures: list[cf.Future[int]] = []
        lock = threading.Lock()

        def submit_some(count: int) -> None:
            for _ in range(count):
                future = pool.submit(barrier.wait)
                with lock:
                    futures.append(future)

        threads = [
            threading.Thread(target=submit_some, args=(workers // submitters,))
            for _ in range(submitters)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert sorted(f.result(WAIT) for f in futures) == list(range(workers))
        assert pool.statistics().workers == workers


def _triple(x: int) -> int:
    return 3 * x


def test_a_map_of_a_function_measured_before_starts_with_full_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from conveyor import _map

    sizes: list[int] = []
    real = _map.Batch

    class Spy(real):  # type: ignore[misc,valid-type]
        __slots__ = ()

        def __init__(self, host: Any, fn: Any, args: Any, *rest: Any) -> None:
            sizes.append(len(args))
            super().__init__(host, fn, args, *rest)

    monkeypatch.setattr(_map, "Batch", Spy)
    with conveyor.Pool(workers=2) as pool:
        assert list(pool.map(_triple, range(3000))) == [3 * x for x in range(3000)]
        assert sizes[0] == 1  # unknown: probed with one call first
        sizes.clear()
        assert list(pool.map(_triple, range(3000))) == [3 * x for x in range(3000)]
        assert sizes[0] > 1  # known from the first map
        sizes.clear()
        assert list(pool.map(abs, range(3000))) == list(range(3000))
        assert sizes[0] == 1
