"""The seam between ``Pool`` and the engines that run calls.

A backend knows nothing of futures, ordering, retries or statistics: it receives ``Batch``es,
runs each call of a batch in order, fills in the batch's outcomes and hands it back with
``batch.finish()``. Everything a user can observe is decided in ``Pool``.

The contract, for every backend:

* ``submit(batch)`` queues a batch and returns at once; it never runs the batch's calls in the
  caller (a backend that ``helps`` may pickle and send it from there).
  A batch that arrives after ``shutdown(kill=True)`` is reported with ``batch.reject()``.
* Before running a batch the backend calls ``batch.begin()``; when that returns False the batch
  was cancelled and must be dropped without a word.
* Each call ends in exactly one of ``batch.values[i]`` (success) or ``batch.errors[i]``.
  A call the backend could not even start (its worker died first) gets ``NotRun`` and Pool runs
  it again elsewhere, without counting an attempt.
* ``batch.elapsed`` is the wall time spent running the calls: it feeds the batch sizer.
* A call with ``batch.timeout`` set must end by then: killed (``can_kill``) or abandoned.
* ``drain()`` takes back the queued batches that no worker started, for cancellation.
* ``shutdown(wait)`` lets workers finish what they run and stops them; after ``wait=True`` no
  thread or process of the backend is left.
* A backend that ``helps`` is offered the thread that waits for a call's future
  (``help(future, timeout)``): it may do its own work on that thread meanwhile, so that the
  call's outcome is read where it is awaited instead of being handed over from another thread.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, ClassVar

__all__ = [
    "Backend",
    "Batch",
    "NotRun",
    "RunAlone",
    "log_initializer_failure",
    "offer_help",
    "plain",
    "waits_for_itself",
]


class NotRun(Exception):
    """Marks a call that its worker never started: Pool runs it again elsewhere, unless
    ``final`` (the backend has stopped and will run nothing more)."""

    def __init__(self, final: bool = False) -> None:
        super().__init__()
        self.final = final


class RunAlone(Exception):
    """Marks a call that ran, but whose outcome came in a message that could not be read
    whole (one outcome sent with it cannot be unpickled): Pool runs it again in a batch of its
    own, where its outcome is read alone, so that only the call at fault fails. When the pool
    runs nothing more, the call ends with ``failure``."""

    def __init__(self, failure: BaseException) -> None:
        super().__init__()
        self.failure = failure


class Batch:
    """Calls of one function, run in order by one worker and reported together.

    ``host`` is the pool's ledger (``conveyor._ledger.Ledger``), which decides the batch's
    life: ``begin(batch) -> bool`` and ``finish(batch)``.
    """

    __slots__ = (
        "args",
        "attempt",
        "elapsed",
        "errors",
        "fn",
        "future",
        "host",
        "kwargs",
        "outstanding",
        "parent",
        "places",
        "seq",
        "sink",
        "slot",
        "star",
        "state",
        "timeout",
        "values",
    )

    def __init__(
        self,
        host: Any,
        fn: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
        star: bool = True,
    ) -> None:
        self.host = host
        self.fn = fn
        # With ``star`` each element of ``args`` is a tuple of positional arguments; without it
        # each element is the single argument itself (``map`` over one iterable).
        self.args = args
        self.star = star
        self.kwargs = kwargs
        self.timeout = timeout
        self.values: list[Any] = [None] * len(args)
        self.errors: dict[int, BaseException] | None = None
        self.elapsed = 0.0
        # Owned by the ledger and the map: the future of a submit, the sequence number inside
        # a map, the state (see _ledger), the retry bookkeeping. Backends leave them alone.
        self.future: Any = None
        self.sink: Callable[[Batch], object] | None = None
        self.seq = 0
        self.attempt = 1
        self.parent: Batch | None = None  # a rerun's original batch
        self.places: list[int] = []  # a rerun's call positions in its parent
        self.outstanding = 0  # reruns of this batch not finished yet
        self.slot = False  # holds one of the pool's ``max_pending`` places
        self.state = 0  # QUEUED

    def reject(self) -> None:
        """Report, without running it, a batch that reached a backend already stopped."""
        if self.begin():
            for index in range(len(self.args)):
                self.fail(index, NotRun(final=True))
            self.finish()

    def __len__(self) -> int:
        return len(self.args)

    def begin(self) -> bool:
        """Called by the backend just before running; False means: cancelled, drop it."""
        return bool(self.host.begin(self))

    def finish(self) -> None:
        """Called by the backend once every call has its outcome."""
        self.host.finish(self)

    def fail(self, index: int, error: BaseException) -> None:
        """Record that call ``index`` raised ``error``."""
        if self.errors is None:
            self.errors = {}
        self.errors[index] = error


class _Offer:
    """``future.result`` for a future whose waiter first offers its thread to ``helper``
    (see ``offer_help``); its ``exception`` method stands for ``future.exception``."""

    __slots__ = ("_future", "_helper")

    def __init__(
        self, future: Future[Any], helper: Callable[[Future[Any], float | None], None]
    ) -> None:
        self._future = future
        self._helper = helper

    def _offer(self, timeout: float | None) -> float | None:
        future = self._future
        if future.done():
            return timeout
        if timeout is None:
            self._helper(future, None)
            return None
        end = time.monotonic() + timeout
        self._helper(future, timeout)
        return max(0.0, end - time.monotonic())

    def __call__(self, timeout: float | None = None) -> Any:
        return Future.result(self._future, self._offer(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return Future.exception(self._future, self._offer(timeout))


def offer_help(future: Future[Any], helper: Callable[[Future[Any], float | None], None]) -> None:
    """Have ``future.result()`` and ``future.exception()`` call ``helper(future, timeout)``
    while the future is not done; the helper returns when it is, at the timeout, or at once
    if it cannot help. The future stays a plain ``concurrent.futures.Future``; ``plain``
    undoes this once it is done."""
    offer = _Offer(future, helper)
    future.result = offer  # type: ignore[method-assign]
    future.exception = offer.exception  # type: ignore[method-assign]


def plain(future: Future[Any]) -> None:
    """Undo ``offer_help``: the offer holds the future, and would keep it (and its result)
    alive in a cycle."""
    future.__dict__.pop("result", None)
    future.__dict__.pop("exception", None)


def log_initializer_failure() -> None:
    """Log the exception being handled, a worker's failing initializer, where the stdlib's
    executors log it: at CRITICAL on the ``concurrent.futures`` logger (in the worker)."""
    import logging

    logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)


class Backend(abc.ABC):
    """An engine that runs batches of calls on some kind of worker."""

    #: The name given to ``Pool(backend=...)``.
    name: ClassVar[str]
    #: Whether a running call can be stopped at its deadline (else it is abandoned).
    can_kill: ClassVar[bool]
    #: Whether functions, arguments and results cross a process boundary.
    needs_pickle: ClassVar[bool]
    #: How long one batch should run: long enough to hide the per-batch cost, short enough to
    #: balance load. The batch sizer aims at it from measured call durations.
    batch_seconds: ClassVar[float]
    #: The keyword arguments of ``Pool`` that only this backend takes.
    options: ClassVar[frozenset[str]] = frozenset()
    #: Whether ``help`` may use a thread that waits for a future (see the module's doc).
    helps: ClassVar[bool] = False

    def __init__(
        self,
        workers: int,
        on_broken: Callable[[BaseException], None],
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        **options: Any,
    ) -> None:
        """``on_broken(error)``: nothing will run any more, because a worker's initializer
        raised ``error``, or for the reason a ``BrokenPool`` ``error`` gives."""
        self.workers = workers
        self._on_broken = on_broken

    @staticmethod
    @abc.abstractmethod
    def default_workers() -> int:
        """The worker count used when the user gives none."""

    @abc.abstractmethod
    def submit(self, batch: Batch) -> None:
        """Queue ``batch`` to run; never blocks on user code."""

    @abc.abstractmethod
    def drain(self) -> list[Batch]:
        """Remove and return the queued batches that no worker has started."""

    @abc.abstractmethod
    def shutdown(self, wait: bool, kill: bool = False) -> None:
        """Stop every worker once the queue is empty; ``kill`` stops running calls too."""

    @abc.abstractmethod
    def busy(self) -> int:
        """How many workers are running a batch now."""

    def live_workers(self) -> int:
        """How many workers exist now (may be fewer than ``workers`` before they are needed)."""
        return self.workers

    def help(self, future: Future[Any], timeout: float | None) -> None:
        """Do the backend's work on the calling thread, which waits for ``future``, until the
        future is done or ``timeout`` seconds have passed; return at once if it cannot."""
        return None

    def decisions(self) -> dict[str, str]:
        """Where the backend runs each function, and why (only a backend that chooses)."""
        return {}

    def in_worker(self) -> bool:
        """Whether the calling thread is one of this backend's workers (running a call)."""
        return False

    def runs_loop_here(self) -> bool:
        """Whether the calling thread runs the backend's own loop (a done callback that it
        runs): no call of the backend can end while this thread waits for it."""
        return False


def waits_for_itself(what: str, fix: str = "") -> RuntimeError:
    """The error for a wait, from a thread that runs its backend's loop, for calls of the same
    pool (see ``Backend.runs_loop_here``): it would wait for ever."""
    return RuntimeError(
        f"{what} in a done callback of a future of the same pool would wait for ever: only "
        "the thread running the callback could end the calls it waits for. "
        + (fix or "Chain calls with add_done_callback, or wait for them outside the callback")
    )
