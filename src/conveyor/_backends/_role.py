"""The process backend's dispatcher role: who runs the pool's loop, when it parks, who may take it.

The role is the ``_role`` lock: whoever holds it owns every worker and runs the dispatcher's
loop (``_serve_once``). The dispatcher thread holds it except while it *parks*: when nothing
is due at a moment (a deadline, a kill), it lets go of the role and waits only on pipes (the
wakeup pipe, workers' pipes and sentinels). A thread that submits then sends its call itself
(``_lend``); a thread that waits for a future (``help``) takes the role and runs the loop
itself until its future is done: it sends the call, waits for the worker's answer and reads
it, where the parked thread would have had to wake, do it and wake the waiter in turn (each
wake-up costs tens of microseconds on a virtual machine, about as much as the rest of a call's
round trip). A helper that leaves work running wakes the dispatcher thread to take it over::

                 _dispatch() starts
                        |
                        v
    +---------------------------------------+  stopping and quiet, or a fault
    | HELD by the dispatcher thread         |-----------------------------------> ENDED
    | (rounds of _serve_once)               |  _finish_all(); the role is released
    +---------------------------------------+  and nobody takes it again (_closed)
        |  nothing due (_may_park) and     ^
        |  no event ready: _park()         |  an event in the park set, role free
        v                                  |
    +---------------------------------------+
    | PARKED: the dispatcher thread waits   |
    | in park_set.poll(); role free;        |
    | _parked = True                        |
    +---------------------------------------+
        |  submit (_lend) or result (help):   ^
        |  _take_role(): _parked, and         |  _give_back(): role released; the
        |  _role.acquire(blocking=False)      |  dispatcher is woken unless it may park
        v                                     |
    +---------------------------------------+ |
    | HELD by a helper thread               |-+
    | _lend: one _assign();                 |
    | help: _serve_once until a batch has   |
    | ended (its own, or another: it comes  |
    | back for its own), or its timeout,    |
    | or Ctrl-C                             |
    +---------------------------------------+
        |  meanwhile, an event in the park set: the dispatcher thread stops parking
        |  (_parked = False) and blocks on _role.acquire(): it is next, no helper
        v  may take the role (_take_role needs _parked)
      HELD by the dispatcher thread, once the helper gives the role back

While it helps, a helper takes its own worker's pipe out of the park set (so that the parked
thread does not wake for the answer the helper waits for) and handles every other event itself.
Every way its future can end wakes a helper: on its own thread it sees its batch on
``_ended`` after the round that ended it; on another thread (``cancel()``,
``shutdown(cancel_futures=True)``) a done callback (``_WakeHelper``) writes the wakeup pipe.
An exception in a helper's rounds is kept in ``_helper_error``: the dispatcher thread, woken,
ends the pool with it as it would with its own.

Threads: any thread calls ``help`` (through ``Pool``) and ``_lend`` (through ``submit``).
``_owner`` and ``_helper_error`` are written by the role holder only; ``_parked`` by the
dispatcher thread only; other threads read ``_parked`` as a hint and check it again once they
hold the role (see ``process`` for the rest of the backend's state).
"""

from __future__ import annotations

import functools
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from . import _interrupts
from ._base import WAKER, waits_for_itself
from ._blame import Blame
from ._completer import Completer
from ._outcomes import Broken, Ended, end_all

__all__ = ["Role"]


class _WakeHelper:
    """A done callback, added to the future that a helper waits for, that wakes the helper
    when the future ends on another thread. It forgets the pool when the helper leaves (it
    stays among the future's callbacks, which offer no way to remove one), and the next
    helper of the same future takes it up again (see ``waker_of``): a wait that times out
    again and again, polling a long call, adds one callback in all."""

    __slots__ = ("backend", "thread")

    def __init__(self) -> None:
        self.backend: Role | None = None
        self.thread = 0

    @staticmethod
    def waker_of(future: Future[Any]) -> _WakeHelper:
        """The future's waker, added to its callbacks the first time (as ``offer_help``
        keeps its offer, in the future's own attributes; ``plain`` drops it)."""
        waker: _WakeHelper | None = future.__dict__.get(WAKER)
        if waker is None:
            waker = future.__dict__[WAKER] = _WakeHelper()
            future.add_done_callback(waker)
        return waker

    def __call__(self, future: Future[Any]) -> None:
        backend = self.backend
        if backend is not None and threading.get_ident() != self.thread:
            backend._wake_from_outside()


