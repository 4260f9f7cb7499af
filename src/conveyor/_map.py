"""The lazy, bounded map behind ``Pool.map``, ``imap`` and ``imap_unordered``.

The iterator pulls input only while its window has room, cuts it into batches sized from the
measured duration of earlier calls, and yields results in input order (through a reorder buffer
no larger than the window) or as batches complete. Leaving it early cancels what it queued.

Batch sizes aim at the backend's ``batch_seconds`` of calls, so that a call measured longer
travels alone, and every worker stays busy until the end:

* Until this map has measured a batch of its own, it keeps two batches per worker in flight:
  of one call each for a function never measured; for one an earlier map measured, sized
  from that measure, so that a warm map of tiny calls starts at full speed. This map's calls
  may be far longer than those (after a warm-up on ``fib(20)``, the first four batches of
  ``fib(25..30)`` x 6 hold five calls each), and only this small window bounds the harm.
  Batches sized at a sixteenth of the earlier measure until then made the first such map
  of ``fib`` over ``range(25, 33)`` 15% faster, and every warm map of 100,000 tiny calls
  5-10% slower (a millisecond more, in A/B runs): not done.
* Near the end of an input of known length (a ``range``, or an iterator over a list or tuple:
  ``operator.length_hint``), batches hold at most ``1 / (TAIL_SHARES * workers)`` of what is
  left, so the last batches are short and the workers end together.
* Calls measured to take steady times (over ``STEADY_MEASURES`` batches, seconds per call
  within 10% of the mean) get batches of the backend's ``steady_batch_seconds`` (100 ms on
  processes, and for functions the auto backend placed there): their length is foreseen, so
  longer batches still balance, and cost one message each way. Until that is known, the
  window holds two batches per worker, not a full window of batches sized for calls of
  unforeseen length. (500 x ``sleep(0.01)`` on 2 processes, ``python benchmarks/bench_peers.py
  sleep``: a batch costs a worker woken from a sleep 100-300 us on a VM; 100 ms batches
  measured 1.017x-1.018x the ideal in A/B rounds against 1.019x-1.021x for 50 ms, where a pool
  that cost nothing would take 1.017x.)
* An explicit ``chunksize`` on a backend that ``sends_chunks`` (processes) makes batches of
  whole chunks, each sent to a worker on its own: the pool's cost is per batch, the
  backend's per chunk.

Long calls of unsteady length go one at a time, in input order, to the first free worker:
nothing tells a pool which input makes a long call before it has run. With one exception,
at the end of an input of known length: when the last two calls measured (in input order)
grew by over ``TAIL_GROWTH``, the last ``TAIL_REVERSE_PER_WORKER`` x workers calls are sent
last one first (``_reverse_tail``; their results still come in input order), since calls
that grow along the input (a sweep over ``range(25, 35)``) would otherwise end with the
longest one running alone. Simulated from fib's growth on 2 workers (durations known to the
simulation only): ``range(25, 35)`` ends 1.236x after a perfect split in order, 1.011x with
this; ``fib(25..30)`` x 6 (``python benchmarks/bench_peers.py fib``), 1.044x and 1.000x;
over 3,000 random orders of those 36 calls, 1.0222x either way (it helps as often as it
hurts where there is no trend). Chunks of 5, what ``multiprocessing.Pool`` and mpire choose
for 36 items, average 1.059x over random orders, though 1.008x on the ascending one.
Measured on 2 processes, medians of 4 maps after a warm-up: ``fib`` over ``range(25, 33)``
348 ms against 405 ms in order; over ``fib(25..30)`` x 6, 723-739 ms against 759-763 ms.
"""

from __future__ import annotations

import functools
import itertools
import operator
import queue
import time
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from ._backends._base import Batch, waits_for_itself
from ._errors import Timeout
from ._ledger import Ledger

R = TypeVar("R")

