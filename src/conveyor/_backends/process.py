"""The process backend: calls run in worker processes that survive each other's faults.

Data flow::

    Pool --submit(batch)--> inbox (deque) + wakeup pipe
                              |
                      dispatcher thread  (owns every worker pipe and process handle)
                      waits at once on: the wakeup pipe, each worker's pipe, each worker's
                      sentinel, and the nearest deadline
                              |
          job = calls of one batch --pipe--> worker process (_worker.main)
          outcomes <--pipe-- (per job, or per FLUSH_SECONDS of work)
                              |
                      batch.finish() --> Pool

Only the dispatcher touches workers. Other threads reach it through ``inbox`` and the wakeup
pipe, so no lock guards a worker's state.

The dispatcher is a role (the ``_role`` lock), held by the dispatcher thread except while it
*parks*: when nothing is due at a moment (a deadline, a kill), it lets go of the role and
waits only on pipes (the wakeup pipe, workers' pipes and sentinels). A thread that submits
then sends its call itself (``_lend``); a thread that waits for a future (``help``) takes the role
and runs the dispatcher's loop itself until its future is done: it sends the call, waits for
the worker's answer and reads it, where the parked thread would have had to wake, do it and
wake the waiter in turn (each wake-up costs tens of microseconds on a virtual machine, about
as much as the rest of a call's round trip). Whoever holds the role owns every worker; a
helper that leaves work running wakes the dispatcher thread to take it over.

Faults stay local:

* A worker that dies fails only the call it was running (known from its shared ``mark``) with
  ``WorkerCrashed``; calls of its job that it had not started, or whose results were lost with
  it, run on another worker; the worker is replaced.
* A call past its deadline: its worker gets SIGTERM, then SIGKILL after ``KILL_GRACE``; the call
  fails with ``TaskTimeout`` at once; the worker is replaced.
* Arguments that cannot be pickled fail their own call with ``PicklingFailed``; arguments that
  cannot be unpickled in the worker are retried one call per job to find the culprit, which
  fails with ``UnpicklingFailed``. A result or exception that cannot be unpickled in the pool
  fails its own call with ``UnpicklingFailed``: the other outcomes sent with it are taken
  apart from it (see ``_wire.loads_salvaging``).
"""

from __future__ import annotations

import atexit
import collections
import importlib
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from .._errors import BrokenPool, PicklingFailed, TaskTimeout, UnpicklingFailed, WorkerCrashed
from . import _forker, _wire, _worker
from ._base import Backend, Batch, NotRun, waits_for_itself
from ._forker import ForkedProcess, Forker

__all__ = ["ProcessBackend", "default_context"]

#: Seconds between SIGTERM and SIGKILL for a worker stopped at a deadline.
KILL_GRACE = 0.5
#: Seconds a worker gets to exit after being told to stop at shutdown.
STOP_GRACE = 5.0
#: A job expected to run less than this may wait in a worker's pipe behind another...
PIPELINE_SECONDS = 0.002
#: ... if its message is no longer than this: it must fit in the pipe's buffer. A worker that
#: runs a job does not read its pipe, and may be blocked sending us a large result: had we
#: blocked sending it a large job meanwhile, each would wait for the other for ever. Nor is a
#: worker still starting sent more than this: its initializer may take its time, and we would
#: wait for it, deaf to everything else.
PIPELINE_BYTES = 32 << 10
#: A job measured to end within this many seconds is waited for without sleeping: waking a
#: sleeping thread costs tens of microseconds on a virtual machine, as much as such a job.
SPIN_SECONDS = 100e-6
#: Calls measured to take less than this run in the worker's fast loop (see _worker).
TRIVIAL_CALL_SECONDS = 2e-6
#: Workers dying before they are ready, in a row, that break the pool.
FAILED_STARTS = 3
#: Functions cached per pool (and per worker) before the caches are reset.
FUNCTION_CACHE = 256
#: A worker that dies or is stopped mid-call is replaced at once by a spare that was started
#: ahead of need, if there is one; after such a loss, as many spares are kept ready as there
#: were losses in the last SPARE_WINDOW seconds (at most one per worker). Starting a worker
#: takes milliseconds, so without spares every crash would cost the pool a worker for that long.
SPARE_WINDOW = 1.0

_RUN = bytes([_worker.RUN])
_STOP = bytes([_worker.STOP])
_FORGET = bytes([_worker.FORGET])

_live: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    for backend in list(_live):
        if backend._pid == os.getpid():  # (not in a child forked from the pool's process)
            backend.shutdown(wait=True)


atexit.register(_stop_all_at_exit)


# -- Ctrl-C while the main thread holds the dispatcher role ---------------------------------
#
# Python runs signal handlers in the main thread, between any two bytecodes: a KeyboardInterrupt
# there, while the main thread runs the dispatcher's code (``help``), could stop it half-way
# through an update and lose a call. So while the main thread helps, Ctrl-C is deferred: the
# handler below wakes the helper, which leaves the role and then raises KeyboardInterrupt. It
# replaces Python's default handler, and only that one, the first time the main thread helps;
# it behaves as the default at any other moment.

_SIGINT = int(signal.SIGINT)
# The C function: signal.getsignal's wrapper (turning numbers into enums) takes microseconds.
_getsignal: Callable[[int], Any] = importlib.import_module("_signal").getsignal
_main_helping: ProcessBackend | None = None
_interrupted = False


def _on_interrupt(signum: int, frame: Any) -> None:
    global _interrupted
    helping = _main_helping
    if helping is None:
        signal.default_int_handler(signum, frame)
        return
    _interrupted = True
    try:
        os.write(helping._wake_w, b"\0")
    except OSError:
        pass


_MAIN_THREAD = threading.main_thread().ident


def _may_help_here() -> bool:
    """Whether the calling thread may take the dispatcher role (see above)."""
    if threading.get_ident() != _MAIN_THREAD:
        return True
    handler = _getsignal(_SIGINT)
    if handler is _on_interrupt or handler in (signal.SIG_IGN, signal.SIG_DFL):
        return True  # (no Python code runs for an ignored or default signal)
    if handler is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_interrupt)
        return True
    return False  # a handler of the program's own, which may raise anywhere


