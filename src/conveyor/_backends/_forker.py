"""A small fork server of one pool's own: its workers are forked from it in about a millisecond.

``multiprocessing``'s fork server starts each child through its whole bootstrap (unpickling the
process object, preparing ``__main__``, running after-fork hooks): measured here, 3 to 5 ms of
CPU and about a thousand page faults per worker. A pool that loses workers (crashes, timeouts,
``max_tasks_per_worker``) pays that for every replacement. So the pool starts one *forker*,
itself a child of that fork server (so it has the worker's code and ``__main__`` imported, and
the parent's ``sys.path`` and working directory), and asks it for workers; it forks each one
straight into ``_worker.main``.

Per worker, the pool sends the forker three file descriptors over a Unix socket: the worker's
end of its pipe, a ``memfd`` holding the worker's ``mark``, and the write end of a *status
pipe*. The forker writes the worker's pid into the status pipe as soon as it has forked, and
its wait status when it has reaped it, then closes it: the pool polls the read end as the
worker's sentinel. A worker's own children cannot hold the status pipe open, as they could a
pipe that the worker itself held.

Each worker asks the kernel to SIGKILL it when the forker dies (``PR_SET_PDEATHSIG``), and the
forker exits at once when its control socket closes without a goodbye, that is when the pool's
process has died: so no worker outlives the pool's process, and none needs a thread of its own
to watch for that (starting one cost a worker more than half a millisecond). Where the kernel
call is missing, workers watch the pool's lifeline pipe instead.

When the pool says goodbye, the forker exits once every worker it forked has been reaped. If it
dies, every status pipe closes without a status (and its workers die with it): the pool kills
those workers by pid, in case, and starts another forker for the next worker.
"""

from __future__ import annotations

import gc
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._worker import Init

__all__ = ["ForkedProcess", "Forker", "available", "wait_exited"]

_WORD = struct.Struct("q")
_FORK = b"F"
_QUIT = b"Q"
_MAX_NAME = 200


def available(context: BaseContext) -> bool:
    """Whether workers of ``context`` can come from a forker (Linux's fork server)."""
    return (
        context.get_start_method() == "forkserver"
        and hasattr(os, "memfd_create")
        and hasattr(socket, "send_fds")
    )


class ForkedProcess:
    """A worker forked by a forker, with the part of ``multiprocessing.Process``'s interface
    the pool uses: ``pid``, ``sentinel``, ``exitcode``, ``join``, ``close``."""

    def __init__(self, status: int, name: str, forker: int = 0) -> None:
        self.sentinel = status
        self.name = name
        self.forker = forker  # which of its pool's forkers forked it (see Forker.died)
        self.pid: int | None = None
        self.exitcode: int | None = None
        self.lost = False  # the status pipe closed without a status: the forker died
        self._buffer = b""
        self._closed = False

    def __repr__(self) -> str:
        return f"<ForkedProcess {self.name} pid={self.pid} exitcode={self.exitcode}>"

    @property
    def ended(self) -> bool:
        """Its exit status has come, or never will."""
        return self.exitcode is not None or self.lost

    def read_status(self) -> bool:
        """Read what the status pipe holds (call when it is readable); True once ended."""
        if self._closed or self.ended:
            return True
        try:
            data = os.read(self.sentinel, 64)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self.lost = True
            return True
        self._buffer += data
        while len(self._buffer) >= _WORD.size:
            (word,) = _WORD.unpack_from(self._buffer)
            self._buffer = self._buffer[_WORD.size :]
            if self.pid is None:
                self.pid = word
            else:
                self.exitcode = os.waitstatus_to_exitcode(word)
        return self.ended

    def join(self, timeout: float | None = None) -> None:
        """Wait until its exit status has come (or the forker is gone), at most ``timeout``."""
        self._wait_for(lambda: self.ended, timeout)

    def wait_for_pid(self, timeout: float) -> None:
        """Wait until its pid has come (the forker sends it just after the fork), or it has
        ended, at most ``timeout``."""
        self._wait_for(lambda: self.pid is not None or self.ended, timeout)

    def _wait_for(self, condition: Callable[[], bool], timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.sentinel, select.POLLIN)
        while not self._closed and not condition():
            if deadline is None:
                wait = None
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                wait = left * 1000.0 + 1
            if poller.poll(wait):
                self.read_status()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.sentinel)


