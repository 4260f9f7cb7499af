"""The thread backend: calls run on a set of threads that share one queue.

Data flow::

    Pool.submit / map --submit(batch)--> SimpleQueue --get()--> worker thread
        worker: batch.begin() -> run each call -> batch.finish()  (outcome back to Pool)

Threads are started lazily, one per submission that finds no idle thread, up to ``workers``.
A thread cannot be killed, so a call with a ``timeout`` is watched by one watchdog thread: at the
deadline the call fails with ``TaskTimeout``, its thread is abandoned (it exits whenever the call
returns, and its late result is dropped) and a new thread takes its slot, so capacity is kept.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .._errors import TaskTimeout
from ._base import Backend, Batch, NotRun, log_initializer_failure

__all__ = ["ThreadBackend"]

_pool_numbers = itertools.count()
_live: weakref.WeakSet[ThreadBackend] = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    # Worker threads are daemons so that an abandoned (timed-out) call cannot block interpreter
    # exit; the pools still finish their queued work first, as the stdlib's do.
    for backend in list(_live):
        backend.shutdown(wait=True)


atexit.register(_stop_all_at_exit)


def _cpu_count() -> int:
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    return int(count or 1)


class _Worker:
    """One worker thread's state, read by the watchdog and by ``busy()``."""

    __slots__ = ("abandoned", "batch", "deadline", "index", "thread")

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.batch: Batch | None = None
        self.deadline: float | None = None  # set while a call with a timeout runs
        self.index = 0
        self.abandoned = False