def _hold_interrupts(backend: ProcessBackend) -> bool:
    """Before the calling thread takes ``backend``'s role: if it is the main thread, Ctrl-C
    waits from now on (see above). Returns whether it is."""
    global _main_helping
    if threading.get_ident() != _MAIN_THREAD:
        return False
    _main_helping = backend
    return True


def _release_interrupts(main: bool) -> None:
    """After the role is given back: a Ctrl-C that waited is raised now."""
    global _main_helping, _interrupted
    if main:
        _main_helping = None
        if _interrupted:
            _interrupted = False
            raise KeyboardInterrupt


def _restore_interrupts() -> None:
    """Put Python's default SIGINT handler back once no pool is left to help."""
    if not _live and threading.get_ident() == _MAIN_THREAD and _getsignal(_SIGINT) is _on_interrupt:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def default_context() -> BaseContext:
    """The start method used when the caller names none.

    ``forkserver`` where the platform has it, else ``spawn``. ``fork`` is fast but unsafe in a
    process that has threads (the pool's own dispatcher is one; Python 3.12 warns about it);
    measured here, a forkserver child starts in a few milliseconds once the server runs, while
    ``spawn`` pays a whole interpreter start and the imports of ``__main__`` for every worker.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


_fork_server_lock = threading.Lock()
_fork_server_started = False


def _preload_worker(context: BaseContext) -> None:
    """Have a fork server import the worker's code and the main module once, not in every
    worker it forks.

    Measured here: start two workers, run one call, shut down takes about 15 ms with the
    preload and 40 ms without, more when the main script imports much (each worker would
    import it all again). It only matters if the server has not started yet.
    """
    if context.get_start_method() != "forkserver":
        return
    main_is_a_file = _wire.main_is_a_file()
    preload = [*(["__main__"] if main_is_a_file else []), _worker.__name__]
    if _forker.available(context):
        # Each pool's forker is a child of the server: what the server has imported, no
        # forker imports again as it starts. The forker itself (7-11 ms here when Python
        # compiles it, without bytecode caches), ctypes (it asks the kernel through ctypes to
        # kill workers with it) and what multiprocessing needs to hand it its sockets.
        preload += [_forker.__name__, "ctypes", "multiprocessing.popen_forkserver"]
    context.set_forkserver_preload(preload)
    _start_fork_server(main_is_a_file)


def _start_fork_server(main_is_a_file: bool) -> None:
    """Start the fork server now, telling it how to import ``__main__`` (see
    ``_worker._preload_parent_main``) through an environment variable that only it sees."""
    global _fork_server_started
    from multiprocessing import forkserver, spawn

    with _fork_server_lock:
        if _fork_server_started:
            return
        _fork_server_started = True
        data = spawn.get_preparation_data("conveyor")
        if "init_main_from_name" in data:
            spec = ["name", data["init_main_from_name"], sys.argv, sys.path]
        elif "init_main_from_path" in data and main_is_a_file:
            spec = ["path", data["init_main_from_path"], sys.argv, sys.path]
        else:
            return
        os.environ[_worker.MAIN_ENV] = json.dumps(spec)
        try:
            forkserver.ensure_running()
        finally:
            os.environ.pop(_worker.MAIN_ENV, None)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "with an unknown status"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"with exit code {code}"


class _Run:
    """A batch being run, possibly as several jobs (after a crash or a split)."""

    __slots__ = ("batch", "open_jobs")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.open_jobs = 0


class _Job:
    """Some calls of one batch, sent to one worker as one message."""

    __slots__ = (
        "careful",
        "deadline",
        "files",
        "indexes",
        "large",
        "ordinal",
        "received",
        "run",
        "segments",
    )

    def __init__(self, run: _Run, indexes: range | list[int], careful: bool = False) -> None:
        self.run = run
        self.careful = careful  # never in the fast loop: it holds a call that crashed one
        # Batch positions of this job's calls, in order: a range while they are contiguous,
        # so that results land in the batch with one slice assignment.
        self.indexes = indexes
        self.received = 0  # how many of them have an outcome
        self.deadline: float | None = None
        self.files: list[str] = []  # shared-memory files of the sent message
        self.segments: list[str] = []  # the pool's segments it was sent in (see _wire)
        self.ordinal = 0  # this job's number among those sent to its worker
        self.large = False  # its message is too large to wait in a pipe (PIPELINE_BYTES)
        run.open_jobs += 1


class _Proc:
    """A worker process, as the dispatcher sees it."""

    __slots__ = (
        "conn",
        "done",
        "fd",
        "held",
        "jobs",
        "kill_at",
        "known",
        "leaving",
        "mark",
        "pending",
        "process",
        "ready",
        "sent",
        "spare",
    )

    def __init__(
        self, process: BaseProcess | ForkedProcess, conn: Connection, mark: Any
    ) -> None:
        self.process = process
        self.conn = conn
        self.fd = conn.fileno()
        # Shared with the worker: [ordinal of the job it is in, index of the call it is in].
        self.mark = mark
        # Whether its pipe has data, asked without blocking: Connection.poll() builds a
        # selector for every question, which costs more than reading a small message.
        self.pending = select.poll()
        self.pending.register(conn.fileno(), select.POLLIN)
        self.jobs: collections.deque[_Job] = collections.deque()  # sent; the first runs
        self.held: list[str] = []  # segments it may still use, freed when it is gone
        self.sent = 0  # jobs sent so far
        self.known: set[int] = set()  # function ids this worker has cached
        self.done = 0  # calls sent, for max_tasks_per_worker
        self.leaving = False  # told to stop, or being killed: its exit is no crash
        self.kill_at: float | None = None  # SIGKILL deadline after a SIGTERM
        self.ready = False  # it has started and run the initializer
        self.spare = False  # started ahead of need: takes no job until it replaces a worker


class ProcessBackend(Backend):
    name = "process"
    can_kill = True
    needs_pickle = True
    helps = True
    batch_seconds = 0.005
    options = frozenset({"mp_context", "max_tasks_per_worker"})

    def __init__(
        self,
        workers: int,
        on_broken: Callable[[BaseException], None],
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        mp_context: BaseContext | None = None,
        max_tasks_per_worker: int | None = None,
    ) -> None:
        super().__init__(workers, on_broken)
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
        self._context = mp_context if mp_context is not None else default_context()
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if (
            self._context.get_start_method() == "spawn"
            and main_file is not None
            and not _wire.main_is_a_file()
        ):
            raise ValueError(
                f"mp_context: 'spawn' workers import the main script again, and {main_file!r} "
                "is not a file (a script read from standard input?); use the default start "
                "method, 'forkserver' or 'fork', or run the script from a file"
            )
        _preload_worker(self._context)
        self._max_tasks = max_tasks_per_worker
        self._init_blob: bytes | None = None
        if initializer is not None:
            try:
                self._init_blob = _wire.dumps((initializer, initargs))
            except Exception as exc:
                raise PicklingFailed(
                    f"initializer and initargs must be picklable for the process backend: {exc}"
                ) from exc
        # Shared with other threads: the inbox (deque operations are atomic) and the flags.
        self._inbox: collections.deque[Batch] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        self._pipes_closed = False
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_sent = False
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._killing = False
        self._closed = False
        # The dispatcher role: its holder owns everything below (see the module's doc).
        self._role = threading.Lock()
        self._parked = False  # the dispatcher thread waits without the role
        self._owner: int | None = None  # the thread that holds it
        self._helper_error: BaseException | None = None  # what stopped a helper's loop
        # Owned by the holder of the role.
        self._procs: list[_Proc] = []
        self._segments = _wire.Segments()  # where jobs' large buffers travel
        self._cpus = ProcessBackend.default_workers()
        self._jobs: collections.deque[_Job] = collections.deque()  # reruns, ahead of inbox
        self._functions: collections.OrderedDict[int, tuple[Any, int, bytes]] = (
            collections.OrderedDict()
        )
        self._fn_ids = itertools.count()
        self._call_seconds: dict[int, float] = {}  # measured seconds per call, by function id
        self._broken = False
        self._failed_starts = 0  # workers that died before READY, in a row
        self._losses: collections.deque[float] = collections.deque()  # when workers were lost
        self._lifeline_r: Connection | None = None
        self._lifeline_w: Connection | None = None
        self._forker: Forker | None = None  # where workers come from, if not multiprocessing
        self._poller: Any = None  # select.poll over the wakeup pipe, pipes and sentinels
        self._park_set: Any = None  # the same in an epoll, which a parked dispatcher waits on
        self._by_fd: dict[int, _Proc] = {}
        self._names = itertools.count()
        self._pid = os.getpid()
        _live.add(self)

    @staticmethod
    def default_workers() -> int:
        if hasattr(os, "sched_getaffinity"):
            return max(1, len(os.sched_getaffinity(0)))
        return max(1, os.cpu_count() or 1)

    # -- called from any thread -------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        with self._start_lock:
            refused = self._closed or self._killing or self._broken
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
        with self._start_lock:
            self._stopping = True
            self._killing = self._killing or kill
            thread = self._thread
            if thread is None and not self._closed:
                self._closed = True
                self._close_pipes()
        if thread is not None:
            self._wake()
            # The dispatcher, or a thread running its loop (a callback of a future it ended
            # calls shutdown), would wait for itself.
            if (
                wait
                and thread is not threading.current_thread()
                and self._owner != threading.get_ident()
            ):
                thread.join()
        _live.discard(self)
        _restore_interrupts()

    def busy(self) -> int:
        return sum(1 for proc in list(self._procs) if proc.jobs)

    def live_workers(self) -> int:
        return sum(1 for proc in list(self._procs) if not proc.leaving and not proc.spare)

    def runs_loop_here(self) -> bool:
        # (Only the holder sets _owner to its own ident, and clears it before letting go.)
        return self._owner == threading.get_ident()

    # -- internals: starting and waking -------------------------------------------------------

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(
                target=self._dispatch, name="conveyor-process-dispatcher", daemon=True
            )
            self._thread.start()

    def _own_fds(self) -> list[int]:
        """The pool-side pipe ends a forked worker must close: lifeline and wakeup."""
        if self._pipes_closed:
            return []
        fds = [self._wake_r, self._wake_w]
        lifeline = self._lifeline_w
        if lifeline is not None:
            try:
                fds.append(lifeline.fileno())
            except OSError:
                pass  # closed meanwhile: that pool is gone
        forker = self._forker
        control = forker.fileno() if forker is not None else None
        if control is not None:
            fds.append(control)
        return fds

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
            self._lifeline_r, self._lifeline_w = self._context.Pipe(duplex=False)
            if _forker.available(self._context):
                self._forker = Forker(
                    self._context, self._lifeline_r, self._init_blob, self._workers_may_spin()
                )
            self._poller = select.poll()
            self._poller.register(self._wake_r, select.POLLIN)
            if hasattr(select, "epoll"):  # else the dispatcher thread never parks
                self._park_set = select.epoll()
                self._park_set.register(self._wake_r, select.EPOLLIN)
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
                self._owner = None  # (a later thread may be given this one's ident)
                self._role.release()

    def _fail_pool(self, error: BrokenPool) -> None:
        with self._start_lock:
            self._broken = True
        self._on_broken(error)

    def _serve_once(self, until: Future[Any] | None = None, end: float | None = None) -> bool:
        """One round of the dispatcher; True when it is time to exit. A helper passes the
        future it waits for and when it stops waiting: True then means that it may leave."""
        self._assign()
        if self._stopping and self._quiet():
            return True
        nearest = self._nearest_deadline()
        parking = False
        if until is not None:
            if until.done() or _interrupted:
                return True
            if end is not None:
                if time.monotonic() >= end:
                    return True
                nearest = end if nearest is None else min(nearest, end)
        elif self._may_park():
            parking = True
        if self._expects_soon():
            events = self._poll_briefly()
        else:
            events = self._poller.poll(0) if parking else []
        if parking and not events:
            # The dispatcher thread waits without the role, once nothing is ready.
            self._park()
            return False
        if events:
            pass
        elif nearest is None:
            events = self._poller.poll()
        else:
            # poll() takes milliseconds; round up so that we never wake just before.
            events = self._poller.poll(max(0.0, (nearest - time.monotonic()) * 1000.0) + 1)
        dead: list[_Proc] = []
        for fd, _ in events:
            if fd == self._wake_r:
                # Empty the pipe first, then accept new wakeups: the other order could
                # swallow a wakeup whose batch arrives after the next _assign().
                self._drain_wakeups()
                continue
            proc = self._by_fd.get(fd)
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
                del self._by_fd[fd]
                self._unwatch(fd)
                if proc.kill_at is None:
                    proc.kill_at = time.monotonic() + KILL_GRACE
        for proc in dead:
            self._bury(proc)
        if self._killing:
            self._kill_all()
        if self._killing or self._broken:
            # Nothing will run any more: end every call that waits.
            for batch in self.drain():
                batch.reject()
            while self._jobs:
                self._fail_job(self._jobs.popleft(), lambda: NotRun(final=True))
        self._enforce_deadlines()
        return False

    # -- parking and helping ------------------------------------------------------------------

    def _may_park(self) -> bool:
        """Whether the dispatcher thread may wait without the role: nothing is due at a
        moment (a deadline, a kill), so that every event it waits for comes through a pipe
        (see ``_park``). A call's deadline is set as it starts, by whoever holds the role."""
        if self._stopping or self._killing or self._broken or self._park_set is None:
            return False
        return self._nearest_deadline() is None

    def _park(self) -> None:
        """Wait without the role until something happens; return holding it.

        The park set holds the wakeup pipe and every worker's pipe and sentinel: whatever
        the dispatcher would act on wakes it. A helper holding the role meanwhile takes its
        own worker's pipe out of the set while it waits on it (see ``help``), and handles
        every other event itself; a parked dispatcher woken then waits for it to leave.
        """
        self._parked = True
        self._owner = None
        self._role.release()
        try:
            while True:
                try:
                    self._park_set.poll()
                except InterruptedError:
                    continue
                if not self._role.acquire(blocking=False):
                    # A helper has it. No other may take it after this one: it is ours next.
                    self._parked = False
                    self._role.acquire()
                break
        finally:
            self._parked = False
        self._owner = threading.get_ident()

    def _take_role(self) -> bool:
        """Take the role from a parked dispatcher thread, if it is free; the caller must
        ``_give_back`` it."""
        if self._parked and self._role.acquire(blocking=False):
            self._owner = threading.get_ident()
            return True
        return False

    def _give_back(self) -> None:
        """Let go of a role taken from the parked dispatcher thread; wake it if what is left
        needs it awake."""
        wake = self._helper_error is not None or not self._may_park()
        self._owner = None
        self._role.release()
        if wake:
            self._wake()

    def _lend(self) -> None:
        """A thread that called ``submit`` while the dispatcher thread was parked sends the
        work itself; if the caller waits for it next (``help``), it reads the outcome too."""
        if not _may_help_here():
            self._wake()
            return
        main = _hold_interrupts(self)
        try:
            if not self._take_role():
                self._wake()
                return
            try:
                if self._parked and self._helper_error is None:
                    self._assign()
            except BaseException as exc:
                self._helper_error = exc
            finally:
                self._give_back()
        finally:
            _release_interrupts(main)

    def help(self, future: Future[Any], timeout: float | None) -> None:
        """Run the dispatcher on this thread until ``future`` is done (see the module's doc),
        if the dispatcher thread is parked."""
        if self.runs_loop_here():
            raise waits_for_itself("waiting for a call's future")
        if not self._parked or not _may_help_here():
            return
        main = _hold_interrupts(self)
        try:
            if not self._take_role():
                return
            busy: list[int] = []
            try:
                if self._parked and self._helper_error is None:
                    # The parked dispatcher must not wake for the answers we wait for.
                    busy = [proc.fd for proc in self._procs if proc.jobs and proc.fd in self._by_fd]
                    for fd in busy:
                        self._park_set.modify(fd, 0)
                    end = None if timeout is None else time.monotonic() + timeout
                    while not self._serve_once(future, end):
                        pass
            except BaseException as exc:
                # The dispatcher's state may be half-updated: the dispatcher thread ends
                # the pool with this error, as it would end it with its own.
                self._helper_error = exc
            finally:
                for fd in busy:
                    if fd in self._by_fd:
                        self._park_set.modify(fd, select.EPOLLIN)
                self._give_back()
        finally:
            _release_interrupts(main)

    def _workers_may_spin(self) -> bool:
        """Whether idle workers may wait for work awake (see _worker.SPIN_SECONDS): only
        when each can have a CPU of its own."""
        return self.workers <= self._cpus

    def _expects_soon(self) -> bool:
        """Whether a running job is measured to end within ``SPIN_SECONDS``, and a CPU is
        free to wait for it on (each busy worker takes one; waiting awake takes another)."""
        soon = False
        busy = 0
        for proc in self._procs:
            if proc.jobs:
                busy += 1
                job = proc.jobs[0]
                entry = self._functions.get(id(job.run.batch.fn))
                seconds = None if entry is None else self._call_seconds.get(entry[1])
                if seconds is not None and seconds * len(job.indexes) < SPIN_SECONDS:
                    soon = True
        return soon and busy < self._cpus

    def _poll_briefly(self) -> list[tuple[int, int]]:
        """Ask for events without sleeping, for at most ``SPIN_SECONDS``."""
        poll = self._poller.poll
        clock = time.perf_counter
        until = clock() + SPIN_SECONDS
        while True:
            events: list[tuple[int, int]] = poll(0)
            if events or clock() >= until:
                return events

    def _quiet(self) -> bool:
        """No work queued or running."""
        return not self._inbox and not self._jobs and not any(p.jobs for p in self._procs)

    def _nearest_deadline(self) -> float | None:
        nearest: float | None = None
        for proc in self._procs:
            head = proc.jobs[0].deadline if proc.jobs else None
            for moment in (head, proc.kill_at):
                if moment is not None and (nearest is None or moment < nearest):
                    nearest = moment
        return nearest

    def _spawn(self, spare: bool = False) -> None:
        if self._broken or self._stopping:
            return
        parent_end, child_end = self._context.Pipe(duplex=True)
        name = f"conveyor-worker-{next(self._names)}"
        if self._forker is not None:
            try:
                forked, mark = self._forker.fork(name, child_end)
            finally:
                child_end.close()
            self._add(_Proc(forked, parent_end, mark), spare)
            return
        mark = self._context.RawArray("q", 2)
        assert self._lifeline_r is not None and self._lifeline_w is not None
        close_fds: tuple[int, ...] = ()
        if self._context.get_start_method() == "fork":
            # A forked child inherits our ends of every pipe; it must not keep the lifeline
            # open, or the lifeline could not tell it that we died.
            # So must the lifelines and wakeup pipes of every other pool in this process, or
            # two pools' workers would keep each other's lifelines open.
            keep = {child_end.fileno(), self._lifeline_r.fileno()}
            close_fds = tuple(
                fd for backend in list(_live) for fd in backend._own_fds() if fd not in keep
            )
        context: Any = self._context  # typeshed's BaseContext lacks Process
        process = context.Process(
            target=_worker.process_main,
            args=(
                child_end,
                self._lifeline_r,
                mark,
                self._init_blob,
                close_fds,
                self._workers_may_spin(),
            ),
            name=name,
            daemon=False,
        )
        process.start()
        child_end.close()
        self._add(_Proc(process, parent_end, mark), spare)

    def _add(self, proc: _Proc, spare: bool) -> None:
        proc.spare = spare
        self._procs.append(proc)
        for fd in (proc.conn.fileno(), proc.process.sentinel):
            self._by_fd[fd] = proc
            self._poller.register(fd, select.POLLIN)
            if self._park_set is not None:
                self._park_set.register(fd, select.EPOLLIN)

    def _unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed: its number may be reused at once)."""
        for watcher in (self._poller, self._park_set):
            if watcher is None:
                continue
            try:
                watcher.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass  # not watched any more

    def _assign(self) -> None:
        """Keep every worker busy: one job running and, when it is short, one more queued in
        its pipe so that the worker never waits for us between jobs.

        Only a job measured to be short waits behind another: a long one queued behind a
        running job could sit there while another worker is idle.
        """
        self._grow()
        # Every idle worker gets a job before any busy one gets a second: a call measured to
        # be short may block this time, and nothing should wait behind it while a worker idles.
        for depth in (1, 2):
            for proc in self._procs:
                if proc.spare:
                    continue
                while not proc.leaving and len(proc.jobs) < depth and self._has_room(proc):
                    # Look before taking: a batch taken has begun (its future runs, its
                    # place under max_pending is freed), so take only what is sent now.
                    if proc.jobs and not (self._is_short(proc.jobs[0]) and self._next_is_short()):
                        break
                    if not proc.ready and self._jobs and self._jobs[0].large:
                        break  # it waits for a ready worker (see _send)
                    job = self._next_job()
                    if job is None:
                        return
                    if not self._send(proc, job):
                        break

    def _grow(self) -> None:
        """Start workers as work comes, up to ``workers``: one for each job waiting beyond the
        idle workers. A pool that runs one call starts one worker, and its shutdown does not
        wait for others to finish starting (the stdlib's executor does the same)."""
        live = [p for p in self._procs if not p.leaving and not p.spare]
        missing = self.workers - len(live)
        if missing <= 0 or self._stopping:
            return
        waiting = len(self._jobs) + len(self._inbox) - sum(1 for p in live if not p.jobs)
        for _ in range(min(missing, waiting)):
            self._spawn()

    def _is_trivial(self, job: _Job, fn_id: int) -> bool:
        """Whether ``job`` may run in the worker's fast loop: many calls, each measured to
        take a few microseconds, so none is worth the cost of marking it."""
        seconds = self._call_seconds.get(fn_id)
        return (
            not job.careful
            and len(job.indexes) > 64
            and seconds is not None
            and seconds < TRIVIAL_CALL_SECONDS
        )

    def _is_short(self, job: _Job) -> bool:
        """Whether ``job`` is expected to run under ``PIPELINE_SECONDS`` (and has no deadline,
        which is counted from the moment it is sent) and may wait in a pipe."""
        return not job.large and self._runs_short(job.run.batch, len(job.indexes))

    def _next_is_short(self) -> bool:
        """Whether the job ``_next_job`` would return is short (False if there is none)."""
        if self._jobs:
            return self._is_short(self._jobs[0])
        try:
            batch = self._inbox[0]
        except IndexError:
            return False
        return self._runs_short(batch, len(batch))

    def _runs_short(self, batch: Batch, calls: int) -> bool:
        if batch.timeout is not None:
            return False
        entry = self._functions.get(id(batch.fn))
        seconds = None if entry is None else self._call_seconds.get(entry[1])
        return seconds is not None and seconds * calls < PIPELINE_SECONDS

    def _has_room(self, proc: _Proc) -> bool:
        return self._max_tasks is None or proc.done < self._max_tasks

    def _next_job(self) -> _Job | None:
        if self._jobs:
            return self._jobs.popleft()
        while not self._killing:
            try:
                batch = self._inbox.popleft()
            except IndexError:
                return None
            if batch.begin():
                return _Job(_Run(batch), range(len(batch)))
        return None

    def _function_blob(self, proc: _Proc, fn: Any) -> tuple[int, bytes | None]:
        """The id under which ``proc`` knows ``fn``, and its pickle if it does not yet."""
        entry = self._functions.get(id(fn))
        if entry is None or entry[0] is not fn:
            entry = (fn, next(self._fn_ids), _wire.dumps_function(fn))
            self._functions[id(fn)] = entry
            if len(self._functions) > FUNCTION_CACHE:
                _, (_, old_id, _) = self._functions.popitem(last=False)
                self._call_seconds.pop(old_id, None)
        else:
            self._functions.move_to_end(id(fn))
        fn_id = entry[1]
        if fn_id in proc.known:
            return fn_id, None
        if len(proc.known) >= FUNCTION_CACHE:
            proc.conn.send_bytes(_FORGET)
            proc.known.clear()
        proc.known.add(fn_id)
        return fn_id, entry[2]

    def _send(self, proc: _Proc, job: _Job) -> bool:
        """Send ``job`` to ``proc`` (or end it, if it cannot be pickled); False if it is too
        large to wait in ``proc``'s pipe (``PIPELINE_BYTES``), and is queued again for a ready,
        idle worker."""
        batch = job.run.batch
        if self._max_tasks is not None:
            room = self._max_tasks - proc.done
            if len(job.indexes) > room:
                self._jobs.appendleft(_Job(job.run, job.indexes[room:]))
                job.indexes = job.indexes[:room]
        try:
            fn_id, fn_blob = self._function_blob(proc, batch.fn)
        except Exception as exc:
            problem = exc
            self._fail_job(job, lambda: _pickling_failed("function", problem))
            return True
        indexes = job.indexes
        args: Sequence[Any]
        if isinstance(indexes, range) and len(indexes) == len(batch):
            args = batch.args
        elif isinstance(indexes, range) and indexes.step == 1:
            args = batch.args[indexes.start : indexes.stop]
        else:
            args = [batch.args[i] for i in indexes]
        try:
            args = _wire.wrap_big_bytes(args)
            fast = self._is_trivial(job, fn_id)
            self._segments.last = []
            payload = _wire.dumps(
                (fn_id, fn_blob, batch.star, batch.kwargs, fast, args), self._segments
            )
        except Exception:
            if fn_blob is not None:
                proc.known.discard(fn_id)
            self._split_unpicklable(job)
            return True
        if (proc.jobs or not proc.ready) and len(payload) > PIPELINE_BYTES:
            _wire.forget_files(_wire.files_of(payload))
            self._segments.release(self._segments.last)
            if fn_blob is not None:
                proc.known.discard(fn_id)
            job.large = True
            self._jobs.appendleft(job)
            return False
        job.files = _wire.files_of(payload)
        job.segments = self._segments.last
        proc.sent += 1
        job.ordinal = proc.sent
        proc.done += len(indexes)
        if batch.timeout is not None and not proc.jobs and proc.ready:
            # A worker still starting sets the clock going when it is ready (see _handle).
            job.deadline = time.monotonic() + batch.timeout
        proc.jobs.append(job)
        try:
            proc.conn.send_bytes(_RUN + payload)
        except OSError:
            pass  # the worker is dead; its sentinel reports it and the job runs elsewhere
        return True

    def _split_unpicklable(self, job: _Job) -> None:
        """Fail the calls whose arguments cannot be pickled; queue the others."""
        batch = job.run.batch
        good: list[int] = []
        for index in job.indexes:
            try:
                for part in (batch.args[index], batch.kwargs):
                    _wire.forget_files(_wire.files_of(_wire.dumps(part)))
            except Exception as exc:
                batch.fail(index, _pickling_failed("arguments", exc))
            else:
                good.append(index)
        if good:
            self._jobs.appendleft(_Job(job.run, good))
        self._close_job(job)

    def _receive(self, proc: _Proc) -> bool:
        """Read what ``proc`` sent; False if its pipe is closed."""
        conn = proc.conn
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return False
            try:
                message, lost = _wire.loads_salvaging(data)
            except BaseException as exc:
                self._unreadable_results(proc, exc)
            else:
                self._handle(proc, message, lost)
            if not proc.pending.poll(0):
                return True

    def _handle(
        self, proc: _Proc, message: tuple[Any, ...], lost: dict[int, BaseException] | None
    ) -> None:
        """Act on a message; ``lost``: the values in it that could not be unpickled."""
        kind = message[0]
        if lost and kind != _worker.RESULTS:
            self._unreadable_results(proc, next(iter(lost.values())))
            return
        if kind == _worker.RESULTS:
            _, first, errors, finished, elapsed, values = message
            if not proc.jobs:
                return  # the job was given up at its deadline
            job = proc.jobs[0]
            batch = job.run.batch
            placed = job.indexes[first : first + len(values)]
            if isinstance(placed, range):
                batch.values[placed.start : placed.stop] = values
            else:
                for place, value in zip(placed, values, strict=True):
                    batch.values[place] = value
            for offset, packed in errors.items():
                batch.fail(placed[offset], _worker.unpack_error(packed))
            if lost:
                for offset, problem in lost.items():
                    batch.fail(placed[offset], _unreadable_result(problem))
            job.received = first + len(values)
            if finished:
                # ``elapsed`` counts from the job's start: only the last report is its total.
                batch.elapsed += elapsed
                self._measure(batch, len(job.indexes), elapsed)
                proc.jobs.popleft()
                self._close_job(job)
                if proc.jobs and proc.jobs[0].run.batch.timeout is not None:
                    proc.jobs[0].deadline = time.monotonic() + proc.jobs[0].run.batch.timeout
                if self._max_tasks is not None and proc.done >= self._max_tasks and not proc.jobs:
                    self._retire(proc)
        elif kind == _worker.UNREADABLE:
            # The worker may have lost a function it was sent with that job: send again.
            proc.known.clear()
            if proc.jobs:
                self._unreadable_job(proc.jobs.popleft(), _worker.unpack_error(message[1]))
        elif kind == _worker.KEPT:
            # A call kept a reference to its argument: its segment is its own from now on.
            self._segments.discard(message[1])
        elif kind == _worker.INIT_FAILED:
            error = _worker.unpack_error(message[1])
            with self._start_lock:
                self._broken = True
            proc.leaving = True
            self._on_broken(error)
            while proc.jobs:
                self._fail_job(proc.jobs.popleft(), NotRun)
        elif kind == _worker.READY:
            proc.ready = True  # jobs were sent before this arrived; they wait in the pipe
            self._failed_starts = 0
            head = proc.jobs[0] if proc.jobs else None
            if head is not None and head.run.batch.timeout is not None and head.deadline is None:
                head.deadline = time.monotonic() + head.run.batch.timeout

    def _measure(self, batch: Batch, calls: int, elapsed: float) -> None:
        entry = self._functions.get(id(batch.fn))
        if entry is None or entry[0] is not batch.fn or not calls:
            return
        per_call = elapsed / calls
        old = self._call_seconds.get(entry[1])
        self._call_seconds[entry[1]] = per_call if old is None else 0.5 * (old + per_call)

    def _unreadable_job(self, job: _Job, error: BaseException) -> None:
        """The worker could not unpickle the job: find which call's arguments are to blame."""
        if len(job.indexes) - job.received > 1:
            for index in reversed(job.indexes[job.received :]):
                self._jobs.appendleft(_Job(job.run, [index]))
            self._close_job(job)
            return

        def failure() -> BaseException:
            problem = UnpicklingFailed(
                f"the worker could not unpickle the call's function or arguments: "
                f"{type(error).__name__}: {error}"
            )
            problem.__cause__ = error
            return problem

        self._fail_job(job, failure)

    def _unreadable_results(self, proc: _Proc, error: BaseException) -> None:
        """We could not unpickle what the worker sent, not even value by value: its job's
        open calls fail."""
        if not proc.jobs:
            return
        job = proc.jobs.popleft()
        self._hold(proc, job)
        for later in reversed(proc.jobs):
            self._requeue(later)
        proc.jobs.clear()
        # The worker goes on with a job we forgot: replace it so nothing arrives late.
        self._retire(proc, kill=True)
        self._fail_job(job, lambda: _unreadable_result(error))

    def _fail_job(self, job: _Job, error: Callable[[], BaseException]) -> None:
        batch = job.run.batch
        for index in job.indexes[job.received :]:
            batch.fail(index, error())
        self._close_job(job)

    def _close_job(self, job: _Job) -> None:
        _wire.forget_files(job.files)
        self._segments.release(job.segments)
        run = job.run
        run.open_jobs -= 1
        if run.open_jobs == 0:
            run.batch.finish()

    @staticmethod
    def _hold(proc: _Proc, job: _Job) -> None:
        """``proc`` runs on, for now, without ``job`` and the jobs queued behind it: the
        segments they were sent in are not written again before it is gone."""
        for sent in (job, *proc.jobs):
            proc.held += sent.segments
            sent.segments = []

    def _retire(self, proc: _Proc, kill: bool = False) -> None:
        """Stop ``proc`` (it has done its share, or cannot be trusted) and start another."""
        if proc.leaving:
            return
        proc.leaving = True
        if kill:
            self._signal(proc, signal.SIGKILL)
        else:
            try:
                proc.conn.send_bytes(_STOP)
            except OSError:
                pass
        self._spawn()

    def _requeue(self, job: _Job) -> None:
        """Run the open calls of ``job`` elsewhere, ahead of new work."""
        rest = job.indexes[job.received :]
        if rest:
            self._jobs.appendleft(_Job(job.run, rest))
        self._close_job(job)

    def _bury(self, proc: _Proc) -> None:
        """``proc`` has exited: account for its jobs and replace it."""
        blame = True  # whether its death, before it was ready, counts as a failed start
        if isinstance(proc.process, ForkedProcess) and proc.process.lost:
            # Its forker died, and with it the news of this worker: it may still run.
            self._signal(proc, signal.SIGKILL)
            assert self._forker is not None
            blame = self._forker.died(proc.process)
        # Outcomes it sent before dying are still in the pipe.
        try:
            while proc.jobs and proc.pending.poll(0):
                if not self._receive(proc):
                    break
        except (EOFError, OSError):
            pass
        self._reap(proc, STOP_GRACE)
        code = proc.process.exitcode
        self._procs.remove(proc)
        for fd in (proc.conn.fileno(), proc.process.sentinel):
            self._by_fd.pop(fd, None)
            self._unwatch(fd)
        proc.conn.close()
        _wire.forget_files_of(proc.process.pid or 0)
        self._segments.release(proc.held)
        if not proc.ready and not proc.leaving:
            # It died before it could take work: no call is to blame.
            for job in reversed(proc.jobs):
                self._requeue(job)
            proc.jobs.clear()
            self._failed_starts += blame
            if self._failed_starts >= FAILED_STARTS:
                self._fail_pool(
                    BrokenPool(
                        f"worker processes exit while starting ({_describe_exit(code)}, "
                        f"{self._failed_starts} times in a row); see their error output. A "
                        "script that creates a pool at import time needs an "
                        "`if __name__ == '__main__':` guard"
                    )
                )
        elif proc.jobs:
            head = proc.jobs.popleft()
            for later in reversed(proc.jobs):  # never started
                self._requeue(later)
            proc.jobs.clear()
            self._crashed(head, proc, code)
        if proc.spare:
            self._keep_spares()
        elif not proc.leaving:
            self._replace()
        try:
            proc.process.close()
        except ValueError:
            pass

    def _crashed(self, job: _Job, proc: _Proc, code: int | None) -> None:
        """The worker running ``job`` died: blame the call it was in, rerun the others."""
        batch = job.run.batch
        if self._killing or self._broken:
            self._fail_job(job, NotRun)
            return
        ordinal, where = int(proc.mark[0]), int(proc.mark[1])
        if ordinal != job.ordinal:
            self._requeue(job)  # it died before it began this job: nothing to blame
            return
        open_indexes = job.indexes[job.received :]
        if where <= -2:
            # It died in the fast loop, in the chunk that starts at -where - 2: calls before
            # the chunk run again as they were, the chunk carefully, to find the culprit.
            chunk = max(0, -where - 2 - job.received)
            if open_indexes[chunk:]:
                self._jobs.appendleft(_Job(job.run, open_indexes[chunk:], careful=True))
            if open_indexes[:chunk]:
                self._jobs.appendleft(_Job(job.run, open_indexes[:chunk]))
            self._close_job(job)
            return
        position = where - job.received  # within open_indexes
        if not 0 <= position < len(open_indexes):
            # It died while unpickling the job, or after its last call: the culprit is
            # unknown. A lone call is it; else each call runs alone to find it.
            if len(open_indexes) == 1:
                position = 0
            else:
                for index in reversed(open_indexes):
                    self._jobs.appendleft(_Job(job.run, [index]))
                self._close_job(job)
                return
        error = WorkerCrashed(
            f"the worker process (pid {proc.process.pid}) running this call died "
            f"{_describe_exit(code)}",
            exitcode=code,
        )
        batch.fail(open_indexes[position], error)
        rest = list(open_indexes[:position]) + list(open_indexes[position + 1 :])
        if rest:
            self._jobs.appendleft(_Job(job.run, rest))
        self._close_job(job)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for proc in list(self._procs):
            if proc.kill_at is not None and now >= proc.kill_at:
                proc.kill_at = None
                self._signal(proc, signal.SIGKILL)
            if not proc.jobs:
                continue
            job = proc.jobs[0]
            if job.deadline is None or now < job.deadline:
                continue
            batch = job.run.batch
            assert batch.timeout is not None
            proc.jobs.popleft()
            self._hold(proc, job)
            for later in reversed(proc.jobs):
                self._requeue(later)
            proc.jobs.clear()
            proc.leaving = True
            proc.kill_at = now + KILL_GRACE
            self._signal(proc, signal.SIGTERM)
            open_indexes = job.indexes[job.received :]
            batch.fail(
                open_indexes[0],
                TaskTimeout(
                    f"the call ran longer than its timeout of {batch.timeout:g} s; "
                    "its worker process was stopped"
                ),
            )
            for index in open_indexes[1:]:
                batch.fail(index, NotRun())
            self._close_job(job)
            self._replace()

    def _replace(self) -> None:
        """A worker was lost mid-work: a spare takes its place (one that is ready, if any),
        else a new worker starts; then spares are started for the next loss."""
        now = time.monotonic()
        self._losses.append(now)
        while self._losses and self._losses[0] < now - SPARE_WINDOW:
            self._losses.popleft()
        spares = [p for p in self._procs if p.spare and not p.leaving]
        if spares:
            chosen = next((p for p in spares if p.ready), spares[0])
            chosen.spare = False
        else:
            self._spawn()
        self._keep_spares()

    def _keep_spares(self) -> None:
        wanted = min(self.workers, len(self._losses))
        have = sum(1 for p in self._procs if p.spare and not p.leaving)
        for _ in range(wanted - have):
            self._spawn(spare=True)

    def _signal(self, proc: _Proc, signum: int) -> None:
        forked = proc.process
        if isinstance(forked, ForkedProcess) and forked.pid is None:
            # Asked of the forker a moment ago: its pid comes through the status pipe as soon
            # as it is forked. Without it the signal would be lost, and a worker stopped at a
            # deadline or by terminate() would run on.
            forked.wait_for_pid(STOP_GRACE)
            if forked.pid is None and not forked.ended and self._forker is not None:
                # The forker does not answer: it goes, and takes its workers with it.
                self._forker.kill(forked)
        pid = proc.process.pid
        if pid is None:
            return
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap(self, proc: _Proc, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for ``proc`` to exit, kill it if it has not, and
        collect its exit status."""
        process = proc.process
        if isinstance(process, ForkedProcess):
            process.join(timeout=timeout)
            running = not process.ended
        else:
            # multiprocessing's join() takes a closed sentinel for an exit, then waits for
            # the process without a timeout: a worker whose call closed every descriptor it
            # had (the sentinel's among them) runs on. So wait for the sentinel, then ask.
            closed = multiprocessing.connection.wait([process.sentinel], timeout)
            if closed and process.pid is not None:
                # Its descriptors close as it exits, a moment before it has exited.
                _forker.wait_exited(process.pid, KILL_GRACE)
            running = process.is_alive()
        if running:
            self._signal(proc, signal.SIGKILL)
            process.join()

    def _kill_all(self) -> None:
        for proc in self._procs:
            if not proc.leaving:
                proc.leaving = True
                self._signal(proc, signal.SIGKILL)

    def _finish_all(self) -> None:
        """Stop every worker and release every resource; runs as the dispatcher exits."""
        for job in list(self._jobs):
            self._fail_job(job, NotRun)
        self._jobs.clear()
        for proc in self._procs:
            running = bool(proc.jobs)
            while proc.jobs:
                self._fail_job(proc.jobs.popleft(), NotRun)
            if proc.kill_at is not None or running:
                # Stopped at a deadline and still there after SIGTERM: no grace is left now.
                # Or running a call when the pool broke: nobody will read its outcome.
                self._signal(proc, signal.SIGKILL)
            elif not proc.leaving:
                proc.leaving = True
                try:
                    proc.conn.send_bytes(_STOP)
                except OSError:
                    pass
        if self._forker is not None:
            self._forker.quit()  # it exits as soon as its last worker has
        deadline = time.monotonic() + STOP_GRACE
        for proc in self._procs:
            self._reap(proc, max(0.0, deadline - time.monotonic()))
            proc.conn.close()
            _wire.forget_files_of(proc.process.pid or 0)
            proc.process.close()
        self._procs.clear()
        self._segments.close()
        if self._forker is not None:
            self._forker.stop(timeout=STOP_GRACE)
        for end in (self._lifeline_r, self._lifeline_w):
            if end is not None:
                end.close()
        if self._park_set is not None:
            self._park_set.close()
        with self._start_lock:
            self._closed = True
            self._close_pipes()
            late = self.drain()
        for batch in late:
            batch.reject()


def _unreadable_result(error: BaseException) -> UnpicklingFailed:
    problem = UnpicklingFailed(
        f"the call's result could not be unpickled in the pool: {type(error).__name__}: {error}"
    )
    problem.__cause__ = error
    return problem


def _pickling_failed(what: str, error: BaseException) -> PicklingFailed:
    problem = PicklingFailed(
        f"the call's {what} cannot be pickled for a worker process: "
        f"{type(error).__name__}: {error}"
    )
    problem.__cause__ = error
    return problem
