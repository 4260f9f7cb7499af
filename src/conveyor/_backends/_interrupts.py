"""Ctrl-C while the main thread holds a process pool's dispatcher role.

Python runs signal handlers in the main thread, between any two bytecodes: a KeyboardInterrupt
there, while the main thread runs the dispatcher's code (``ProcessBackend.help``), could stop it
half-way through an update and lose a call. So while the main thread helps, Ctrl-C is deferred:
the handler below wakes the helper, which leaves the role and then raises KeyboardInterrupt. It
replaces Python's default handler, and only that one, the first time the main thread helps; it
behaves as the default at any other moment.

Threads: only the main thread reads or writes this module's state (signal handlers run there,
and only the main thread holds interrupts), so it needs no lock.
"""

from __future__ import annotations

import importlib
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

_SIGINT = int(signal.SIGINT)
# The C function: signal.getsignal's wrapper (turning numbers into enums) takes microseconds.
_getsignal: Callable[[int], Any] = importlib.import_module("_signal").getsignal
_MAIN_THREAD = threading.main_thread().ident

# The wakeup pipe (write end) of the pool whose role the main thread holds, if it holds one.
_main_helping: int | None = None
_interrupted = False


def interrupted() -> bool:
    """Whether a Ctrl-C waits to be raised (the main thread should leave the role)."""
    return _interrupted


def _on_interrupt(signum: int, frame: Any) -> None:
    global _interrupted
    wake_fd = _main_helping
    if wake_fd is None:
        signal.default_int_handler(signum, frame)
        return
    _interrupted = True
    try:
        os.write(wake_fd, b"\0")
    except OSError:
        pass


def may_help_here() -> bool:
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


def hold_interrupts(wake_fd: int) -> bool:
    """Before the calling thread takes the role of the pool woken through ``wake_fd``: if it is
    the main thread, Ctrl-C waits from now on (see above). Returns whether it is."""
    global _main_helping
    if threading.get_ident() != _MAIN_THREAD:
        return False
    _main_helping = wake_fd
    return True


def release_interrupts(main: bool) -> None:
    """After the role is given back: a Ctrl-C that waited is raised now."""
    global _main_helping, _interrupted
    if main:
        _main_helping = None
        if _interrupted:
            _interrupted = False
            raise KeyboardInterrupt


def restore_interrupts(pools_left: bool) -> None:
    """Put Python's default SIGINT handler back once no pool is left to help."""
    if (
        not pools_left
        and threading.get_ident() == _MAIN_THREAD
        and _getsignal(_SIGINT) is _on_interrupt
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)
