"""Every error conveyor raises on its own behalf.

Each class subclasses the standard-library error that existing code already catches, so
replacing ``concurrent.futures`` with conveyor never turns a handled error into an unhandled one.
A task's own exception is never wrapped: it reaches the caller as itself.
"""

from __future__ import annotations

import concurrent.futures
import pickle
import sys
from concurrent.futures.process import BrokenProcessPool
from concurrent.futures.thread import BrokenThreadPool

__all__ = [
    "BrokenPool",
    "InitializerFailed",
    "PicklingFailed",
    "PoolFull",
    "TaskTimeout",
    "UnpicklingFailed",
    "WorkerCrashed",
]


class PoolFull(RuntimeError):
    """``submit_nowait`` found the pool's ``max_pending`` bound reached.

    Example:
        >>> import conveyor
        >>> issubclass(conveyor.PoolFull, RuntimeError)
        True
    """


if sys.version_info >= (3, 11):  # concurrent.futures.TimeoutError is TimeoutError
    Timeout = TimeoutError
else:  # pragma: no cover - Python 3.10, where the two are different classes

    class Timeout(concurrent.futures.TimeoutError, TimeoutError):
        """A deadline passed: both the built-in ``TimeoutError`` and, before Python 3.11,
        ``concurrent.futures.TimeoutError``, so either ``except`` clause catches it."""


class TaskTimeout(Timeout):
    """A call ran longer than its per-call ``timeout``.

    On the process backend the worker running it was stopped; on threads, which cannot be
    stopped, the call's outcome was decided at the deadline and its late result discarded.

    Example:
        >>> import conveyor
        >>> issubclass(conveyor.TaskTimeout, TimeoutError)
        True
    """


class WorkerCrashed(BrokenProcessPool):
    """The worker process running a call died (signal, ``os._exit``, segfault, out of memory).

    Only that call fails; the pool replaces the worker and goes on. ``exitcode`` is the
    process's exit code (negative: killed by that signal) and ``attempts`` how many workers
    the call was tried on.

    Example:
        >>> import conveyor
        >>> from concurrent.futures.process import BrokenProcessPool
        >>> issubclass(conveyor.WorkerCrashed, BrokenProcessPool)
        True
    """

    def __init__(self, message: str, exitcode: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.attempts = attempts

    def __str__(self) -> str:
        message = super().__str__()
        if self.attempts > 1:
            return f"{message} (the call was tried {self.attempts} times, each crashed its worker)"
        return message

    def __reduce__(self) -> tuple[type[WorkerCrashed], tuple[str, int | None, int]]:
        return (type(self), (self.args[0], self.exitcode, self.attempts))


class BrokenPool(BrokenThreadPool, BrokenProcessPool):
    """The pool cannot run calls any more; the calls it held fail with this error.

    It is both a ``BrokenThreadPool`` and a ``BrokenProcessPool``, so ``except`` clauses
    written for either standard executor keep working. The reason is the ``__cause__``.

    Example:
        >>> import conveyor
        >>> from concurrent.futures import BrokenExecutor
        >>> issubclass(conveyor.BrokenPool, BrokenExecutor)
        True
    """


class InitializerFailed(BrokenPool):
    """The pool's ``initializer`` raised: the pool is broken and takes no more work.

    The initializer's exception is the ``__cause__``.

    Example:
        >>> import conveyor
        >>> issubclass(conveyor.InitializerFailed, conveyor.BrokenPool)
        True
    """


class PicklingFailed(pickle.PicklingError, BrokenProcessPool):
    """A call's function, arguments or result could not be pickled.

    Only that call fails and the pool goes on. Where the stdlib's process pool breaks (and
    raises ``BrokenProcessPool``), this error is both, so either ``except`` catches it. The
    original error is the ``__cause__``.

    Example:
        >>> import conveyor, pickle
        >>> from concurrent.futures.process import BrokenProcessPool
        >>> issubclass(conveyor.PicklingFailed, (pickle.PicklingError, BrokenProcessPool))
        True
    """


class UnpicklingFailed(pickle.UnpicklingError, BrokenProcessPool):
    """A call's function, arguments or result could not be unpickled on the other side.

    Only that call fails and the pool goes on; like ``PicklingFailed`` it is also a
    ``BrokenProcessPool``. The original error is the ``__cause__`` when it could be carried.

    Example:
        >>> import conveyor, pickle
        >>> from concurrent.futures.process import BrokenProcessPool
        >>> issubclass(conveyor.UnpicklingFailed, (pickle.UnpicklingError, BrokenProcessPool))
        True
    """
