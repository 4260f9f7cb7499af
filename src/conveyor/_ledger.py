"""The ledger: the life of every batch a pool accepted, as one state machine.

States of a batch (``Batch.state``), and who moves it::

                 accept()                begin()               finish()
    (new) ─────────────────> QUEUED ───────────────> RUNNING ───────────────> DONE
                               │        backend                 backend      ▲
                               │                                            │
                               │ cancel(), withdraw(), or begin() finding   │ last rerun
                               │ its future cancelled by the caller         │ finished
                               ▼                                            │
                           CANCELLED                    RUNNING ── calls to run again
                                                        (not started, retry) ──> reruns

A rerun is a batch of its own (``parent`` set) that goes through the same states; its
outcomes are merged into its original batch, which is DONE once its last rerun is.

Every move out of QUEUED is decided under the ledger's lock, so when a backend's ``begin``
races with a map left early, a ``shutdown(cancel_futures=True)``, ``terminate()`` or a broken
pool, exactly one of them wins. Counters move only when an original batch reaches a final
state (DONE or CANCELLED), so every call lands once in completed, failed or cancelled, and
the count of accepted batches that shutdown waits for drops exactly once per batch.

Threads: any thread may call ``accept`` and ``cancel``; backends call ``begin``/``finish``
(through ``Batch``) on their own threads. The lock is never held while user code runs: done
callbacks run after it is released. Backends never call ``finish`` from a thread that runs
their own loop (the process backend ends batches once it has let go of its dispatcher role),
so a callback can neither stall a pool nor wait for itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import CancelledError, Future
from typing import Any

from ._backends._base import (
    Backend,
    Batch,
    NotRun,
    RunAlone,
    plain,
    waits_for_itself,
)
from ._backends._fnref import FnRef, fn_key, fn_ref, is_fn
from ._errors import BrokenPool, InitializerFailed, PoolFull, TaskTimeout

__all__ = ["CANCELLED", "DONE", "QUEUED", "RUNNING", "CallCosts", "Counts", "Ledger"]

QUEUED, RUNNING, CANCELLED, DONE = 0, 1, 2, 3

# Once the interpreter starts to exit, no pool takes new work (as the stdlib's executors do):
# its threads and workers are being stopped. ``threading._register_atexit`` runs before the
# ``atexit`` hooks, where a late submit would otherwise reach a backend already stopped.
_exiting = False


def _interpreter_exits() -> None:
    global _exiting
    _exiting = True


getattr(threading, "_register_atexit", lambda fn: None)(_interpreter_exits)


class Counts:
    """The ledger's counters, read together under its lock (see ``Ledger.counts``)."""

    __slots__ = ("cancelled", "completed", "failed", "queued", "retried", "submitted", "timed_out")

    def __init__(self) -> None:
        self.submitted = 0  # calls accepted (reruns not counted again)
        self.queued = 0  # calls in QUEUED batches, reruns included
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.timed_out = 0
        self.retried = 0

    def copy(self) -> Counts:
        other = Counts()
        for name in Counts.__slots__:
            setattr(other, name, getattr(self, name))
        return other


class CallCosts:
    """Measured seconds per call, by function, so that a new map of a known function sizes
    its first batches from them instead of probing. Functions are held weakly where Python
    allows it (a bound method must not keep its object alive after its map)."""

    #: Functions remembered before the memo starts again.
    LIMIT = 64

    def __init__(self) -> None:
        self._costs: dict[Hashable, tuple[FnRef, float]] = {}

    def get(self, fn: Callable[..., Any]) -> float | None:
        entry = self._costs.get(fn_key(fn))
        if entry is None or not is_fn(entry[0], fn):
            return None
        return entry[1]

    def put(self, fn: Callable[..., Any], seconds: float) -> None:
        ref = fn_ref(fn)
        if ref is None:
            return
        if len(self._costs) >= self.LIMIT:
            self._costs.clear()
        self._costs[fn_key(fn)] = (ref, seconds)


