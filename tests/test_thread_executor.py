"""``conveyor.ThreadPoolExecutor``: the standard library's signature and behaviour, plus extras.

Tests marked with the ``executor_cls`` parameter run the same scenario on the standard library's
``ThreadPoolExecutor`` as well, so they state the behaviour being copied, not our guess of it.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import itertools
import threading
from collections.abc import Iterator
from concurrent.futures.thread import BrokenThreadPool
from typing import Any

import pytest

import conveyor

WAIT = 30.0
GLANCE = 0.2

BOTH = pytest.mark.parametrize(
    "executor_cls",
    [cf.ThreadPoolExecutor, conveyor.ThreadPoolExecutor],
    ids=["stdlib", "conveyor"],
)


def counting(source: Iterator[Any], pulled: list[Any]) -> Iterator[Any]:
    for item in source:
        pulled.append(item)
        yield item


class Blocker:
    """A call that blocks until ``release()``; ``started`` is set once it runs."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release_event = threading.Event()

    def __call__(self, *_: object) -> str:
        self.started.set()
        if not self.release_event.wait(WAIT):
            raise AssertionError("the test never released this call")
        return "released"

    def release(self) -> None:
        self.release_event.set()


# -- signature ------------------------------------------------------------------------------


def test_signature_starts_with_the_stdlib_one_and_adds_keyword_only_extras() -> None:
    ours = inspect.signature(conveyor.ThreadPoolExecutor).parameters
    theirs = inspect.signature(cf.ThreadPoolExecutor).parameters
    shared = list(theirs)
    assert list(ours)[: len(shared)] == shared
    for name in shared:
        assert ours[name].kind == theirs[name].kind, name
        assert ours[name].default == theirs[name].default, name
    extras = {"max_pending": None, "timeout": None, "retries": 0, "retry_on": (Exception,)}
    assert set(ours) - set(theirs) == set(extras)
    for name, default in extras.items():
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert ours[name].default == default, name


def test_it_is_an_executor_and_a_pool() -> None:
    with conveyor.ThreadPoolExecutor(max_workers=1) as executor:
        assert isinstance(executor, cf.Executor)
        assert isinstance(executor, conveyor.Pool)
        assert executor.submit(abs, -1).result(WAIT) == 1


def test_the_extras_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        conveyor.ThreadPoolExecutor(2, "", None, (), 5)  # type: ignore[misc]


@BOTH
def test_positional_arguments_in_stdlib_order(executor_cls: type[cf.ThreadPoolExecutor]) -> None:
    seen: list[tuple[str, str]] = []

    def init(tag: str) -> None:
        seen.append((tag, threading.current_thread().name))

    with executor_cls(2, "positional-test", init, ("tag",)) as executor:
        name = executor.submit(lambda: threading.current_thread().name).result(WAIT)
    assert name.startswith("positional-test")
    assert ("tag", name) in seen


def test_default_max_workers_is_the_stdlib_default() -> None:
    stdlib = cf.ThreadPoolExecutor()
    try:
        expected = stdlib._max_workers  # type: ignore[attr-defined]
    finally:
        stdlib.shutdown()
    with conveyor.ThreadPoolExecutor() as executor:
        assert executor.workers == expected
        assert executor.statistics().workers == expected


@BOTH
@pytest.mark.parametrize("max_workers", [0, -1])
def test_max_workers_must_be_positive(
    executor_cls: type[cf.ThreadPoolExecutor], max_workers: int
) -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        executor_cls(max_workers=max_workers)


def test_max_workers_of_the_wrong_type_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="max_workers"):
        conveyor.ThreadPoolExecutor(max_workers="4")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_workers"):
        conveyor.ThreadPoolExecutor(max_workers=1.5)  # type: ignore[arg-type]


@BOTH
def test_thread_names_start_with_the_prefix(executor_cls: type[cf.ThreadPoolExecutor]) -> None:
    barrier = threading.Barrier(3, timeout=WAIT)

    def meet() -> str:
        barrier.wait()
        return threading.current_thread().name

    with executor_cls(max_workers=3, thread_name_prefix="prefix-test") as executor:
        names = {f.result(WAIT) for f in [executor.submit(meet) for _ in range(3)]}
    assert len(names) == 3
    assert all(name.startswith("prefix-test") for name in names), names


def test_without_a_prefix_threads_still_get_distinct_names() -> None:
    barrier = threading.Barrier(2, timeout=WAIT)

    def meet() -> str:
        barrier.wait()
        return threading.current_thread().name

    with conveyor.ThreadPoolExecutor(max_workers=2) as executor:
        names = {f.result(WAIT) for f in [executor.submit(meet) for _ in range(2)]}
    assert len(names) == 2
    assert threading.current_thread().name not in names


# -- submit and shutdown, as in the stdlib --------------------------------------------------


@BOTH
def test_submit_passes_args_and_kwargs(executor_cls: type[cf.ThreadPoolExecutor]) -> None:
    with executor_cls(max_workers=2) as executor:
        future = executor.submit(int, "ff", base=16)
        assert type(future) is cf.Future
        assert future.result(WAIT) == 255
        assert executor.submit(dict, fn=1).result(WAIT) == {"fn": 1}


