"""The worker set of a process pool: its worker processes, their pipes and the descriptors
the dispatcher watches, how workers start, are signalled, reaped and replaced, and spares.

Threads: a ``WorkerSet`` is owned by whoever holds its pool's dispatcher role (see
``process``): only that thread starts, signals, reaps or forgets workers, and only it changes
``procs``, ``by_fd``, the pollers or a ``Proc``. Two readings are made from other threads,
without a lock, and are safe as snapshots (see ``ProcessBackend.busy``): ``list(procs)`` (one
C call under the GIL) and each proc's ``jobs``, ``leaving`` and ``spare`` (one read each).
``own_fds`` is called from any thread that forks a worker of another pool: it reads two
attributes that are set once, as the dispatcher starts, and tolerates their being closed.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from . import _forker, _worker
from ._forker import ForkedProcess, Forker
from ._lifecycle import Lifecycle
from ._worker import Init

if TYPE_CHECKING:
    from ._schedule import Job

__all__ = ["KILL_GRACE", "STOP_GRACE", "Proc", "WorkerSet", "describe_exit"]

#: Seconds between SIGTERM and SIGKILL for a worker stopped at a deadline.
KILL_GRACE = 0.5
#: Seconds a worker gets to exit after being told to stop at shutdown.
STOP_GRACE = 5.0
#: A worker that dies or is stopped mid-call is replaced at once by a spare that was started
#: ahead of need, if there is one; after such a loss, as many spares are kept ready as there
#: were losses in the last SPARE_WINDOW seconds (at most one per worker). Starting a worker
#: takes milliseconds, so without spares every crash would cost the pool a worker for that long.
SPARE_WINDOW = 1.0

STOP = bytes([_worker.STOP])


def describe_exit(code: int | None) -> str:
    if code is None:
        return "with an unknown status"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"with exit code {code}"


class Proc:
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

    def __init__(self, process: BaseProcess | ForkedProcess, conn: Connection, mark: Any) -> None:
        self.process = process
        self.conn = conn
        self.fd = conn.fileno()
        # Shared with the worker: [ordinal of the job it is in, index of the call it is in].
        self.mark = mark
        # Whether its pipe has data, asked without blocking: Connection.poll() builds a
        # selector for every question, which costs more than reading a small message.
        self.pending = select.poll()
        self.pending.register(conn.fileno(), select.POLLIN)
        self.jobs: collections.deque[Job] = collections.deque()  # sent; the first runs
        self.held: list[str] = []  # segments it may still use, freed when it is gone
        self.sent = 0  # jobs sent so far
        self.known: set[int] = set()  # function ids this worker has cached
        self.done = 0  # calls sent, for max_tasks_per_worker
        self.leaving = False  # told to stop, or being killed: its exit is no crash
        self.kill_at: float | None = None  # SIGKILL deadline after a SIGTERM
        self.ready = False  # it has started and run the initializer
        self.spare = False  # started ahead of need: takes no job until it replaces a worker


class WorkerSet:
    """A pool's worker processes and what watches them (see the module's doc).

    Args:
        context: the multiprocessing context workers start from.
        life: the pool's flags; no worker starts once it is broken or killing, and once it is
            stopping only for work that waits.
        size: how many workers may run calls at once (spares come on top).
        init: the initializer and its arguments, if any (see ``_worker.Init``).
        may_spin: whether idle workers may wait for work awake (see ``_worker``).
        inherited_fds: the pool-side descriptors, of every pool in this process, that a
            worker started with ``fork`` must close.
    """

    def __init__(
        self,
        context: BaseContext,
        life: Lifecycle,
        size: int,
        init: Init | None,
        may_spin: bool,
        inherited_fds: Callable[[], list[int]],
    ) -> None:
        self.context = context
        self._life = life
        self.size = size
        self._init = init
        self._may_spin = may_spin
        self._inherited_fds = inherited_fds
        self.procs: list[Proc] = []
        self.by_fd: dict[int, Proc] = {}  # each worker's pipe and sentinel
        self.failed_starts = 0  # workers that died before READY, in a row
        self.losses: collections.deque[float] = collections.deque()  # when workers were lost
        self.lifeline_r: Connection | None = None
        self.lifeline_w: Connection | None = None
        self.forker: Forker | None = None  # where workers come from, if not multiprocessing
        self.poller: Any = None  # select.poll over the wakeup pipe, pipes and sentinels
        self.park_set: Any = None  # the same in an epoll, which a parked dispatcher waits on
        self._names = itertools.count()

    def open(self, wake_r: int) -> None:
        """Make the lifeline, the forker and the pollers (which watch ``wake_r`` too); runs
        as the dispatcher starts."""
        self.lifeline_r, self.lifeline_w = self.context.Pipe(duplex=False)
        if _forker.available(self.context):
            self.forker = Forker(self.context, self.lifeline_r, self._init, self._may_spin)
        self.poller = select.poll()
        self.poller.register(wake_r, select.POLLIN)
        if hasattr(select, "epoll"):  # else the dispatcher thread never parks
            self.park_set = select.epoll()
            self.park_set.register(wake_r, select.EPOLLIN)

    def own_fds(self) -> list[int]:
        """The lifeline and forker descriptors, which a forked worker of any pool must close."""
        fds = []
        lifeline = self.lifeline_w
        if lifeline is not None:
            try:
                fds.append(lifeline.fileno())
            except OSError:
                pass  # closed meanwhile: that pool is gone
        forker = self.forker
        control = forker.fileno() if forker is not None else None
        if control is not None:
            fds.append(control)
        return fds

    def live(self) -> list[Proc]:
        """The workers that take jobs: neither leaving nor spare."""
        return [p for p in self.procs if not p.leaving and not p.spare]

    # -- starting -----------------------------------------------------------------------------

    def spawn(self, spare: bool = False, for_work: bool = False) -> None:
        """Start a worker; ``for_work``: work waits for it, which a pool that is stopping
        still runs (only spares and replacements are not started then)."""
        life = self._life
        if life.broken or life.killing or (life.stopping and not for_work):
            return
        parent_end, child_end = self.context.Pipe(duplex=True)
        name = f"conveyor-worker-{next(self._names)}"
        if self.forker is not None:
            try:
                forked, mark = self.forker.fork(name, child_end)
            finally:
                child_end.close()
            self._add(Proc(forked, parent_end, mark), spare)
            return
        mark = self.context.RawArray("q", 2)
        assert self.lifeline_r is not None and self.lifeline_w is not None
        close_fds: tuple[int, ...] = ()
        if self.context.get_start_method() == "fork":
            # A forked child inherits our ends of every pipe; it must not keep the lifeline
            # open, or the lifeline could not tell it that we died.
            # So must the lifelines and wakeup pipes of every other pool in this process, or
            # two pools' workers would keep each other's lifelines open.
            keep = {child_end.fileno(), self.lifeline_r.fileno()}
            close_fds = tuple(fd for fd in self._inherited_fds() if fd not in keep)
        context: Any = self.context  # typeshed's BaseContext lacks Process
        process = context.Process(
            target=_worker.process_main,
            args=(
                child_end,
                self.lifeline_r,
                mark,
                self._init,
                close_fds,
                self._may_spin,
            ),
            name=name,
            daemon=False,
        )
        process.start()
        child_end.close()
        self._add(Proc(process, parent_end, mark), spare)

    def _add(self, proc: Proc, spare: bool) -> None:
        proc.spare = spare
        self.procs.append(proc)
        for fd in (proc.conn.fileno(), proc.process.sentinel):
            self.by_fd[fd] = proc
            self.poller.register(fd, select.POLLIN)
            if self.park_set is not None:
                self.park_set.register(fd, select.EPOLLIN)

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed: its number may be reused at once)."""
        for watcher in (self.poller, self.park_set):
            if watcher is None:
                continue
            try:
                watcher.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass  # not watched any more

    def forget(self, proc: Proc) -> None:
        """Drop ``proc``, which has exited and been reaped, from the set and the pollers."""
        self.procs.remove(proc)
        for fd in (proc.conn.fileno(), proc.process.sentinel):
            self.by_fd.pop(fd, None)
            self.unwatch(fd)
        proc.conn.close()

    # -- replacing ----------------------------------------------------------------------------

    def retire(self, proc: Proc, kill: bool = False) -> None:
        """Stop ``proc`` (it has done its share, or cannot be trusted) and start another."""
        if proc.leaving:
            return
        proc.leaving = True
        if kill:
            self.signal(proc, signal.SIGKILL)
        else:
            try:
                proc.conn.send_bytes(STOP)
            except OSError:
                pass
        self.spawn()

    def replace(self) -> None:
        """A worker was lost mid-work: a spare takes its place (one that is ready, if any),
        else a new worker starts; then spares are started for the next loss."""
        now = time.monotonic()
        self.losses.append(now)
        while self.losses and self.losses[0] < now - SPARE_WINDOW:
            self.losses.popleft()
        spares = [p for p in self.procs if p.spare and not p.leaving]
        if spares:
            chosen = next((p for p in spares if p.ready), spares[0])
            chosen.spare = False
        else:
            self.spawn()
        self.keep_spares()

    def keep_spares(self) -> None:
        wanted = min(self.size, len(self.losses))
        have = sum(1 for p in self.procs if p.spare and not p.leaving)
        for _ in range(wanted - have):
            self.spawn(spare=True)

    # -- stopping -----------------------------------------------------------------------------

    def signal(self, proc: Proc, signum: int) -> None:
        forked = proc.process
        if isinstance(forked, ForkedProcess) and forked.pid is None:
            # Asked of the forker a moment ago: its pid comes through the status pipe as soon
            # as it is forked. Without it the signal would be lost, and a worker stopped at a
            # deadline or by terminate() would run on.
            forked.wait_for_pid(STOP_GRACE)
            if forked.pid is None and not forked.ended and self.forker is not None:
                # The forker does not answer: it goes, and takes its workers with it.
                self.forker.kill(forked)
        pid = proc.process.pid
        if pid is None:
            return
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self, proc: Proc, timeout: float) -> None:
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
            self.signal(proc, signal.SIGKILL)
            process.join()

    def kill_all(self) -> None:
        for proc in self.procs:
            if not proc.leaving:
                proc.leaving = True
                self.signal(proc, signal.SIGKILL)

    def stop(self, proc: Proc) -> None:
        """Tell ``proc`` to exit once its pipe is empty."""
        if not proc.leaving:
            proc.leaving = True
            try:
                proc.conn.send_bytes(STOP)
            except OSError:
                pass

    def reap_all(self, forget_files: Callable[[int], None]) -> None:
        """Wait for every worker to exit (they were told to), within ``STOP_GRACE`` in all;
        ``forget_files(pid)`` for each."""
        if self.forker is not None:
            self.forker.quit()  # it exits as soon as its last worker has
        deadline = time.monotonic() + STOP_GRACE
        for proc in self.procs:
            self.reap(proc, max(0.0, deadline - time.monotonic()))
            proc.conn.close()
            forget_files(proc.process.pid or 0)
            proc.process.close()
        self.procs.clear()

    def close(self) -> None:
        """Stop the forker and close the lifeline and the park set; the last step of all."""
        if self.forker is not None:
            self.forker.stop(timeout=STOP_GRACE)
        for end in (self.lifeline_r, self.lifeline_w):
            if end is not None:
                end.close()
        if self.park_set is not None:
            self.park_set.close()
