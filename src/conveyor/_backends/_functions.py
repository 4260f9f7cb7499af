"""The functions a process pool sends its workers: each pickled once per pool and sent once
per worker, with what was measured of its calls (their mean time, and whether it is steady).
Used by the holder of the dispatcher role only (see ``_schedule``).
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Hashable
from typing import Any

from . import _wire, _worker
from ._base import Batch
from ._fnref import FnRef, fn_key, fn_ref, is_fn
from ._workers import Proc

__all__ = ["FUNCTION_CACHE", "STEADY", "FunctionCache"]

#: Functions cached per pool (and per worker) before the caches are reset.
FUNCTION_CACHE = 256
#: Calls are steady when their measured times stray from their mean by under this share.
STEADY = 0.1

_FORGET = bytes([_worker.FORGET])


class FunctionCache:
    """The functions sent to workers, each pickled once per pool and sent once per worker,
    with the measured seconds per call of each."""

    def __init__(self) -> None:
        # fn_key(fn) -> (a weak reference to fn, its id on the wire, its pickle): the cache
        # must not keep a function, or the object of a bound method, alive.
        self._entries: collections.OrderedDict[Hashable, tuple[FnRef, int, bytes]] = (
            collections.OrderedDict()
        )
        self._ids = itertools.count()
        self._seconds: dict[int, float] = {}  # measured seconds per call, by wire id
        self._spread: dict[int, float] = {}  # how far measures stray from it, by wire id
        self._last: tuple[FnRef, int, bytes] | None = None  # the entry found last...
        self._last_key: Hashable = None  # ... and its key

    def _entry(self, fn: Any) -> tuple[FnRef, int, bytes] | None:
        last = self._last
        if last is not None and last[0]() is fn:
            return last  # the function of the batch before, asked of again and again
        key = fn_key(fn)
        entry = self._entries.get(key)
        if entry is not None and is_fn(entry[0], fn):
            self._last = entry
            self._last_key = key
            return entry
        return None

    def blob_for(self, proc: Proc, fn: Any) -> tuple[int, bytes | None]:
        """The id under which ``proc`` knows ``fn``, and its pickle if it does not yet."""
        entry = self._entry(fn)
        if entry is None:
            ref = fn_ref(fn)
            entry = (ref or _gone, next(self._ids), _wire.dumps_function(fn))
            if ref is not None:  # (else it is pickled again for every job)
                self._entries[fn_key(fn)] = entry
                if len(self._entries) > FUNCTION_CACHE:
                    _, (_, old_id, _) = self._entries.popitem(last=False)
                    self._seconds.pop(old_id, None)
                    self._spread.pop(old_id, None)
                    self._last = None
        else:
            self._entries.move_to_end(self._last_key)  # (_entry found it: it is _last)
        fn_id = entry[1]
        if fn_id in proc.known:
            return fn_id, None
        if len(proc.known) >= FUNCTION_CACHE:
            proc.conn.send_bytes(_FORGET)
            proc.known.clear()
        proc.known.add(fn_id)
        return fn_id, entry[2]

    def call_seconds(self, fn: Any) -> float | None:
        """The measured seconds per call of ``fn``, if known."""
        entry = self._entry(fn)
        return None if entry is None else self._seconds.get(entry[1])

    def seconds_by_id(self, fn_id: int) -> float | None:
        return self._seconds.get(fn_id)

    def measure(self, batch: Batch, calls: int, elapsed: float) -> None:
        entry = self._entry(batch.fn)
        if entry is None or not calls:
            return
        per_call = elapsed / calls
        fn_id = entry[1]
        old = self._seconds.get(fn_id)
        if old is None:
            self._seconds[fn_id] = per_call
            self._spread[fn_id] = math.inf  # not steady until two strays are measured
            return
        self._seconds[fn_id] = 0.5 * (old + per_call)
        stray = abs(per_call - old)
        spread = self._spread.get(fn_id, math.inf)
        # The first stray stands in for the spread, doubled: one alike pair of calls does
        # not make a function steady; a second one does.
        self._spread[fn_id] = 2.0 * stray if spread == math.inf else 0.5 * (spread + stray)

    def steady(self, fn: Any) -> bool:
        """Whether the measured calls of ``fn`` take about the same time each (``STEADY``),
        so that when a call will end can be foreseen."""
        entry = self._entry(fn)
        if entry is None:
            return False
        seconds = self._seconds.get(entry[1])
        spread = self._spread.get(entry[1])
        return seconds is not None and spread is not None and spread <= STEADY * seconds


def _gone() -> None:
    return None
