"""Functions and classes that worker processes of the process-backend tests import by name.

``spawn`` and ``forkserver`` workers unpickle a function by importing its module, so what they
run must live in an importable module: pytest puts this directory on ``sys.path`` and the
workers inherit it. The faults here are real: ``os._exit``, a segfault, a call that never
returns, objects whose pickling or unpickling raises or exits.

Calls that must stay busy until the test says so talk to it through a ``Channel``: a named
pipe in the test's ``tmp_path``. A call ``tell``s the test a line (for example its pid) and
waits in ``await_release`` until the test releases it, each with a bound, so that no worker
outlives a failed test for long.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Upper bound, in seconds, on every wait of a test or of a call for the other side.
WAIT = 60.0


# -- talking between a test and its calls -----------------------------------------------------


class Channel:
    """A named pipe that calls in worker processes write lines to and wait on.

    The test keeps it open for reading and writing, so a call's open() never blocks, a call's
    line is never lost, and a call waiting for a release sees the end of the pipe once the test
    closes it (it never waits past the test).
    """

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = str(path)
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._buffer = b""

    def read_line(self, timeout: float = WAIT) -> str:
        """The next line a call wrote; AssertionError if none comes within ``timeout``."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([self._fd], [], [], max(0.0, remaining))
            if not readable:
                raise AssertionError(f"no call wrote to {self.path} within {timeout} s")
            try:
                self._buffer += os.read(self._fd, 4096)
            except BlockingIOError:  # another reader took it first
                continue
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def read_pids(self, count: int, timeout: float = WAIT) -> list[int]:
        return [int(self.read_line(timeout)) for _ in range(count)]

    def release(self, calls: int = 64) -> None:
        """Let up to ``calls`` calls waiting in ``await_release`` go on."""
        os.write(self._fd, b"r" * calls)

    def close(self) -> None:
        os.close(self._fd)


def tell(path: str, text: str) -> None:
    """Write a line to the test's channel (lines under 4 KiB never interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, text.encode() + b"\n")
    finally:
        os.close(fd)


def await_release(path: str, timeout: float = WAIT) -> bool:
    """Wait until the test releases one call through its channel; False at the timeout."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(0.0, remaining))
            if not readable:
                return False
            try:
                return os.read(fd, 1) != b""
            except BlockingIOError:  # another call took the byte: wait for the next
                continue
    finally:
        os.close(fd)


def report_and_wait(started: str, release: str, value: Any) -> Any:
    """Tell the test our pid, then wait to be released; return ``value``."""
    tell(started, str(os.getpid()))
    if not await_release(release):
        raise AssertionError("the test never released this call")
    return value


def maybe_block(started: str, release: str, block: bool) -> int:
    """If ``block``: tell the test our pid and wait to be released. Return our pid."""
    if block:
        tell(started, str(os.getpid()))
        if not await_release(release):
            raise AssertionError("the test never released this call")
    return os.getpid()


def report_and_hang(started: str) -> None:
    """Tell the test our pid, then never return."""
    tell(started, str(os.getpid()))
    threading.Event().wait()


def report_ignore_sigterm_and_hang(started: str) -> None:
    """Ignore SIGTERM, tell the test our pid, then loop forever."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tell(started, str(os.getpid()))
    while True:
        time.sleep(1.0)


def report_and_crash(started: str, release: str, code: int) -> None:
    """Tell the test our pid, wait to be released, then die with ``code``."""
    tell(started, str(os.getpid()))
    await_release(release)
    os._exit(code)


def never_returns(*_: Any) -> None:
    threading.Event().wait()


# -- plain calls ----------------------------------------------------------------------------


class Boom(Exception):
    """A task's own exception."""


def double(x: int) -> int:
    return 2 * x


def identity(x: Any) -> Any:
    return x


def add(x: int, y: int = 0, *, z: int = 0) -> int:
    return x + y + z


def pid(*_: Any) -> int:
    return os.getpid()


def pid_and_value(x: Any) -> tuple[int, Any]:
    return os.getpid(), x


def type_name(x: Any) -> str:
    return type(x).__name__


def raise_boom(x: int) -> int:
    raise Boom(f"boom {x}")


def raise_on(x: int, bad: int) -> int:
    if x == bad:
        raise Boom(f"boom {x}")
    return x


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


