"""``Pool``: the one executor users see, written once for every backend.

Everything observable is decided here or in the rooms it delegates to: the life of every
batch, the pending bound, retries, cancellation and counters in ``_ledger``; laziness,
batching and ordering in ``_map``. A backend only runs ``Batch``es and reports their
outcomes through ``Batch.begin``/``Batch.finish``, which land in the ledger.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from ._async import AsyncPoolMethods
from ._backends import lookup
from ._backends._base import Backend, Batch, offer_help, waits_for_itself
from ._checks import check_callable, check_count, check_exception_classes, check_timeout
from ._ledger import Ledger
from ._map import MapObserver, map_results
from ._progress import length_of, track
from ._results import AsyncResult

__all__ = ["Pool", "PoolStatistics"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class PoolStatistics:
    """An immutable snapshot of a pool, from ``Pool.statistics()``.

    Counts are of calls, not batches. ``busy`` counts workers running calls; ``pending``
    counts calls accepted that no worker has started yet (calls run again after a crash or
    for a retry included). ``completed`` counts successes and ``failed`` final failures
    (timeouts included, which ``timed_out`` also counts); ``retried`` counts extra attempts.
    Every submitted call ends up in exactly one of completed, failed and cancelled.

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


#: This process's id, kept current across forks: asking the kernel on every submit costs a
#: system call.
_this_pid = os.getpid()


def _forked() -> None:
    global _this_pid
    _this_pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _drop_backend(backend: Backend, ledger: Ledger, pid: int) -> None:
    """A pool dropped without shutdown stops its backend, in the process that made it."""
    if os.getpid() == pid:
        backend.shutdown(wait=False)


def _source(iterable: Iterable[Any]) -> Iterator[Any] | range:
    """What a map reads its input from: a ``range`` as it is (its batches travel as ranges,
    which cost nothing to build or pickle, however long), anything else as an iterator."""
    return iterable if type(iterable) is range else iter(iterable)


class _WeakCall:
    """A callback that does not keep its object alive (backends must not keep Pools alive)."""

    def __init__(self, method: Callable[[BaseException], None]) -> None:
        self._ref = weakref.WeakMethod(method)

    def __call__(self, error: BaseException) -> None:
        method = self._ref()
        if method is not None:
            method(error)


