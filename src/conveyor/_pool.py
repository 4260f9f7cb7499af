"""``Pool``: the one executor users see, written once for every backend.

Everything observable lives here: futures, laziness and ordering (in ``_map``), the pending
bound, retries, cancellation, shutdown and statistics. A backend only runs ``Batch``es and
reports their outcomes through ``Batch.begin``/``Batch.finish``, which land in ``_begin`` and
``_finish`` below.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import CancelledError, Executor, Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from ._backends import lookup
from ._backends._base import Backend, Batch, NotRun, offer_help, plain, waits_for_itself
from ._errors import BrokenPool, InitializerFailed, PoolFull, TaskTimeout
from ._map import map_results
from ._progress import length_of, track

__all__ = ["AsyncResult", "Pool", "PoolStatistics"]

P = ParamSpec("P")
R = TypeVar("R")

# Batch.state values.
_QUEUED, _RUNNING, _CANCELLED, _DONE = 0, 1, 2, 3


@dataclass(frozen=True)
class PoolStatistics:
    """An immutable snapshot of a pool, from ``Pool.statistics()``.

    Counts are of calls, not batches. ``completed`` counts successes and ``failed`` final
    failures (timeouts included, which ``timed_out`` also counts); ``retried`` counts extra
    attempts. Every submitted call ends up in exactly one of completed, failed and cancelled.

    Example:
        >>> import conveyor
        >>> with conveyor.Pool(workers=2) as pool:
        ...     _ = list(pool.map(abs, [-1, -2]))
        ...     pool.statistics().completed
        2
    """

    workers: int
    busy: int
    pending: int
    submitted: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    retried: int


class AsyncResult:
    """The outcome of ``Pool.apply_async``, with ``multiprocessing``'s ``AsyncResult`` methods.

    Example:
        >>> import conveyor
        >>> with conveyor.Pool(workers=1) as pool:
        ...     pool.apply_async(pow, (2, 10)).get(timeout=10)
        1024
    """

    def __init__(
        self,
        future: Future[Any],
        callback: Callable[[Any], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> None:
        self._future = future
        self._callback = callback
        self._error_callback = error_callback
        self._callback_error: BaseException | None = None
        self._settled = threading.Event()
        future.add_done_callback(self._settle)

    def _settle(self, future: Future[Any]) -> None:
        try:
            if future.cancelled():
                return
            error = future.exception()
            if error is None:
                if self._callback is not None:
                    self._callback(future.result())
            elif self._error_callback is not None:
                self._error_callback(error)
        except BaseException as exc:
            # A failing callback must not vanish into a log: get() raises it.
            self._callback_error = exc
        finally:
            self._settled.set()

    @property
    def future(self) -> Future[Any]:
        """The underlying ``concurrent.futures.Future``."""
        return self._future

    def ready(self) -> bool:
        """Whether the call has ended."""
        return self._settled.is_set()

    def successful(self) -> bool:
        """Whether the call returned; ``ValueError`` if it has not ended yet."""
        if not self.ready():
            raise ValueError("the call has not ended yet; wait() or check ready() first")
        return not self._future.cancelled() and self._future.exception() is None

    def wait(self, timeout: float | None = None) -> None:
        """Block until the call has ended or ``timeout`` seconds passed."""
        self._wait(timeout)

    def _wait(self, timeout: float | None) -> bool:
        # Through the future first: its waiter may run the pool meanwhile (a process pool
        # reads the call's outcome on this thread), as ``future.result()`` does. The callback
        # that settles this object may still be running on another thread after that.
        end = None if timeout is None else time.monotonic() + timeout
        try:
            self._future.exception(timeout)
        except (CancelledError, FutureTimeoutError):
            pass
        return self._settled.wait(None if end is None else max(0.0, end - time.monotonic()))

    def get(self, timeout: float | None = None) -> Any:
        """The call's result; its exception is raised; ``multiprocessing.TimeoutError`` if
        it has not ended within ``timeout`` seconds."""
        if not self._wait(timeout):
            raise multiprocessing.TimeoutError(f"no result within {timeout} s")
        if self._callback_error is not None:
            raise self._callback_error
        return self._future.result()


def _drop_backend(backend: Backend, pid: int) -> None:
    """A pool dropped without shutdown stops its backend, in the process that made it."""
    if os.getpid() == pid:
        backend.shutdown(wait=False)


def _check_timeout(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 seconds or None, got {value!r}")


def _source(iterable: Iterable[Any]) -> Iterator[Any] | range:
    """What a map reads its input from: a ``range`` as it is (its batches travel as ranges,
    which cost nothing to build or pickle, however long), anything else as an iterator."""
    return iterable if type(iterable) is range else iter(iterable)


def _check_callable(fn: object, name: str = "fn") -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__} {fn!r}")


def _check_count(name: str, value: int | None, minimum: int, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


class _WeakCall:
    """A callback that does not keep its object alive (backends must not keep Pools alive)."""

    def __init__(self, method: Callable[[BaseException], None]) -> None:
        self._ref = weakref.WeakMethod(method)

    def __call__(self, error: BaseException) -> None:
        method = self._ref()
        if method is not None:
            method(error)


class Pool(Executor):
    """Run calls on a set of workers: threads, processes or another backend.

    ``Pool`` is a ``concurrent.futures.Executor`` (``submit`` returns a standard ``Future``,
    so ``as_completed``, ``wait`` and ``asyncio.wrap_future`` work) with
    ``multiprocessing.Pool``'s conveniences (``imap``, ``imap_unordered``, ``starmap``,
    ``apply_async``, ``close``/``join``/``terminate``).

    Args:
        backend: ``"thread"`` (default; for IO-bound work) or ``"process"`` (CPU-bound work).
        workers: how many calls run at once; None picks the backend's default (threads:
            ``min(32, cpus + 4)``; processes: the CPUs this process may use).
        max_pending: at most this many submitted calls wait for a worker; ``submit`` then
            blocks until there is room and ``submit_nowait`` raises ``PoolFull``.
        timeout: seconds each call may run. At the deadline the call fails with
            ``TaskTimeout``; a process worker running it is stopped, a thread (which cannot be
            stopped) is abandoned and replaced so the pool keeps its capacity, and its late
            result is discarded.
        retries: how many more times a call that raised an exception matching ``retry_on``
            is run. A retried call runs at least once, maybe more: make it idempotent.
        retry_on: the exception classes that trigger a retry.
        initializer, initargs: run ``initializer(*initargs)`` in every worker when it starts.
            If it raises, the pool is broken: calls fail with ``InitializerFailed``.
        thread_name_prefix: (thread backend) names of its threads.
        mp_context: (process backend) a ``multiprocessing`` context choosing the start
            method; by default ``forkserver`` where available, else ``spawn``.
        max_tasks_per_worker: (process backend) replace a worker after this many calls.

    Behaviour on faults (process backend): a worker that dies fails only the call it was
    running, with ``WorkerCrashed``; the pool replaces it and goes on. Calls of the same
    batch that it had not started run on another worker, and so do finished calls whose
    results it had not yet sent (results are sent at least every millisecond). Calls
    measured to take under 2 microseconds run in a fast loop that knows only which group of
    256 calls is running: if one of them crashes its worker, that group runs again, call by
    call, to find it.

    Example:
        >>> import conveyor
        >>> with conveyor.Pool(workers=4) as pool:
        ...     list(pool.map(str.upper, ["a", "b"]))
        ['A', 'B']
    """

    _eager_map = False

    def __init__(
        self,
        backend: str = "thread",
        workers: int | None = None,
        *,
        max_pending: int | None = None,
        timeout: float | None = None,
        retries: int = 0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        **options: Any,
    ) -> None:
        backend_cls = lookup(backend)
        for option in options:
            if option not in backend_cls.options:
                takes = ", ".join(sorted(backend_cls.options)) or "none"
                raise TypeError(
                    f"Pool() got an unexpected keyword argument {option!r} for backend "
                    f"{backend_cls.name!r} (its own options: {takes})"
                )
        _check_count("workers", workers, 1)
        _check_count("max_pending", max_pending, 1)
        _check_timeout("timeout", timeout)
        _check_count("retries", retries, 0, allow_none=False)
        if initializer is not None:
            _check_callable(initializer, "initializer")
        retry_classes = retry_on if isinstance(retry_on, tuple) else (retry_on,)
        for cls in retry_classes:
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                raise TypeError(f"retry_on must hold exception classes, got {cls!r}")
        self._workers = workers if workers is not None else backend_cls.default_workers()
        self._timeout = timeout
        # Seconds per call that maps measured, by id(fn) (with fn, to tell a reused id): a new
        # map of a known function sizes its first batches from it instead of probing.
        self._call_costs: dict[int, tuple[Any, float]] = {}
        self._retries = retries
        self._retry_on = retry_classes
        self._max_pending = max_pending
        # One lock guards the pool's state and counters; it is never held while user code
        # runs. ``_room`` wakes submitters blocked on ``max_pending``.
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)  # notified when _active drops to 0
        self._shutdown = False
        self._cancelling = False  # shut down with cancel_futures, or terminated
        self._broken: BrokenPool | None = None
        self._active = 0  # accepted batches (not reruns) without a final outcome yet
        self._pending = 0  # submitted calls not yet started (only with max_pending)
        self._submitted = 0
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        self._timed_out = 0
        self._retried = 0
        self._backend: Backend = backend_cls(
            self._workers,
            _WeakCall(self._on_broken),
            initializer=initializer,
            initargs=tuple(initargs),
            **options,
        )
        # A pool dropped without shutdown still stops its workers.
        self._pid = os.getpid()  # a forked child cannot use the pool (see _forked_away)
        self._finalizer = weakref.finalize(self, _drop_backend, self._backend, self._pid)
        # At exit the backends' own hook stops every pool and waits for it; this one, run
        # first, would stop it without waiting and race with multiprocessing's exit handler.
        self._finalizer.atexit = False

    # -- submitting -------------------------------------------------------------------------

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)``; returns a standard ``concurrent.futures.Future``.

        Blocks while ``max_pending`` calls are already waiting for a worker. Raises
        ``RuntimeError`` after shutdown.

        Example:
            >>> import conveyor
            >>> with conveyor.Pool() as pool:
            ...     pool.submit(divmod, 7, 2).result()
            (3, 1)
        """
        return self._submit(fn, args, kwargs, block=True)

    def submit_nowait(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Like ``submit``, but raise ``PoolFull`` instead of blocking at ``max_pending``.

        Example:
            >>> import conveyor
            >>> with conveyor.Pool(max_pending=100) as pool:
            ...     pool.submit_nowait(len, "abc").result()
            3
        """
        return self._submit(fn, args, kwargs, block=False)

    def _submit(
        self, fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any], block: bool
    ) -> Future[R]:
        _check_callable(fn)
        batch = Batch(self, fn, [args], kwargs or None, self._timeout)
        future: Future[R] = Future()
        if self._backend.helps:
            offer_help(future, self._backend.help)
        batch.future = future
        self._enqueue(batch, block=block, counted=False)
        return future

    def _enqueue(self, batch: Batch, *, block: bool, counted: bool) -> None:
        """Hand ``batch`` to the backend; ``counted`` batches bypass ``max_pending``
        (a map bounds itself)."""
        self._check_process()
        with self._lock:
            if self._broken is not None:
                raise self._broken
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._max_pending is not None and not counted:
                while self._pending >= self._max_pending:
                    if not block:
                        raise PoolFull(
                            f"{self._pending} calls are already waiting (max_pending="
                            f"{self._max_pending}); retry later or use submit() to wait"
                        )
                    if self._backend.runs_loop_here():
                        raise waits_for_itself(
                            "submit() blocking at max_pending",
                            "Use submit_nowait(), or submit outside the callback",
                        )
                    self._room.wait()
                    # Broken before shut down: a broken pool is also shut down.
                    if self._broken is not None:
                        raise self._broken
                    if self._shutdown:
                        raise RuntimeError("cannot schedule new futures after shutdown")
                self._pending += 1
                batch.slot = True
            self._submitted += len(batch)
            # While a batch is active the backend is not stopped (see _stop_backend_if_idle),
            # so the batch can be handed over outside the lock; only terminate() stops it
            # regardless, and backends fail what they receive after that with NotRun.
            self._active += 1
        self._backend.submit(batch)

    # -- mapping ----------------------------------------------------------------------------

    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
        progress: bool = False,
    ) -> Iterator[R]:
        """``fn`` over zipped ``iterables``, results in input order, lazily.

        Input is pulled only while fewer than ``buffersize`` results wait to be yielded
        (default: a window sized to keep every worker busy), so an endless generator runs in
        constant memory. ``timeout`` counts from this call; a failing call's exception is
        raised at its position. Leaving the loop early (``break``, ``close()``, garbage
        collection) cancels the calls it queued. ``chunksize`` fixes the batch size; by default
        batches are sized from the measured duration of earlier calls. ``progress`` shows a
        live line on stderr (done/total, rate, ETA; the total when the inputs have a
        ``len()``), wiped when the results end.

        Example:
            >>> import conveyor
            >>> with conveyor.Pool() as pool:
            ...     list(pool.map(pow, [2, 3], [5, 2]))
            [32, 9]
        """
        _check_callable(fn)
        _check_timeout("timeout", timeout)
        _check_count("chunksize", chunksize, 1)
        _check_count("buffersize", buffersize, 1)
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        if len(iterables) == 1:
            inputs: Iterator[Any] | range = _source(iterables[0])
            star = False
        else:
            inputs = zip(*iterables)  # noqa: B905 - the stdlib's map stops at the shortest
            star = True
        results = map_results(
            self,
            fn,
            inputs,
            star=star,
            ordered=True,
            timeout=timeout,
            chunksize=chunksize,
            buffersize=buffersize,
            eager=self._eager_map and buffersize is None,
        )
        return track(results, length_of(*iterables)) if progress else results

    def imap(
        self,
        fn: Callable[[Any], R],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        buffersize: int | None = None,
        progress: bool = False,
    ) -> Iterator[R]:
        """``multiprocessing.Pool.imap``: lazy ``fn`` over ``iterable`` in input order.

        ``progress`` shows a live line on stderr, as ``map`` does.

        Example:
            >>> import conveyor
            >>> with conveyor.Pool() as pool:
            ...     list(pool.imap(abs, [-3, 1]))
            [3, 1]
        """
        _check_callable(fn)
        _check_count("chunksize", chunksize, 1)
        _check_count("buffersize", buffersize, 1)
        results = map_results(
            self,
            fn,
            _source(iterable),
            star=False,
            ordered=True,
            timeout=None,
            chunksize=chunksize,
            buffersize=buffersize,
        )
        return track(results, length_of(iterable)) if progress else results

    def imap_unordered(
        self,
        fn: Callable[[Any], R],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        buffersize: int | None = None,
        progress: bool = False,
    ) -> Iterator[R]:
        """``multiprocessing.Pool.imap_unordered``: lazy, results as they complete.

        ``progress`` shows a live line on stderr, as ``map`` does.

        Example:
            >>> import conveyor
            >>> with conveyor.Pool() as pool:
            ...     sorted(pool.imap_unordered(abs, [-3, 1]))
            [1, 3]
        """
        _check_callable(fn)
        _check_count("chunksize", chunksize, 1)
        _check_count("buffersize", buffersize, 1)
        results = map_results(
            self,
            fn,
            _source(iterable),
            star=False,
            ordered=False,
            timeout=None,
            chunksize=chunksize,
            buffersize=buffersize,
        )
        return track(results, length_of(iterable)) if progress else results

    def starmap(
        self,
        fn: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
    ) -> list[R]:
        """``multiprocessing.Pool.starmap``: ``fn(*args)`` for each ``args``, as a list.

        Example:
            >>> import conveyor
            >>> with conveyor.Pool() as pool:
            ...     pool.starmap(max, [(1, 5), (7, 2)])
            [5, 7]
        """
        _check_callable(fn)
        _check_count("chunksize", chunksize, 1)
        inputs = (tuple(args) for args in iterable)
        return list(
            map_results(
                self,
                fn,
                inputs,
                star=True,
                ordered=True,
                timeout=None,
                chunksize=chunksize,
                buffersize=None,
            )
        )

    def apply(
        self,
        fn: Callable[..., R],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] | None = None,
    ) -> R:
        """``multiprocessing.Pool.apply``: run ``fn(*args, **kwds)`` and wait for it.

        Example:
            >>> import conveyor
            >>> with conveyor.Pool() as pool:
            ...     pool.apply(int, ("ff",), {"base": 16})
            255
        """
        return self._submit(fn, tuple(args), dict(kwds or {}), block=True).result()

    def apply_async(
        self,
        fn: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult:
        """``multiprocessing.Pool.apply_async``: returns an ``AsyncResult``.

        ``callback(result)`` or ``error_callback(exception)`` runs when the call ends; if a
        callback raises, ``get()`` raises that error.

        Example:
            >>> import conveyor
            >>> with conveyor.Pool() as pool:
            ...     pool.apply_async(sum, ([1, 2, 3],)).get(timeout=10)
            6
        """
        if callback is not None:
            _check_callable(callback, "callback")
        if error_callback is not None:
            _check_callable(error_callback, "error_callback")
        future = self._submit(fn, tuple(args), dict(kwds or {}), block=True)
        return AsyncResult(future, callback, error_callback)

    # -- stopping ---------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more calls; with ``cancel_futures`` cancel those not started; with ``wait``
        return once every accepted call has ended and every worker has stopped.

        Example:
            >>> import conveyor
            >>> pool = conveyor.Pool()
            >>> pool.shutdown()
        """
        self._stop(cancel=cancel_futures, kill=False)
        if self._forked_away():
            return  # (see _stop)
        if wait:
            if self._backend.in_worker():
                # Waiting here would wait for the very call that waits: a deadlock.
                raise RuntimeError(
                    "shutdown(wait=True) was called from inside one of this pool's own calls, "
                    "which would wait for itself; the pool is shut down, but to wait for it, "
                    "call shutdown() from outside the pool (or pass wait=False here)"
                )
            if self._backend.runs_loop_here():
                raise waits_for_itself(
                    "shutdown(wait=True), join() or terminate()",
                    "The pool is shut down; to wait for it, call shutdown() outside the "
                    "callback (or pass wait=False here)",
                )
            with self._lock:
                while self._active:
                    self._idle.wait()
            self._backend.shutdown(wait=True)
            self._finalizer.detach()

    def close(self) -> None:
        """``multiprocessing.Pool.close``: take no more calls; queued ones still run."""
        self._stop(cancel=False, kill=False)

    def join(self) -> None:
        """``multiprocessing.Pool.join``: wait for the workers to exit after ``close()``."""
        if not self._shutdown:
            raise ValueError("join() needs close() or terminate() first: the pool is running")
        self.shutdown(wait=True)

    def terminate(self) -> None:
        """``multiprocessing.Pool.terminate``: cancel queued calls and stop the workers now.

        Process workers are killed and the calls they ran fail; threads cannot be killed, so
        their running calls finish first.
        """
        self._stop(cancel=True, kill=True)
        self.shutdown(wait=True)

    def _stop(self, *, cancel: bool, kill: bool) -> None:
        if self._forked_away():
            # A forked child's copy: the workers are the parent's, and so may be the locks
            # (held by threads that the child does not have). Nothing here is to stop.
            self._shutdown = True
            self._finalizer.detach()
            return
        with self._lock:
            self._shutdown = True
            # No reruns either: a retry or a rerun is a call that has not started.
            self._cancelling = self._cancelling or cancel or kill
            self._room.notify_all()
        if cancel:
            self._cancel_batches(self._backend.drain(), drained=True)
        if kill:
            self._backend.shutdown(wait=False, kill=True)
        self._stop_backend_if_idle()

    def _stop_backend_if_idle(self) -> None:
        with self._lock:
            stop = self._shutdown and not self._active
        if stop:
            self._backend.shutdown(wait=False)

    def __enter__(self) -> Pool:
        return self

    def _forked_away(self) -> bool:
        """Whether this is a child forked from the process that made the pool."""
        return os.getpid() != self._pid

    def _check_process(self) -> None:
        if self._forked_away():
            raise RuntimeError(
                f"this pool belongs to process {self._pid}, and this process is a child forked "
                "from it: the pool's workers and threads are not here. Create the pool in this "
                "process, after the fork"
            )

    def __reduce__(self) -> Any:
        raise TypeError(
            "a conveyor.Pool cannot be pickled (sent to a worker process, say): it owns this "
            "process's threads and workers; create a pool where it is used instead"
        )

    # -- observing --------------------------------------------------------------------------

    @property
    def workers(self) -> int:
        """The number of calls that may run at once."""
        return self._workers

    def statistics(self) -> PoolStatistics:
        """An immutable snapshot of the pool's counters.

        Example:
            >>> import conveyor
            >>> with conveyor.Pool(workers=3) as pool:
            ...     pool.statistics().workers
            3
        """
        busy = self._backend.busy()
        with self._lock:
            done = self._completed + self._failed + self._cancelled
            return PoolStatistics(
                workers=self._workers,
                busy=busy,
                pending=max(0, self._submitted - done - busy),
                submitted=self._submitted,
                completed=self._completed,
                failed=self._failed,
                cancelled=self._cancelled,
                timed_out=self._timed_out,
                retried=self._retried,
            )

    # -- backend events (called on backend threads) -----------------------------------------

    def _begin(self, batch: Batch) -> bool:
        if batch.parent is not None:
            return True  # a rerun: its original batch was started already
        if batch.slot:
            with self._lock:
                batch.slot = False
                self._pending -= 1
                self._room.notify()
        future = batch.future
        if future is not None:
            if future.set_running_or_notify_cancel():
                return True
            with self._lock:
                self._cancelled += 1
                self._active -= 1
        else:
            with self._lock:
                if batch.state == _QUEUED:
                    batch.state = _RUNNING
                    return True
                self._active -= 1  # cancelled by its map, counted there
        self._after_drop()
        return False

    def _after_drop(self) -> None:
        with self._lock:
            if self._active:
                return
            self._idle.notify_all()
        self._stop_backend_if_idle()

    def _cancel_batches(self, batches: list[Batch], drained: bool) -> None:
        """Cancel the batches that no worker started; running ones finish.

        ``drained`` batches were taken out of the backend's queue and will never reach
        ``_begin``: each is ended here (a map learns that its calls were cancelled, a rerun
        fails its calls into its original batch). The others may still reach ``_begin``, and
        are dropped there.
        """
        cancelled: set[int] = set()
        reruns: list[Batch] = []
        sinks: list[Batch] = []
        if drained:
            for batch in batches:
                # Outside the lock: cancel() runs the future's done callbacks, which may call
                # back into the pool. wait() and as_completed() only see a cancelled future
                # once set_running_or_notify_cancel() has told them, as a worker would have.
                if batch.future is not None and batch.future.cancel():
                    batch.future.set_running_or_notify_cancel()
                    cancelled.add(id(batch))
        with self._lock:
            for batch in batches:
                if batch.slot:
                    batch.slot = False
                    self._pending -= 1
                if batch.parent is not None:
                    if drained:
                        reruns.append(batch)
                elif batch.future is not None:
                    if id(batch) in cancelled:
                        self._cancelled += 1
                        self._active -= 1
                elif batch.state == _QUEUED:
                    batch.state = _CANCELLED
                    self._cancelled += len(batch)
                    if drained:
                        self._active -= 1
                        sinks.append(batch)
            self._room.notify_all()
        for batch in sinks:
            # A map waiting for this batch (maybe on another thread) must hear of it.
            for index in range(len(batch)):
                batch.fail(index, CancelledError("the pool was shut down before this call ran"))
            if batch.sink is not None:
                batch.sink(batch)
        for batch in reruns:
            for index in range(len(batch)):
                batch.fail(
                    index, CancelledError("the pool was shut down before this call ran again")
                )
            self._finish(batch)
        if drained:
            self._after_drop()

    def _on_broken(self, error: BaseException) -> None:
        """The backend cannot run calls any more: fail everything queued and refuse new
        calls. ``error`` is a ``BrokenPool`` to raise as is, or what a worker's initializer
        raised."""
        broken: BrokenPool
        if isinstance(error, BrokenPool):
            broken = error
        else:
            broken = InitializerFailed(
                f"the pool's initializer raised {type(error).__name__}: {error}; "
                "the pool takes no more calls"
            )
            broken.__cause__ = error
        with self._lock:
            if self._broken is None:
                self._broken = broken
            self._shutdown = True
            self._room.notify_all()
        for batch in self._backend.drain():
            if batch.slot:
                with self._lock:
                    batch.slot = False
                    self._pending -= 1
            if batch.future is not None and not batch.future.set_running_or_notify_cancel():
                with self._lock:
                    self._cancelled += 1
                    self._active -= 1
                continue
            for index in range(len(batch)):
                batch.fail(index, broken)
            self._finish(batch)
        self._stop_backend_if_idle()

    def _finish(self, batch: Batch) -> None:
        root = batch.parent if batch.parent is not None else batch
        with self._lock:
            reruns = self._plan_reruns(root, batch) if batch.errors else []
            rerun = {index for child in reruns for index in child.places}
            if batch is root:
                if root.errors is not None:
                    for index in rerun:
                        del root.errors[index]
                    root.errors = root.errors or None
            else:
                root.outstanding -= 1
                self._merge(root, batch, rerun)
            for child in reruns:
                child.places = [batch.places[i] if batch is not root else i for i in child.places]
            root.outstanding += len(reruns)
            ready = not root.outstanding
            if ready:
                errors = root.errors
                failed = 0 if errors is None else len(errors)
                self._completed += len(root) - failed
                self._failed += failed
                if errors:
                    self._timed_out += sum(isinstance(e, TaskTimeout) for e in errors.values())
                self._active -= 1
        for child in reruns:
            self._backend.submit(child)
        if not ready:
            return
        future = root.future
        if future is not None:
            if self._backend.helps:
                plain(future)
            if root.errors:
                future.set_exception(root.errors[0])
            else:
                future.set_result(root.values[0])
        elif root.sink is not None:
            root.sink(root)
        if self._shutdown:
            self._after_drop()

    @staticmethod
    def _merge(root: Batch, child: Batch, skip: set[int]) -> None:
        """Copy a rerun's final outcomes into its original batch (lock held); calls in
        ``skip`` run once more and are left open."""
        root_errors = root.errors if root.errors is not None else {}
        for local, place in enumerate(child.places):
            if local in skip:
                continue
            root_errors.pop(place, None)
            error = None if child.errors is None else child.errors.get(local)
            if error is None:
                root.values[place] = child.values[local]
            else:
                root_errors[place] = error
                _note_attempts(error, child.attempt)
        root.errors = root_errors or None

    def _plan_reruns(self, root: Batch, batch: Batch) -> list[Batch]:
        """The reruns that ``batch``'s errors call for (lock held). Each rerun's ``places``
        holds indexes into ``batch``; the caller maps them to ``root``.

        A call its worker never started runs again as the same attempt; a call that raised a
        ``retry_on`` exception runs again while attempts remain.
        """
        assert batch.errors is not None
        can_rerun = self._broken is None and not self._cancelling
        not_run: list[int] = []
        retry: list[int] = []
        for index, error in batch.errors.items():
            if isinstance(error, NotRun):
                if can_rerun and not error.final:
                    not_run.append(index)
                elif self._broken is not None:
                    batch.errors[index] = self._broken
                elif self._cancelling:
                    batch.errors[index] = CancelledError(
                        "the pool was terminated (or shut down with cancel_futures=True) "
                        "before this call could end"
                    )
                else:
                    batch.errors[index] = BrokenPool(
                        "the pool's workers stopped before this call ran"
                    )
            elif (
                can_rerun
                and batch.attempt <= self._retries
                and isinstance(error, self._retry_on)
            ):
                retry.append(index)
        reruns = []
        for indexes, attempt in ((not_run, batch.attempt), (retry, batch.attempt + 1)):
            if indexes:
                child = Batch(
                    self,
                    root.fn,
                    [batch.args[i] for i in indexes],
                    root.kwargs,
                    root.timeout,
                    root.star,
                )
                child.parent = root
                child.attempt = attempt
                child.places = indexes
                reruns.append(child)
        self._retried += len(retry)
        return reruns


def _note_attempts(error: BaseException, attempts: int) -> None:
    """Record on a final exception how many times its call ran."""
    if attempts <= 1:
        return
    try:
        error.attempts = attempts  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - exotic exception types
        return
    if hasattr(error, "add_note"):
        error.add_note(f"conveyor: the call failed on each of {attempts} attempts")
