"""Pools and pipelines from async code: awaiting without blocking the event loop.

What waits where::

    arun:   submit on the loop's thread (never blocking: PoolFull waits on a helper thread)
            -> asyncio.wrap_future(future): the call's end is posted to the loop
    amap:   the lazy map of ``_map`` (same window, batching, order), polled on the loop's
            thread; each batch that ends posts one wake-up to the loop (``_Wake``), and an
            async iterable input is read by a task into a small bounded buffer
    leaving ``async with`` / a pipeline's chunks: the blocking part (joining threads and
            processes, a buffer's wait) runs on another thread, awaited

The event loop's thread never calls ``future.result()`` and never waits on a lock that a call
holds: the process backend lets a thread that waits for a result run its dispatcher loop
meanwhile (``Backend.help``), and the loop's thread never waits, so it never does. (Submitting
may send a call to an idle worker on the spot, as it does from any thread.) Cancelling a task that
awaits a call cancels the call: a queued call does not start, and a running one on the asyncio
backend is cancelled too; a running thread or process call finishes, its result dropped.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from ._backends._base import Batch
from ._checks import check_callable, check_count
from ._errors import PoolFull
from ._ledger import Ledger
from ._map import _MapState

if TYPE_CHECKING:
    import asyncio

    from ._backends._base import Backend
    from ._pipeline import _PipelineRun

__all__ = ["AsyncMapResults", "AsyncPipelineMethods", "AsyncPoolMethods", "PipelineResults"]

R = TypeVar("R")
T = TypeVar("T")


class _Pool(Protocol):
    """What of ``Pool`` the awaitable methods use."""

    _ledger: Ledger
    _backend: Backend

    @property
    def workers(self) -> int: ...

    def _submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], block: bool
    ) -> Future[Any]: ...

    def _check_process(self) -> None: ...

    def _halt(self) -> None: ...

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...


P = TypeVar("P", bound=_Pool)


async def _in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a new thread, awaited: for waits that block (a join, a lock)."""
    import asyncio

    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)

    def target() -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            value = fn()
        except BaseException as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:
            pass  # the loop has closed: nobody waits any more
        del value, error

    threading.Thread(target=target, name="conveyor-async-wait", daemon=True).start()
    return await done


