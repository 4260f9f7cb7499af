"""The auto backend: each function runs on threads or on processes, as its calls measure.

Data flow::

    Pool --submit(batch)--> AutoBackend: the verdict on batch.fn (see _verdict)
        placed on threads ----------> ThreadBackend
        placed on processes --------> ProcessBackend, made when the first batch goes there
        being measured -------------> ThreadBackend, one or two batches at a time; the
                                      others wait in the verdict's ``held`` until it is placed

Each batch sent to a side gets a ``host`` of ours (``_Host``) in place of the pool's ledger: it
passes ``begin`` and ``finish`` on to the ledger and reads the clocks on the way, on the thread
that runs the batch, so that the thread backend is measured without a line added to it.

Sizes: the thread side has ``workers`` threads (by default the thread backend's number); the
process side min(``workers``, CPUs) processes: only functions that compute go there, and more
processes than CPUs would not run them faster. The process side starts only when a function is
first placed there, so a pool whose work waits (IO) starts no process.

Threads: ``_lock`` guards the verdicts, ``_processes`` and ``_stopping``; nothing is sent to a
side while it is held. The sampler thread (``conveyor-auto-sampler``, started with the first
measured batch) ticks the verdicts being measured every ``SAMPLE`` seconds, so that long calls
are judged while they run; it ends at shutdown.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from multiprocessing.context import BaseContext
from typing import Any

from . import _wire
from ._base import Backend, Batch, batch_seconds_of
from ._fnref import fn_key, fn_ref, is_fn, unwrapped
from ._verdict import PROCESS, SAMPLE, THREAD, Meter, Run, Verdict, can_measure, probe
from .process import ProcessBackend, check_options
from .thread import ThreadBackend

__all__ = ["AutoBackend"]

#: Batches placed on processes whose arguments are pickled first, so that arguments that
#: cannot travel move the function back to threads instead of failing its calls.
_CHECKED_BATCHES = 3
#: Verdicts kept; beyond that they are forgotten (and measured again if their function comes).
_VERDICTS_KEPT = 1024
_CAN_MEASURE = can_measure()


def _gil_enabled() -> bool:
    check: Callable[[], bool] | None = getattr(sys, "_is_gil_enabled", None)
    return True if check is None else check()


class _Host:
    """A batch's host while it runs on one side: the ledger, with clocks read on the way."""

    __slots__ = ("auto", "ledger", "local", "side", "verdict")

    def __init__(self, auto: AutoBackend, ledger: Any, verdict: Verdict, side: str) -> None:
        self.auto = auto
        self.ledger = ledger
        self.verdict = verdict
        self.side = side
        self.local = threading.local()  # (batch, thread CPU time) as a batch began here

    def begin(self, batch: Batch) -> bool:
        began = bool(self.ledger.begin(batch))
        if self.side == THREAD:
            self.auto._began(self, batch, began)
        return began

    def finish(self, batch: Batch) -> None:
        try:
            self.auto._ended(self, batch)
        finally:
            self.ledger.finish(batch)


