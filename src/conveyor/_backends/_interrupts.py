"""Ctrl-C while the main thread holds a process pool's dispatcher role.

Python runs signal handlers in the main thread, between any two bytecodes: a KeyboardInterrupt
there, while the main thread runs the dispatcher's code (``ProcessBackend.help``), could stop it
half-way through an update and lose a call. So while the main thread holds the role, Ctrl-C is
deferred: ``hold_interrupts`` puts ``_on_interrupt`` in place of Python's default handler (and
only of that one), which wakes the helper instead of raising; ``release_interrupts`` puts the
exact handler it replaced back, after the role is given back, then raises the KeyboardInterrupt
that waited. At any other moment the process's handler is left alone: ``asyncio.run``, which
installs its own Ctrl-C handling only over the default handler, sees the default one.

A program with a handler of its own keeps it: the main thread then never takes the role (that
handler may raise anywhere), and waits for the dispatcher thread instead.

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
_setsignal: Callable[[int, Any], Any] = importlib.import_module("_signal").signal
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
    # (No Python code runs for an ignored or default signal.)
    return handler is signal.default_int_handler or handler in (signal.SIG_IGN, signal.SIG_DFL)


def hold_interrupts(wake_fd: int) -> Any:
    """Before the calling thread takes the role of the pool woken through ``wake_fd``: if it is
    the main thread and Python's default handler is in place, Ctrl-C waits from now on (see
    above). Returns what ``release_interrupts`` needs: the handler to put back, or None."""
    global _main_helping
    if threading.get_ident() != _MAIN_THREAD:
        return None
    if _getsignal(_SIGINT) is not signal.default_int_handler:
        return None
    _main_helping = wake_fd
    return _setsignal(_SIGINT, _on_interrupt)


def release_interrupts(previous: Any) -> None:
    """After the role is given back: put back the handler that ``hold_interrupts`` replaced,
    then raise a Ctrl-C that waited."""
    global _main_helping, _interrupted
    if previous is None:
        return
    try:
        _main_helping = None
        interrupted, _interrupted = _interrupted, False
    finally:
        _setsignal(_SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
