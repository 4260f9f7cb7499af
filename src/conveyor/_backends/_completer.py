"""The process backend's completer: threads that end batches outside the dispatcher role.

Ending a batch runs user code: its results' unpickling (``__setstate__``, ``__reduce__``),
then its future's done callbacks or its map's sink. The holder of the role must run none of
it, or one slow piece would hold up every deadline, crash check and other call of the pool;
a helper thread (see ``process``) ends the batch of the future it waits for itself, and
everything else comes here.

A piece of work runs on an idle thread of the completer; when none is idle, on a new one. So
no piece waits behind another that is slow, or that waits for the pool itself (a callback
calling ``result()`` on another future whose batch is handed over after its own). A pool
busy with quick pieces needs one thread.

Threads: ``run`` is called by whoever let go of the role, ``stop`` by the dispatcher thread as
it exits (after its last ``run``), ``join`` by ``shutdown(wait=True)``. Every thread ends once
the work handed over before ``stop`` is done; what comes after ``stop`` runs on the caller.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

__all__ = ["Completer"]


class Completer:
    """Threads, started as work comes, that run it outside the dispatcher role."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work that nothing was handed to yet
        self._stopped = False

    def run(self, work: Callable[[], object]) -> None:
        """Run ``work`` on a thread of ours that is free for it (a new one if none is)."""
        with self._lock:
            stopped = self._stopped
            thread = None
            if not stopped:
                if self._idle:
                    self._idle -= 1
                else:
                    thread = threading.Thread(
                        target=self._serve,
                        name=f"{self._name}-{len(self._threads)}",
                        daemon=True,
                    )
                    self._threads.append(thread)
                self._queue.put(work)
        if stopped:
            work()  # nobody else would run it
        elif thread is not None:
            thread.start()

    def stop(self) -> None:
        """Let every thread end once the work handed over is done."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            for _ in self._threads:
                self._queue.put(None)

    def join(self) -> None:
        """Wait for every thread to end (after ``stop``), unless called from one of them:
        each would wait for the others (a done callback that calls ``shutdown``)."""
        with self._lock:
            threads = list(self._threads)
        if threading.current_thread() in threads:
            return
        for thread in threads:
            thread.join()

    def _serve(self) -> None:
        get = self._queue.get
        while (work := get()) is not None:
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
            with self._lock:
                self._idle += 1
