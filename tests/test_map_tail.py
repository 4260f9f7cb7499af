"""The end of a map whose calls grow longer along its input: its last calls are sent last one
first (``_map._MapState._reverse_tail``), and everything a map promises still holds: results in
input order, each input once, an input error raised after the results before it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import conveyor

ITEMS = 10


class _Starts:
    """A function whose calls take longer the larger their input (1.5x per step), noting the
    order in which they start."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, x: int) -> int:
        with self._lock:
            self.order.append(x)
        time.sleep(0.004 * 1.5**x)
        return x * x


class _HintedRaising:
    """An iterator over ``range(items)`` that says how many items are left, and raises
    ``ValueError`` instead of giving ``bad``."""

    def __init__(self, items: int, bad: int) -> None:
        self._next = 0
        self._items = items
        self._bad = bad

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if self._next >= self._items:
            raise StopIteration
        if self._next == self._bad:
            self._next = self._items
            raise ValueError("bad input")
        self._next += 1
        return self._next - 1

    def __length_hint__(self) -> int:
        return self._items - self._next


@pytest.mark.parametrize("source", [range, list, tuple])
def test_calls_that_grow_end_with_the_last_ones_sent_first_and_results_in_order(
    source: Any,
) -> None:
    fn = _Starts()
    inputs = range(ITEMS) if source is range else source(range(ITEMS))
    with conveyor.Pool(workers=2) as pool:
        assert list(pool.map(fn, inputs)) == [x * x for x in range(ITEMS)]
    assert sorted(fn.order) == list(range(ITEMS))  # each once
    # The longest call started before the one just before it in the input.
    assert fn.order.index(ITEMS - 1) < fn.order.index(ITEMS - 2), fn.order


def test_calls_that_do_not_grow_go_in_input_order() -> None:
    order: list[int] = []

    def nap(x: int) -> int:
        order.append(x)
        time.sleep(0.004 * 1.5 ** (ITEMS - x))  # shrinking along the input
        return x

    with conveyor.Pool(workers=2) as pool:
        assert list(pool.map(nap, range(ITEMS))) == list(range(ITEMS))
    assert order.index(ITEMS - 1) > order.index(ITEMS - 2), order


def test_unordered_results_of_a_reversed_end_each_come_once() -> None:
    fn = _Starts()
    with conveyor.Pool(workers=2) as pool:
        assert sorted(pool.imap_unordered(fn, list(range(ITEMS)))) == sorted(
            x * x for x in range(ITEMS)
        )
    assert fn.order.index(ITEMS - 1) < fn.order.index(ITEMS - 2), fn.order


def test_an_input_error_in_the_end_comes_after_the_results_before_it() -> None:
    fn = _Starts()
    bad = ITEMS - 2
    results: list[int] = []
    with conveyor.Pool(workers=2) as pool, pytest.raises(ValueError, match="bad input"):
        for value in pool.map(fn, _HintedRaising(ITEMS, bad)):
            results.append(value)
    assert results == [x * x for x in range(bad)]
    assert sorted(fn.order) == list(range(bad))