# -- crashes --------------------------------------------------------------------------------


def exit_on(x: int, bad: int, code: int = 7) -> int:
    if x == bad:
        os._exit(code)
    return x


def crash_on(x: int, bad: int, how: str) -> int:
    """Kill this worker at ``bad``: ``exit`` (code 7), ``sigkill`` or ``segfault``."""
    if x == bad:
        if how == "exit":
            os._exit(7)
        elif how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            ctypes.string_at(0)
    return x


class PickleCounted:
    """An int that counts, in the class, how many times it is pickled (in the pool's
    process), and arrives in the worker as a plain int."""

    pickled = 0

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        type(self).pickled += 1
        return int, (self.value,)


def crash_on_noting(x: int, bad: int, how: str, path: str) -> int:
    """``crash_on``, first adding a line to ``path`` for each time the bad call runs."""
    if x == bad:
        with open(path, "a") as file:
            file.write(f"{x}\n")
    return crash_on(x, bad, how)


def nap_noting_or_exit(x: int, bad: int, path: str) -> int:
    """Note ``x`` in ``path``, sleep 20 ms (calls of steady length), return ``x``; exit at
    ``bad`` instead of sleeping."""
    with open(path, "a") as file:
        file.write(f"{x}\n")
    if x == bad:
        os._exit(3)
    time.sleep(0.02)
    return x


def exit_with(data: Any, code: int) -> None:
    """Receive ``data`` (perhaps large), then die."""
    os._exit(code)


def exit_now(code: int) -> None:
    os._exit(code)


def segfault(*_: Any) -> None:
    ctypes.string_at(0)


def close_every_descriptor(x: int) -> int:
    """Close every file descriptor of the worker (its pipes and its sentinel among them)."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    return x


def leave_a_thread(x: int) -> int:
    """Return, leaving a thread (not a daemon) that never ends."""
    threading.Thread(target=threading.Event().wait, name="left-behind").start()
    return x


def crash_first_time(marker: str, value: Any) -> Any:
    """Crash the worker the first time (creating ``marker``), return ``value`` after that."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return value
    os.close(fd)
    os._exit(9)


def double_or_crash_once(x: int, bad: int, marker: str) -> int:
    """``2 * x``; but the first call with ``x == bad`` kills its worker (creating ``marker``)."""
    if x == bad:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return 2 * x
        os.close(fd)
        os._exit(9)
    return 2 * x


def increment_trivially(x: int) -> int:
    return x + 1


def increment_or_exit(x: int, bad: int) -> int:
    if x == bad:
        os._exit(5)
    return x + 1


def outcome(kind: str, value: int) -> int:
    """For the property tests: return, raise or crash, as ``kind`` says."""
    if kind == "raise":
        raise Boom(value)
    if kind == "crash":
        os._exit(13)
    return value * 3


# -- pickling faults ------------------------------------------------------------------------


class ReduceRaises:
    """Cannot be pickled: ``__reduce__`` raises."""

    def __reduce__(self) -> Any:
        raise ValueError("this object refuses to be pickled")


def _refuse_to_build() -> Any:
    raise LookupError("this object refuses to be unpickled")


class UnpicklingRaises:
    """Pickles fine; unpickling it raises (in whichever process unpickles it)."""

    def __reduce__(self) -> tuple[Callable[[], Any], tuple[()]]:
        return (_refuse_to_build, ())


class UnpicklingExits:
    """Pickles fine; unpickling it ends the process with ``os._exit(code)``."""

    def __init__(self, code: int) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Callable[[int], Any], tuple[int]]:
        return (os._exit, (self.code,))


class UnpicklingCallsSysExit:
    """Pickles fine; unpickling it raises ``SystemExit`` through ``sys.exit``."""

    def __reduce__(self) -> tuple[Callable[[int], Any], tuple[int]]:
        return (sys.exit, (4,))


class ErrorHoldingALock(Exception):
    """An exception that cannot travel back: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class ErrorWithTwoArguments(Exception):
    """Pickles fine, but unpickling calls ``__init__`` with one argument and fails."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(first)
        self.second = second


def lock_on(x: int, bad: int) -> Any:
    """Return a result that cannot be pickled at ``bad``."""
    return threading.Lock() if x == bad else x


def raise_unpicklable_on(x: int, bad: int) -> int:
    if x == bad:
        raise ErrorHoldingALock(f"locked {x}")
    return x


