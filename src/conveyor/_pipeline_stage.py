"""One stage of a ``Pipeline``: a Pool's lazy map between two bounded buffers.

Data flow of stage ``i``::

    inbox (Buffer, filled by stage i-1 or the source thread)
      -> Stage._inputs()   generator pulled by Pool's map on the stage's own thread,
                            paced by ``rate``; Failed records are held back as _Pass markers
      -> Pool's lazy map (batches, window, order, retries, timeouts), which tells the stage
                            (its observer) of each batch as it is queued and as it ends:
      -> Stage.ended()     on a worker thread as each batch ends: records its length, turns
                            errors into Failed records or stops the pipeline
      -> Stage._pump()     takes one whole batch of results at a time, flattens/filters them
      -> outbox (Buffer, read by stage i+1 or the consumer)

Why the markers: Pool's map fills a whole batch, and then its whole window, from its input
before it hands out a finished result. With an empty inbox that pull would block and hold
items back until more input came (forever, if the source waits for the consumer); instead,
after ``LINGER`` seconds ``_inputs`` answers with ``_PAD`` markers, which workers return at
once and the pump drops. A stage with input waiting never pads, and an idle one (nothing
finished, nothing being batched) waits for input without padding.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._backends._base import Batch
from ._coroutines import stage_step
from ._pool import Pool

__all__ = ["Buffer", "Failed", "Stage", "StageSpec", "StageStatistics"]

#: How long a stage waits for more input, once waiting holds a finished result or a batch
#: being filled back, before it pads the map's input instead.
LINGER = 0.003


@dataclass(frozen=True)
class Failed:
    """An item a stage could not process, in a pipeline built with ``errors="collect"``.

    It flows to the output in the item's place; later stages pass it on untouched.

    Args:
        item: the stage's input that failed.
        exception: what the call raised (``TaskTimeout`` or ``WorkerCrashed`` included).
        stage: the name of the stage that failed.

    Example:
        >>> import conveyor
        >>> out = list(conveyor.Pipeline([1, 0], errors="collect").map(lambda x: 1 // x))
        >>> out[0], type(out[1].exception).__name__
        (1, 'ZeroDivisionError')
    """

    item: Any
    exception: BaseException
    stage: str


@dataclass(frozen=True)
class StageStatistics:
    """An immutable snapshot of one stage, from ``Pipeline.statistics()``.

    ``items_in`` counts the items that reached the stage's input buffer, ``items_out`` the
    items it passed on (a ``flat_map`` may pass on more, a ``filter`` fewer). ``queued`` is
    the items it holds that have not been processed yet (waiting in its buffer or with its
    workers); ``busy`` the workers running a call now; ``failures`` the calls that failed
    for good; ``throughput`` the items processed per second since the pipeline started.

    Example:
        >>> import conveyor
        >>> p = conveyor.Pipeline(range(5)).map(abs, name="abs")
        >>> _ = p.run()
        >>> p.statistics()[0].items_out
        5
    """

    name: str
    workers: int
    items_in: int
    items_out: int
    busy: int
    queued: int
    failures: int
    throughput: float


class _Pass:
    """A marker that workers hand back as it came. ``key`` None: padding (see module doc);
    -1: an item a filter dropped; else: the key of a held ``Failed`` record."""

    __slots__ = ("key",)

    def __init__(self, key: int | None) -> None:
        self.key = key

    def __reduce__(self) -> tuple[type[_Pass], tuple[int | None]]:
        return (_Pass, (self.key,))


_PAD = _Pass(None)
_DROPPED = _Pass(-1)


class _Stopped(Exception):
    """Stands in, inside the map, for an error handed to the consumer: raising one exception
    object on two threads at once would mix their tracebacks."""


# -- what runs on the workers: one callable per kind of stage --------------------------------


class _Step:
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __reduce__(self) -> tuple[type[_Step], tuple[Callable[[Any], Any]]]:
        return (type(self), (self.fn,))

    def __call__(self, item: Any) -> Any:
        raise NotImplementedError


class _MapStep(_Step):
    __slots__ = ()

    def __call__(self, item: Any) -> Any:
        if type(item) is _Pass:
            return item
        return self.fn(item)


class _FlatStep(_Step):
    __slots__ = ()

    def __call__(self, item: Any) -> Any:
        if type(item) is _Pass:
            return item
        # Materialised here: a generator would otherwise run on the stage's thread, not on
        # a worker, and could not cross to a process.
        return list(self.fn(item))


class _FilterStep(_Step):
    __slots__ = ()

    def __call__(self, item: Any) -> Any:
        if type(item) is _Pass:
            return item
        return item if self.fn(item) else _DROPPED


class _EachStep(_Step):
    __slots__ = ()

    def __call__(self, item: Any) -> Any:
        if type(item) is _Pass:
            return item
        self.fn(item)
        return item


STEPS: dict[str, type[_Step]] = {
    "map": _MapStep,
    "flat_map": _FlatStep,
    "filter": _FilterStep,
    "each": _EachStep,
}


@dataclass(frozen=True)
class StageSpec:
    """A stage as the user described it (arguments already checked)."""

    kind: str
    fn: Callable[[Any], Any]
    name: str
    workers: int
    backend: str
    ordered: bool
    per_second: float | None
    timeout: float | None
    retries: int
    buffer: int
    options: dict[str, Any] = field(default_factory=dict)  # the backend's own keywords


# -- the buffer between two stages ------------------------------------------------------------


class Buffer:
    """A bounded FIFO between one putting thread and one taking thread.

    ``close()`` says no more will come (takers get the rest, then the end); ``stop()``
    abandons it (every wait returns at once). The condition may be shared with a stage, whose
    finished batches also wake a waiting taker.
    """

    def __init__(self, capacity: int, cond: threading.Condition | None = None) -> None:
        self.capacity = capacity
        self.cond = cond if cond is not None else threading.Condition()
        self.items: list[Any] = []
        self.closed = False
        self.stopped = False
        self.total_in = 0
        self.taker_waiting = False
        self._putter_waiting = False

    def put(self, item: Any) -> bool:
        """Add one item, waiting for room; False if the buffer was stopped."""
        with self.cond:
            while len(self.items) >= self.capacity and not self.stopped:
                self._putter_waiting = True
                self.cond.wait()
            self._putter_waiting = False
            if self.stopped:
                return False
            self.items.append(item)
            self.total_in += 1
            if self.taker_waiting:
                self.cond.notify_all()
            return True

    def put_many(self, items: list[Any]) -> bool:
        """Add ``items`` once there is room for one; False if the buffer was stopped."""
        with self.cond:
            while len(self.items) >= self.capacity and not self.stopped:
                self._putter_waiting = True
                self.cond.wait()
            self._putter_waiting = False
            if self.stopped:
                return False
            self.items += items
            self.total_in += len(items)
            if self.taker_waiting:
                self.cond.notify_all()
            return True

    def take(
        self, limit: int, ready: Callable[[], bool] | None = None, linger: float = 0.0
    ) -> list[Any] | None:
        """Up to ``limit`` items, waiting for one; ``[]`` at the end or once stopped.

        ``None`` when ``ready()`` (called with the lock held) has been true for ``linger``
        seconds and still nothing came: the caller holds something back and should not
        wait for input any longer.
        """
        with self.cond:
            since: float | None = None
            while not self.items:
                if self.stopped or self.closed:
                    return []
                self.taker_waiting = True
                if ready is not None and ready():
                    now = time.monotonic()
                    since = now if since is None else since
                    left = linger - (now - since)
                    if left <= 0:
                        self.taker_waiting = False
                        return None
                    self.cond.wait(left)
                else:
                    self.cond.wait()
                self.taker_waiting = False
            if self.stopped:
                return []
            if len(self.items) <= limit:
                taken, self.items = self.items, []
            else:
                taken = self.items[:limit]
                del self.items[:limit]
            if self._putter_waiting:
                self.cond.notify_all()
            return taken

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


# -- the stage --------------------------------------------------------------------------------


class Stage:
    """Runs one stage on its own thread; see the module docstring for the data flow."""

    def __init__(
        self,
        spec: StageSpec,
        inbox: Buffer,
        outbox: Buffer,
        collect: bool,
        fail: Callable[[BaseException], bool],
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._inbox = inbox
        self._outbox = outbox
        self._collect = collect
        self._fail = fail
        self._cond = inbox.cond  # guards the records below, shared with the inbox
        self._step = stage_step(spec.kind, spec.fn, spec.backend, STEPS, _Pass, _DROPPED)
        self._flat = spec.kind == "flat_map"
        self._scan_always = spec.kind in ("flat_map", "filter")
        self._pacer = None if spec.per_second is None else _Pacer(spec.per_second)
        # Batch records from ended(), in the order the map hands batches out: by sequence
        # number when ordered, in completion order otherwise.
        self._done: dict[int, tuple[int, bool]] = {}
        self._order: deque[tuple[int, bool]] = deque()
        self._ready_real = 0  # unordered: finished batches with real items, not yet taken
        # Owned by the stage's thread.
        self._head = 0  # sequence number of the next batch the ordered map hands out
        self._padding = False
        self._lingered = False  # waited LINGER for input since the last input came
        self._yielded = 0  # items (pads included) the map pulled from _inputs
        self._submitted = 0  # items the map handed to the pool
        self._marks_sent = 0
        self._marks_seen = 0
        self._held: dict[int, Failed] = {}
        self._keys = itertools.count()
        # Read by statistics() from other threads.
        self.done = 0
        self.items_out = 0
        self.failures = 0
        self.pool: Pool | None = None
        self.thread: threading.Thread | None = None

    def start(self, index: int) -> None:
        spec = self.spec
        self.pool = Pool(
            spec.backend,
            spec.workers,
            timeout=spec.timeout,
            retries=spec.retries,
            **spec.options,
        )
        self.thread = threading.Thread(
            target=self._pump, name=f"conveyor-pipeline-stage-{index}", daemon=True
        )
        self.thread.start()

    def statistics(self, seconds: float) -> StageStatistics:
        pool = self.pool
        busy = 0 if pool is None else pool.statistics().busy
        items_in = self._inbox.total_in
        return StageStatistics(
            name=self.name,
            workers=self.spec.workers,
            items_in=items_in,
            items_out=self.items_out,
            busy=busy,
            queued=max(0, items_in - self.done),
            failures=self.failures,
            throughput=self.done / seconds if seconds > 0 else 0.0,
        )

    # -- the stage's thread -------------------------------------------------------------------

    def _pump(self) -> None:
        pool = self.pool
        assert pool is not None
        results: Iterator[Any] | None = None
        try:
            spec = self.spec
            chunksize = 1 if self._pacer is not None else None  # a batch starts all at once
            results = pool._map(
                self._step,
                self._inputs(),
                ordered=spec.ordered,
                chunksize=chunksize,
                buffersize=spec.buffer,
                observer=self,
            )
            take_rest = itertools.islice
            while True:
                self._padding = False
                try:
                    first = next(results)
                except StopIteration:
                    break
                size, real = self._taken()
                if not real:  # a batch of pads: drop it at C speed
                    deque(take_rest(results, size - 1), maxlen=0)
                    self._marks_seen += size
                    continue
                values = [first, *take_rest(results, size - 1)] if size > 1 else [first]
                out = self._outputs(values)
                if self._outbox.stopped or (out and not self._outbox.put_many(out)):
                    break
        except BaseException as exc:
            self._fail(exc)
        finally:
            if results is not None:
                results.close()  # type: ignore[attr-defined]  # cancels what the map queued
            if self._outbox.stopped:
                pool._halt()
            pool.shutdown(wait=True)
            self._outbox.close()

    def _taken(self) -> tuple[int, bool]:
        """The length of the batch the map just started handing out, and whether it holds
        more than pads."""
        with self._cond:
            if self.spec.ordered:
                size, real = self._done.pop(self._head)
                self._head += 1
            else:
                size, real = self._order.popleft()
                self._ready_real -= real
        return size, real

    def _outputs(self, values: list[Any]) -> list[Any]:
        """What one batch passes downstream."""
        if not self._scan_always and self._marks_sent == self._marks_seen:
            self.done += len(values)
            self.items_out += len(values)
            return values
        out: list[Any] = []
        done = 0
        for value in values:
            if type(value) is _Pass:
                key = value.key
                if key is None:
                    self._marks_seen += 1
                    continue
                done += 1
                if key >= 0:
                    self._marks_seen += 1
                    out.append(self._held.pop(key))
            else:
                done += 1
                if self._flat and type(value) is not Failed:
                    out += value
                else:
                    out.append(value)
        self.done += done
        self.items_out += len(out)
        return out

    def _inputs(self) -> Iterator[Any]:
        """The input of the stage's map (pulled on the stage's thread, inside the map)."""
        inbox, limit = self._inbox, self.spec.buffer
        paced, screen = self._pacer is not None, self._collect
        while True:
            # Wait LINGER for more input once after the last input came, not before each pad.
            chunk = inbox.take(limit, self._should_pad, 0.0 if self._lingered else LINGER)
            if chunk is None:
                self._lingered = True
                yield from self._pads()
                continue
            if not chunk:
                return
            self._lingered = False
            if not paced and not screen:
                self._yielded += len(chunk)
                yield from chunk
                continue
            index = 0
            while index < len(chunk):
                if paced:
                    turn = self._turn()
                    if turn is None:
                        return
                    if not turn:
                        yield from self._pads()
                        continue
                item = chunk[index]
                index += 1
                self._yielded += 1
                if type(item) is Failed:
                    key = next(self._keys)
                    self._held[key] = item
                    self._marks_sent += 1
                    yield _Pass(key)
                else:
                    yield item

    def _pads(self) -> Iterator[Any]:
        """Pads for one of two reasons: a finished result is waiting (pad until the pump
        takes control back, which means the map stopped pulling), or real items wait in a
        batch the map is still filling (pad until the map has handed that batch over)."""
        self._padding = True
        for_result = self._ready()
        while self._padding and (for_result or self._yielded > self._submitted):
            self._yielded += 1
            self._marks_sent += 1
            yield _PAD
        self._padding = False

    def _turn(self) -> bool | None:
        """Wait for the pacer: True to start the next item, False to pad, None if stopped."""
        pacer = self._pacer
        assert pacer is not None
        with self._cond:
            while not self._inbox.stopped:
                now = time.monotonic()
                delay = pacer.next_start - now
                if delay <= 0:
                    pacer.started(now)
                    return True
                if delay > LINGER and self._should_pad():
                    return False
                self._inbox.taker_waiting = True
                self._cond.wait(delay)
                self._inbox.taker_waiting = False
        return None

    def _should_pad(self) -> bool:
        """Whether waiting for input would hold something back: a batch being filled has
        real items, or a finished result waits (lock held)."""
        return self._yielded > self._submitted or self._ready()

    def _ready(self) -> bool:
        """Whether the map holds a finished result it could hand out now (lock held)."""
        if self.spec.ordered:
            seq = self._head
            while (record := self._done.get(seq)) is not None:
                if record[1]:
                    return True
                seq += 1
            return False
        return self._ready_real > 0

    # -- the map's observer ----------------------------------------------------------------

    def queued(self, batch: Batch) -> None:
        """The map handed ``batch`` to the pool (on the stage's thread)."""
        self._submitted += len(batch.args)

    def ended(self, sink: Callable[[Batch], object], batch: Batch) -> None:
        """``batch`` ended (on a worker or dispatcher thread); ``sink`` gives it to the map."""
        failures = self._failed(batch, batch.errors) if batch.errors else 0
        real = batch.args[0] is not _PAD  # pads only ever follow real items in a batch
        with self._cond:
            self.failures += failures
            if self.spec.ordered:
                self._done[batch.seq] = (len(batch.args), real)
            else:
                self._order.append((len(batch.args), real))
                self._ready_real += real
            # Under the lock, so that the map hands batches out in the order recorded.
            sink(batch)
            if self._inbox.taker_waiting:
                # Even a batch of pads: in order, a real result behind it may now be next.
                self._cond.notify_all()

    def _failed(self, batch: Batch, errors: dict[int, BaseException]) -> int:
        """Turn a batch's failed calls into Failed records, or stop the pipeline with the
        first; returns how many failures count against the stage."""
        if not self._collect:
            first = self._fail(errors[min(errors)])
            batch.errors = dict.fromkeys(errors, _Stopped())
            return int(first)
        counted = 0
        stopped = self._outbox.stopped  # calls failed by stopping the pipeline are not counted
        for index, error in errors.items():
            item = batch.args[index]
            if type(item) is _Pass:
                batch.values[index] = item
            else:
                batch.values[index] = Failed(item, error, self.name)
                counted += not stopped
        batch.errors = None
        return counted


class _Pacer:
    """Evenly spaced starts, at most one every ``1 / per_second`` seconds, for a whole stage."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self.next_start = float("-inf")

    def started(self, now: float) -> None:
        # From the later of now and the planned start: idle time earns no burst.
        self.next_start = max(now, self.next_start) + self.interval
