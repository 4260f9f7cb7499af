"""Property tests of the process backend: exactly one outcome per call under random crashes,
and input order, whatever the batch sizes.

Each example builds its own pool of two worker processes and shuts it down, so the leak check
of the test still holds. Few examples: every crash costs a worker start.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import tempfile
import threading
from collections import Counter
from functools import partial
from typing import Any

import _process_funcs as funcs
from _process_funcs import WAIT
from hypothesis import given, settings
from hypothesis import strategies as st

import conveyor

examples = settings(max_examples=10, deadline=None)

KINDS = ("ok", "raise", "crash")
calls = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(min_value=-1000, max_value=1000)),
    max_size=12,
)


def _check_outcome(kind: str, value: int, outcome: Any, retries: int) -> None:
    attempts = retries + 1
    if kind == "ok":
        assert outcome == value * 3
    elif kind == "raise":
        assert type(outcome) is funcs.Boom
        assert outcome.args == (value,)
        assert getattr(outcome, "attempts", 1) == attempts
    else:
        assert isinstance(outcome, conveyor.WorkerCrashed)
        assert outcome.exitcode == 13
        assert outcome.attempts == attempts  # it crashed its worker every time


@examples
@given(calls=calls, retries=st.integers(min_value=0, max_value=1))
def test_submitted_calls_each_have_exactly_one_outcome_under_crashes(
    calls: list[tuple[str, int]], retries: int
) -> None:
    ended: Counter[int] = Counter()
    lock = threading.Lock()

    def note(index: int) -> Any:
        def done(_: cf.Future[Any]) -> None:
            with lock:
                ended[index] += 1

        return done

    with conveyor.Pool("process", 2, retries=retries) as pool:
        futures = [pool.submit(funcs.outcome, kind, value) for kind, value in calls]
        for index, future in enumerate(futures):
            future.add_done_callback(note(index))
        _, not_done = cf.wait(futures, timeout=WAIT)
        assert not not_done
        assert list(pool.map(funcs.double, range(5))) == [0, 2, 4, 6, 8]  # it still works
        stats = pool.statistics()

    assert ended == Counter(range(len(calls)))  # each future ended exactly once
    for (kind, value), future in zip(calls, futures, strict=True):
        _check_outcome(kind, value, future.exception(0) or future.result(0), retries)
    failing = sum(kind != "ok" for kind, _ in calls)
    assert stats.submitted == len(calls) + 5
    assert (stats.completed, stats.failed, stats.cancelled) == (
        len(calls) - failing + 5,
        failing,
        0,
    )
    assert stats.retried == retries * failing
    assert stats.timed_out == 0
    assert stats.busy == stats.pending == 0


@examples
@given(
    calls=calls,
    retries=st.integers(min_value=0, max_value=1),
    chunksize=st.none() | st.integers(min_value=1, max_value=5),
)
def test_a_map_under_crashes_yields_up_to_its_first_failure_and_counts_add_up(
    calls: list[tuple[str, int]], retries: int, chunksize: int | None
) -> None:
    kinds = [kind for kind, _ in calls]
    values = [value for _, value in calls]
    seen: list[int] = []
    error: BaseException | None = None
    with conveyor.Pool("process", 2, retries=retries) as pool:
        try:
            for result in pool.map(funcs.outcome, kinds, values, chunksize=chunksize):
                seen.append(result)
        except (funcs.Boom, conveyor.WorkerCrashed) as exc:
            error = exc
        assert pool.submit(funcs.double, 4).result(WAIT) == 8  # it still works
    stats = pool.statistics()

    first_bad = next((i for i, kind in enumerate(kinds) if kind != "ok"), len(calls))
    assert seen == [value * 3 for value in values[:first_bad]]
    if first_bad == len(calls):
        assert error is None
    else:
        _check_outcome(kinds[first_bad], values[first_bad], error, retries)
    # the map is lazy: leaving it at its error may leave input unread and cancel queued
    # calls, but every call it submitted has one outcome
    if error is None:
        assert stats.submitted == len(calls) + 1
    else:
        assert first_bad + 2 <= stats.submitted <= len(calls) + 1
    assert stats.submitted == stats.completed + stats.failed + stats.cancelled
    assert stats.completed >= first_bad + 1
    assert stats.failed <= len(calls) - kinds.count("ok")
    assert stats.failed >= (error is not None)
    assert stats.busy == stats.pending == 0


@examples
@given(
    xs=st.lists(st.integers(), max_size=60),
    chunksize=st.none() | st.integers(min_value=1, max_value=10),
    buffersize=st.none() | st.integers(min_value=1, max_value=12),
)
def test_maps_on_processes_equal_the_builtin_map(
    xs: list[int], chunksize: int | None, buffersize: int | None
) -> None:
    expected = [2 * x for x in xs]
    with conveyor.Pool("process", 2) as pool:
        assert list(pool.map(funcs.double, xs, chunksize=chunksize, buffersize=buffersize)) == (
            expected
        )
        assert list(pool.imap(funcs.double, iter(xs), chunksize, buffersize=buffersize)) == (
            expected
        )
        unordered = pool.imap_unordered(funcs.double, xs, chunksize, buffersize=buffersize)
        assert sorted(unordered) == sorted(expected)
        assert pool.starmap(funcs.add, [(x, x) for x in xs], chunksize) == expected
        stats = pool.statistics()
    assert stats.completed == stats.submitted == 4 * len(xs)


@examples
@given(
    start=st.integers(min_value=-20, max_value=20),
    length=st.integers(min_value=0, max_value=80),
    step=st.sampled_from([1, 2, -1, -3]),
    bad=st.integers(min_value=-30, max_value=100),
    chunksize=st.none() | st.integers(min_value=1, max_value=10),
)
def test_a_map_over_a_range_with_a_crash_reruns_the_right_calls(
    start: int, length: int, step: int, bad: int, chunksize: int | None
) -> None:
    # Batches of a range travel as ranges; a crash splits them into reruns, which must run
    # exactly the calls that were lost, with their own arguments.
    inputs = range(start, start + step * length, step)
    with tempfile.TemporaryDirectory() as scratch:
        marker = os.path.join(scratch, "crashed")
        with conveyor.Pool("process", 2, retries=1) as pool:
            call = partial(funcs.double_or_crash_once, bad=bad, marker=marker)
            results = list(pool.map(call, inputs, chunksize=chunksize))
        assert os.path.exists(marker) == (bad in inputs)
    assert results == [2 * x for x in inputs]