class Pool(AsyncPoolMethods, Executor):
    """Run calls on a set of workers: threads, processes or another backend.

    ``Pool`` is a ``concurrent.futures.Executor`` (``submit`` returns a standard ``Future``,
    so ``as_completed``, ``wait`` and ``asyncio.wrap_future`` work) with
    ``multiprocessing.Pool``'s conveniences (``imap``, ``imap_unordered``, ``starmap``,
    ``apply_async``, ``close``/``join``/``terminate``).

    Args:
        backend: ``"thread"`` (default; for IO-bound work), ``"process"`` (CPU-bound work),
            ``"auto"`` (each function starts on threads, is measured, and moves to processes
            if it computes while holding the GIL: see ``decisions()``), ``"dask"`` (a Dask
            cluster; needs ``pip install 'conveyor[dask]'``), ``"asyncio"`` (coroutine
            functions, as tasks of the pool's own event loop), or the name of a backend
            another package declares (entry-point group ``conveyor.backends``).
        workers: how many calls run at once; None picks the backend's default (threads:
            ``min(32, cpus + 4)``; processes: the CPUs this process may use; dask: the
            cluster's threads, or the CPUs for the pool's own cluster; asyncio: 100 calls in
            flight). With ``"auto"``, its threads; its processes are ``min(workers, cpus)``.
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
        client, address: (dask backend) a ``distributed.Client`` to use (never closed by
            the pool), or a scheduler's address to connect to (``"tcp://host:8786"``);
            with neither, the pool starts a ``LocalCluster`` of its own and closes it at
            shutdown. A dask call past its ``timeout`` fails at once; on the pool's own
            cluster its worker process is stopped, elsewhere the call is abandoned.

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
        check_count("workers", workers, 1)
        check_count("max_pending", max_pending, 1)
        check_timeout("timeout", timeout)
        check_count("retries", retries, 0, allow_none=False)
        if initializer is not None:
            check_callable(initializer, "initializer")
        retry_classes = check_exception_classes("retry_on", retry_on)
        self._ledger = ledger = Ledger(
            retries=retries,
            retry_on=retry_classes,
            max_pending=max_pending,
            workers=workers or 1,  # (the backend's count, once it is made)
            call_timeout=timeout,
        )
        # The backend picks the default count itself: one on a cluster asks the cluster.
        self._backend: Backend = backend_cls(
            workers,
            _WeakCall(ledger.broke),
            initializer=initializer,
            initargs=tuple(initargs),
            **options,
        )
        self._workers = ledger.workers = self._backend.workers
        ledger.backend = self._backend
        # A pool dropped without shutdown still stops its workers.
        self._pid = os.getpid()  # a forked child cannot use the pool (see _forked_away)
        self._finalizer = weakref.finalize(self, _drop_backend, self._backend, ledger, self._pid)
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
        check_callable(fn)
        self._check_process()
        fn = self._backend.prepare(fn)
        batch = Batch(self._ledger, fn, [args], kwargs or None, self._ledger.call_timeout)
        future: Future[R] = Future()
        if self._backend.helps:
            offer_help(future, self._backend.help)
        batch.future = future
        self._ledger.accept(batch, bounded=True, block=block)
        return future

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
        check_callable(fn)
        check_timeout("timeout", timeout)
        check_count("chunksize", chunksize, 1)
        check_count("buffersize", buffersize, 1)
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        if len(iterables) == 1:
            inputs: Iterator[Any] | range = _source(iterables[0])
            star = False
        else:
            inputs = zip(*iterables)  # noqa: B905 - the stdlib's map stops at the shortest
            star = True
        results = self._map(
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
        check_callable(fn)
        check_count("chunksize", chunksize, 1)
        check_count("buffersize", buffersize, 1)
        results = self._map(
            fn, _source(iterable), ordered=True, chunksize=chunksize, buffersize=buffersize
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
        check_callable(fn)
        check_count("chunksize", chunksize, 1)
        check_count("buffersize", buffersize, 1)
        results = self._map(
            fn, _source(iterable), ordered=False, chunksize=chunksize, buffersize=buffersize
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
        check_callable(fn)
        check_count("chunksize", chunksize, 1)
        inputs = (tuple(args) for args in iterable)
        return list(self._map(fn, inputs, star=True, ordered=True, chunksize=chunksize))

    def _map(
        self,
        fn: Callable[..., R],
        inputs: Iterator[Any] | range,
        *,
        ordered: bool,
        star: bool = False,
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
        eager: bool = False,
        observer: MapObserver | None = None,
    ) -> Iterator[R]:
        """The lazy map behind every public one (arguments checked), and a pipeline
        stage's, which passes an ``observer`` (see ``_map.map_results``)."""
        self._check_process()
        return map_results(
            self._ledger,
            self._backend.prepare(fn),
            inputs,
            star=star,
            ordered=ordered,
            timeout=timeout,
            chunksize=chunksize,
            buffersize=buffersize,
            eager=eager,
            observer=observer,
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
            check_callable(callback, "callback")
        if error_callback is not None:
            check_callable(error_callback, "error_callback")
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
            self._ledger.wait_idle()
            self._backend.shutdown(wait=True)
            self._finalizer.detach()

    def close(self) -> None:
        """``multiprocessing.Pool.close``: take no more calls; queued ones still run."""
        self._stop(cancel=False, kill=False)

    def join(self) -> None:
        """``multiprocessing.Pool.join``: wait for the workers to exit after ``close()``."""
        if not self._ledger.shut:
            raise ValueError("join() needs close() or terminate() first: the pool is running")
        self.shutdown(wait=True)

    def terminate(self) -> None:
        """``multiprocessing.Pool.terminate``: cancel queued calls and stop the workers now.

        Process workers are killed and the calls they ran fail; threads cannot be killed, so
        their running calls finish first.
        """
        self._stop(cancel=True, kill=True)
        self.shutdown(wait=True)

    def _halt(self) -> None:
        """Stop now without waiting (``terminate()`` without its wait): queued calls are
        cancelled (a map waiting for them hears of it) and process workers are killed. Safe
        from any thread, a worker's included."""
        self._stop(cancel=True, kill=True)

    def _stop(self, *, cancel: bool, kill: bool) -> None:
        if self._forked_away():
            # A forked child's copy: the workers are the parent's, and so may be the locks
            # (held by threads that the child does not have). Nothing here is to stop.
            self._ledger.shut = True
            self._finalizer.detach()
            return
        self._ledger.stop(cancel=cancel or kill)
        if kill:
            self._backend.shutdown(wait=False, kill=True)
        self._ledger.stop_backend_if_idle()

    def __enter__(self) -> Pool:
        return self

    def _forked_away(self) -> bool:
        """Whether this is a child forked from the process that made the pool."""
        return _this_pid != self._pid

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

    def decisions(self) -> dict[str, str]:
        """With ``backend="auto"``: where each function runs, and why, in figures (empty on
        other backends). A function is named by its qualified name (with its module when two
        share it).

        Example:
            >>> import conveyor, time
            >>> with conveyor.Pool("auto", 4) as pool:
            ...     _ = list(pool.map(time.sleep, [0.01] * 8))
            ...     print(pool.decisions()["sleep"])  # doctest: +ELLIPSIS
            thread (CPU ...% of wall: it waits (IO, a lock, a sleep))
        """
        return self._backend.decisions()

    def statistics(self) -> PoolStatistics:
        """An immutable snapshot of the pool's counters.

        Example:
            >>> import conveyor
            >>> with conveyor.Pool(workers=3) as pool:
            ...     pool.statistics().workers
            3
        """
        busy = self._backend.busy()
        counts = self._ledger.counts()
        return PoolStatistics(
            workers=self._workers,
            busy=busy,
            pending=counts.queued,
            submitted=counts.submitted,
            completed=counts.completed,
            failed=counts.failed,
            cancelled=counts.cancelled,
            timed_out=counts.timed_out,
            retried=counts.retried,
        )
