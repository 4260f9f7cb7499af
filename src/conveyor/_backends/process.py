"""The process backend: calls run in worker processes that survive each other's faults.

Data flow::

    Pool --submit(batch)--> inbox (deque) + wakeup pipe
                              |
                      holder of the dispatcher role (owns every worker pipe and process handle)
                      waits at once on: the wakeup pipe, each worker's pipe, each worker's
                      sentinel, and the nearest deadline
                              |
          job = calls of one batch --pipe--> worker process (_worker.main)
          outcomes <--pipe-- (per job, or per JOB_FLUSH_SECONDS of work)
                              |
                      reads each message's head, keeps the pickled outcomes; a batch
                      whose calls all have one goes on the ended list (_ended)
                              |
                      the role let go of: a helper ends its own future's batch, the
                      completer the others: unpickle outcomes, batch.finish() --> Pool

The rooms: this module holds ``ProcessBackend``, its dispatcher thread and the loop;
``_role`` who holds the loop (the dispatcher role), when the dispatcher thread parks and who
may take the role then; ``_schedule`` assigns jobs to workers and speaks the wire
(``_functions`` caches what it sends, ``_outcomes`` keeps what comes back); ``_blame``
decides what a fault means for which call; ``_workers`` keeps the worker set; ``_start`` the
start method; ``_interrupts`` defers Ctrl-C while the main thread holds the role; ``_lifecycle``
holds the flags every thread reads; ``_completer`` the threads that end batches.

The holder of the role never runs user code: no result is unpickled under it (a result's
``__setstate__`` could take its time, or never return), no batch finished (done callbacks,
map sinks), ``Pool`` not told that the pool broke (it ends what it holds). What ends while
the role is held goes on ``_ended`` (``_outcomes.BatchRun``, ``_outcomes.Broken``), and is
ended by the thread that lets go of the role, once it has: a helper ends the batch of the
future it waits for itself, which keeps a call's round trip free of thread hand-offs, and
hands the others to the completer (``_hand_over``); the dispatcher thread hands all of them
over, before it waits for the next event. A slow unpickling or callback then delays only its
own call, never a deadline, a crash check or another call.

The dispatcher role
-------------------

The role is the ``_role`` lock: whoever holds it owns every worker and runs the dispatcher's
loop (``_serve_once``). The dispatcher thread holds it except while it parks; a thread that
submits or waits may take it meanwhile. Who holds it when, and how it changes hands, is in
``_role`` (with its state diagram).

Threads and state
-----------------

* Any thread calls ``submit``, ``drain``, ``shutdown``, ``busy``, ``live_workers``,
  ``runs_loop_here`` and ``help``.
* ``_inbox`` is a deque (appends and pops are atomic); ``submit`` appends under
  ``_life.lock``, so that nothing enters once the pool is closed.
* ``_life`` (stopping, killing, broken, closed) and ``_thread``: written under ``_life.lock``
  (see ``_lifecycle`` for who reads them without it, and why that is safe).
* The wakeup pipe: any thread writes it; ``_wake_sent`` saves repeated writes, and may race
  with the role holder's draining, which at worst leaves one extra byte in the pipe.
* ``_completer``: ``run`` by whoever has let go of the role, ``stop`` by the dispatcher
  thread as it exits, ``join`` by ``shutdown(wait=True)`` (see ``_completer``).
* ``_owner`` and ``_helper_error`` are written by the role holder only; ``_parked`` by the
  dispatcher thread only. Other threads read ``_parked`` as a hint and check it again once
  they hold the role; ``_owner`` is only compared with the reader's own ident, which only
  the reader could have written.
* Everything else (``_crew``, ``_jobs``, ``_functions``, ``_segments``, ``_ended``) belongs
  to the holder of the role.
"""

from __future__ import annotations

import atexit
import collections
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.context import BaseContext
from typing import Any

from .._errors import BrokenPool, PicklingFailed
from . import _interrupts, _wire
from ._base import Backend, Batch, NotRun
from ._completer import Completer
from ._forker import ForkedProcess
from ._functions import FunctionCache
from ._lifecycle import Lifecycle
from ._outcomes import Broken, Ended
from ._role import Role
from ._schedule import SPIN_SECONDS, Job
from ._start import default_context, preload_worker
from ._worker import Init
from ._workers import KILL_GRACE, Proc, WorkerSet