class Forker:
    """The pool's side of its forker: started on the first ``fork``, again if it dies."""

    def __init__(
        self, context: BaseContext, lifeline: Connection, init: Init | None, spin: bool
    ) -> None:
        self._context = context
        self._spin = spin
        self._lifeline = lifeline
        self._init = init
        self._process: Any = None
        self._control: socket.socket | None = None
        self._quitting = False
        self._started = 0  # forkers started so far; the current one is number _started
        self._dead = 0  # the newest forker known to have died

    def fileno(self) -> int | None:
        """The pool's end of the control socket (forked children of the pool must close it)."""
        control = self._control
        if control is None:
            return None
        try:
            return control.fileno()
        except OSError:
            return None

    def fork(self, name: str, conn: Connection) -> tuple[ForkedProcess, memoryview]:
        """Ask the forker for a worker that runs ``_worker.main`` on ``conn`` (the worker's
        end, which the caller closes); returns it and its ``mark``."""
        mark_fd = os.memfd_create("conveyor-mark", os.MFD_CLOEXEC)
        status_r, status_w = os.pipe()
        try:
            os.ftruncate(mark_fd, 2 * _WORD.size)
            mark = memoryview(mmap.mmap(mark_fd, 2 * _WORD.size)).cast("q")
            request = _FORK + name.encode()[:_MAX_NAME]
            fds = [conn.fileno(), mark_fd, status_w]
            try:
                self._send(request, fds)
            except OSError:
                # The forker died since the last worker: start another.
                self._forget()
                self._send(request, fds)
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(mark_fd)
            os.close(status_w)
        os.set_blocking(status_r, False)
        return ForkedProcess(status_r, name, self._started), mark

    def died(self, worker: ForkedProcess) -> bool:
        """``worker`` lost its forker (``worker.lost``): let go of that forker, so that the
        next ``fork`` starts another. True the first time a forker's death is heard of.

        A forker's status pipes may close before its control socket does, as it dies: a
        request sent in between is lost with it, and its worker is lost in turn. So is
        every worker it had forked. Those are all one failure.
        """
        if worker.forker <= self._dead:
            return False
        self._dead = worker.forker
        if worker.forker == self._started:
            self._forget()
        return True

    def kill(self, worker: ForkedProcess) -> None:
        """Kill the forker of ``worker``, which does not answer. The kernel kills its workers
        with it; their status pipes close, and each is then ``lost``."""
        if worker.forker == self._started and self._process is not None:
            self._process.kill()

    def _send(self, request: bytes, fds: list[int]) -> None:
        if self._control is None:
            self._start()
        assert self._control is not None
        socket.send_fds(self._control, [request], fds)

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            context: Any = self._context
            process = context.Process(
                target=serve,
                args=(theirs, self._lifeline, self._init, self._spin),
                name="conveyor-forker",
                daemon=False,
            )
            process.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._process = process
        self._control = ours
        self._started += 1

    def _forget(self) -> None:
        """Let go of a forker that died."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            self._process.join(timeout=1.0)
            self._process = None

    def quit(self) -> None:
        """Tell the forker to exit once every worker it forked is gone; ``stop`` waits."""
        if self._control is not None and not self._quitting:
            self._quitting = True
            try:
                self._control.send(_QUIT)
            except OSError:
                pass

    def stop(self, timeout: float) -> None:
        """Tell the forker to exit once its workers are gone, and wait until it has.

        Its end is watched through a pidfd, which is readable once it has exited: that comes
        sooner than the news from its parent, the fork server, that it was reaped
        (``multiprocessing`` reaps it later, as it does every child).
        """
        self.quit()
        control, process = self._control, self._process
        self._control = self._process = None
        self._quitting = False
        if control is not None:
            control.close()
        if process is None:
            return
        if not (process.pid is not None and wait_exited(process.pid, timeout)):
            process.join(timeout=timeout)
            if process.exitcode is None:
                process.kill()
                process.join()
        if process.exitcode is not None:
            process.close()


# -- in the forker process --------------------------------------------------------------------


def serve(control: socket.socket, lifeline: Connection, init: Init | None, spin: bool) -> None:
    """The forker's loop: fork a worker per request, report each one's pid and exit status."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, _ignore)
    statuses: dict[int, int] = {}  # pid -> write end of its status pipe
    die_with_forker = _parent_death_setter()
    poller = select.poll()
    poller.register(control, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    from . import _worker  # imported before freezing, so that workers share it

    # Objects the forker holds now are never collected in the workers: the collector would
    # otherwise write to every page they are on, copying the whole heap into each worker.
    gc.freeze()
    quitting = False
    while not (quitting and not statuses):
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == wake_r:
                _drain(wake_r)
            elif not quitting:
                try:
                    message, fds, _, _ = socket.recv_fds(control, _MAX_NAME + 1, 3)
                except OSError:
                    message, fds = b"", []
                if message[:1] == _FORK and len(fds) == 3:
                    pid = _fork(
                        message[1:].decode(errors="replace"),
                        fds,
                        lifeline,
                        die_with_forker,
                        init,
                        spin,
                        control,
                        (wake_r, wake_w),
                        statuses,
                    )
                    if pid:
                        statuses[pid] = fds[2]
                        _write(fds[2], pid)
                    for fd_ in fds[:2]:
                        os.close(fd_)
                else:
                    for fd_ in fds:
                        os.close(fd_)
                    if message[:1] != _QUIT:
                        # No goodbye: the pool's process is gone. Our workers die with us.
                        _worker.clean_up_after_pool()
                        sys.exit(0)
                    quitting = True
                    poller.unregister(control)
                    control.close()
        _reap(statuses)
    # Every worker is reaped: nothing is left to clean up, and the pool waits for our exit.
    # multiprocessing's way out (its finalizers, joining threads) took milliseconds here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def wait_exited(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has exited (it may not be reaped yet); False at the timeout,
    or where a process that is not our child cannot be watched."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True  # reaped already
    except (AttributeError, OSError):
        return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000.0 + 1))
    finally:
        os.close(fd)