@BOTH
def test_submit_after_shutdown_raises(executor_cls: type[cf.ThreadPoolExecutor]) -> None:
    executor = executor_cls(max_workers=1)
    executor.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(abs, 1)


@BOTH
def test_shutdown_cancel_futures(executor_cls: type[cf.ThreadPoolExecutor]) -> None:
    blocker = Blocker()
    executor = executor_cls(max_workers=1)
    try:
        running = executor.submit(blocker)
        assert blocker.started.wait(WAIT)
        queued = [executor.submit(abs, -i) for i in range(4)]
        executor.shutdown(wait=False, cancel_futures=True)
        assert all(f.cancelled() for f in queued)
        assert not running.done()
    finally:
        blocker.release()
    assert running.result(WAIT) == "released"
    executor.shutdown(wait=True)


@BOTH
def test_exiting_the_with_block_waits_for_the_calls(
    executor_cls: type[cf.ThreadPoolExecutor],
) -> None:
    blocker = Blocker()
    left = threading.Event()
    futures: list[cf.Future[Any]] = []

    def use() -> None:
        with executor_cls(max_workers=2) as executor:
            futures.append(executor.submit(blocker))
            futures.extend(executor.submit(abs, -i) for i in range(5))
        left.set()

    user = threading.Thread(target=use)
    user.start()
    try:
        assert blocker.started.wait(WAIT)
        assert not left.wait(GLANCE)
    finally:
        blocker.release()
    user.join(WAIT)
    assert left.is_set()
    assert [f.result(0) for f in futures] == ["released", 0, 1, 2, 3, 4]


@BOTH
def test_a_failing_initializer_breaks_the_executor(
    executor_cls: type[cf.ThreadPoolExecutor],
) -> None:
    go = threading.Event()

    def init() -> None:
        if not go.wait(WAIT):
            raise AssertionError("never released")
        raise ValueError("setup failed")

    executor = executor_cls(max_workers=2, initializer=init)
    try:
        try:
            futures = [executor.submit(abs, -i) for i in range(3)]
        finally:
            go.set()
        for future in futures:
            assert isinstance(future.exception(WAIT), BrokenThreadPool)
        with pytest.raises(BrokenThreadPool):
            executor.submit(abs, 1)
    finally:
        executor.shutdown()


def test_a_failing_initializer_reports_conveyors_error() -> None:
    def init() -> None:
        raise ValueError("setup failed")

    with conveyor.ThreadPoolExecutor(max_workers=1, initializer=init) as executor:
        error = executor.submit(abs, 1).exception(WAIT)
    assert isinstance(error, conveyor.InitializerFailed)
    assert isinstance(error.__cause__, ValueError)


# -- map ------------------------------------------------------------------------------------


@BOTH
def test_map_is_eager(executor_cls: type[cf.ThreadPoolExecutor]) -> None:
    pulled: list[int] = []
    with executor_cls(max_workers=2) as executor:
        results = executor.map(abs, counting(iter(range(-50, 0)), pulled))
        # the whole input was taken at the call, before any result was asked for
        assert pulled == list(range(-50, 0))
        assert list(results) == list(range(50, 0, -1))


@BOTH
def test_map_results_can_be_read_after_the_with_block(
    executor_cls: type[cf.ThreadPoolExecutor],
) -> None:
    with executor_cls(max_workers=2) as executor:
        results = executor.map(str, range(100))
    assert list(results) == [str(i) for i in range(100)]


@BOTH
def test_a_map_never_iterated_still_runs_every_call(
    executor_cls: type[cf.ThreadPoolExecutor],
) -> None:
    lock = threading.Lock()
    ran: list[int] = []

    def record(x: int) -> None:
        with lock:
            ran.append(x)

    with executor_cls(max_workers=2) as executor:
        executor.map(record, range(30))
    assert sorted(ran) == list(range(30))


@BOTH
def test_map_raises_the_first_error_at_its_position_and_cancels_the_rest(
    executor_cls: type[cf.ThreadPoolExecutor],
) -> None:
    blocker = Blocker()
    lock = threading.Lock()
    ran: list[int] = []

    def call(x: int) -> int:
        with lock:
            ran.append(x)
        if x == 1:
            raise ValueError(x)
        if x == 2:
            blocker()  # holds the only worker until the error was raised
        return x

    seen: list[int] = []
    with executor_cls(max_workers=1) as executor:
        try:
            results = executor.map(call, range(10))
            seen.append(next(results))
            with pytest.raises(ValueError) as info:
                next(results)
            assert info.value.args == (1,)
        finally:
            blocker.release()
    assert seen == [0]
    # leaving the map through the error cancelled what had not started
    assert set(ran) <= {0, 1, 2}


@BOTH
def test_map_timeout(executor_cls: type[cf.ThreadPoolExecutor]) -> None:
    blocker = Blocker()
    with executor_cls(max_workers=1) as executor:
        try:
            results = executor.map(blocker, [1, 2], timeout=0.05)
            with pytest.raises(cf.TimeoutError):  # TimeoutError itself since Python 3.11
                next(results)
        finally:
            blocker.release()


