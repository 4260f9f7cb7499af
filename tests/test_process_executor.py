"""``conveyor.ProcessPoolExecutor``: the standard library's signature and behaviour, except that
a crashed worker fails only its own call and the executor stays usable.

Tests marked ``BOTH`` run the same scenario on the standard library's ``ProcessPoolExecutor``
too, so they state the behaviour being copied, not our guess of it. Both get a ``forkserver``
context (the stdlib's default, ``fork``, refuses ``max_tasks_per_child``).
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import multiprocessing
import os
import sys
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any

import _process_funcs as funcs
import pytest
from _process_funcs import WAIT, Channel, counting

import conveyor

Executor = type[cf.ProcessPoolExecutor]

BOTH = pytest.mark.parametrize(
    "executor_cls",
    [cf.ProcessPoolExecutor, conveyor.ProcessPoolExecutor],
    ids=["stdlib", "conveyor"],
)


def forkserver() -> Any:
    return multiprocessing.get_context("forkserver")


# -- signature ------------------------------------------------------------------------------


def test_signature_starts_with_the_stdlib_one_and_adds_keyword_only_extras() -> None:
    ours = inspect.signature(conveyor.ProcessPoolExecutor).parameters
    theirs = inspect.signature(cf.ProcessPoolExecutor).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, parameter in theirs.items():
        assert ours[name].kind == parameter.kind, name
        assert ours[name].default == parameter.default, name
    for name in list(ours)[len(theirs) :]:
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY, name


def test_it_is_an_executor_and_a_pool() -> None:
    assert issubclass(conveyor.ProcessPoolExecutor, cf.Executor)
    assert issubclass(conveyor.ProcessPoolExecutor, conveyor.Pool)


@BOTH
@pytest.mark.parametrize(("bad", "error"), [(0, ValueError), (-1, ValueError), ("2", TypeError)])
def test_bad_max_workers_is_refused(executor_cls: Executor, bad: Any, error: type) -> None:
    with pytest.raises(error):
        executor_cls(max_workers=bad, mp_context=forkserver())


# -- submit, map, shutdown, as in the stdlib ------------------------------------------------


@BOTH
def test_submit_passes_args_and_kwargs(executor_cls: Executor) -> None:
    with executor_cls(max_workers=2, mp_context=forkserver()) as executor:
        future = executor.submit(funcs.add, 1, 2, z=3)
        assert type(future) is cf.Future
        assert future.result(WAIT) == 6
        assert executor.submit(int, "ff", base=16).result(WAIT) == 255


@BOTH
def test_map_returns_results_in_order(executor_cls: Executor) -> None:
    with executor_cls(max_workers=2, mp_context=forkserver()) as executor:
        assert list(executor.map(funcs.double, range(100))) == [2 * x for x in range(100)]
        assert list(executor.map(funcs.double, range(100), chunksize=9)) == [
            2 * x for x in range(100)
        ]
        assert list(executor.map(funcs.add, [1, 2, 3], [10, 20])) == [11, 22]


@BOTH
def test_map_is_eager_and_its_results_outlive_the_with_block(executor_cls: Executor) -> None:
    pulled: list[int] = []
    with executor_cls(max_workers=2, mp_context=forkserver()) as executor:
        results = executor.map(funcs.double, counting(iter(range(40)), pulled))
        assert pulled == list(range(40))  # the whole input was taken at the call
    assert list(results) == [2 * x for x in range(40)]


@BOTH
def test_map_raises_a_task_error_at_its_position(executor_cls: Executor) -> None:
    seen: list[int] = []
    with executor_cls(max_workers=2, mp_context=forkserver()) as executor:
        with pytest.raises(funcs.Boom, match="boom 4"):
            for value in executor.map(funcs.raise_on, range(10), [4] * 10):
                seen.append(value)
        assert executor.submit(funcs.double, 1).result(WAIT) == 2
    assert seen == [0, 1, 2, 3]


@BOTH
def test_map_timeout(executor_cls: Executor, started: Channel, release: Channel) -> None:
    call = partial(funcs.report_and_wait, started.path, release.path)
    with executor_cls(max_workers=1, mp_context=forkserver()) as executor:
        try:
            results = executor.map(call, ["slow"], timeout=0.2)
            started.read_line()
            with pytest.raises(cf.TimeoutError):  # the builtin TimeoutError from 3.11
                next(results)
        finally:
            release.release(1)
        assert list(executor.map(funcs.double, [1, 2], timeout=WAIT)) == [2, 4]


@BOTH
def test_as_completed_and_wait(executor_cls: Executor) -> None:
    with executor_cls(max_workers=2, mp_context=forkserver()) as executor:
        futures = [executor.submit(funcs.double, i) for i in range(12)]
        done = [f.result() for f in cf.as_completed(futures, timeout=WAIT)]
        assert sorted(done) == [2 * i for i in range(12)]
        finished, pending = cf.wait(futures, timeout=WAIT, return_when=cf.ALL_COMPLETED)
        assert len(finished) == 12 and not pending


@BOTH
def test_a_task_error_crosses_as_itself_with_the_remote_traceback(executor_cls: Executor) -> None:
    with executor_cls(max_workers=1, mp_context=forkserver()) as executor:
        error = executor.submit(funcs.raise_boom, 3).exception(WAIT)
    assert type(error) is funcs.Boom
    assert error.args == ("boom 3",)
    assert "raise_boom" in str(error.__cause__)


@BOTH
def test_submit_after_shutdown_raises(executor_cls: Executor) -> None:
    executor = executor_cls(max_workers=1, mp_context=forkserver())
    assert executor.submit(funcs.double, 1).result(WAIT) == 2
    executor.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(funcs.double, 1)


@BOTH
def test_shutdown_cancel_futures(
    executor_cls: Executor, started: Channel, release: Channel
) -> None:
    executor = executor_cls(max_workers=1, mp_context=forkserver())
    try:
        try:
            running = executor.submit(funcs.report_and_wait, started.path, release.path, "done")
            started.read_line()
            queued = [executor.submit(funcs.double, i) for i in range(6)]
            executor.shutdown(wait=False, cancel_futures=True)
        finally:
            release.release(1)
        assert running.result(WAIT) == "done"
        results: list[int | None] = []
        for future in queued:
            try:
                results.append(future.result(WAIT))
            except cf.CancelledError:
                results.append(None)
    finally:
        executor.shutdown(wait=True)
    # calls already handed on to the workers' queue still run: the stdlib's queue holds
    # max_workers + 1 calls besides the running ones, conveyor hands on at most one
    assert results.count(None) >= len(queued) - 2
    assert all(result in (None, 2 * index) for index, result in enumerate(results))


@BOTH
def test_the_with_block_waits_for_every_call(executor_cls: Executor) -> None:
    with executor_cls(max_workers=2, mp_context=forkserver()) as executor:
        futures = [executor.submit(funcs.sleep_then_pid, 0.05) for _ in range(6)]
    assert all(f.done() for f in futures)
    assert os.getpid() not in {f.result(0) for f in futures}


@BOTH
def test_a_failing_initializer_breaks_the_executor(executor_cls: Executor) -> None:
    executor = executor_cls(max_workers=2, mp_context=forkserver(), initializer=funcs.failing_init)
    try:
        futures = []
        try:
            for i in range(3):
                futures.append(executor.submit(funcs.double, i))
        except BrokenProcessPool:
            pass  # it may already know
        for future in futures:
            assert isinstance(future.exception(WAIT), BrokenProcessPool)
        with pytest.raises(BrokenProcessPool):
            executor.submit(funcs.double, 1)
    finally:
        executor.shutdown()


@BOTH
def test_an_initializer_runs_in_every_worker(executor_cls: Executor) -> None:
    with executor_cls(
        max_workers=2, mp_context=forkserver(), initializer=funcs.record_init, initargs=("up",)
    ) as executor:
        records = [executor.submit(funcs.init_record).result(WAIT) for _ in range(4)]
    assert all(record == ["up"] for _, record in records)


@BOTH
def test_max_tasks_per_child_replaces_workers(executor_cls: Executor) -> None:
    if executor_cls is cf.ProcessPoolExecutor and sys.version_info < (3, 11):
        pytest.skip("the stdlib's executor has max_tasks_per_child from Python 3.11")
    with executor_cls(max_workers=1, mp_context=forkserver(), max_tasks_per_child=2) as executor:
        pids = [executor.submit(funcs.pid).result(WAIT) for _ in range(6)]
    per_worker = Counter(pids)
    assert len(per_worker) >= 3
    assert max(per_worker.values()) <= 2


# -- where conveyor differs: a crash is local -----------------------------------------------


def test_the_stdlib_executor_breaks_on_a_crash() -> None:
    # the behaviour conveyor improves on, stated here so that the difference stays visible
    with cf.ProcessPoolExecutor(max_workers=2, mp_context=forkserver()) as executor:
        assert isinstance(executor.submit(funcs.exit_now, 3).exception(WAIT), BrokenProcessPool)
        with pytest.raises(BrokenProcessPool):
            executor.submit(funcs.double, 1)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_crash_fails_only_its_call_and_the_executor_stays_usable(method: str) -> None:
    context = multiprocessing.get_context(method)
    with conveyor.ProcessPoolExecutor(max_workers=2, mp_context=context) as executor:
        futures = [executor.submit(funcs.crash_on, i, 2, "exit") for i in range(6)]
        crashed = futures[2].exception(WAIT)
        assert isinstance(crashed, BrokenProcessPool)
        assert isinstance(crashed, conveyor.WorkerCrashed)
        assert crashed.exitcode == 7
        assert [f.result(WAIT) for i, f in enumerate(futures) if i != 2] == [0, 1, 3, 4, 5]
        with pytest.raises(BrokenProcessPool):
            list(executor.map(funcs.crash_on, range(6), [4] * 6, ["segfault"] * 6))
        assert list(executor.map(funcs.double, range(20))) == [2 * x for x in range(20)]
    stats = executor.statistics()  # after shutdown: every call of the left map has ended
    assert stats.failed == 2
    assert stats.submitted == stats.completed + stats.failed + stats.cancelled


def test_the_executor_takes_conveyors_keyword_extras() -> None:
    with conveyor.ProcessPoolExecutor(
        max_workers=2, mp_context=forkserver(), retries=1, timeout=WAIT
    ) as executor:
        error = executor.submit(funcs.exit_now, 4).exception(WAIT)
        assert isinstance(error, conveyor.WorkerCrashed)
        assert error.attempts == 2
        assert executor.starmap(funcs.add, [(1, 2)]) == [3]
        assert executor.apply_async(funcs.double, (4,)).get(WAIT) == 8
        stats = executor.statistics()
    assert (stats.retried, stats.failed, stats.completed) == (1, 1, 2)