#: Largest batch the sizer builds on its own; an explicit ``chunksize`` may be larger.
MAX_BATCH = 4096
#: A batch measured to run under this many seconds is short...
SHORT_BATCH_SECONDS = 0.001
#: ... and a map keeps up to this many such batches in flight per worker (else 4).
SHORT_BATCHES_PER_WORKER = 128
#: Batches near the end of an input of known length hold at most 1 / (this x workers) of
#: what is left (see ``_batch_size``).
TAIL_SHARES = 2
#: Batches measured before a map decides whether its calls take steady times.
STEADY_MEASURES = 3
#: A map of long calls whose last calls grew longer along the input sends its last
#: (this x workers) calls last one first (see ``_reverse_tail``)...
TAIL_REVERSE_PER_WORKER = 3
#: ... when the later of the last two calls measured (in input order) took this many times
#: as long as the earlier one.
TAIL_GROWTH = 1.1
#: Items a map keeps in flight when the caller sets no ``buffersize``.
DEFAULT_WINDOW_ITEMS = 65536


class MapObserver(Protocol):
    """What a pipeline stage learns of its map's batches (see ``map_results``)."""

    def queued(self, batch: Batch) -> None:
        """``batch`` was handed to the pool (on the map's thread)."""

    def ended(self, deliver: Callable[[Batch], object], batch: Batch) -> None:
        """``batch`` ended (on a backend's thread); ``deliver(batch)`` hands it to the map."""


def map_results(
    ledger: Ledger,
    fn: Callable[..., R],
    inputs: Iterator[Any] | range,
    *,
    star: bool,
    ordered: bool,
    timeout: float | None,
    chunksize: int | None,
    buffersize: int | None,
    eager: bool = False,
    observer: MapObserver | None = None,
) -> Iterator[R]:
    """Start a map and return the iterator of its results (see ``Pool.map``).

    Work starts at once. Closing the iterator, or losing it to the garbage collector,
    cancels what it queued (an eager map keeps the stdlib's behaviour: what it submitted
    runs anyway). An ``observer`` hears of each batch as it is queued and as it ends.
    """
    state = _MapState(
        ledger, fn, inputs, star, ordered, timeout, chunksize, buffersize, eager, observer
    )
    if eager and state.input_error is not None:
        # The stdlib's map reads its whole input at the call, so that is where an error of the
        # input is raised; the calls submitted before it run.
        raise state.input_error
    batches = _batches(state)
    results: MapResults[R] = MapResults.from_iterable(batches)  # type: ignore[assignment]
    results._batches = batches
    results._state = state
    if not eager:
        weakref.finalize(results, state.close)
    return results


class MapResults(itertools.chain[R]):
    """The results of a map: a C-speed chain over whole batches of results, with the
    ``close()`` of a generator (``Pool.map`` used to return one).

    Each batch's results are popped as they are handed out, so that the iterator keeps no
    reference to a result its caller has dropped."""

    __slots__ = ("__weakref__", "_batches", "_state")
    _batches: Generator[Iterator[Any], None, None]
    _state: _MapState

    def close(self) -> None:
        """Stop: cancel the calls this map queued that have not started."""
        self._batches.close()
        self._state.close()  # (closing a generator not yet started runs none of it)


def _handing_out(values: list[Any]) -> Iterator[Any]:
    """``values`` in order, each popped from the list as it is handed out."""
    values.reverse()
    return itertools.starmap(values.pop, itertools.repeat((), len(values)))


def _batches(state: _MapState) -> Generator[Iterator[Any], None, None]:
    """Each batch's results in turn, up to the first failed call, whose error is raised."""
    try:
        while True:
            batch = state.next_batch()
            if batch is None:
                break
            errors = batch.errors
            values, batch.values = batch.values, []
            del batch
            if errors is None:
                yield _handing_out(values)
                continue
            first = min(errors)
            if first:
                del values[first:]
                yield _handing_out(values)
            failure = errors[first]
            del errors, values
            raise failure
        error = state.input_error
        if error is not None:
            state.input_error = None
            raise error
    finally:
        state.close()


