"""Property tests: a pipeline computes what the same composition of built-ins computes.

For any data, stages, worker counts, window sizes and orderings: the output equals the
built-in composition (as a list when every stage is ordered, as a multiset otherwise), and
every stage calls its function exactly once per item it receives.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor import Failed, Pipeline

# (kind, a, b): map x -> a*x + b; filter x % a == b; flat_map x -> [x + i for i in range(a)]
_STAGE = st.one_of(
    st.tuples(st.just("map"), st.integers(-3, 3), st.integers(-5, 5)),
    st.integers(2, 4).flatmap(
        lambda m: st.tuples(st.just("filter"), st.just(m), st.integers(0, m - 1))
    ),
    st.tuples(st.just("flat_map"), st.integers(0, 3), st.just(0)),
)
_OPTIONS = st.tuples(
    st.integers(1, 4),  # workers
    st.booleans(),  # ordered
    st.sampled_from([None, 1, 2, 7]),  # buffersize
)
_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    # The leak check runs once around all examples of a test, which is what it should do.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _function(kind: str, a: int, b: int) -> Callable[[int], Any]:
    if kind == "map":
        return lambda x: a * x + b
    if kind == "filter":
        return lambda x: x % a == b
    return lambda x: [x + i for i in range(a)]


def _builtin(kind: str, fn: Callable[[int], Any], items: Iterable[int]) -> list[int]:
    if kind == "map":
        return list(map(fn, items))
    if kind == "filter":
        return list(filter(fn, items))
    return [y for x in items for y in fn(x)]


class _Calls:
    """Counts the calls of each stage's function, by argument."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[Counter[int]] = []

    def wrap(self, fn: Callable[[int], Any]) -> Callable[[int], Any]:
        seen: Counter[int] = Counter()
        self.seen.append(seen)

        def call(x: int) -> Any:
            with self.lock:
                seen[x] += 1
            return fn(x)

        return call


@_SETTINGS
@given(
    data=st.lists(st.integers(-1000, 1000), max_size=200),
    stages=st.lists(st.tuples(_STAGE, _OPTIONS), max_size=4),
)
def test_a_pipeline_equals_the_builtin_composition(
    data: list[int], stages: list[tuple[tuple[str, int, int], tuple[int, bool, int | None]]]
) -> None:
    calls = _Calls()
    pipeline: Pipeline[Any] = Pipeline(iter(data))
    expected: list[int] = list(data)
    inputs: list[list[int]] = []
    for (kind, a, b), (workers, ordered, buffersize) in stages:
        fn = _function(kind, a, b)
        inputs.append(expected)
        expected = _builtin(kind, fn, expected)
        add = getattr(pipeline, kind)
        pipeline = add(calls.wrap(fn), workers=workers, ordered=ordered, buffersize=buffersize)
    out = list(pipeline)
    if all(ordered for _, (_, ordered, _) in stages):
        assert out == expected
    else:
        assert Counter(out) == Counter(expected)
    # Exactly once: each stage saw each of its inputs as often as it occurs.
    assert calls.seen == [Counter(items) for items in inputs]


@_SETTINGS
@given(
    data=st.lists(st.integers(0, 100), max_size=100),
    modulus=st.integers(2, 5),
    workers=st.integers(1, 4),
    ordered=st.booleans(),
)
def test_collected_failures_take_the_place_of_their_items(
    data: list[int], modulus: int, workers: int, ordered: bool
) -> None:
    def fragile(x: int) -> int:
        if x % modulus == 0:
            raise ValueError(x)
        return x * 10

    out = list(
        Pipeline(data, errors="collect")
        .map(fragile, workers=workers, ordered=ordered, name="fragile")
        .map(lambda x: x + 1, workers=workers)
        .filter(lambda x: x % 3 != 0, workers=workers)
    )
    expected: list[object] = [
        ("failed", x) if x % modulus == 0 else x * 10 + 1
        for x in data
        if x % modulus == 0 or (x * 10 + 1) % 3 != 0
    ]
    got = [("failed", o.item) if isinstance(o, Failed) else o for o in out]
    if ordered:
        assert got == expected
    else:
        assert Counter(got) == Counter(expected)
    assert all(o.stage == "fragile" for o in out if isinstance(o, Failed))