__all__ = ["ProcessBackend", "check_options", "default_context"]

_live: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    for backend in list(_live):
        if backend._pid == os.getpid():  # (not in a child forked from the pool's process)
            backend.shutdown(wait=True)


atexit.register(_stop_all_at_exit)


def _fds_of_every_pool() -> list[int]:
    """The pool-side descriptors of every pool in this process (see ``WorkerSet.spawn``)."""
    return [fd for backend in list(_live) for fd in backend._own_fds()]


def _initializer_unpicklable(error: BaseException) -> PicklingFailed:
    return PicklingFailed(
        f"initializer and initargs must be picklable for the process backend: {error}"
    )


def check_options(mp_context: BaseContext | None, max_tasks_per_worker: int | None) -> BaseContext:
    """Check the process backend's own options; returns the start context to use."""
    if max_tasks_per_worker is not None and (
        isinstance(max_tasks_per_worker, bool)
        or not isinstance(max_tasks_per_worker, int)
        or max_tasks_per_worker < 1
    ):
        raise ValueError(
            f"max_tasks_per_worker must be an int >= 1 or None, got {max_tasks_per_worker!r}"
        )
    if mp_context is not None and not isinstance(mp_context, BaseContext):
        raise TypeError(
            "mp_context must be a multiprocessing context such as "
            f"multiprocessing.get_context('spawn'), got {mp_context!r}"
        )
    context = mp_context if mp_context is not None else default_context()
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if (
        context.get_start_method() == "spawn"
        and main_file is not None
        and not _wire.main_is_a_file()
    ):
        raise ValueError(
            f"mp_context: 'spawn' workers import the main script again, and {main_file!r} "
            "is not a file (a script read from standard input?); use the default start "
            "method, 'forkserver' or 'fork', or run the script from a file"
        )
    return context


