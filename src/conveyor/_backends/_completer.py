"""The completer: threads that end batches outside the thread that received their outcomes.

Ending a batch runs user code: its results' unpickling (``__setstate__``, ``__reduce__``),
then its future's done callbacks or its map's sink. The holder of the process dispatcher's role
(or the asyncio backend's loop, or the Dask reader) must run none of it, or one slow piece
would hold up every deadline, crash check and other call of the pool; so it hands the pieces
here.

Pieces run in the order they came, on one thread while they are quick: a burst of 64 outcomes
read from one message is 64 pieces of a few microseconds each, and a thread started for each
would cost ten times the pieces themselves. No piece may wait for long behind one that is
slow, or that waits for the pool itself (a done callback calling ``result()`` on another
future, whose batch is handed over after its own, would wait for ever): while pieces are
queued and every thread of the completer has been on its piece for ``SLOW`` seconds or more,
a watcher thread starts one more thread for them. So a pool busy with quick pieces runs two
threads here (one serving, one watching), and one more for each piece that blocks.

Threads: ``run`` is called by whoever has a batch to end, ``stop`` by the backend's thread as
it exits (after its last ``run``), ``join`` by ``shutdown(wait=True)``. Every thread ends once
the work handed over before ``stop`` is done; what comes after ``stop`` runs on the caller.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

__all__ = ["SLOW", "Completer"]

#: Seconds a piece may take before the pieces queued behind it get a thread of their own.
SLOW = 0.005


class Completer:
    """Threads, started as work comes, that run it outside the caller's thread."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: collections.deque[Callable[[], object]] = collections.deque()
        lock = threading.Lock()
        self._ready = threading.Condition(lock)  # servers wait on it for pieces...
        self._watching = threading.Condition(lock)  # ... and the watcher on this
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a piece
        self._busy: dict[int, float] = {}  # thread ident -> when it took its piece
        self._starting = 0  # threads started that have not taken a piece yet
        self._watcher: threading.Thread | None = None
        self._watcher_asleep = False  # waiting until a piece comes (not for a moment)
        self._stopped = False

    def run(self, work: Callable[[], object]) -> None:
        """Run ``work`` on a thread of ours, after the pieces handed over before it."""
        self.run_each([work])

    def run_each(self, works: list[Callable[[], object]]) -> None:
        """``run`` each of ``works``, in order (each a piece of its own)."""
        with self._ready:
            stopped = self._stopped
            if not stopped:
                self._queue.extend(works)
                if self._idle:
                    self._ready.notify()
                elif not self._threads:
                    self._start(self._serve, f"{self._name}-0")
                elif self._watcher is None:
                    self._watcher = self._start(self._watch, f"{self._name}-watcher")
                elif self._watcher_asleep:
                    self._watcher_asleep = False
                    self._watching.notify()
        if stopped:
            for work in works:
                work()  # nobody else would run it

    def stop(self) -> None:
        """Let every thread end once the work handed over is done."""
        with self._ready:
            self._stopped = True
            self._ready.notify_all()
            self._watching.notify()

    def join(self) -> None:
        """Wait for every thread to end (after ``stop``), unless called from one of them:
        each would wait for the others (a done callback that calls ``shutdown``)."""
        with self._ready:
            threads = list(self._threads)
        if threading.current_thread() in threads:
            return
        for thread in threads:
            thread.join()

    def _start(self, target: Callable[[], None], name: str) -> threading.Thread:
        """Start a thread (lock held)."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        if target == self._serve:
            self._starting += 1
        thread.start()
        return thread

    def _serve(self) -> None:
        me = threading.get_ident()
        ready = self._ready
        queue = self._queue
        with ready:
            self._starting -= 1
        while True:
            with ready:
                self._busy.pop(me, None)
                while not queue:
                    if self._stopped:
                        return
                    self._idle += 1
                    ready.wait()
                    self._idle -= 1
                work = queue.popleft()
                self._busy[me] = time.monotonic()
            try:
                work()
            except BaseException as exc:  # a bug: report it, and keep serving
                threading.excepthook(
                    threading.ExceptHookArgs(
                        (type(exc), exc, exc.__traceback__, threading.current_thread())
                    )
                )
                del exc
            del work

    def _watch(self) -> None:
        """Start a thread for the queued pieces whenever every thread serving is stuck on a
        piece (busy for ``SLOW`` or more)."""
        watching = self._watching
        with watching:
            while True:
                if not self._queue:
                    if self._stopped:
                        return
                    self._watcher_asleep = True
                    watching.wait()
                    self._watcher_asleep = False
                    continue
                if self._idle or self._starting:
                    watching.wait(SLOW)  # (one of them takes it)
                    continue
                now = time.monotonic()
                freshest = max(self._busy.values(), default=now - SLOW)
                if now - freshest >= SLOW:
                    self._start(self._serve, f"{self._name}-{len(self._threads)}")
                else:
                    watching.wait(freshest + SLOW - now)