@BOTH
def test_closing_a_started_map_cancels_what_has_not_started(
    executor_cls: type[cf.ThreadPoolExecutor],
) -> None:
    blocker = Blocker()
    lock = threading.Lock()
    ran: list[int] = []

    def call(x: int) -> int:
        with lock:
            ran.append(x)
        if x == 1:
            blocker()
        return x

    with executor_cls(max_workers=1) as executor:
        try:
            results = executor.map(call, range(20))
            assert next(results) == 0
            results.close()  # type: ignore[attr-defined]
        finally:
            blocker.release()
    assert set(ran) <= {0, 1}


@BOTH
def test_map_input_error(executor_cls: type[cf.ThreadPoolExecutor]) -> None:
    lock = threading.Lock()
    ran: list[int] = []

    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise LookupError("input broke")

    def record(x: int) -> int:
        with lock:
            ran.append(x)
        return x

    with executor_cls(max_workers=2) as executor, pytest.raises(LookupError):
        # an eager map takes its whole input at the call, so the error comes from the call
        executor.map(record, source())
    # and what it submitted before the error ran
    assert sorted(ran) == [1, 2]


@BOTH
def test_map_after_shutdown_raises_at_the_call(
    executor_cls: type[cf.ThreadPoolExecutor],
) -> None:
    executor = executor_cls(max_workers=1)
    executor.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        executor.map(abs, [1, 2])


def test_map_with_buffersize_is_lazy() -> None:
    pulled: list[int] = []
    with conveyor.ThreadPoolExecutor(max_workers=2) as executor:
        results = executor.map(abs, counting(itertools.count(), pulled), buffersize=4)
        assert len(pulled) <= 4
        assert list(itertools.islice(results, 100)) == list(range(100))
        results.close()  # type: ignore[attr-defined]
        assert len(pulled) <= 100 + 2 * 4


def test_map_with_several_iterables() -> None:
    with conveyor.ThreadPoolExecutor(max_workers=2) as executor:
        assert list(executor.map(pow, [2, 3, 4], [5, 2, 1])) == [32, 9, 4]


# -- conveyor's extras ----------------------------------------------------------------------


def test_timeout_fails_a_stuck_call_and_keeps_capacity() -> None:
    blocker = Blocker()
    with conveyor.ThreadPoolExecutor(max_workers=1, timeout=0.5) as executor:
        try:
            stuck = executor.submit(blocker)
            assert isinstance(stuck.exception(WAIT), conveyor.TaskTimeout)
            assert executor.submit(pow, 3, 4).result(WAIT) == 81
            assert not blocker.release_event.is_set()
        finally:
            blocker.release()
    assert executor.statistics().timed_out == 1


def test_retries_and_retry_on() -> None:
    lock = threading.Lock()
    attempts: dict[str, int] = {}

    def flaky(key: str, error: type[Exception]) -> str:
        with lock:
            attempts[key] = attempts.get(key, 0) + 1
            attempt = attempts[key]
        if attempt < 3:
            raise error(key)
        return key

    with conveyor.ThreadPoolExecutor(max_workers=2, retries=2, retry_on=OSError) as executor:
        assert executor.submit(flaky, "a", ConnectionError).result(WAIT) == "a"
        assert isinstance(executor.submit(flaky, "b", ValueError).exception(WAIT), ValueError)
    assert attempts == {"a": 3, "b": 1}
    assert executor.statistics().retried == 2


def test_max_pending_and_submit_nowait() -> None:
    blocker = Blocker()
    with conveyor.ThreadPoolExecutor(max_workers=1, max_pending=1) as executor:
        try:
            executor.submit(blocker)
            assert blocker.started.wait(WAIT)
            queued = executor.submit_nowait(abs, -1)
            with pytest.raises(conveyor.PoolFull):
                executor.submit_nowait(abs, -2)
        finally:
            blocker.release()
        assert queued.result(WAIT) == 1


def test_statistics() -> None:
    def fail() -> None:
        raise KeyError("x")

    with conveyor.ThreadPoolExecutor(max_workers=2) as executor:
        futures = [executor.submit(abs, -i) for i in range(5)] + [executor.submit(fail)]
        cf.wait(futures, timeout=WAIT)
    stats = executor.statistics()
    assert isinstance(stats, conveyor.PoolStatistics)
    assert (stats.workers, stats.submitted, stats.completed, stats.failed) == (2, 6, 5, 1)
    assert (stats.busy, stats.pending, stats.cancelled) == (0, 0, 0)


def test_the_pools_conveniences_are_there_too() -> None:
    with conveyor.ThreadPoolExecutor(max_workers=2) as executor:
        assert executor.starmap(pow, [(2, 2), (2, 3)]) == [4, 8]
        assert sorted(executor.imap_unordered(abs, [-1, -2])) == [1, 2]
        assert executor.apply_async(abs, (-5,)).get(WAIT) == 5
