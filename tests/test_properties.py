"""Property tests of ``conveyor.Pool`` on threads: ordering, exactly one outcome, counters.

Each example builds its own pool and shuts it down, so the leak check of the test still holds.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import conveyor

WAIT = 30.0

examples = settings(max_examples=50, deadline=None)

worker_counts = st.integers(min_value=1, max_value=8)
chunksizes = st.none() | st.integers(min_value=1, max_value=10)
buffersizes = st.none() | st.integers(min_value=1, max_value=20)


def scramble(x: int) -> int:
    return (x * 7919) ^ (x >> 3)


@examples
@given(
    xs=st.lists(st.integers()),
    workers=worker_counts,
    chunksize=chunksizes,
    buffersize=buffersizes,
)
def test_map_equals_the_builtin_map(
    xs: list[int], workers: int, chunksize: int | None, buffersize: int | None
) -> None:
    with conveyor.Pool(workers=workers) as pool:
        results = pool.map(scramble, xs, chunksize=chunksize, buffersize=buffersize)
        assert list(results) == list(map(scramble, xs))
        imap = pool.imap(scramble, iter(xs), chunksize=chunksize, buffersize=buffersize)
        assert list(imap) == list(map(scramble, xs))
        unordered = pool.imap_unordered(scramble, xs, chunksize=chunksize, buffersize=buffersize)
        assert sorted(unordered) == sorted(map(scramble, xs))
        stats = pool.statistics()
    assert stats.submitted == stats.completed == 3 * len(xs)


@examples
@given(
    xs=st.lists(st.integers(), max_size=30),
    ys=st.lists(st.integers(), max_size=30),
    workers=worker_counts,
    chunksize=chunksizes,
)
def test_map_over_two_iterables_equals_the_builtin_map(
    xs: list[int], ys: list[int], workers: int, chunksize: int | None
) -> None:
    def combine(a: int, b: int) -> int:
        return a * 31 - b

    with conveyor.Pool(workers=workers) as pool:
        assert list(pool.map(combine, xs, ys, chunksize=chunksize)) == list(map(combine, xs, ys))
        pairs = list(zip(xs, ys, strict=False))
        assert pool.starmap(combine, pairs, chunksize=chunksize) == [combine(*p) for p in pairs]


@examples
@given(
    xs=st.lists(st.integers(min_value=0, max_value=50), max_size=40),
    workers=worker_counts,
    chunksize=chunksizes,
    buffersize=buffersizes,
    bad=st.integers(min_value=0, max_value=50),
)
def test_map_raises_at_the_first_failing_position(
    xs: list[int], workers: int, chunksize: int | None, buffersize: int | None, bad: int
) -> None:
    def call(x: int) -> int:
        if x == bad:
            raise ValueError(x)
        return -x

    seen: list[int] = []
    error: BaseException | None = None
    with conveyor.Pool(workers=workers) as pool:
        try:
            for value in pool.map(call, xs, chunksize=chunksize, buffersize=buffersize):
                seen.append(value)
        except ValueError as exc:
            error = exc
        stats = pool.statistics()
    if bad in xs:
        position = xs.index(bad)
        assert seen == [-x for x in xs[:position]]
        assert error is not None
        assert error.args == (bad,)
    else:
        assert seen == [-x for x in xs]
        assert error is None
    # leaving early may cancel queued calls, but every call has its one outcome
    assert stats.completed + stats.failed + stats.cancelled == stats.submitted
    assert stats.busy == stats.pending == 0


class Call:
    """Fails its first ``failures[i]`` attempts at item ``i``; counts attempts per item."""

    def __init__(self, failures: list[int], gate: threading.Event) -> None:
        self.failures = failures
        self.gate = gate
        self.attempts: Counter[int] = Counter()
        self._lock = threading.Lock()

    def __call__(self, i: int) -> int:
        if not self.gate.wait(WAIT):
            raise AssertionError("the gate was never opened")
        with self._lock:
            self.attempts[i] += 1
            attempt = self.attempts[i]
        if attempt <= self.failures[i]:
            raise ValueError(f"item {i} attempt {attempt}")
        return i * i


@examples
@given(
    data=st.data(),
    workers=st.integers(min_value=1, max_value=4),
    retries=st.integers(min_value=0, max_value=2),
    n=st.integers(min_value=0, max_value=25),
)
def test_every_call_has_exactly_one_outcome(
    data: st.DataObject, workers: int, retries: int, n: int
) -> None:
    failures = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n), label="failures")
    to_cancel = data.draw(st.sets(st.integers(0, max(0, n - 1)), max_size=n), label="cancel")
    gate = threading.Event()
    call = Call(failures, gate)
    callbacks: Counter[int] = Counter()
    lock = threading.Lock()

    def note(index: int) -> Any:
        def done(_: cf.Future[int]) -> None:
            with lock:
                callbacks[index] += 1

        return done

    with conveyor.Pool(workers=workers, retries=retries) as pool:
        try:
            futures = [pool.submit(call, i) for i in range(n)]
            for i, future in enumerate(futures):
                future.add_done_callback(note(i))
            cancelled = {i for i in to_cancel if i < n and futures[i].cancel()}
        finally:
            gate.set()
        _, not_done = cf.wait(futures, timeout=WAIT)
        assert not not_done
        stats = pool.statistics()

    assert callbacks == Counter(range(n))  # each future ended once
    results = errors = 0
    for i, future in enumerate(futures):
        if i in cancelled:
            assert future.cancelled()
            assert call.attempts[i] == 0  # a cancelled call never ran
            continue
        assert not future.cancelled()
        expected_attempts = min(failures[i], retries) + 1
        assert call.attempts[i] == expected_attempts
        error = future.exception(0)
        if failures[i] <= retries:
            assert error is None
            assert future.result(0) == i * i
            results += 1
        else:
            assert isinstance(error, ValueError)
            assert str(error) == f"item {i} attempt {expected_attempts}"
            if expected_attempts > 1:
                assert error.attempts == expected_attempts  # type: ignore[attr-defined]
            errors += 1
    assert stats.submitted == n
    assert (stats.completed, stats.failed, stats.cancelled) == (results, errors, len(cancelled))
    assert stats.retried == sum(min(failures[i], retries) for i in range(n) if i not in cancelled)
    assert stats.busy == stats.pending == 0


@examples
@given(
    n=st.integers(min_value=0, max_value=200),
    take=st.integers(min_value=0, max_value=200),
    workers=worker_counts,
    chunksize=chunksizes,
    buffersize=buffersizes,
    failing=st.sets(st.integers(min_value=0, max_value=200), max_size=5),
)
def test_statistics_add_up_after_maps_left_early(
    n: int,
    take: int,
    workers: int,
    chunksize: int | None,
    buffersize: int | None,
    failing: set[int],
) -> None:
    lock = threading.Lock()
    ran: Counter[int] = Counter()

    def call(x: int) -> int:
        with lock:
            ran[x] += 1
        if x in failing:
            raise KeyError(x)
        return x

    with conveyor.Pool(workers=workers) as pool:
        results = pool.map(call, range(n), chunksize=chunksize, buffersize=buffersize)
        seen: list[int] = []
        try:
            for value in results:
                if len(seen) == take:
                    break
                seen.append(value)
        except KeyError:
            pass
        results.close()  # type: ignore[attr-defined]
        futures = [pool.submit(call, x) for x in range(min(n, 20))]
        cf.wait(futures, timeout=WAIT)
    stats = pool.statistics()
    expected = [x for x in range(n) if x not in failing]
    assert seen == expected[: len(seen)]
    assert stats.completed + stats.failed + stats.cancelled == stats.submitted
    # every call ran at most once, and exactly the calls not cancelled ran
    assert all(count <= 2 for count in ran.values())  # once in the map, once as a future
    assert sum(ran.values()) == stats.completed + stats.failed
    assert stats.failed == sum(count for x, count in ran.items() if x in failing)
    assert stats.busy == stats.pending == 0


ranges = st.builds(
    range,
    st.integers(min_value=-50, max_value=50),
    st.integers(min_value=-50, max_value=200),
    st.integers(min_value=1, max_value=7) | st.integers(min_value=-7, max_value=-1),
)


@examples
@given(inputs=ranges, workers=worker_counts, chunksize=chunksizes, buffersize=buffersizes)
def test_a_map_over_a_range_equals_the_builtin_map(
    inputs: range, workers: int, chunksize: int | None, buffersize: int | None
) -> None:
    # A range is cut into ranges, not read item by item: the results must not show it.
    with conveyor.Pool(workers=workers) as pool:
        expected = list(map(scramble, inputs))
        assert list(pool.map(scramble, inputs, chunksize=chunksize, buffersize=buffersize)) == (
            expected
        )
        assert list(pool.imap(scramble, inputs, chunksize, buffersize=buffersize)) == expected
        unordered = pool.imap_unordered(scramble, inputs, chunksize, buffersize=buffersize)
        assert sorted(unordered) == sorted(expected)