class AsyncPoolMethods:
    """The awaitable side of ``Pool`` (mixed into it): ``async with``, ``arun`` and ``amap``."""

    async def __aenter__(self: P) -> P:
        return self

    async def __aexit__(
        self: _Pool,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        import asyncio

        # Left because the task was cancelled (Ctrl-C in asyncio.run, say): stop now rather
        # than wait for calls nobody will read; otherwise wait for them, as ``with`` does.
        if exc_type is not None and issubclass(
            exc_type, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)
        ):
            self._halt()
        try:
            await _in_thread(self.shutdown)
        except asyncio.CancelledError:
            self._halt()  # cancelled while waiting: stop now; the wait ends on its thread
            raise

    async def arun(self: _Pool, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the pool and await its result, without blocking
        the event loop. A coroutine function runs on the asyncio backend as a task; on the
        thread and process backends each call runs on an event loop of its own.

        Cancelling the awaiting task cancels the call: one not started never starts, and a
        running one on the asyncio backend is cancelled; a running thread or process call
        finishes and its result is dropped. With ``max_pending`` reached, the wait for room
        happens off the event loop.

        Example:
            >>> import asyncio, conveyor
            >>> async def main():
            ...     async with conveyor.Pool(workers=2) as pool:
            ...         return await pool.arun(divmod, 7, 2)
            >>> asyncio.run(main())
            (3, 1)
        """
        import asyncio

        try:
            future = self._submit(fn, args, kwargs, block=False)
        except PoolFull:
            future = await _submit_off_loop(self, fn, args, kwargs)
        return await asyncio.wrap_future(future)

    def amap(
        self: _Pool,
        fn: Callable[[Any], R],
        iterable: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = True,
        buffersize: int | None = None,
    ) -> AsyncMapResults[R]:
        """``fn`` over ``iterable`` (or an async iterable), for ``async for``: lazy and
        bounded as ``map`` is, results in input order (``ordered=False``: as they complete).

        The event loop is never blocked: results are awaited, and an async iterable is read
        by a task of the loop, at most a window ahead. A failing call's exception is raised
        at its position; leaving the loop early and calling ``aclose()`` (or cancelling the
        task) cancels the calls queued. ``buffersize`` bounds the results in flight.

        Example:
            >>> import asyncio, conveyor
            >>> async def square(x):
            ...     return x * x
            >>> async def main():
            ...     async with conveyor.Pool("asyncio", workers=10) as pool:
            ...         return [y async for y in pool.amap(square, range(4))]
            >>> asyncio.run(main())
            [0, 1, 4, 9]
        """
        check_callable(fn)
        check_count("buffersize", buffersize, 1)
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be True or False, got {ordered!r}")
        self._check_process()
        fn = self._backend.prepare(fn)
        if isinstance(iterable, AsyncIterable):
            return AsyncMapResults(self, fn, None, iterable, ordered, buffersize)
        if not isinstance(iterable, Iterable):
            raise TypeError(
                f"amap() needs an iterable or an async iterable, got {type(iterable).__name__}"
            )
        inputs = iterable if type(iterable) is range else iter(iterable)
        return AsyncMapResults(self, fn, inputs, None, ordered, buffersize)


async def _submit_off_loop(
    pool: _Pool, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Future[Any]:
    """Submit on another thread, which may wait for room at ``max_pending``; if the awaiting
    task is cancelled meanwhile, the call is cancelled once submitted. Tasks of one loop take
    turns (an ``asyncio.Lock`` per pool and loop), so that one thread at most waits per pool,
    however many calls wait for room."""
    import asyncio

    loop = asyncio.get_running_loop()
    turns = _turns.setdefault(pool, weakref.WeakKeyDictionary())
    turn = turns.get(loop)
    if turn is None:
        turn = turns[loop] = asyncio.Lock()
    async with turn:
        return await _submit_in_thread(pool, fn, args, kwargs)


#: Per pool and event loop, the lock that ``_submit_off_loop`` takes turns with.
_turns: weakref.WeakKeyDictionary[Any, weakref.WeakKeyDictionary[Any, Any]] = (
    weakref.WeakKeyDictionary()
)


async def _submit_in_thread(
    pool: _Pool, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Future[Any]:
    import asyncio

    cancelled = False
    submitted: list[Future[Any]] = []

    def submit() -> Future[Any]:
        future = pool._submit(fn, args, kwargs, block=True)
        submitted.append(future)
        if cancelled:
            future.cancel()
        return future

    try:
        return await _in_thread(submit)
    except asyncio.CancelledError:
        cancelled = True
        for future in submitted:
            future.cancel()
        raise


class _Wake:
    """A map's observer that posts one wake-up to the event loop per turn of it, however
    many batches end meanwhile (see ``_map.MapObserver``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import asyncio

        self.loop = loop
        self.event = asyncio.Event()
        self._posted = False

    def queued(self, batch: Batch) -> None:
        pass

    def ended(self, deliver: Callable[[Batch], object], batch: Batch) -> None:
        deliver(batch)
        self.post()

    def post(self) -> None:
        """Set the event from any thread."""
        if self._posted:
            return
        self._posted = True
        try:
            self.loop.call_soon_threadsafe(self._set)
        except RuntimeError:
            pass  # the loop has closed

    def _set(self) -> None:
        self._posted = False  # before set(): a batch delivered after this posts again
        self.event.set()


class _Pending(Exception):
    """Raised by ``_AsyncMapState._wait`` when no batch has ended yet."""


class _Feed:
    """Items read from an async iterable by a task, for the map to pull without waiting:
    an iterator that stops when the buffer is empty and goes on once it fills again."""

    def __init__(self, limit: int) -> None:
        import asyncio

        self.items: deque[Any] = deque()
        self.limit = limit
        self.done = False
        self.error: BaseException | None = None
        self.room = asyncio.Event()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.items:
            return self.items.popleft()
        raise StopIteration

    async def read(self, source: AsyncIterable[Any], wake: _Wake) -> None:
        import asyncio

        try:
            async for item in source:
                self.items.append(item)
                wake.event.set()
                while len(self.items) >= self.limit:
                    self.room.clear()
                    await self.room.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
        finally:
            self.done = True
            wake.event.set()


class _AsyncMapState(_MapState):
    """``_MapState`` whose wait never blocks (``_Pending`` instead) and whose input may be a
    ``_Feed`` that runs dry for a while without being exhausted."""

    def __init__(self, feed: _Feed | None, *args: Any) -> None:
        self.feed = feed  # before the first fill, which the base class starts
        super().__init__(*args)

    def _wait(self) -> Batch:
        if self._done.empty():
            raise _Pending
        return super()._wait()

    def _fill(self) -> None:
        super()._fill()
        feed = self.feed
        if feed is None or self._closed or self.input_error is not None:
            return
        if not feed.done:
            self._exhausted = False  # dry for now, not ended
        elif not feed.items and feed.error is not None:
            self.input_error, feed.error = feed.error, None
            self._exhausted = True
        if len(feed.items) < feed.limit:
            feed.room.set()


class AsyncMapResults(Generic[R]):
    """The results of ``Pool.amap``, for ``async for``; ``aclose()`` cancels what is left."""

    def __init__(
        self,
        pool: _Pool,
        fn: Callable[..., Any],
        inputs: Iterator[Any] | range | None,
        source: AsyncIterable[Any] | None,
        ordered: bool,
        buffersize: int | None,
    ) -> None:
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "amap() needs a running event loop: use it with `async for` inside a coroutine "
                "(from plain code, use map() or imap_unordered())"
            ) from None
        self._wake = wake = _Wake(loop)
        feed: _Feed | None = None
        if source is not None:
            limit = buffersize if buffersize is not None else max(64, 2 * pool.workers)
            feed = _Feed(limit)
            inputs = feed
        assert inputs is not None
        self._state = state = _AsyncMapState(
            feed, pool._ledger, fn, inputs, False, ordered, None, None, buffersize, False, wake
        )
        self._reader: asyncio.Task[None] | None = None
        if feed is not None and source is not None:
            self._reader = loop.create_task(feed.read(source, wake))
        self._values: list[Any] = []  # of the current batch, reversed
        self._failure: BaseException | None = None
        self._finalizer = weakref.finalize(self, _abandon, state, self._reader, loop)

    def __aiter__(self) -> AsyncMapResults[R]:
        return self

    async def __anext__(self) -> R:
        if self._values:
            value: R = self._values.pop()
            return value
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        try:
            batch = await self._next_batch()
        except BaseException:
            self._close()
            raise
        if batch is None:
            self._close()
            error = self._state.input_error
            if error is not None:
                self._state.input_error = None
                raise error
            raise StopAsyncIteration
        values, batch.values = batch.values, []
        errors = batch.errors
        if errors:
            first = min(errors)
            del values[first:]
            self._failure = errors[first]
            self._close()
        del batch, errors
        values.reverse()
        self._values = values
        return await self.__anext__()

    async def _next_batch(self) -> Batch | None:
        state, event = self._state, self._wake.event
        while True:
            event.clear()
            try:
                batch = state.next_batch()
            except _Pending:
                batch = None
            else:
                if batch is not None:
                    return batch
                if state.feed is None or state._exhausted:
                    return None
            await event.wait()

    def _close(self) -> None:
        self._finalizer()

    async def aclose(self) -> None:
        """Stop: cancel the calls this map queued that have not started.

        Example:
            >>> import asyncio, conveyor, itertools
            >>> async def main():
            ...     async with conveyor.Pool(workers=2) as pool:
            ...         results = pool.amap(abs, itertools.count())
            ...         first = await results.__anext__()
            ...         await results.aclose()
            ...         return first
            >>> asyncio.run(main())
            0
        """
        self._close()
        self._values = []
        self._failure = None


def _abandon(
    state: _MapState, reader: asyncio.Task[None] | None, loop: asyncio.AbstractEventLoop
) -> None:
    """Close a map (on any thread: a finalizer may run anywhere): cancel its queued calls and
    the task reading its input."""
    state.close()
    if reader is not None and not reader.done():
        try:
            loop.call_soon_threadsafe(reader.cancel)
        except RuntimeError:
            pass  # the loop has closed, and its tasks with it


# -- pipelines --------------------------------------------------------------------------------


class AsyncPipelineMethods(Generic[T]):
    """The awaitable side of ``Pipeline`` (mixed into it): ``async for``."""

    def _start(self) -> _PipelineRun:
        raise NotImplementedError

    def __aiter__(self) -> PipelineResults[T]:
        """Iterate with ``async for``, never blocking the event loop (no progress line);
        ``aclose()`` on the iterator stops every stage and awaits their end.

        Example:
            >>> import asyncio, conveyor
            >>> async def double(x):
            ...     return 2 * x
            >>> async def main():
            ...     return [y async for y in conveyor.Pipeline(range(3)).map(double, workers=5)]
            >>> asyncio.run(main())
            [0, 2, 4]
        """
        return PipelineResults(self._start())


class PipelineResults(Generic[T]):
    """A pipeline's outputs for ``async for``: chunks taken off the pipeline's output buffer
    on another thread, handed out on the loop."""

    def __init__(self, run: _PipelineRun) -> None:
        self._run = run
        self._items: deque[T] = deque()
        self._ended = False
        self._finalizer = weakref.finalize(self, run.stop, False)

    def __aiter__(self) -> PipelineResults[T]:
        return self

    async def __anext__(self) -> T:
        if self._items:
            return self._items.popleft()
        if self._ended:
            raise StopAsyncIteration
        run = self._run
        try:
            chunk = await _in_thread(run.next_chunk)
        except BaseException:
            self._ended = True
            self._finalizer()  # stops every stage; their threads end on their own
            raise
        if not chunk:
            self._ended = True
            await _in_thread(functools.partial(run.stop, wait=run.ended))
            self._finalizer.detach()
            if run.source_error is not None:
                raise run.source_error
            raise StopAsyncIteration
        self._items.extend(chunk)
        return self._items.popleft()

    async def aclose(self) -> None:
        """Stop every stage and await the end of their threads and processes."""
        self._ended = True
        self._items.clear()
        self._finalizer.detach()
        await _in_thread(functools.partial(self._run.stop, wait=True))
