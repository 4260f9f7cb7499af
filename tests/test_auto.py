"""``backend="auto"``: each function is measured on threads, then placed on threads or
processes, and ``Pool.decisions()`` says where and why.

The functions here are unmistakable (a sleep; pure-Python CPU work holding the GIL), and the
assertions are on the decisions and where calls ran, never on times. A function that lets
the GIL go is judged on given measurements only (``test_the_verdict_on_calls_that_let_the_
gil_go``): how two threads scale depends on free CPUs, which a loaded test machine lacks
(``benchmarks/bench_auto.py`` shows the decision on a real one).
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

import _process_funcs as funcs
import psutil
import pytest

import conveyor
from conveyor._backends._verdict import (
    CPU_BOUND,
    ENOUGH,
    MIN_PAIR,
    MIN_SOLO,
    PROCESS,
    SHORT_CALL,
    THREAD,
    Verdict,
)

needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="with one CPU, auto keeps every function on threads"
)


def _descendants() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def test_a_function_that_waits_stays_on_threads_and_no_process_starts() -> None:
    before = _descendants()
    with conveyor.Pool("auto", 8) as pool:
        assert set(pool.map(funcs.sleep_then_pid, [0.02] * 24)) == {os.getpid()}
        decision = pool.decisions()["sleep_then_pid"]
        started = _descendants() - before
    assert decision.startswith("thread (CPU "), decision
    assert "it waits" in decision
    assert not started


@needs_two_cpus
def test_a_function_that_holds_the_gil_moves_to_processes() -> None:
    with conveyor.Pool("auto", 2) as pool:
        pids = list(pool.map(funcs.spin, [0.15] * 8))
        decision = pool.decisions()["spin"]
    assert decision.startswith("process (CPU "), decision
    assert "scaling on 2 threads" in decision
    # The first calls ran on threads, while measured; the rest in worker processes.
    assert os.getpid() in pids
    assert any(pid != os.getpid() for pid in pids)


@needs_two_cpus
def test_a_function_that_cannot_be_pickled_stays_on_threads_and_says_why() -> None:
    lock = threading.Lock()  # a closure over a lock cannot be pickled

    def spin_holding(seconds: float) -> int:
        with lock:
            pass
        return funcs.spin(seconds)

    before = _descendants()
    with conveyor.Pool("auto", 2) as pool:
        pids = list(pool.map(spin_holding, [0.15] * 6))
        (decision,) = pool.decisions().values()
        started = _descendants() - before
    assert decision.startswith("thread (CPU "), decision
    assert "cannot be pickled" in decision
    assert set(pids) == {os.getpid()}
    assert not started


@needs_two_cpus
def test_a_function_whose_calls_become_long_is_measured_again() -> None:
    with conveyor.Pool("auto", 2) as pool:
        assert list(pool.map(funcs.short_then_spinning, range(500))) == list(range(1, 501))
        first = pool.decisions()["short_then_spinning"]
        # The first slow calls may come in one batch sized from the quick ones: the pool
        # sees they got long as that batch ends, and measures the calls after it.
        for _ in range(3):
            assert list(pool.map(funcs.short_then_spinning, [1000] * 4)) == [1001] * 4
        second = pool.decisions()["short_then_spinning"]
    assert first.startswith("thread (calls of "), first
    assert "too short" in first
    assert second.startswith("process (CPU "), second


def test_a_failure_to_measure_leaves_the_function_on_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: Verdict, sampled: bool = False) -> None:
        raise ZeroDivisionError("a bug in measuring")

    monkeypatch.setattr(Verdict, "judge", broken)
    with conveyor.Pool("auto", 2) as pool:
        assert list(pool.map(funcs.double, range(40))) == [2 * x for x in range(40)]
        decision = pool.decisions()["double"]
    assert decision == "thread (measuring it failed (ZeroDivisionError: a bug in measuring))"


async def _async_double(x: int) -> int:
    return 2 * x


def test_a_coroutine_function_submitted_call_by_call_is_one_function() -> None:
    # Each call gets a new plain wrapper (run on a loop of its own): the pool still knows
    # them as one function, measured once, and named by it.
    with conveyor.Pool("auto", 2) as pool:
        for x in range(20):
            assert pool.submit(_async_double, x).result(funcs.WAIT) == 2 * x
        assert list(pool.decisions()) == ["_async_double"]


def test_decisions_are_empty_on_the_other_backends() -> None:
    with conveyor.Pool("thread", 2) as pool:
        pool.submit(funcs.double, 1).result(funcs.WAIT)
        assert pool.decisions() == {}


def test_an_auto_pool_keeps_the_pool_promises() -> None:
    with conveyor.Pool("auto", 4, retries=1, retry_on=ValueError) as pool:
        assert pool.submit(funcs.double, 21).result(funcs.WAIT) == 42
        with pytest.raises(ZeroDivisionError):
            pool.submit(divmod, 1, 0).result(funcs.WAIT)
        assert sorted(pool.imap_unordered(funcs.double, range(50))) == [2 * x for x in range(50)]
        stats = pool.statistics()
    assert stats.completed == 51 and stats.failed == 1


def test_an_auto_pool_leaves_no_thread_behind() -> None:
    before = set(threading.enumerate())
    with conveyor.Pool("auto", 2) as pool:
        list(pool.map(funcs.sleep_then_pid, [0.01] * 6))
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not left, left


def test_a_pipeline_stage_may_be_auto() -> None:
    pipeline = conveyor.Pipeline(range(20)).map(funcs.double, backend="auto", workers=2)
    assert list(pipeline) == [2 * x for x in range(20)]


def test_bad_process_options_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="max_tasks_per_worker"):
        conveyor.Pool("auto", max_tasks_per_worker=0)


# -- the verdict, on measurements given --------------------------------------------------------


def _measured(
    solo: tuple[float, float] = (0.0, 0.0), pair: tuple[float, float] = (0.0, 0.0), **more: Any
) -> Verdict:
    """A verdict that measured ``solo`` (CPU, time a CPU was to be had) of calls alone and
    ``pair`` of calls two at once (both summed over the two threads)."""
    verdict = Verdict("f", "m", lambda: None)
    verdict.solo_cpu, verdict.solo_time = solo
    verdict.solo_wall = solo[1]
    verdict.pair_cpu, verdict.pair_time = pair
    verdict.pair_wall = pair[1]
    for name, value in more.items():
        setattr(verdict, name, value)
    return verdict


def test_the_verdict_on_calls_that_wait() -> None:
    assert _measured(solo=(0.0001, 0.02)).judge() == (THREAD, "waits", {"share": 0.005})


def test_the_verdict_on_calls_too_short_for_processes() -> None:
    judged = _measured(calls=100, call_wall=100 * SHORT_CALL / 10).judge()
    assert judged is not None and judged[:2] == (THREAD, "short")


def test_the_verdict_on_calls_that_hold_the_gil() -> None:
    judged = _measured(solo=(0.02, 0.02), pair=(0.02, 0.04)).judge()
    assert judged is not None and judged[:2] == (PROCESS, "gil")
    assert judged[2]["scaling"] == pytest.approx(1.0)


def test_the_verdict_on_calls_that_let_the_gil_go() -> None:
    judged = _measured(solo=(0.02, 0.02), pair=(0.04, 0.04)).judge()
    assert judged is not None and judged[:2] == (THREAD, "scales")
    assert judged[2]["scaling"] == pytest.approx(2.0)


def test_the_verdict_waits_for_more_when_too_little_was_measured() -> None:
    assert _measured(solo=(MIN_SOLO / 2, MIN_SOLO / 2)).judge() is None
    assert _measured(solo=(0.02, 0.02), pair=(MIN_PAIR / 2, MIN_PAIR)).judge() is None


def test_the_verdict_near_a_threshold_waits_for_more_then_decides() -> None:
    near = CPU_BOUND * 1.05
    assert _measured(solo=(near * 0.01, 0.01)).solo_share() is None
    assert _measured(solo=(near * ENOUGH, ENOUGH)).solo_share() == pytest.approx(near)


def test_the_verdict_on_a_busy_machine_measures_longer() -> None:
    quiet = _measured(solo=(0.006, 0.006))
    busy = _measured(solo=(0.006, 0.006), solo_wall=0.03, solo_waited=0.024)
    assert quiet.solo_share() == pytest.approx(1.0)
    assert busy.solo_share() is None


def test_a_decision_reads_as_figures() -> None:
    verdict = _measured()
    verdict.place(PROCESS, "gil", {"share": 0.98, "scaling": 1.04})
    assert verdict.describe() == "process (CPU 98% of wall, 1.0x scaling on 2 threads)"
    verdict.place(THREAD, "short", {"call": 3e-6})
    assert verdict.describe() == "thread (calls of 3 µs: too short to gain from processes)"


def test_a_partial_is_named_by_its_function() -> None:
    add_one = functools.partial(funcs.add, z=1)  # (decisions() names functions still alive)
    with conveyor.Pool("auto", 2) as pool:
        assert list(pool.map(add_one, range(10))) == list(range(1, 11))
        assert list(pool.decisions()) == ["partial(add)"]