def _parent_death_setter() -> Callable[[], bool] | None:
    """A function that makes the calling process get SIGKILL when its parent dies (Linux's
    ``prctl(PR_SET_PDEATHSIG)``), or None where there is no such call."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def die_with_parent() -> bool:
        return bool(prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0)

    return die_with_parent


def _ignore(signum: int, frame: Any) -> None:
    pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


def _write(fd: int, word: int) -> None:
    try:
        os.write(fd, _WORD.pack(word))
    except OSError:
        pass  # the pool is gone


def _reap(statuses: dict[int, int]) -> None:
    while statuses:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = statuses.pop(pid, None)
        if fd is not None:
            _write(fd, status)
            os.close(fd)


def _fork(
    name: str,
    fds: list[int],
    lifeline: Connection,
    die_with_forker: Callable[[], bool] | None,
    init: Init | None,
    spin: bool,
    control: socket.socket,
    wake: tuple[int, int],
    statuses: dict[int, int],
) -> int:
    forker = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        os.close(fds[2])  # the pool sees the status pipe close: the worker never started
        return 0
    if pid:
        return pid

    def become_worker() -> int:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        control.close()
        for fd in (*wake, fds[2], *statuses.values()):
            os.close(fd)
        watch: Connection | None = lifeline
        if die_with_forker is not None and die_with_forker():
            if os.getppid() != forker:
                os._exit(70)  # the forker died before we asked
            watch = None
        return _run_worker(name, fds[0], fds[1], watch, init, spin)

    from . import _worker

    _worker.exit_after(become_worker)


def _run_worker(
    name: str,
    conn_fd: int,
    mark_fd: int,
    lifeline: Connection | None,
    init: Init | None,
    spin: bool,
) -> int:
    """In a newly forked worker: become a ``multiprocessing`` child named ``name``, then run
    the worker's loop."""
    from multiprocessing import process, util

    from . import _worker

    process.current_process().name = name
    process._children = set()  # type: ignore[attr-defined]
    util._finalizer_registry.clear()  # type: ignore[attr-defined]
    util._run_after_forkers()  # type: ignore[attr-defined]
    mark = mmap.mmap(mark_fd, 2 * _WORD.size)
    os.close(mark_fd)
    conn = Connection(conn_fd)
    try:
        _worker.main(conn, lifeline, mark, init, (), spin)
    finally:
        util._exit_function()  # type: ignore[attr-defined]
    return 0