def _end(future: Future[Any], outcome: Any, failed: bool) -> None:
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class Ledger:
    """Where a pool's batches are accepted, begun, ended and counted.

    ``Pool`` and the lazy map talk to it; backends reach it through ``Batch.begin`` and
    ``Batch.finish`` (a batch's ``host`` is its ledger).
    """

    def __init__(
        self,
        *,
        retries: int,
        retry_on: tuple[type[BaseException], ...],
        max_pending: int | None,
        workers: int,
        call_timeout: float | None,
    ) -> None:
        #: How many calls may run at once, and each call's timeout (seconds or None).
        self.workers = workers
        self.call_timeout = call_timeout
        #: Measured seconds per call of the functions mapped so far (see ``CallCosts``).
        self.costs = CallCosts()
        self._retries = retries
        self._retry_on = retry_on
        self._max_pending = max_pending
        self.backend: Backend | None = None  # set once the pool has made it
        # One lock guards every batch's state and the counters below; it is never held
        # while user code runs.
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # a max_pending place was freed
        self._emptied = threading.Condition(self._lock)  # no accepted batch is left
        self.shut = False  # takes no new batch
        self.cancelling = False  # shut down with cancel_futures, or terminated: no reruns
        self.broken: BrokenPool | None = None
        self._active = 0  # original batches (not reruns) not yet DONE or CANCELLED
        self._waiting = 0  # submitted calls holding a max_pending place
        self._counts = Counts()

    # -- accepting ----------------------------------------------------------------------------

    def accept(self, batch: Batch, *, bounded: bool, block: bool) -> None:
        """Take ``batch`` (QUEUED) and hand it to the backend. A ``bounded`` batch takes one
        of the ``max_pending`` places, waiting for one if ``block``, else raising
        ``PoolFull``; a map bounds itself and passes False."""
        backend = self.backend
        assert backend is not None
        with self._lock:
            self._refuse_if_stopped()
            if bounded and self._max_pending is not None:
                while self._waiting >= self._max_pending:
                    if not block:
                        raise PoolFull(
                            f"{self._waiting} calls are already waiting (max_pending="
                            f"{self._max_pending}); retry later or use submit() to wait"
                        )
                    if backend.runs_loop_here():
                        raise waits_for_itself(
                            "submit() blocking at max_pending",
                            "Use submit_nowait(), or submit outside the callback",
                        )
                    self._room.wait()
                    self._refuse_if_stopped()
                self._waiting += 1
                batch.slot = True
            calls = len(batch.args)
            self._counts.submitted += calls
            self._counts.queued += calls
            # While a batch is active the backend is not stopped (see stop_backend_if_idle),
            # so the batch can be handed over outside the lock; only terminate() stops it
            # regardless, and backends report what they receive after that with NotRun.
            self._active += 1
        backend.submit(batch)

    def _refuse_if_stopped(self) -> None:
        # Broken before shut down: a broken pool is also shut down.
        if self.broken is not None:
            raise self.broken
        if self.shut:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _leave_queue(self, batch: Batch) -> None:
        """``batch`` leaves QUEUED (lock held)."""
        self._counts.queued -= len(batch.args)
        if batch.slot:
            batch.slot = False
            self._waiting -= 1
            self._room.notify()

    def _cancelled(self, batch: Batch) -> None:
        """An original batch ends CANCELLED (lock held)."""
        batch.state = CANCELLED
        self._leave_queue(batch)
        self._counts.cancelled += len(batch)
        self._active -= 1
        if not self._active:
            self._emptied.notify_all()

    # -- the backend's events (through Batch.begin / Batch.finish) ---------------------------

    def begin(self, batch: Batch) -> bool:
        """QUEUED -> RUNNING; False if it was cancelled (the backend drops it)."""
        future = batch.future
        with self._lock:
            if batch.state != QUEUED:
                return False  # cancelled meanwhile; counted then
            if future is not None and not future.set_running_or_notify_cancel():
                self._cancelled(batch)  # by its caller, through future.cancel()
                idle = not self._active
            else:
                batch.state = RUNNING
                self._leave_queue(batch)
                return True
        if idle:
            self.stop_backend_if_idle()
        return False

    def finish(self, batch: Batch) -> None:
        """RUNNING -> DONE (or some calls to run again); ends the future or tells the map."""
        if batch.parent is None and not batch.errors and not batch.outstanding:
            # The common case, kept short: an original batch whose calls all returned.
            with self._lock:
                batch.state = DONE
                self._counts.completed += len(batch.args)
                self._active -= 1
                idle = not self._active
                if idle:
                    self._emptied.notify_all()
            self._deliver(batch, idle)
            return
        root = batch.parent if batch.parent is not None else batch
        with self._lock:
            reruns = self._plan_reruns(root, batch) if batch.errors else []
            rerun = {index for child in reruns for index in child.places}
            batch.state = DONE
            if batch is root:
                if root.errors is not None:
                    for index in rerun:
                        del root.errors[index]
                    root.errors = root.errors or None
            else:
                root.outstanding -= 1
                _merge(root, batch, rerun)
            for child in reruns:
                child.places = [batch.places[i] if batch is not root else i for i in child.places]
                self._counts.queued += len(child)
            root.outstanding += len(reruns)
            ready = not root.outstanding
            if ready:
                errors = root.errors
                failed = 0 if errors is None else len(errors)
                counts = self._counts
                counts.completed += len(root) - failed
                counts.failed += failed
                if errors:
                    counts.timed_out += sum(isinstance(e, TaskTimeout) for e in errors.values())
                root.state = DONE
                self._active -= 1
                idle = not self._active
                if idle:
                    self._emptied.notify_all()
        backend = self.backend
        assert backend is not None
        for child in reruns:
            backend.submit(child)
        if ready:
            self._deliver(root, idle)

    def _deliver(self, root: Batch, idle: bool) -> None:
        """Hand a finished original batch's outcomes to its future or its map."""
        future = root.future
        if future is not None:
            root.future = None
            if self.backend is not None and self.backend.helps:
                plain(future)
            failed_call = bool(root.errors)
            outcome = root.errors[0] if root.errors else root.values[0]
            root.values = []  # the future holds the outcome from now on, not the batch
            root.errors = None
            # (Never on a thread that holds a backend's loop: see the module's doc.)
            _end(future, outcome, failed_call)
            del outcome
        elif root.sink is not None:
            root.sink(root)
        if idle and self.shut:
            self.stop_backend_if_idle()

    def _plan_reruns(self, root: Batch, batch: Batch) -> list[Batch]:
        """The reruns that ``batch``'s errors call for (lock held). Each rerun's ``places``
        holds indexes into ``batch``; the caller maps them to ``root``.

        A call its worker never started runs again as the same attempt; so does a call whose
        outcome could not be read with others (``RunAlone``), in a batch of its own; a call
        that raised a ``retry_on`` exception runs again while attempts remain.
        """
        assert batch.errors is not None
        can_rerun = self.broken is None and not self.cancelling
        not_run: list[int] = []
        retry: list[int] = []
        alone: list[int] = []
        for index, error in batch.errors.items():
            if isinstance(error, NotRun):
                if can_rerun and not error.final:
                    not_run.append(index)
                else:
                    batch.errors[index] = self._never_ran(again=False)
            elif isinstance(error, RunAlone):
                if can_rerun:
                    alone.append(index)
                else:
                    batch.errors[index] = error.failure
            elif can_rerun and batch.attempt <= self._retries and isinstance(error, self._retry_on):
                retry.append(index)
        plans = [(not_run, batch.attempt), (retry, batch.attempt + 1)]
        plans += [([index], batch.attempt) for index in alone]
        reruns = []
        for indexes, attempt in plans:
            if indexes:
                child = Batch(
                    self,
                    root.fn,
                    [batch.args[i] for i in indexes],
                    root.kwargs,
                    root.timeout,
                    root.star,
                )
                child.parent = root
                child.attempt = attempt
                child.places = indexes
                reruns.append(child)
        self._counts.retried += len(retry)
        return reruns

    def _never_ran(self, again: bool) -> BaseException:
        """Why a call that was not (or not again) run ends so (lock held)."""
        if self.broken is not None:
            return self.broken
        if self.cancelling:
            return CancelledError(
                "the pool was terminated (or shut down with cancel_futures=True) before this "
                + ("call ran again" if again else "call could end")
            )
        return BrokenPool("the pool's workers stopped before this call ran")

    # -- cancelling ---------------------------------------------------------------------------

    def cancel(self, batches: Iterable[Batch]) -> None:
        """Cancel the QUEUED batches of a map that its caller left; no sink is told (the map
        is gone). A backend that later begins one of them is told to drop it."""
        with self._lock:
            gone = [b for b in batches if b.state == QUEUED and b.parent is None]
            for batch in gone:
                self._cancelled(batch)
            idle = not self._active
        if gone:
            assert self.backend is not None
            self.backend.forget(gone)  # (a remote queue drops them now, not at begin())
        if idle and self.shut:
            self.stop_backend_if_idle()

    def withdraw(self, batches: list[Batch]) -> None:
        """End batches taken back from the backend's queue (``drain``): they will never
        begin. On a pool shut down with ``cancel_futures`` or terminated, futures and map
        batches are cancelled (a map, which may be waiting on another thread, hears of it);
        on a broken pool they fail with its error. Reruns fail their calls into their
        original batch."""
        if self.broken is None:
            for batch in batches:
                if batch.future is not None:
                    batch.future.cancel()  # outside the lock: it runs done callbacks
        told: list[Batch] = []  # cancelled map batches, whose map must hear of it
        failed: list[Batch] = []  # ended through finish()
        with self._lock:
            for batch in batches:
                if batch.state != QUEUED:
                    continue  # cancelled earlier, and counted then
                future = batch.future
                if batch.parent is None:
                    if future is not None:
                        # wait() and as_completed() see a cancelled future only once told
                        # so, as a backend's begin() would have told them.
                        cancelled = not future.set_running_or_notify_cancel()
                    else:
                        cancelled = self.broken is None
                    if cancelled:
                        self._cancelled(batch)
                        if future is None:
                            told.append(batch)
                        continue
                batch.state = RUNNING
                self._leave_queue(batch)
                error = self._never_ran(again=batch.parent is not None)
                for index in range(len(batch)):
                    batch.fail(index, error)
                failed.append(batch)
        for batch in told:
            for index in range(len(batch)):
                batch.fail(index, CancelledError("the pool was shut down before this call ran"))
            if batch.sink is not None:
                batch.sink(batch)
        for batch in failed:
            self.finish(batch)
        self.stop_backend_if_idle()

    # -- stopping -----------------------------------------------------------------------------

    def stop(self, *, cancel: bool) -> None:
        """Take no new batch; with ``cancel`` no rerun either, and the queued batches are
        withdrawn."""
        with self._lock:
            self.shut = True
            # No reruns either: a retry or a rerun is a call that has not started.
            self.cancelling = self.cancelling or cancel
            self._room.notify_all()
        if cancel:
            assert self.backend is not None
            self.withdraw(self.backend.drain())

    def broke(self, error: BaseException) -> None:
        """The backend cannot run calls any more: fail everything queued and refuse new
        calls. ``error`` is a ``BrokenPool`` to raise as is, or what a worker's initializer
        raised."""
        broken: BrokenPool
        if isinstance(error, BrokenPool):
            broken = error
        else:
            broken = InitializerFailed(
                f"the pool's initializer raised {type(error).__name__}: {error}; "
                "the pool takes no more calls"
            )
            broken.__cause__ = error
        with self._lock:
            if self.broken is None:
                self.broken = broken
            self.shut = True
            self._room.notify_all()
        assert self.backend is not None
        self.withdraw(self.backend.drain())
        self.stop_backend_if_idle()

    def stop_backend_if_idle(self) -> None:
        """Once shut down and nothing is left, the backend may stop (without waiting)."""
        with self._lock:
            stop = self.shut and not self._active
        if stop:
            assert self.backend is not None
            self.backend.shutdown(wait=False)

    def wait_idle(self) -> None:
        """Block until every accepted batch is DONE or CANCELLED."""
        with self._lock:
            while self._active:
                self._emptied.wait()

    def counts(self) -> Counts:
        """A copy of the counters, taken at one moment."""
        with self._lock:
            return self._counts.copy()


def _merge(root: Batch, child: Batch, skip: set[int]) -> None:
    """Copy a rerun's final outcomes into its original batch (lock held); calls in ``skip``
    run once more and are left open."""
    root_errors = root.errors if root.errors is not None else {}
    for local, place in enumerate(child.places):
        if local in skip:
            continue
        root_errors.pop(place, None)
        error = None if child.errors is None else child.errors.get(local)
        if error is None:
            root.values[place] = child.values[local]
        else:
            root_errors[place] = error
            _note_attempts(error, child.attempt)
    root.errors = root_errors or None


def _note_attempts(error: BaseException, attempts: int) -> None:
    """Record on a final exception how many times its call ran."""
    if attempts <= 1:
        return
    try:
        error.attempts = attempts  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - exotic exception types
        return
    if hasattr(error, "add_note"):
        error.add_note(f"conveyor: the call failed on each of {attempts} attempts")
