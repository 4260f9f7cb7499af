"""The seam between ``Pool`` and the engines that run calls.

A backend knows nothing of futures, ordering, retries or statistics: it receives ``Batch``es,
runs each call of a batch in order, fills in the batch's outcomes and hands it back with
``batch.finish()``. Everything a user can observe is decided in ``Pool`` and its ledger
(``conveyor._ledger``), so a new engine is one new module with one ``Backend`` subclass.

The contract, for every backend:

* ``submit(batch)`` queues a batch and returns at once; it never runs the batch's calls in the
  caller (a backend that ``helps`` may pickle and send it from there).
  A batch that arrives after ``shutdown(kill=True)`` is reported with ``batch.reject()``.
* ``batch.begin()`` is called once the batch really starts to run on a worker, and not before:
  it frees the batch's ``max_pending`` place and makes its future RUNNING, after which
  ``future.cancel()`` fails. A backend that hands batches to a queue of its own calls it when
  a worker takes the batch from that queue. A backend that hands them to a remote queue (a
  cluster's scheduler) must not call it at hand-off: it calls it when the worker reports that
  the batch started (or, if that report can be lost, when the batch's outcome arrives, just
  before ``finish``). Calling it earlier would let ``submit`` run past ``max_pending`` and
  make every queued call impossible to cancel. When ``begin()`` returns False the batch was
  cancelled: the backend drops it without a word (and stops its remote copy if it can).
* A ``Batch`` never leaves the process: it holds the ledger, futures and locks. Only
  ``batch.fn``, ``batch.args``, ``batch.kwargs`` and ``batch.star`` travel to a worker, and
  only the values, the errors by index and the elapsed time come back.
* Each call ends in exactly one of ``batch.values[i]`` (success) or ``batch.errors[i]``.
  A call the backend could not even start (its worker died first) gets ``NotRun`` and Pool runs
  it again elsewhere, without counting an attempt.
* ``batch.elapsed`` is the wall time spent running the calls: it feeds the batch sizer.
* A call with ``batch.timeout`` set must end by then: its worker stopped if the backend can
  stop it, else abandoned (its late outcome dropped). Such batches hold one call each.
* ``drain()`` takes back the queued batches that no worker started, for cancellation;
  ``forget(batches)`` hears of queued batches the ledger cancelled itself (a map left early),
  so that a backend whose queue is remote can remove them there.
* ``shutdown(wait)`` lets workers finish what they run and stops them; after ``wait=True`` no
  thread or process of the backend is left.
* ``finish()`` is never called on a thread that runs the backend's own loop (or an engine's
  event loop): done callbacks run there, and may wait for other calls of the same pool. A
  backend whose outcomes arrive on one thread of its own hands ``finish`` to a
  ``_completer.Completer`` (as the process and dask backends do).
* A backend that ``helps`` is offered the thread that waits for a call's future
  (``help(future, timeout)``): it may do its own work on that thread meanwhile, so that the
  call's outcome is read where it is awaited instead of being handed over from another thread.

Finding backends by name: ``Pool(backend="name")`` looks the name up among the built-in
backends, then among the entry points of the group ``conveyor.backends``, whose value is
``"module:Class"`` (see ``conveyor._backends.lookup``). A package adds an engine by declaring
one, without touching conveyor::

    [project.entry-points."conveyor.backends"]
    ray = "conveyor_ray:RayBackend"

The class sets ``name``, ``batch_seconds`` and ``options`` (its own ``Pool`` keywords, passed
to its constructor) and implements the abstract methods below.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, ClassVar

from .._coroutines import on_own_loop

__all__ = [
    "WAKER",
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
        "chunk",
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
        # Set by a map with a ``chunksize`` on a backend that ``sends_chunks``: how many
        # calls it sends to a worker at a time (0: as many as it likes).
        self.chunk = 0
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


def batch_seconds_of(kind: type[Backend], steady: bool) -> float:
    """``kind``'s ``batch_seconds``, or its ``steady_batch_seconds`` for calls of steady
    length when it has one."""
    if steady and kind.steady_batch_seconds is not None:
        return kind.steady_batch_seconds
    return kind.batch_seconds


def offer_help(future: Future[Any], helper: Callable[[Future[Any], float | None], None]) -> None:
    """Have ``future.result()`` and ``future.exception()`` call ``helper(future, timeout)``
    while the future is not done; the helper returns when it is, at the timeout, or at once
    if it cannot help. The future stays a plain ``concurrent.futures.Future``; ``plain``
    undoes this once it is done."""
    offer = _Offer(future, helper)
    future.result = offer  # type: ignore[method-assign]
    future.exception = offer.exception  # type: ignore[method-assign]


#: The key, in a future's attributes, of the callback that wakes a thread helping the pool
#: while it waits for that future (see ``_role``).
WAKER = "_conveyor_waker"


def plain(future: Future[Any]) -> None:
    """Undo ``offer_help``: the offer holds the future, and would keep it (and its result)
    alive in a cycle."""
    future.__dict__.pop("result", None)
    future.__dict__.pop("exception", None)
    future.__dict__.pop(WAKER, None)


def log_initializer_failure() -> None:
    """Log the exception being handled, a worker's failing initializer, where the stdlib's
    executors log it: at CRITICAL on the ``concurrent.futures`` logger (in the worker)."""
    import logging

    logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)


class Backend(abc.ABC):
    """An engine that runs batches of calls on some kind of worker."""

    #: The name given to ``Pool(backend=...)``.
    name: ClassVar[str]
    #: How long one batch should run: long enough to hide the per-batch cost, short enough to
    #: balance load. The batch sizer aims at it from measured call durations.
    batch_seconds: ClassVar[float]
    #: The keyword arguments of ``Pool`` that only this backend takes.
    options: ClassVar[frozenset[str]] = frozenset()
    #: How long a batch may run when its calls are measured to take steady times (``None``:
    #: ``batch_seconds``): where a batch costs much (a message each way), longer batches of
    #: such calls cost less per call and still balance, since their length is foreseen.
    steady_batch_seconds: ClassVar[float | None] = None
    #: Whether ``help`` may use a thread that waits for a future (see the module's doc).
    helps: ClassVar[bool] = False
    #: Whether it sends a batch's calls to workers ``batch.chunk`` at a time, each chunk to
    #: the first worker free: a map with a ``chunksize`` then makes batches of many chunks
    #: (one batch costs the pool far more than one message costs the backend).
    sends_chunks: ClassVar[bool] = False

    def __init__(
        self,
        workers: int | None,
        on_broken: Callable[[BaseException], None],
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        **options: Any,
    ) -> None:
        """``workers``: how many calls may run at once, None for ``default_workers()``
        (asked of the instance, so a backend may first connect to its engine and count
        what is there); Pool reads the count back from ``self.workers``.
        ``on_broken(error)``: nothing will run any more, because a worker's initializer
        raised ``error``, or for the reason a ``BrokenPool`` ``error`` gives."""
        self.workers = workers if workers is not None else self.default_workers()
        self._on_broken = on_broken

    @abc.abstractmethod
    def default_workers(self) -> int:
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

    def forget(self, batches: list[Batch]) -> None:
        """``batches``, queued here, were cancelled by the ledger (a map left early): they
        will be dropped at ``begin()`` anyway; a backend whose queue is remote may remove
        them there now."""
        return None

    def live_workers(self) -> int:
        """How many workers exist now (may be fewer than ``workers`` before they are needed)."""
        return self.workers

    def batch_seconds_for(self, fn: Callable[..., Any], steady: bool) -> float:
        """How long a batch of ``fn``'s calls should run (``batch_seconds``, or
        ``steady_batch_seconds`` for calls of ``steady`` length); a backend that runs
        functions on engines of different costs answers per function."""
        return batch_seconds_of(type(self), steady)

    def prepare(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """What runs for ``fn`` on this backend, or ``TypeError`` if it cannot run here. By
        default each call of a coroutine function runs to completion on an event loop of
        its own (see ``conveyor._coroutines``)."""
        return on_own_loop(fn)

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
