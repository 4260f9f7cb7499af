"""The asyncio backend: calls are coroutine functions, run as tasks on an event loop of the
backend's own, on one thread, at most ``workers`` of them at once.

Data flow::

    Pool.submit / map --submit(batch)--> _queue (deque, lock) --poke: call_soon_threadsafe-->
    loop thread: _start_calls(): batch.begin(), then one task per call while fewer than
                 ``workers`` run; each task records its call's outcome; the batch's last
                 call to end -> completer thread: batch.finish() (a map's batches that end
                 in one turn of the loop together); a freed place starts the next call

``workers`` counts calls, not batches: the calls of one batch run side by side, and a batch
ends when its last call does (its ``elapsed`` is that wall time). Submissions are poked to
the loop at most once per turn of it, however many arrive.

Unlike a thread, a coroutine can be stopped: at a call's deadline its task is cancelled and
the call fails with ``TaskTimeout``; ``shutdown(kill=True)`` cancels every task; a running
submitted call's ``future.cancel()`` cancels its task (the future then raises
``CancelledError``).

Batches end on the threads of a ``Completer``, never on the loop's, so that done callbacks
and a map's sink, which may be slow or wait for calls of the same pool, never stall the calls
in flight. A call that blocks on a result of its own pool would stall the loop for ever: on
the loop's thread (``runs_loop_here``) such a wait raises instead. When the loop stops, tasks
that calls started and left behind are cancelled, so that none outlives the pool.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

from .._coroutines import is_coroutine_function, not_coroutine_error
from .._errors import TaskTimeout
from ._base import Backend, Batch, NotRun, log_initializer_failure
from ._completer import Completer

__all__ = ["AsyncioBackend"]

_pool_numbers = itertools.count()
_live: weakref.WeakSet[AsyncioBackend] = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    for backend in list(_live):
        backend.shutdown(wait=True)


atexit.register(_stop_all_at_exit)


class _Run:
    """A begun batch: its calls' tasks, how many are left to start and to end."""

    __slots__ = ("batch", "cancelled", "expired", "left", "next", "start", "tasks")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.next = 0  # index of the next call to start
        self.left = len(batch)  # calls not ended
        self.start = time.perf_counter()
        # The tasks of calls that have started (a task cancelled before its first step would
        # never run its coroutine, so never report: one not started yet is not cancelled but
        # told, through ``cancelled`` or the backend's ``_killing``, not to start).
        self.tasks: dict[int, asyncio.Task[Any]] = {}
        self.expired: set[int] = set()  # calls cancelled at their deadline
        self.cancelled = False  # future.cancel() of a running submitted call