class ProcessBackend(Role, Backend):
    name = "process"
    helps = True
    sends_chunks = True
    batch_seconds = 0.005
    steady_batch_seconds = 0.1
    options = frozenset({"mp_context", "max_tasks_per_worker"})

    def __init__(
        self,
        workers: int | None,
        on_broken: Callable[[BaseException], None],
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        mp_context: BaseContext | None = None,
        max_tasks_per_worker: int | None = None,
    ) -> None:
        super().__init__(workers, on_broken)
        workers = self.workers  # (None: the default count, picked by the base class)
        context = check_options(mp_context, max_tasks_per_worker)
        preload_worker(context)
        self._max_tasks = max_tasks_per_worker
        init: Init | None = None
        if initializer is not None:
            try:
                init = (_wire.dumps_function(initializer), initargs)
                _wire.forget_files(_wire.files_of(_wire.dumps(initargs)))
            except RuntimeError as exc:
                if init is None:
                    raise _initializer_unpicklable(exc) from exc
                # An object that may only be inherited (a multiprocessing.Queue): it will be,
                # as the argument of a new process.
            except Exception as exc:
                raise _initializer_unpicklable(exc) from exc
        # Shared with other threads (see the module's doc).
        self._life = Lifecycle()
        self._inbox: collections.deque[Batch] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        self._pipes_closed = False
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_sent = False
        self._thread: threading.Thread | None = None
        # The dispatcher role: its holder owns everything below (see the module's doc).
        self._role = threading.Lock()
        self._parked = False  # the dispatcher thread waits without the role
        self._owner: int | None = None  # the thread that holds it
        self._helper_error: BaseException | None = None  # what stopped a helper's loop
        # Ended batches, to be finished once the role is let go of (see _give_back).
        self._ended: list[Ended] = []
        # Where the dispatcher thread has them finished: never on itself.
        self._completer = Completer("conveyor-process-completer")
        # Owned by the holder of the role.
        self._cpus = ProcessBackend.default_workers()
        self._crew = WorkerSet(
            context,
            self._life,
            workers,
            init,
            may_spin=workers <= self._cpus,  # only when each can have a CPU of its own
            inherited_fds=_fds_of_every_pool,
        )
        self._segments = _wire.Segments()
        self._jobs: collections.deque[Job] = collections.deque()
        self._functions = FunctionCache()
        self._pid = os.getpid()
        _live.add(self)

    @staticmethod
    def default_workers() -> int:
        if hasattr(os, "sched_getaffinity"):
            return max(1, len(os.sched_getaffinity(0)))
        return max(1, os.cpu_count() or 1)

    # -- called from any thread -------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        life = self._life
        with life.lock:
            refused = life.closed or life.killing or life.broken
            if not refused:
                self._inbox.append(batch)
        if refused:
            batch.reject()
            return
        if self._thread is None:
            self._start()
        if self._parked:
            self._lend()
        else:
            self._wake()

    def drain(self) -> list[Batch]:
        taken: list[Batch] = []
        while True:
            try:
                taken.append(self._inbox.popleft())
            except IndexError:
                return taken

    def shutdown(self, wait: bool, kill: bool = False) -> None:
        life = self._life
        with life.lock:
            life.stopping = True
            life.killing = life.killing or kill
            thread = self._thread
            if thread is None and not life.closed:
                life.closed = True
                self._close_pipes()
        if thread is not None:
            self._wake()
            # The holder of the role would wait for itself (it runs no user code, so only
            # the backend's own code could ask). A done callback on a completer thread may
            # ask: ``Completer.join`` leaves out the thread it runs on.
            if (
                wait
                and thread is not threading.current_thread()
                and self._owner != threading.get_ident()
            ):
                thread.join()
                self._completer.join()  # (stopped by the dispatcher thread as it exited)
        _live.discard(self)

    def busy(self) -> int:
        # Read without the role: a snapshot, safe under the GIL (see ``_workers``), and as
        # current as any count of a running pool can be.
        return sum(1 for proc in list(self._crew.procs) if proc.jobs)

    def live_workers(self) -> int:
        # (A snapshot too: see ``busy``.)
        return sum(1 for proc in list(self._crew.procs) if not proc.leaving and not proc.spare)

    def runs_loop_here(self) -> bool:
        # (Only the holder sets _owner to its own ident, and clears it before letting go.)
        # Never true where user code runs: it runs once the role is let go of.
        return self._owner == threading.get_ident()

    # -- internals: starting and waking -------------------------------------------------------

    def _start(self) -> None:
        with self._life.lock:
            if self._thread is not None or self._life.closed:
                return
            self._thread = threading.Thread(
                target=self._dispatch, name="conveyor-process-dispatcher", daemon=True
            )
            self._thread.start()

    def _own_fds(self) -> list[int]:
        """The pool-side pipe ends a forked worker must close: lifeline, forker and wakeup."""
        if self._pipes_closed:
            return []
        return [self._wake_r, self._wake_w, *self._crew.own_fds()]

    def _wake(self) -> None:
        if self._wake_sent:
            return
        self._wake_sent = True
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def _drain_wakeups(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except OSError:
            pass
        self._wake_sent = False

    def _wake_from_outside(self) -> None:
        """``_wake`` from a thread that may run after the dispatcher has exited: the pipe is
        written only while it is open (its number could be another file's after)."""
        with self._life.lock:
            if not self._pipes_closed:
                self._wake()

    def _close_pipes(self) -> None:
        self._pipes_closed = True  # before closing: their numbers may be reused at once
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- the dispatcher thread ----------------------------------------------------------------

    def _dispatch(self) -> None:
        self._role.acquire()
        self._owner = threading.get_ident()
        try:
            self._crew.open(self._wake_r)
            while not self._serve_once():
                if self._helper_error is not None:
                    raise self._helper_error
        except BaseException as exc:
            # A bug here, or an error starting a worker: the pool cannot go on, but every
            # call it holds must still end, and nobody may wait forever.
            broken = BrokenPool(f"the process pool stopped working: {type(exc).__name__}: {exc}")
            broken.__cause__ = exc
            self._fail_pool(broken)
        finally:
            try:
                self._finish_all()
            finally:
                ended, self._ended = self._ended, []
                self._owner = None  # (a later thread may be given this one's ident)
                self._role.release()
                try:
                    self._hand_over(ended)
                finally:
                    self._completer.stop()

    def _fail_pool(self, error: BrokenPool) -> None:
        with self._life.lock:
            self._life.broken = True
        self._ended.append(Broken(self._on_broken, error))

    def _serve_once(self, until: Future[Any] | None = None, end: float | None = None) -> bool:
        """One round of the dispatcher; True when it is time to exit. A helper passes the
        future it waits for and when it stops waiting: True then means that it may leave."""
        self._assign()
        life = self._life
        if life.stopping and self._quiet():
            return True
        if self._ended:
            if until is not None:
                return True  # (one of them may be ``until``'s batch: see help)
            # Before waiting: nothing that has ended may wait for the next event.
            ended, self._ended = self._ended, []
            self._hand_over(ended)
        nearest = self._nearest_deadline()
        parking = False
        if until is not None:
            if until.done() or _interrupts.interrupted():
                return True
            if end is not None:
                if time.monotonic() >= end:
                    return True
                nearest = end if nearest is None else min(nearest, end)
        elif self._may_park():
            parking = True
        crew = self._crew
        if self._expects_soon():
            events = self._poll_briefly()
        else:
            events = crew.poller.poll(0) if parking else []
        if parking and not events:
            # The dispatcher thread waits without the role, once nothing is ready.
            self._park()
            return False
        if events:
            pass
        elif nearest is None:
            events = crew.poller.poll()
        else:
            # poll() takes milliseconds; round up so that we never wake just before.
            events = crew.poller.poll(max(0.0, (nearest - time.monotonic()) * 1000.0) + 1)
        dead: list[Proc] = []
        for fd, _ in events:
            if fd == self._wake_r:
                # Empty the pipe first, then accept new wakeups: the other order could
                # swallow a wakeup whose batch arrives after the next _assign().
                self._drain_wakeups()
                continue
            proc = crew.by_fd.get(fd)
            if proc is None or proc in dead:
                continue
            if fd == proc.process.sentinel:
                # A forked worker's status pipe brings its pid first, its exit status later.
                if isinstance(proc.process, ForkedProcess) and not proc.process.read_status():
                    continue
                dead.append(proc)
            elif not self._receive(proc):
                # The pipe closed: the process is exiting. Its exit status comes through the
                # sentinel, which the poll watches; waiting for it here would hold up every
                # other worker. One that keeps running without its pipe is killed.
                del crew.by_fd[fd]
                crew.unwatch(fd)
                if proc.kill_at is None:
                    proc.kill_at = time.monotonic() + KILL_GRACE
        for proc in dead:
            self._bury(proc)
        if life.killing:
            crew.kill_all()
        if life.killing or life.broken:
            # Nothing will run any more: end every call that waits.
            for batch in self.drain():
                self._reject(batch)
            while self._jobs:
                self._fail_job(self._jobs.popleft(), lambda: NotRun(final=True))
        self._enforce_deadlines()
        return False

    def _poll_briefly(self) -> list[tuple[int, int]]:
        """Ask for events without sleeping, for at most ``SPIN_SECONDS``."""
        poll = self._crew.poller.poll
        clock = time.perf_counter
        until = clock() + SPIN_SECONDS
        while True:
            events: list[tuple[int, int]] = poll(0)
            if events or clock() >= until:
                return events

    # -- the end ------------------------------------------------------------------------------

    def _finish_all(self) -> None:
        """Stop every worker and release every resource; runs as the dispatcher exits."""
        crew = self._crew
        for job in list(self._jobs):
            self._fail_job(job, NotRun)
        self._jobs.clear()
        for proc in crew.procs:
            running = bool(proc.jobs)
            while proc.jobs:
                self._fail_job(proc.jobs.popleft(), NotRun)
            if proc.kill_at is not None or running:
                # Stopped at a deadline and still there after SIGTERM: no grace is left now.
                # Or running a call when the pool broke: nobody will read its outcome.
                crew.signal(proc, signal.SIGKILL)
            else:
                crew.stop(proc)
        crew.reap_all(_wire.forget_files_of)
        self._segments.close()
        crew.close()
        with self._life.lock:
            self._life.closed = True
            self._close_pipes()
            late = self.drain()
        for batch in late:
            self._reject(batch)