class Role(Blame):
    """Parking the dispatcher thread, and lending the role to threads that submit or wait."""

    # The state it works on, set up by ProcessBackend.__init__:
    _role: threading.Lock  # the role itself
    _parked: bool  # the dispatcher thread waits without the role
    _owner: int | None  # the thread that holds it
    _helper_error: BaseException | None  # what stopped a helper's loop
    _completer: Completer  # where batches ended under the role are finished
    _wake_w: int  # the wakeup pipe's writing end

    # Provided by process.ProcessBackend:
    def _wake(self) -> None:
        raise NotImplementedError

    def _wake_from_outside(self) -> None:
        raise NotImplementedError

    def _serve_once(self, until: Future[Any] | None = None, end: float | None = None) -> bool:
        raise NotImplementedError

    def runs_loop_here(self) -> bool:
        raise NotImplementedError

    def _may_park(self) -> bool:
        """Whether the dispatcher thread may wait without the role: nothing is due at a
        moment (a deadline, a kill), so that every event it waits for comes through a pipe
        (see ``_park``). A call's deadline is set as it starts, by whoever holds the role."""
        life = self._life
        if life.stopping or life.killing or life.broken or self._crew.park_set is None:
            return False
        return self._nearest_deadline() is None

    def _park(self) -> None:
        """Wait without the role until something happens; return holding it.

        The park set holds the wakeup pipe and every worker's pipe and sentinel: whatever
        the dispatcher would act on wakes it. A helper holding the role meanwhile takes its
        own worker's pipe out of the set while it waits on it (see ``help``), and handles
        every other event itself; a parked dispatcher woken then waits for it to leave.
        """
        park_set = self._crew.park_set
        self._parked = True
        self._owner = None
        self._role.release()
        try:
            while True:
                try:
                    park_set.poll()
                except InterruptedError:
                    continue
                if not self._role.acquire(blocking=False):
                    # A helper has it. No other may take it after this one: it is ours next.
                    self._parked = False
                    self._role.acquire()
                break
        finally:
            self._parked = False
        self._owner = threading.get_ident()

    def _take_role(self) -> bool:
        """Take the role from a parked dispatcher thread, if it is free; the caller must
        ``_give_back`` it."""
        if self._parked and self._role.acquire(blocking=False):
            self._owner = threading.get_ident()
            return True
        return False

    def _give_back(self) -> list[Ended]:
        """Let go of a role taken from the parked dispatcher thread; wake it if what is left
        needs it awake. Returns the batches that ended meanwhile, for the caller to end now
        that it does not hold the role (see ``_hand_over`` and ``_end_after_help``)."""
        wake = self._helper_error is not None or not self._may_park()
        ended, self._ended = self._ended, []
        self._owner = None
        self._role.release()
        if wake:
            self._wake()
        return ended

    def _hand_over(self, ended: list[Ended]) -> None:
        """Have the completer end ``ended``, each batch on its own so that none waits behind
        another; a notice that the pool broke goes with everything after it, in order (the
        calls failed after it must fail with its error). Empties ``ended``: the caller's
        frame may live on (a parked dispatcher's), and must not keep a batch alive."""
        works: list[Callable[[], object]] = []
        for at, item in enumerate(ended):
            if isinstance(item, Broken):
                works.append(functools.partial(end_all, ended[at:]))
                break
            works.append(item.end)
        self._completer.run_each(works)
        ended.clear()

    def _end_after_help(self, ended: list[Ended], future: Future[Any]) -> None:
        """End, on this thread, the batch of ``future`` (for which it waits); hand the
        others over, so that none of them waits for this one's done callbacks."""
        own: list[Ended] = []
        rest: list[Ended] = []
        for at, item in enumerate(ended):
            if isinstance(item, Broken):
                rest += ended[at:]
                break
            batch = item.batch
            root = batch if batch.parent is None else batch.parent
            (own if root.future is future else rest).append(item)
        ended.clear()
        if not rest:  # (a call's round trip: only its own batch)
            end_all(own)
            return
        try:
            self._hand_over(rest)
        finally:
            end_all(own)

    def _lend(self) -> None:
        """A thread that called ``submit`` while the dispatcher thread was parked sends the
        work itself; if the caller waits for it next (``help``), it reads the outcome too."""
        if not _interrupts.may_help_here():
            self._wake()
            return
        held = _interrupts.hold_interrupts(self._wake_w)
        ended: list[Ended] = []
        try:
            if not self._take_role():
                self._wake()
                return
            try:
                if self._parked and self._helper_error is None:
                    self._assign()
            except BaseException as exc:
                self._helper_error = exc
            finally:
                ended = self._give_back()
        finally:
            try:
                _interrupts.release_interrupts(held)
            finally:
                if ended:
                    self._hand_over(ended)

    def help(self, future: Future[Any], timeout: float | None) -> None:
        """Run the dispatcher on this thread until ``future`` is done (see the module's doc),
        if the dispatcher thread is parked."""
        if self.runs_loop_here():
            raise waits_for_itself("waiting for a call's future")
        end = None if timeout is None else time.monotonic() + timeout
        while self._parked and not future.done() and _interrupts.may_help_here():
            if not self._help_once(future, end):
                return
            if end is not None and time.monotonic() >= end:
                return

    def _help_once(self, future: Future[Any], end: float | None) -> bool:
        """Hold the role until ``future``'s batch, or another, has ended, then end them
        (see ``_end_after_help``); True if it may help again (only others had ended)."""
        held = _interrupts.hold_interrupts(self._wake_w)
        ended: list[Ended] = []
        again = False
        try:
            if not self._take_role():
                return False
            park_set = self._crew.park_set
            by_fd = self._crew.by_fd
            busy: list[int] = []
            # A future can end on another thread (cancel(), shutdown(cancel_futures=True)):
            # that thread must wake us out of poll(). On this thread the callback does nothing.
            waker: _WakeHelper | None = None
            try:
                if self._parked and self._helper_error is None:
                    waker = _WakeHelper.waker_of(future)
                    waker.thread = threading.get_ident()
                    waker.backend = self
                    # The parked dispatcher must not wake for the answers we wait for.
                    busy = [p.fd for p in self._crew.procs if p.jobs and p.fd in by_fd]
                    for fd in busy:
                        park_set.modify(fd, 0)
                    while not self._serve_once(future, end):
                        pass
                    again = bool(self._ended)
            except BaseException as exc:
                # The dispatcher's state may be half-updated: the dispatcher thread ends
                # the pool with this error, as it would end it with its own.
                self._helper_error = exc
                again = False
            finally:
                if waker is not None:
                    waker.backend = None
                for fd in busy:
                    if fd in by_fd:
                        park_set.modify(fd, select.EPOLLIN)
                ended = self._give_back()
        finally:
            try:
                _interrupts.release_interrupts(held)
            finally:
                self._end_after_help(ended, future)
        return again