class AutoBackend(Backend):
    name = "auto"
    batch_seconds = ThreadBackend.batch_seconds
    options = ThreadBackend.options | ProcessBackend.options
    helps = True

    def __init__(
        self,
        workers: int | None,
        on_broken: Callable[[BaseException], None],
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        thread_name_prefix: str = "",
        mp_context: BaseContext | None = None,
        max_tasks_per_worker: int | None = None,
    ) -> None:
        super().__init__(workers, on_broken)
        check_options(mp_context, max_tasks_per_worker)
        self._threads = ThreadBackend(
            self.workers,
            on_broken,
            initializer=initializer,
            initargs=initargs,
            thread_name_prefix=thread_name_prefix,
        )
        self._cpus = ProcessBackend.default_workers()
        self._process_args: dict[str, Any] = {
            "initializer": initializer,
            "initargs": initargs,
            "mp_context": mp_context,
            "max_tasks_per_worker": max_tasks_per_worker,
        }
        self._processes: ProcessBackend | None = None
        self._lock = threading.Lock()
        self._sampling = threading.Condition(self._lock)
        self._sampler: threading.Thread | None = None
        self._stopping = False
        self._verdicts: dict[Hashable, Verdict] = {}
        self._ledger: Any = None
        self._on_processes: weakref.WeakSet[Future[Any]] = weakref.WeakSet()
        self._gil = _gil_enabled()

    @staticmethod
    def default_workers() -> int:
        return ThreadBackend.default_workers()

    # -- called by Pool -------------------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        ref = fn_ref(batch.fn)
        with self._lock:
            if self._ledger is None:
                self._ledger = batch.host
            if ref is None or self._stopping:
                # A function that cannot be remembered without keeping an object alive
                # (``[].append``) is not measured; after shutdown, threads refuse it.
                side: str | None = THREAD
                verdict = None
            else:
                verdict = self._verdict_of(batch.fn, ref)
                side = verdict.side
                if side is None:
                    self._start_sampler()  # (now: a thread takes a while to start)
                    if not verdict.may_release():
                        verdict.held.append(batch)
                        return
                    verdict.released[id(batch)] = Run(batch)
        if verdict is None:
            self._threads.submit(batch)
        else:
            self._send([(batch, side or THREAD, verdict)])

    def drain(self) -> list[Batch]:
        with self._lock:
            taken = self._take_held()
            processes = self._processes
        from_sides = self._threads.drain()
        if processes is not None:
            from_sides += processes.drain()
        if from_sides:
            # Measured batches taken back before they began free their places.
            ids = {id(batch) for batch in from_sides}
            with self._lock:
                for verdict in self._verdicts.values():
                    for key in [key for key in verdict.released if key in ids]:
                        del verdict.released[key]
        return taken + from_sides

    def shutdown(self, wait: bool, kill: bool = False) -> None:
        with self._lock:
            self._stopping = True
            held = self._take_held()  # (they still run, on threads: close() lets them)
            self._sampling.notify_all()
            sampler = self._sampler
            processes = self._processes
        for batch in held:
            self._threads.submit(batch)
        self._threads.shutdown(wait, kill)
        if processes is not None:
            processes.shutdown(wait, kill)
        if wait and sampler is not None and sampler is not threading.current_thread():
            sampler.join()

    def forget(self, batches: list[Batch]) -> None:
        gone = {id(batch) for batch in batches}
        with self._lock:
            for verdict in self._verdicts.values():
                if verdict.held:
                    kept = [batch for batch in verdict.held if id(batch) not in gone]
                    verdict.held.clear()
                    verdict.held.extend(kept)
            processes = self._processes
        self._threads.forget(batches)
        if processes is not None:
            processes.forget(batches)

    def busy(self) -> int:
        processes = self._processes
        return self._threads.busy() + (processes.busy() if processes is not None else 0)

    def live_workers(self) -> int:
        processes = self._processes
        return self._threads.live_workers() + (
            processes.live_workers() if processes is not None else 0
        )

    def in_worker(self) -> bool:
        return self._threads.in_worker()

    def runs_loop_here(self) -> bool:
        processes = self._processes
        return processes is not None and processes.runs_loop_here()

    def help(self, future: Future[Any], timeout: float | None) -> None:
        processes = self._processes
        if processes is not None and future in self._on_processes:
            processes.help(future, timeout)

    def batch_seconds_for(self, fn: Callable[..., Any], steady: bool) -> float:
        """A function placed on processes gets batches sized for them (a message each way
        per batch), any other for threads."""
        verdict = self._verdicts.get(fn_key(fn))  # (read without the lock: a hint)
        if verdict is not None and verdict.side == PROCESS and is_fn(verdict.ref, fn):
            return batch_seconds_of(ProcessBackend, steady)
        return batch_seconds_of(ThreadBackend, steady)

    def decisions(self) -> dict[str, str]:
        with self._lock:
            named: dict[str, list[Verdict]] = {}
            for verdict in self._verdicts.values():
                if verdict.ref() is not None:
                    named.setdefault(verdict.name, []).append(verdict)
            return {
                (name if len(same) == 1 else f"{verdict.module}.{name}"): verdict.describe()
                for name, same in named.items()
                for verdict in same
            }

    def _take_held(self) -> list[Batch]:
        """Every batch waiting for a verdict, taken out (lock held)."""
        taken = [batch for verdict in self._verdicts.values() for batch in verdict.held]
        for verdict in self._verdicts.values():
            verdict.held.clear()
        return taken

    # -- verdicts -------------------------------------------------------------------------------

    def _verdict_of(self, fn: Callable[..., Any], ref: Any) -> Verdict:
        """The verdict on ``fn``, made if new (lock held)."""
        key = fn_key(fn)
        verdict = self._verdicts.get(key)
        if verdict is not None and is_fn(verdict.ref, fn):
            return verdict
        if len(self._verdicts) >= _VERDICTS_KEPT:
            self._forget()
        named = unwrapped(fn)
        module = getattr(named, "__module__", None) or type(named).__module__
        verdict = Verdict(name_of(named), module, ref)
        if not self._gil:
            verdict.place(THREAD, "gil-off", {})
        elif self._cpus < 2:
            verdict.place(THREAD, "one-cpu", {})
        elif not _CAN_MEASURE:
            verdict.place(THREAD, "unmeasured", {})
        self._verdicts[key] = verdict
        ledger = self._ledger
        verdict.hosts = (
            _Host(self, ledger, verdict, THREAD),
            _Host(self, ledger, verdict, PROCESS),
        )
        return verdict

    def _forget(self) -> None:
        """Drop the verdicts of functions gone, then, if as many are left, those placed
        (lock held); none with batches held or measured."""
        for only_gone in (True, False):
            for key, verdict in list(self._verdicts.items()):
                if verdict.held or verdict.released:
                    continue
                if verdict.ref() is None or not only_gone:
                    del self._verdicts[key]
            if len(self._verdicts) < _VERDICTS_KEPT:
                return

    def _judge(self, verdict: Verdict, sampled: bool = False) -> list[tuple[Batch, str, Verdict]]:
        """Place ``verdict`` if its measurements are enough, else release what may be
        measured next; returns what to send where (lock held)."""
        judged = verdict.judge(sampled)
        if judged is None:
            out: list[tuple[Batch, str, Verdict]] = []
            while verdict.held and verdict.may_release():
                batch = verdict.held.popleft()
                verdict.released[id(batch)] = Run(batch)
                out.append((batch, THREAD, verdict))
            return out
        side, why, figures = judged
        if side == PROCESS:
            problem = self._cannot_travel(verdict)
            if problem:
                side, why = THREAD, "kept"
                figures = {**figures, "error": problem}
        return [(batch, side, verdict) for batch in verdict.place(side, why, figures)]

    def _give_up(self, verdict: Verdict, error: Exception) -> list[tuple[Batch, str, Verdict]]:
        """Measuring failed (a bug, or a platform that does not say what it should): the
        function runs on threads from now on, and ``decisions()`` says why; nothing held
        may wait for a verdict that will not come (lock held)."""
        if verdict.side is not None:
            return []
        problem = f"{type(error).__name__}: {error}"
        verdict.released.clear()
        return [(b, THREAD, verdict) for b in verdict.place(THREAD, "failed", {"error": problem})]

    def _cannot_travel(self, verdict: Verdict) -> str:
        """Why the function, or the arguments of a call waiting for it, cannot be pickled
        ("" if they can) (lock held)."""
        fn = verdict.ref()
        if fn is None:
            return ""
        try:
            _wire.dumps_function(fn)
        except Exception as exc:
            return f"it cannot be pickled ({type(exc).__name__}: {exc})"
        waiting = verdict.held[0] if verdict.held else None
        return _arguments_problem(waiting) if waiting is not None else ""

    # -- sending, and what the hosts see ----------------------------------------------------------

    def _send(self, routes: list[tuple[Batch, str, Verdict]]) -> None:
        """Send each batch to its side (lock not held)."""
        for batch, side, verdict in routes:
            if side == PROCESS:
                try:
                    processes = self._process_side()
                except Exception as exc:  # (a process being started, say: it may not start others)
                    processes = None
                    self._keep_on_threads(
                        verdict, f"processes cannot start here ({type(exc).__name__}: {exc})"
                    )
                if processes is not None and verdict.checked < _CHECKED_BATCHES:
                    verdict.checked += 1
                    problem = _arguments_problem(batch)
                    if problem:
                        self._keep_on_threads(verdict, problem)
                        processes = None
                if processes is not None:
                    batch.host = verdict.hosts[1]
                    if batch.future is not None:
                        self._on_processes.add(batch.future)
                    processes.submit(batch)
                    continue
            batch.host = verdict.hosts[0]
            self._threads.submit(batch)

    def _keep_on_threads(self, verdict: Verdict, problem: str) -> None:
        """A function placed on processes cannot go there after all (lock not held)."""
        with self._lock:
            if verdict.side == PROCESS:
                verdict.place(THREAD, "kept", {**verdict.figures, "error": problem})

    def _process_side(self) -> ProcessBackend | None:
        """The process backend, made on first use; None once the pool stops."""
        with self._lock:
            if self._processes is None and not self._stopping:
                self._processes = ProcessBackend(
                    min(self.workers, self._cpus), self._on_broken, **self._process_args
                )
            return self._processes

    def _began(self, host: _Host, batch: Batch, began: bool) -> None:
        """On the worker thread, as a batch placed or measured on threads begins."""
        verdict = host.verdict
        routes: list[tuple[Batch, str, Verdict]] = []
        with self._lock:
            run = verdict.released.get(id(batch))
            if run is not None:
                try:
                    if began:
                        verdict.began(run, Meter(threading.current_thread()))
                        self._start_sampler()
                    else:  # cancelled meanwhile: its place goes to the next
                        del verdict.released[id(batch)]
                        routes = self._judge(verdict)
                except Exception as exc:
                    routes = self._give_up(verdict, exc)
        self._send(routes)
        if began:  # (last: what this costs is not counted as the batch's)
            host.local.start = (batch, time.thread_time())

    def _ended(self, host: _Host, batch: Batch) -> None:
        """As a batch ends, on the thread that ran it (threads) or that finishes it."""
        cpu = None
        if host.side == THREAD:
            start = getattr(host.local, "start", None)
            if start is not None and start[0] is batch:
                cpu = time.thread_time() - start[1]
            host.local.start = None
        verdict = host.verdict
        wall = batch.elapsed  # (the calls' own time, measured by the side that ran them)
        routes: list[tuple[Batch, str, Verdict]] = []
        with self._lock:
            try:
                if id(batch) in verdict.released:
                    verdict.ended(batch, wall)
                    if verdict.side is None:
                        routes = self._judge(verdict)
                elif verdict.side == host.side and verdict.observe(len(batch), wall, cpu):
                    verdict.measure()
            except Exception as exc:
                routes = self._give_up(verdict, exc)
        self._send(routes)

    # -- the sampler ------------------------------------------------------------------------------

    def _start_sampler(self) -> None:
        """Wake the sampler, starting it if need be (lock held). Under a function that holds
        the GIL a thread waits up to ``sys.getswitchinterval()`` (5 ms) for each step it
        takes, so it is started with the first batch to measure, before that batch runs."""
        if self._sampler is None and not self._stopping:
            self._sampler = threading.Thread(
                target=self._sample, name="conveyor-auto-sampler", daemon=True
            )
            self._sampler.start()
        self._sampling.notify()

    def _sample(self) -> None:
        due = 0.0
        while True:
            probing: tuple[Verdict, Run] | None = None
            with self._lock:
                if self._stopping:
                    return
                measured = [v for v in self._verdicts.values() if v.side is None and v.running()]
                if not measured:
                    self._sampling.wait()
                    continue  # (woken as a measured call begins: look at once, next time)
                # Under a call that holds the GIL, each wake-up costs a turn of the GIL (5 ms):
                # no more of them than it takes.
                wait = due - time.perf_counter()
                if wait > 0.0:
                    self._sampling.wait(wait)
                due = time.perf_counter() + SAMPLE
                routes: list[tuple[Batch, str, Verdict]] = []
                for verdict in measured:
                    if verdict.side is None and verdict.running():
                        try:
                            verdict.tick(sampled=True)
                            routes += self._judge(verdict, sampled=True)
                            run = verdict.wants_probe() if verdict.side is None else None
                            if run is not None and probing is None:
                                probing = (verdict, run)
                        except Exception as exc:
                            routes += self._give_up(verdict, exc)
            self._send(routes)
            del routes
            if probing is not None:
                self._probe(*probing)

    def _probe(self, verdict: Verdict, run: Run) -> None:
        """Probe ``run``'s call for the GIL (``_verdict.probe``, without the lock), then judge."""
        try:
            measured = probe(run)
            # (Read at once, without the lock, a dict lookup under the GIL: the call must have
            # run throughout the probe, since one that ended stopped using a CPU.)
            ran_throughout = verdict.released.get(id(run.batch)) is run
        except Exception as exc:
            with self._lock:
                routes = self._give_up(verdict, exc)
            self._send(routes)
            return
        routes = []
        with self._lock:
            if measured is not None and ran_throughout and verdict.side is None:
                try:
                    verdict.probed_with(*measured)
                    routes = self._judge(verdict, sampled=True)
                except Exception as exc:
                    routes = self._give_up(verdict, exc)
        self._send(routes)


def name_of(fn: Callable[..., Any]) -> str:
    """What ``decisions()`` calls ``fn``: its qualified name; ``partial(name)`` for a
    ``functools.partial``; the class's name for a callable object.

    Example:
        >>> import functools
        >>> name_of(functools.partial(divmod, 7)), name_of(len)
        ('partial(divmod)', 'len')
    """
    if isinstance(fn, functools.partial):
        return f"partial({name_of(fn.func)})"
    name = getattr(fn, "__qualname__", None)
    if isinstance(name, str):
        return name
    kind = type(fn)
    return kind.__qualname__ if callable(getattr(kind, "__call__", None)) else repr(fn)  # noqa: B004


def _arguments_problem(batch: Batch) -> str:
    """Why the first call of ``batch`` cannot be pickled ("" if it can)."""
    if not batch.args:
        return ""
    try:
        for part in (batch.args[0], batch.kwargs):
            _wire.forget_files(_wire.files_of(_wire.dumps(part)))
    except Exception as exc:
        return f"its arguments cannot be pickled ({type(exc).__name__}: {exc})"
    return ""