class _MapState:
    """The window of one map: what is queued, what is done, what comes next."""

    def __init__(
        self,
        ledger: Ledger,
        fn: Callable[..., Any],
        inputs: Iterator[Any] | range,
        star: bool,
        ordered: bool,
        timeout: float | None,
        chunksize: int | None,
        buffersize: int | None,
        eager: bool,
        observer: MapObserver | None,
    ) -> None:
        self._ledger = ledger
        self._fn = fn
        self._observer = observer
        # A range is cut into ranges (see Pool's _source); anything else is read item by item.
        self._range = inputs if isinstance(inputs, range) else None
        self._taken = 0  # items of the range handed out so far
        self._inputs: Iterator[Any] = iter(()) if isinstance(inputs, range) else inputs
        self._star = star
        self._ordered = ordered
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._chunksize = chunksize
        self._chunk = 0  # what each batch's chunk is (see Batch.chunk)
        if chunksize is not None and ledger.backend is not None and ledger.backend.sends_chunks:
            self._chunk = chunksize
        self._call_timeout = ledger.call_timeout
        workers = self._workers = ledger.workers
        self._eager = eager
        if eager:
            self._max_batches: float = float("inf")
            self._max_items: float = float("inf")
        else:
            self._max_batches = max(16, 4 * workers)
            self._max_items = buffersize if buffersize is not None else DEFAULT_WINDOW_ITEMS
        # Batch sizes: never so large that the window holds fewer batches than workers.
        # (An eager map's window is infinite, and inf // n is nan: divide, then bound.)
        self._size_cap = max(1, int(min(MAX_BATCH, self._max_items / max(1, workers))))
        assert ledger.backend is not None
        self._backend = ledger.backend
        self._per_item: float | None = None  # measured seconds per call
        # Decaying sums of measured seconds and calls: each batch counts by its calls, so
        # that one call's start-up cost does not keep batches small for long.
        self._measured_seconds = 0.0
        self._measured_calls = 0.0
        known = ledger.costs.get(fn)
        if known is not None:
            self._per_item = self._measured_seconds = known
            self._measured_calls = 1.0
        self._measured_here = 0  # batches of this map measured so far
        # Seconds of the last one-call batches measured, by position (see _growing).
        self._lately: dict[int, float] = {}
        self._tail_sent = False  # the last calls were sent last one first
        self._spread = 0.0  # how far their seconds per call stray from the mean
        self._window = self._window_batches()
        self._done: queue.SimpleQueue[Batch] = queue.SimpleQueue()
        self._sink: Callable[[Batch], object] = self._done.put
        if observer is not None:
            self._sink = functools.partial(observer.ended, self._done.put)
        self._inflight: dict[int, Batch] = {}  # submitted, not yet consumed
        self._ready: dict[int, Batch] = {}  # ordered mode: done, waiting for its turn
        self._items = 0  # calls in _inflight
        self._next_seq = 0
        self._head = 0
        self._exhausted = False
        self.input_error: BaseException | None = None
        self._closed = False
        self._fill()

    def close(self) -> None:
        """Cancel the calls this map queued that have not started. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._measured_here and self._per_item is not None:
            self._ledger.costs.put(self._fn, self._per_item)
        self._exhausted = True
        pending = list(self._inflight.values())
        self._inflight.clear()
        self._ready.clear()
        self._ledger.cancel(pending)

    def next_batch(self) -> Batch | None:
        """The next batch to yield from, waiting for it; None when nothing is left."""
        if self._closed:
            return None
        self._fill()
        if self._ordered:
            batch = self._ready.pop(self._head, None)
            while batch is None:
                if self._head not in self._inflight:
                    return None
                done = self._wait()
                if done.seq == self._head:
                    batch = done
                else:
                    self._ready[done.seq] = done
            self._head += 1
        else:
            if not self._inflight:
                return None
            batch = self._wait()
        del self._inflight[batch.seq]
        self._items -= len(batch.args)
        # Refill now: the workers should not wait while the caller consumes this batch.
        self._fill()
        return batch

    def _wait(self) -> Batch:
        """The next batch to complete; each one measured and followed by a refill, so that a
        slow head of line does not starve the workers."""
        if self._done.empty() and self._backend.runs_loop_here():
            self.close()
            raise waits_for_itself("waiting for a map's results")
        if self._deadline is None:
            batch = self._done.get()
        else:
            remaining = self._deadline - time.monotonic()
            try:
                batch = self._done.get(timeout=max(0.0, remaining))
            except queue.Empty:
                self.close()
                raise Timeout("map() did not produce its next result within timeout") from None
        if batch.elapsed > 0.0:
            per_call = batch.elapsed / len(batch.args)
            before = self._per_item
            self._measured_seconds = 0.5 * self._measured_seconds + batch.elapsed
            self._measured_calls = 0.5 * self._measured_calls + len(batch.args)
            self._per_item = self._measured_seconds / self._measured_calls
            if self._measured_here == 0 or before is None:
                self._spread = per_call  # (not steady until measured again)
            elif self._measured_here == 1:
                self._spread = abs(per_call - before)  # the first stray measured
            else:
                self._spread = 0.5 * (self._spread + abs(per_call - before))
            self._measured_here += 1
            if len(batch.args) == 1:
                lately = self._lately
                lately[batch.seq] = per_call
                if len(lately) > 4:
                    del lately[min(lately)]
            if self._measured_here == 1:
                # Other maps of the function starting now size from this (and close() keeps
                # the last measure for the maps after).
                self._ledger.costs.put(self._fn, self._per_item)
            self._window = self._window_batches()
            self._fill()
        return batch

    def _batch_size(self) -> int:
        if self._call_timeout is not None:
            return 1  # a deadline is watched per batch, so each call gets its own
        chunk = self._chunksize
        if chunk is not None and not self._backend.sends_chunks:
            return chunk
        if self._per_item is None:
            # An unmeasured function may be slow: one slow batch would hold back all.
            return chunk or 1
        steady = self._measured_here >= STEADY_MEASURES and self._spread < 0.1 * self._per_item
        target = self._backend.batch_seconds_for(self._fn, steady)
        size = max(1, min(self._size_cap, int(target / max(self._per_item, 1e-9))))
        if size > 1:
            # Near the end of an input of known length, batches shrink, so that the workers
            # finish together rather than one of them running a last long batch alone.
            if self._range is not None:
                left = len(self._range) - self._taken
            else:
                left = operator.length_hint(self._inputs, -1)
            if left >= 0:
                size = max(1, min(size, -(-left // (TAIL_SHARES * self._workers))))
        if chunk is not None:
            # A batch of whole chunks, which the backend sends one by one.
            size = max(chunk, size // chunk * chunk)
        return size

    def _window_batches(self) -> float:
        """How many batches the window holds now (besides its ``_max_items`` calls)."""
        if self._eager:
            return self._max_batches
        if self._chunksize is None and (self._per_item is None or not self._measured_here):
            # Until a call has been measured, two batches per worker: one to run, one
            # waiting, so that a worker ending its first call finds the next without waiting
            # for this thread to measure it and refill (the measure comes with the first end).
            # (Also when sized from an earlier map: the calls of this one may be longer.)
            return min(self._max_batches, 2 * self._workers)
        if self._per_item is not None and self._per_item * self._batch_size() < SHORT_BATCH_SECONDS:
            # Batches this short (a small chunksize, or a timeout making each call its own
            # batch) each cost the pool a round of its own: keep enough queued that workers
            # never wait for this thread to refill.
            return max(self._max_batches, SHORT_BATCHES_PER_WORKER * self._workers)
        if self._chunksize is None and self._measured_here < STEADY_MEASURES:
            # Whether the calls are steady is not known yet, and steady ones get longer
            # batches: a full window of batches sized until then would each cost a message
            # (500 x sleep(0.01) on 2 processes: 9 one-call batches per worker, 3 with this).
            return min(self._max_batches, 2 * self._workers)
        return self._max_batches

    def _fill(self) -> None:
        """Pull and submit input while the window has room."""
        if self._exhausted:
            return
        max_batches = self._window
        while len(self._inflight) < max_batches and self._items < self._max_items:
            if not self._tail_sent and self._reverse_tail():
                return
            size = self._batch_size()
            if self._max_items != float("inf"):
                size = max(1, min(size, int(self._max_items - self._items)))
            args: Sequence[Any]
            if self._range is not None:
                args = self._range[self._taken : self._taken + size]
                self._taken += len(args)
            else:
                # extend() keeps the items pulled before the input raised: they still run.
                pulled: list[Any] = []
                args = pulled
                try:
                    pulled.extend(itertools.islice(self._inputs, size))
                except BaseException as exc:
                    # Raised once the results before it are yielded, as a loop over the
                    # input would have raised it.
                    self.input_error = exc
                    self._exhausted = True
            if not args:
                self._exhausted = True
                return
            if not self._accept([self._batch_of(args)]):
                return
            if len(args) < size:
                self._exhausted = True
                return

    def _batch_of(self, args: Sequence[Any]) -> Batch:
        """A batch of ``args``, the next in input order, counted in flight."""
        batch = Batch(self._ledger, self._fn, args, None, self._call_timeout, self._star)
        batch.chunk = self._chunk
        batch.seq = self._next_seq
        batch.sink = self._sink
        self._next_seq += 1
        self._inflight[batch.seq] = batch
        self._items += len(args)
        return batch

    def _accept(self, batches: list[Batch]) -> bool:
        """Hand ``batches`` to the pool in this order; False if the pool was shut down
        meanwhile (the map then yields what was computed, and says why the rest never
        will be). Batches not handed over leave the window."""
        ledger = self._ledger
        for position, batch in enumerate(batches):
            try:
                if self._observer is not None:
                    self._observer.queued(batch)
                ledger.accept(batch, bounded=False, block=True)
            except BaseException as exc:
                for left in batches[position:]:
                    del self._inflight[left.seq]
                    self._items -= len(left.args)
                stopped = ledger.shut and ledger.broken is None
                # An eager map raises at the call, as the stdlib's does.
                if isinstance(exc, RuntimeError) and stopped and not self._eager:
                    self.input_error = RuntimeError(
                        "the pool was shut down before this map() pulled all of its input: "
                        "map() is lazy, so consume its results (or list() them) inside the "
                        "pool's `with` block"
                    )
                    self._exhausted = True
                    return False
                raise
        return True

    def _growing(self) -> bool:
        """Whether, of the last two calls measured, the later one in input order took over
        ``TAIL_GROWTH`` times as long as the earlier one."""
        lately = self._lately
        if len(lately) < 2:
            return False
        earlier, later = sorted(lately)[-2:]
        return lately[later] > TAIL_GROWTH * lately[earlier]

    def _reverse_tail(self) -> bool:
        """Send the rest of the input, when it is a few long calls whose length grew along
        the input, last one first (see the module's doc); True if it did. Their results
        still come in input order."""
        # (Cheapest first: this is asked before every batch a map makes.)
        if (
            not self._growing()
            or self._eager
            or self._chunksize is not None
            or self._batch_size() != 1
        ):
            return False
        if self._range is not None:
            left = len(self._range) - self._taken
        else:
            left = operator.length_hint(self._inputs, -1)
        if not 1 < left <= TAIL_REVERSE_PER_WORKER * self._workers:
            return False
        if self._items + left > self._max_items:
            return False  # (the window of batches may grow by these few)
        self._tail_sent = True
        items: list[Any]
        if self._range is not None:
            items = list(self._range[self._taken :])
            self._taken = len(self._range)
        else:
            items = []
            try:
                # (At most what its length hint says: a hint may be wrong, and what follows
                # is then pulled as any input is.)
                items.extend(itertools.islice(self._inputs, left))
            except BaseException as exc:
                self.input_error = exc  # raised after the results before it
                self._exhausted = True
        if not items:
            return True
        batches = [self._batch_of([item]) for item in items]
        self._accept(batches[::-1])
        return True