def raise_two_argument_error_on(x: int, bad: int) -> int:
    if x == bad:
        raise ErrorWithTwoArguments("first", "second")
    return x


def unbuildable_on(x: int, bad: int) -> Any:
    """Return a result that the pool cannot unpickle at ``bad``."""
    return UnpicklingRaises() if x == bad else x


def _build_outside(pid: int, x: int) -> int:
    if os.getpid() == pid:
        raise LookupError("this object refuses to be unpickled in the process that made it")
    return x


class ReadableOnlyElsewhere:
    """Pickles fine, and unpickles anywhere but in the process ``pid`` (the pool's)."""

    def __init__(self, pid: int, x: int) -> None:
        self.pid = pid
        self.x = x

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[int, int]]:
        return (_build_outside, (self.pid, self.x))


def unreadable_in_pool_on(x: int, bad: int, pool_pid: int) -> Any:
    """A result that the worker could unpickle, but not the pool (process ``pool_pid``)."""
    return ReadableOnlyElsewhere(pool_pid, x) if x == bad else x


def raise_base_exception_on(x: int, bad: int, kind: str) -> int:
    if x == bad:
        if kind == "SystemExit":
            raise SystemExit(3)
        raise KeyboardInterrupt
    return x


def _build_when_released(started: str, release: str, value: Any) -> Any:
    """Rebuild a ``SlowToUnpickle``: tell the test, then wait until it releases us."""
    tell(started, "unpickling")
    if not await_release(release):
        raise AssertionError("the test never released this unpickling")
    return value


class SlowToUnpickle:
    """Pickles at once; whoever unpickles it (the pool, for a result) tells the test and
    waits to be released, then gets ``value``."""

    def __init__(self, started: str, release: str, value: Any) -> None:
        self.args = (started, release, value)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str, Any]]:
        return (_build_when_released, self.args)


def slow_to_unpickle(started: str, release: str, value: Any) -> SlowToUnpickle:
    return SlowToUnpickle(started, release, value)


# -- initializers ---------------------------------------------------------------------------

_initialized: list[str] = []


def record_init(tag: str) -> None:
    _initialized.append(tag)


def init_record(*_: Any) -> tuple[int, list[str]]:
    """The pid of this worker and what its initializer recorded."""
    return os.getpid(), list(_initialized)


def failing_init() -> None:
    raise ValueError("the initializer broke")


def exiting_init() -> None:
    os._exit(3)


def read_line(stream: Any, timeout: float = WAIT) -> str:
    """A line from a child process's pipe (``stream``); AssertionError if none comes in time."""
    readable, _, _ = select.select([stream], [], [], timeout)
    if not readable:
        raise AssertionError(f"the child process wrote no line within {timeout} s")
    return str(stream.readline().decode())


# -- watching processes from the test -----------------------------------------------------


def wait_gone(pids: list[int] | set[int], timeout: float = WAIT) -> set[int]:
    """Wait until every process in ``pids`` has ended; return those still running at the
    timeout. A pidfd becomes readable when its process ends, so this is a wait on an event,
    and it never reaps a child (its parent's own bookkeeping stays intact)."""
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fds[os.pidfd_open(pid)] = pid
            except ProcessLookupError:  # already gone
                pass
        deadline = time.monotonic() + timeout
        while fds:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select(list(fds), [], [], max(0.0, remaining))
            if not readable:
                break
            for fd in readable:
                del fds[fd]
                os.close(fd)
        return set(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def counting(source: Iterator[Any], pulled: list[Any]) -> Iterator[Any]:
    for item in source:
        pulled.append(item)
        yield item


# -- references -----------------------------------------------------------------------------


class Dummy:
    """An object a test can hold a weak reference to."""

    def method(self, x: int) -> int:
        return x + 1


def make_dummy(_: Any) -> Dummy:
    return Dummy()


def spin(seconds: float) -> int:
    """Compute in pure Python, holding the GIL, for ``seconds`` of this thread's CPU time;
    return the process id."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        for _ in range(1000):
            pass
    return os.getpid()


def short_then_spinning(x: int) -> int:
    """``x + 1`` at once for ``x`` below 1000; above, ``spin(0.2)`` first."""
    if x >= 1000:
        spin(0.2)
    return x + 1