class AsyncioBackend(Backend):
    name = "asyncio"
    can_kill = True
    needs_pickle = False
    # Calls of a batch run side by side, so a batch lasts about as long as its slowest call
    # whatever its size: larger batches cost less to hand over between threads.
    batch_seconds = 0.02
    # Not to help (the loop is this backend's alone), but so that a wait for a future on
    # the loop's own thread, which would never end, raises instead (see ``help``).
    helps = True

    def __init__(
        self,
        workers: int | None,
        on_broken: Callable[[BaseException], None],
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(workers, on_broken)
        self._initializer = initializer
        self._initargs = initargs
        self._name = f"conveyor-asyncio-{next(_pool_numbers)}"
        self._completer = Completer(f"{self._name}-completer")
        # Guards the fields up to _thread; the rest belongs to the loop's thread.
        self._lock = threading.Lock()
        self._queue: deque[Batch] = deque()  # submitted, not begun
        self._poked = False  # a _take is scheduled on the loop
        self._stopping = False
        self._killing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ident: int | None = None
        self._running = 0  # calls whose task runs
        self._partial: _Run | None = None  # a begun batch with calls not started yet
        self._runs: set[_Run] = set()  # begun, not finished
        self._closed = False  # the loop has stopped for good
        self._ended_maps: list[Batch] = []  # map batches ended in this turn of the loop
        _live.add(self)

    def default_workers(self) -> int:
        return 100

    def prepare(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if not is_coroutine_function(fn):
            raise not_coroutine_error(fn)
        return fn

    # -- called by Pool (any thread) ------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        with self._lock:
            stopped = self._stopping
            if not stopped:
                self._queue.append(batch)
                poke = not self._poked
                self._poked = True
                if self._thread is None:
                    self._start_thread()
        if stopped:
            batch.reject()
        elif poke:
            self._soon(self._take)

    def drain(self) -> list[Batch]:
        with self._lock:
            taken = list(self._queue)
            self._queue.clear()
        return taken

    def shutdown(self, wait: bool, kill: bool = False) -> None:
        with self._lock:
            self._stopping = True
            self._killing = self._killing or kill
            thread = self._thread
        if thread is not None:
            self._soon(self._stop_when_idle)
            if wait and thread is not threading.current_thread():
                thread.join()
        if wait:
            self._completer.stop()  # (the loop's thread stopped it already, if it ran)
            self._completer.join()
        _live.discard(self)

    def help(self, future: Future[Any], timeout: float | None) -> None:
        if self.runs_loop_here() and not future.done():
            raise RuntimeError(
                "waiting for a call's result on the asyncio pool's own event loop thread (in "
                "one of its calls) would wait for ever: only that thread can run the call. "
                "Await it instead (await asyncio.wrap_future(future)), or chain it with "
                "add_done_callback"
            )

    def busy(self) -> int:
        return self._running

    def in_worker(self) -> bool:
        return self.runs_loop_here()

    def runs_loop_here(self) -> bool:
        return self._ident is not None and threading.get_ident() == self._ident

    # -- the loop's thread ----------------------------------------------------------------

    def _start_thread(self) -> None:
        """Make the loop and its thread (lock held)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()

    def _soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop's thread; nothing if the loop has closed."""
        loop = self._loop
        assert loop is not None
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:
            pass  # closed: everything has ended

    def _main(self) -> None:
        loop = self._loop
        assert loop is not None
        self._ident = threading.get_ident()
        asyncio.set_event_loop(loop)
        try:
            if self._initializer is not None and not self._initialize(loop):
                return
            loop.run_forever()
        finally:
            self._closed = True  # a late _stop_when_idle must not stop the clean-up below
            try:
                _cancel_leftovers(loop)
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                self._completer.stop()

    def _initialize(self, loop: asyncio.AbstractEventLoop) -> bool:
        assert self._initializer is not None
        try:
            result = self._initializer(*self._initargs)
            if asyncio.iscoroutine(result):
                loop.run_until_complete(result)
        except BaseException as exc:
            log_initializer_failure()
            with self._lock:
                self._stopping = True
            self._on_broken(exc)
            return False
        return True

    def _take(self) -> None:
        with self._lock:
            self._poked = False
        self._start_calls()
        self._stop_when_idle()

    def _start_calls(self) -> None:
        """Start calls while fewer than ``workers`` run and batches wait."""
        loop = self._loop
        assert loop is not None
        while self._running < self.workers:
            run = self._partial
            if run is None:
                with self._lock:
                    if not self._queue:
                        return
                    batch = self._queue.popleft()
                    killing = self._killing
                if killing:
                    self._completer.run(batch.reject)
                    continue
                if not batch.begin():
                    continue
                run = _Run(batch)
                self._runs.add(run)
                self._partial = run
                future = batch.future
                if future is not None:
                    # A running call, unlike a stdlib one, can still be cancelled.
                    future.cancel = functools.partial(self._cancel_soon, run)
            index = run.next
            run.next += 1
            if run.next == len(run.batch):
                self._partial = None
            self._running += 1
            loop.create_task(self._call(run, index))

    async def _call(self, run: _Run, index: int) -> None:
        batch = run.batch
        if self._killing or run.cancelled:
            batch.fail(index, CancelledError("the call's task was cancelled before it started"))
            self._ended(run, index)
            return
        task = asyncio.current_task()
        assert task is not None
        run.tasks[index] = task
        arg = batch.args[index]
        timer: asyncio.TimerHandle | None = None
        if batch.timeout is not None:
            loop = self._loop
            assert loop is not None
            timer = loop.call_later(batch.timeout, self._expire, run, index)
        try:
            kwargs = batch.kwargs or {}
            value = await (batch.fn(*arg, **kwargs) if batch.star else batch.fn(arg, **kwargs))
        except asyncio.CancelledError:
            if index in run.expired:
                assert batch.timeout is not None
                batch.fail(
                    index,
                    TaskTimeout(f"the call ran longer than its timeout of {batch.timeout:g} s"),
                )
            else:
                batch.fail(index, CancelledError("the call's task was cancelled"))
        except BaseException as exc:
            batch.fail(index, exc)
        else:
            batch.values[index] = value
            del value
        finally:
            if timer is not None:
                timer.cancel()
        self._ended(run, index)

    def _expire(self, run: _Run, index: int) -> None:
        task = run.tasks.get(index)
        if task is not None:
            run.expired.add(index)
            task.cancel()

    def _cancel_soon(self, run: _Run) -> bool:
        """``future.cancel()`` of a running submitted call: cancel its task (any thread)."""
        self._soon(functools.partial(self._cancel_task, run))
        return True

    def _cancel_task(self, run: _Run) -> None:
        run.cancelled = True
        for task in run.tasks.values():
            task.cancel()

    def _ended(self, run: _Run, index: int) -> None:
        self._running -= 1
        run.tasks.pop(index, None)
        run.left -= 1
        if not run.left:
            self._runs.discard(run)
            batch = run.batch
            batch.elapsed = time.perf_counter() - run.start
            future: Future[Any] | None = batch.future
            if future is not None:
                future.__dict__.pop("cancel", None)
            del run
            if future is None and batch.parent is None:
                # A map's batch: its sink is the pool's own and quick, so the map batches
                # that end in one turn of the loop go to the completer together.
                self._ended_maps.append(batch)
                if len(self._ended_maps) == 1:
                    loop = self._loop
                    assert loop is not None
                    loop.call_soon(self._hand_over_maps)
            else:
                self._completer.run(batch.finish)  # alone: its callbacks are the user's
        if not self._killing:
            self._start_calls()
        self._stop_when_idle()

    def _hand_over_maps(self) -> None:
        batches, self._ended_maps = self._ended_maps, []
        if batches:
            self._completer.run(functools.partial(_finish_all, batches))

    def _stop_when_idle(self) -> None:
        """Once stopping: cancel every task if killing; stop the loop when nothing is left."""
        if not self._stopping or self._closed:
            return
        self._hand_over_maps()  # now: the loop may stop before a callback scheduled runs
        if self._killing:
            for begun in list(self._runs):
                for task in begun.tasks.values():
                    task.cancel()
            run = self._partial
            if run is not None:
                # Its calls not started never will be; it ends with its last running one.
                self._partial = None
                batch = run.batch
                for later in range(run.next, len(batch)):
                    batch.fail(later, NotRun(final=True))
                run.left -= len(batch) - run.next
                if not run.left:
                    self._runs.discard(run)
                    self._completer.run(batch.finish)
            with self._lock:
                leftover = list(self._queue)
                self._queue.clear()
            for batch in leftover:
                self._completer.run(batch.reject)
        else:
            self._start_calls()
        with self._lock:
            idle = not self._queue and not self._runs
        if idle:
            loop = self._loop
            assert loop is not None
            loop.stop()


def _finish_all(batches: list[Batch]) -> None:
    for batch in batches:
        batch.finish()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and await the tasks that calls started and did not wait for."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
