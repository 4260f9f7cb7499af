"""Where a process pool is in its life: the flags every thread may read.

Threads: the flags are written only under ``lock``, by the thread that shuts the pool down
(``stopping``, ``killing``) or by the holder of the dispatcher role (``broken``, ``closed``).
Whoever must act on them at once (``ProcessBackend.submit`` deciding to take a batch) reads
them under ``lock``. The holder of the role reads them without it, once per round of its loop:
each is a plain bool that only goes from False to True, and every writer from another thread
wakes the dispatcher after writing, so a stale read only delays it by one round.
"""

from __future__ import annotations

import threading

__all__ = ["Lifecycle"]


class Lifecycle:
    """The pool's stage of life, shared by every thread (see the module's doc)."""

    __slots__ = ("broken", "closed", "killing", "lock", "stopping")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stopping = False  # shutdown was asked: take no more work once idle
        self.killing = False  # shutdown(kill=True): stop running calls too
        self.broken = False  # nothing will run any more (a fault, a failing initializer)
        self.closed = False  # the dispatcher has exited, or never started and never will