class ThreadBackend(Backend):
    name = "thread"
    batch_seconds = 0.002
    options = frozenset({"thread_name_prefix"})

    def __init__(
        self,
        workers: int | None,
        on_broken: Callable[[BaseException], None],
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        thread_name_prefix: str = "",
    ) -> None:
        super().__init__(workers, on_broken)
        self._initializer = initializer
        self._initargs = initargs
        self._prefix = thread_name_prefix or f"conveyor-thread-{next(_pool_numbers)}"
        self._names = itertools.count()
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        # A token per free worker, put by the worker and taken by submit() to learn that an
        # existing thread will pick the batch up, so no new thread is needed.
        self._free_tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        # Guards _workers, _stopping and every worker's deadline/abandoned pair.
        self._lock = threading.Lock()
        self._workers: set[_Worker] = set()
        self._stopping = False
        self._deadlines = threading.Condition(self._lock)
        self._watchdog: threading.Thread | None = None
        _live.add(self)

    @staticmethod
    def default_workers() -> int:
        return min(32, _cpu_count() + 4)

    # -- called by Pool -------------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        # An idle token says that a thread will pick the batch up; without one, a new thread
        # is started after the batch is queued, so that it finds the batch at once instead of
        # blocking on the empty queue and being woken again (each wake-up is a GIL hand-off).
        try:
            self._free_tokens.get_nowait()
            spawn = False
        except queue.Empty:
            spawn = True
        with self._lock:
            # Under the lock shutdown() takes: a batch is either queued before the stop
            # sentinel, so it runs, or refused.
            stopped = self._stopping
            if not stopped:
                self._queue.put(batch)
        if stopped:
            batch.reject()
        elif spawn:
            self._spawn(replacement=False)

    def drain(self) -> list[Batch]:
        taken: list[Batch] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return taken
            if item is None:
                self._queue.put(None)
                return taken
            taken.append(item)

    def shutdown(self, wait: bool, kill: bool = False) -> None:
        with self._lock:
            if not self._stopping:
                # A stop sentinel per worker, so that they all leave at once rather than one
                # after another, each waking the next (a worker also passes one on, for
                # threads this count missed).
                for _ in range(max(1, len(self._workers))):
                    self._queue.put(None)
            self._stopping = True
            self._deadlines.notify_all()
            workers = [w.thread for w in self._workers]
            watchdog = self._watchdog
        if wait:
            current = threading.current_thread()
            for thread in workers:
                if thread is not None and thread is not current:
                    thread.join()
            if watchdog is not None and watchdog is not current:
                watchdog.join()
        _live.discard(self)

    def busy(self) -> int:
        with self._lock:
            return sum(1 for w in self._workers if w.batch is not None)

    def live_workers(self) -> int:
        with self._lock:
            return len(self._workers)

    def in_worker(self) -> bool:
        current = threading.current_thread()
        with self._lock:
            return any(w.thread is current for w in self._workers)

    # -- threads -------------------------------------------------------------------------

    def _spawn(self, replacement: bool) -> bool:
        """Start a worker thread; False if the pool is stopping or full."""
        with self._lock:
            if self._stopping or len(self._workers) >= self.workers:
                return False
            worker = _Worker()
            self._workers.add(worker)
            thread = threading.Thread(
                target=self._work,
                args=(worker,),
                name=f"{self._prefix}_{next(self._names)}",
                daemon=True,
            )
            worker.thread = thread
        if replacement:
            # Nothing is queued for a replacement: it is free as soon as it starts.
            self._free_tokens.put(None)
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._workers.discard(worker)
            raise
        return True

    def _work(self, worker: _Worker) -> None:
        try:
            if self._initializer is not None:
                try:
                    self._initializer(*self._initargs)
                except BaseException as exc:
                    log_initializer_failure()
                    # Refuse new batches before the pool takes back the queued ones, so
                    # that none slips in between and waits for a worker that never comes.
                    with self._lock:
                        if not self._stopping:
                            self._queue.put(None)
                        self._stopping = True
                    self._on_broken(exc)
                    return
            get = self._queue.get
            while True:
                batch = get()
                if batch is None:
                    self._queue.put(None)  # wake the next worker too
                    return
                if batch.begin():
                    worker.batch = batch
                    if batch.timeout is None:
                        _run(batch)
                    elif not self._run_watched(worker, batch):
                        return  # abandoned: the watchdog reported this batch already
                    worker.batch = None
                    self._free_tokens.put(None)
                    batch.finish()
                else:
                    self._free_tokens.put(None)
                del batch
        finally:
            with self._lock:
                self._workers.discard(worker)

    def _run_watched(self, worker: _Worker, batch: Batch) -> bool:
        """Run ``batch`` with a deadline per call; False if the watchdog abandoned us."""
        fn, kwargs, star, timeout = batch.fn, batch.kwargs or {}, batch.star, batch.timeout
        assert timeout is not None
        self._ensure_watchdog()
        start = time.perf_counter()
        for index, arg in enumerate(batch.args):
            with self._lock:
                worker.index = index
                worker.deadline = time.monotonic() + timeout
                self._deadlines.notify()
            error: BaseException | None = None
            value: Any = None
            try:
                value = fn(*arg, **kwargs) if star else fn(arg, **kwargs)
            except BaseException as exc:
                error = exc
            with self._lock:
                if worker.abandoned:
                    return False
                worker.deadline = None
            if error is None:
                batch.values[index] = value
            else:
                batch.fail(index, error)
            del value, error
        batch.elapsed = time.perf_counter() - start
        return True

    def _ensure_watchdog(self) -> None:
        with self._lock:
            if self._watchdog is None and not self._stopping:
                self._watchdog = threading.Thread(
                    target=self._watch, name=f"{self._prefix}_watchdog", daemon=True
                )
                self._watchdog.start()

    def _watch(self) -> None:
        """Fail calls that outlive their deadline and give their slot to a new thread."""
        while True:
            expired: list[_Worker] = []
            with self._lock:
                while True:
                    if self._stopping and not any(w.deadline for w in self._workers):
                        return
                    now = time.monotonic()
                    nearest: float | None = None
                    for w in self._workers:
                        if w.deadline is None:
                            continue
                        if w.deadline <= now:
                            expired.append(w)
                        elif nearest is None or w.deadline < nearest:
                            nearest = w.deadline
                    if expired:
                        for w in expired:
                            w.abandoned = True
                            w.deadline = None
                            self._workers.discard(w)
                        break
                    self._deadlines.wait(None if nearest is None else nearest - now)
            for w in expired:
                batch = w.batch
                assert batch is not None and batch.timeout is not None
                batch.fail(
                    w.index,
                    TaskTimeout(f"the call ran longer than its timeout of {batch.timeout:g} s"),
                )
                for later in range(w.index + 1, len(batch)):
                    batch.fail(later, NotRun())
                self._spawn(replacement=True)
                batch.finish()


def _run(batch: Batch) -> None:
    """Run every call of ``batch``, recording values and errors; the hot loop of the backend."""
    fn, kwargs, values = batch.fn, batch.kwargs, batch.values
    start = time.perf_counter()
    if kwargs:
        for index, arg in enumerate(batch.args):
            try:
                values[index] = fn(*arg, **kwargs) if batch.star else fn(arg, **kwargs)
            except BaseException as exc:
                batch.fail(index, exc)
    elif batch.star:
        for index, arg in enumerate(batch.args):
            try:
                values[index] = fn(*arg)
            except BaseException as exc:
                batch.fail(index, exc)
    else:
        for index, arg in enumerate(batch.args):
            try:
                values[index] = fn(arg)
            except BaseException as exc:
                batch.fail(index, exc)
    batch.elapsed = time.perf_counter() - start
