"""What the auto backend measured of one function's calls, and where it runs them.

A function the pool has not seen is *measured* on threads before it is placed:

1. **Alone.** One call at a time runs (the others wait in ``held``) until ``MIN_SOLO`` seconds
   of calls have run: the share of their wall time that their thread spent on a CPU tells a
   call that waits (IO, a lock, a sleep) from one that computes.
2. **Beside a probe, or in pairs.** For a function that computes, the sampler thread then
   computes in Python for ``PROBE`` seconds beside the call still running (``probe``): a call
   that holds the GIL gets no CPU meanwhile (it waits for the GIL), one that lets the GIL go
   gets as much as the probe. When there was no call to probe (calls shorter than a look of
   the sampler) or the probe was disturbed, two calls run at once for ``MIN_PAIR`` seconds
   instead: the CPU time both threads get together per second of wall time, over what one got
   alone. Either way, a function that holds the GIL scales about 1.0x; one that lets it go
   (NumPy, hashlib, zlib on large inputs) about 2.0x.

A call's thread is read from outside (``Meter``) every time a measured call begins or ends
and every ``SAMPLE`` seconds in between (``tick``), so that a call of minutes is judged within
milliseconds. Time the thread spent ready to run but waiting for a CPU (another process had
it) is not held against the call, so a busy machine does not make computing look like
waiting; time it waits for the GIL is (a thread waiting for the GIL sleeps).

Then ``judge`` places it: on processes when it computes, scales less than ``SCALES``, has
calls long enough to gain from another process (``SHORT_CALL``), and it and its arguments
pickle; on threads otherwise. Each verdict keeps the figures it stands on, for
``Pool.decisions()``.

A placed function is still watched, at the cost of two clock readings per batch, and measured
again when what placed it no longer holds (``observe``): calls too short for processes that
become ``REVISIT`` times longer than that, a function placed for waiting that now computes,
calls on processes that become too short for them, calls that scaled on threads and become
``REVISIT`` times longer or shorter (inputs of another size may hold the GIL).

Threads: a verdict is read and changed only under its backend's lock.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any

from ._base import Batch
from ._fnref import FnRef

__all__ = ["PROCESS", "THREAD", "Meter", "Run", "Verdict", "can_measure"]

THREAD, PROCESS = "thread", "process"

#: Calls shorter than this (seconds) gain nothing from another process: pickling and the pipe
#: cost about as much.
SHORT_CALL = 50e-6
#: A call whose thread is on a CPU for less than this share of its wall time waits.
CPU_BOUND = 0.6
#: Two threads at once that get less than this many times the CPU time of one: the function
#: holds the GIL.
SCALES = 1.5
#: Seconds of calls measured alone, then in pairs, before a verdict (of time a CPU was to be
#: had).
MIN_SOLO = 0.005
MIN_PAIR = 0.005
#: Measurements this near a threshold (as a share of it) are taken as enough only after
#: ``CLOSE_MORE`` times as much time: the threads' waits for a CPU are counted by the kernel
#: as each ends, so over a short span a busy machine blurs them.
CLOSE = 0.15
CLOSE_MORE = 4
#: On a busy machine, measure up to this many times longer (see ``_busy``).
BUSY_MORE = 10
#: Wall seconds (summed over the threads) after which calls alone, then in pairs, are judged
#: on what was measured, however close or busy: measuring runs the calls on threads.
ENOUGH = 0.25
#: How often (seconds) the threads of measured calls that are still running are looked at.
SAMPLE = 0.002
#: How many times longer or shorter calls must become before the function is measured again.
REVISIT = 4.0
#: The weight of the newest batch in the running means of a placed function's calls.
_NEWEST = 0.25


class Meter:
    """What a thread has done, read from any thread: its CPU time (its CPU-time clock), and
    on Linux the time it was ready to run but waited for a CPU (``run_delay`` in
    ``/proc/self/task/<tid>/schedstat``); elsewhere waits count as nothing. The kernel adds a
    wait when it ends (the thread gets a CPU back): read from another thread, the wait going
    on is missing, so on a busy machine only readings by the measured thread itself (as its
    call begins or ends) are trusted to judge (see ``Verdict.judge``)."""

    __slots__ = ("clock", "path")

    def __init__(self, thread: threading.Thread) -> None:
        assert thread.ident is not None
        self.clock = time.pthread_getcpuclockid(thread.ident)
        path = f"/proc/self/task/{thread.native_id}/"
        self.path = path if os.path.exists(path + "schedstat") else None

    def cpu(self) -> float:
        """The thread's CPU seconds (a clock read in C: the GIL is kept)."""
        return time.clock_gettime(self.clock)

    def waiting(self) -> float:
        """The thread's seconds spent waiting for a CPU, as the kernel counted them. Reading
        them lets the GIL go (a system call), so a caller reads every ``cpu`` first."""
        if self.path is None:
            return 0.0
        return int(_read(self.path + "schedstat").split()[1]) * 1e-9


#: Seconds the sampler computes beside a call measured alone, to see whether they share the GIL.
PROBE = 0.003
#: A thread on a CPU for this share of the time since the last look is computing: the
#: sampler does not read its waits for a CPU then (see ``Verdict.tick``).
SURE_CPU = 0.9


def probe(run: Run) -> tuple[float, float, float]:
    """Compute in Python for ``PROBE`` seconds beside ``run``'s call, on this thread, which
    holds the GIL as it starts; returns the CPU seconds the call's thread and this one got
    meanwhile. A call that holds the GIL gets none: it waits for the GIL, and asks for it only
    after ``sys.getswitchinterval()`` (5 ms), longer than the probe. One that lets the GIL go
    runs beside the probe, as much as this thread does if a CPU is free for it. So the sum
    over this thread's part is how the function scales on two threads, without running a
    second call and without waiting for a second thread to win the GIL; and a busy machine,
    which slows both, cannot make a function that holds the GIL look as if it scaled. Also
    returns the wall seconds: a probe that did not run throughout (its thread lost the GIL or
    its CPU) proves nothing, and ``probed_with`` drops it."""
    meter = run.meter
    assert meter is not None
    # (Called as the sampler has just taken the GIL, which a call holding it waits for and
    # asks back only 5 ms later: the probe runs within this turn.)
    clock = time.perf_counter
    start, theirs, mine = clock(), meter.cpu(), time.thread_time()
    end = start + PROBE
    while clock() < end:
        for _ in range(100):
            pass
    return meter.cpu() - theirs, time.thread_time() - mine, clock() - start


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def can_measure() -> bool:
    """Whether threads can be measured from outside here."""
    try:
        meter = Meter(threading.current_thread())
        meter.cpu()
        meter.waiting()
    except (AttributeError, OSError, ValueError, IndexError):
        return False
    return True


class Run:
    """A measured batch: released to the threads, then running on one."""

    __slots__ = ("batch", "cpu", "meter", "waited")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.meter: Meter | None = None  # once it runs: its thread's
        self.cpu = self.waited = 0.0  # the meter's readings at the last tick


class Verdict:
    """One function's measurements and placement (see the module's doc)."""

    def __init__(self, name: str, module: str, ref: FnRef) -> None:
        self.name = name  # the function's qualified name
        self.module = module
        self.ref = ref
        self.hosts: Any = None  # what its batches' host is on each side (see auto._Host)
        self.held: collections.deque[Batch] = collections.deque()
        self.checked = 0  # batches placed on processes whose arguments were pickled first
        self.measure()

    def measure(self) -> None:
        """Start measuring, afresh."""
        self.side: str | None = None
        self.why = ""  # a key of _REASONS
        self.figures: dict[str, Any] = {}
        self.released: dict[int, Run] = {}  # id(batch) -> measured batch, until it ends
        self.tick_at = 0.0
        # CPU seconds, and seconds a CPU was to be had (wall time less waits for a CPU), of
        # calls running alone, then of calls running two at once (summed over both)
        self.solo_cpu = self.solo_time = 0.0
        self.pair_cpu = self.pair_time = 0.0
        # Wall seconds (summed over the threads) and the part of them spent waiting for a CPU
        self.solo_wall = self.solo_waited = 0.0
        self.pair_wall = self.pair_waited = 0.0
        self.calls = 0
        self.call_wall = 0.0
        self.probed = False  # the sampler probed a call for the GIL (see ``probe``)
        self.probe_scaling: float | None = None
        self.per_call: float | None = None  # after placing: running mean of a call's seconds
        self.placed_per_call: float | None = None
        self.cpu_share: float | None = None  # after placing on threads: running mean

    # -- measuring ------------------------------------------------------------------------------

    def may_release(self) -> bool:
        """Whether one more batch may be measured now: one at a time, then two. While a call
        measured alone still runs and computes, the sampler probes it instead (``wants_probe``):
        a second call would be measured only once it ends."""
        share = self.solo_share()
        if share is None or share < CPU_BOUND:
            return len(self.released) < 1
        if not self.probed and self.running():
            return len(self.released) < 1
        return len(self.released) < 2

    def wants_probe(self) -> Run | None:
        """The call to probe for the GIL (see ``probe``): the one running alone, once it is
        known to compute, if no pair was measured yet."""
        runs = self.running()
        if self.probed or self.pair_wall > 0.0 or len(runs) != 1:
            return None
        share = self.solo_share()
        return runs[0] if share is not None and share >= CPU_BOUND else None

    def probed_with(self, theirs: float, mine: float, wall: float) -> None:
        """Take a probe's result: the CPU seconds the probed call's thread (``theirs``) and
        the prober (``mine``) got in ``wall`` seconds (see ``probe``). One whose prober did
        not run throughout is dropped: two calls at once are measured instead."""
        self.probed = True
        if mine >= 0.8 * wall > 0.0:
            self.probe_scaling = (theirs + mine) / mine
        # The probe's time is not the call's alone: the next tick counts from now. (Its
        # waits for a CPU are left for the next reading, which counts no more of them than
        # its own time off a CPU: reading them now would let the GIL go, and the verdict
        # would wait a turn of it.)
        self.tick_at = time.perf_counter()
        for run in self.running():
            assert run.meter is not None
            run.cpu = run.meter.cpu()

    def _busy_now(self) -> bool:
        """Whether the threads measured waited for a CPU much (> 10% of their time), and too
        little was measured yet to judge on readings that may miss a wait."""
        if self.pair_wall > 0.0:
            return self.pair_waited > 0.1 * self.pair_wall and self.pair_wall < 2 * ENOUGH
        return self.solo_waited > 0.1 * self.solo_wall and self.solo_wall < ENOUGH

    def solo_share(self) -> float | None:
        """The share of its time a CPU was to be had that a call alone used, once measured
        long enough (longer on a busy machine, or near ``CPU_BOUND``)."""
        need = MIN_SOLO * _busy(self.solo_waited, self.solo_wall)
        if self.solo_time <= 0.0 or (self.solo_time < need and self.solo_wall < ENOUGH):
            return None
        share = min(1.0, self.solo_cpu / self.solo_time)
        close = _close(share, CPU_BOUND) and self.solo_time < CLOSE_MORE * need
        return None if close and self.solo_wall < ENOUGH else share

    def running(self) -> list[Run]:
        return [run for run in self.released.values() if run.meter is not None]

    def tick(self, sampled: bool = False) -> None:
        """Count what the running calls' threads did since the last tick, alone or in pairs
        (the clocks are read together, with the time, under the backend's lock).

        ``sampled``: read by the sampler, while the calls run. Their waits for a CPU are then
        read only for a thread that was off a CPU for more than ``1 - SURE_CPU`` of the
        time: reading them is a system call, which lets the GIL go, and under a call that
        holds the GIL the sampler waits a turn of it (5 ms) to go on. A thread on a CPU
        for the rest waited at most that much; what it waited is counted at the next reading
        (no more of it than that reading's time off a CPU)."""
        runs = self.running()
        # The time and the CPU clocks together, with the GIL held throughout: under a call
        # that holds the GIL, this thread could lose it for milliseconds in between.
        now = time.perf_counter()
        cpus = [run.meter.cpu() for run in runs if run.meter is not None]
        if runs and self.tick_at:
            wall = now - self.tick_at
            cpu = available = walls = waits = 0.0
            for run, used in zip(runs, cpus, strict=True):
                assert run.meter is not None
                ran = used - run.cpu
                counted = 0.0
                if not sampled or ran < SURE_CPU * wall:
                    try:
                        delay = run.meter.waiting()
                    except (OSError, ValueError, IndexError):  # (its thread is gone)
                        continue
                    # (A wait still going on is counted later.)
                    counted = min(delay - run.waited, max(0.0, wall - ran))
                    run.waited = delay
                cpu += ran
                available += wall - counted
                walls += wall
                waits += counted
                run.cpu = used
            if len(runs) == 1:
                self.solo_cpu += cpu
                self.solo_time += available
                self.solo_wall += walls
                self.solo_waited += waits
            else:
                self.pair_cpu += cpu
                self.pair_time += available
                self.pair_wall += walls
                self.pair_waited += waits
        self.tick_at = now

    def began(self, run: Run, meter: Meter) -> None:
        self.tick()
        run.meter = meter
        run.cpu = meter.cpu()
        run.waited = meter.waiting()

    def ended(self, batch: Batch, wall: float) -> None:
        run = self.released.get(id(batch))
        if run is None:
            return
        if run.meter is not None:
            self.tick()
            self.calls += len(batch)
            self.call_wall += wall
        del self.released[id(batch)]

    # -- judging ------------------------------------------------------------------------------

    def judge(self, sampled: bool = False) -> tuple[str, str, dict[str, Any]] | None:
        """Where the measurements so far place the function (side, why, figures), or None
        while they are not enough. ``sampled``: the last readings were taken from another
        thread, as the calls ran; on a busy machine those miss the waits going on, so they
        are not judged on (unless ``ENOUGH`` was measured)."""
        if sampled and self._busy_now() and self.probe_scaling is None:
            return None
        if self.calls and self.call_wall / self.calls < SHORT_CALL:
            return THREAD, "short", {"call": self.call_wall / self.calls}
        share = self.solo_share()
        if share is None:
            return None
        if share < CPU_BOUND:
            return THREAD, "waits", {"share": share}
        if self.probe_scaling is not None:
            scaling = self.probe_scaling
            figures = {"share": share, "scaling": scaling}
            return (THREAD, "scales", figures) if scaling >= SCALES else (PROCESS, "gil", figures)
        need = 2 * MIN_PAIR * _busy(self.pair_waited, self.pair_wall)
        if self.pair_time <= 0.0 or (self.pair_time < need and self.pair_wall < 2 * ENOUGH):
            return None
        # What two threads at once get of the CPU, over what one alone got, both per second
        # of wall time: whatever else keeps the machine busy takes its part of both alike,
        # and a function that holds the GIL cannot get more than one CPU's worth in all.
        alone = self.solo_cpu / self.solo_wall if self.solo_wall > 0.0 else share
        if alone <= 0.0:
            return None
        scaling = 2 * (self.pair_cpu / self.pair_wall) / alone
        close = _close(scaling, SCALES) and self.pair_time < CLOSE_MORE * need
        if close and self.pair_wall < 2 * ENOUGH:
            return None
        figures = {"share": share, "scaling": scaling}
        if scaling >= SCALES:
            return THREAD, "scales", figures
        return PROCESS, "gil", figures

    def place(self, side: str, why: str, figures: dict[str, Any]) -> list[Batch]:
        """Record the verdict; returns the batches held meanwhile, to run there."""
        self.side = side
        self.why = why
        self.figures = figures
        self.per_call = self.placed_per_call = self.call_wall / self.calls if self.calls else None
        self.cpu_share = figures.get("share")
        held = list(self.held)
        self.held.clear()
        return held

    def describe(self) -> str:
        """The verdict in words and figures, e.g. ``process (CPU 98% of wall, 1.0x ...)``."""
        if self.side is None:
            share = self.solo_share()
            if share is not None:
                return (
                    f"thread for now (CPU {share:.0%} of wall; how it scales is measured "
                    "once two calls run at once)"
                )
            return "thread for now (being measured)"
        figures = self.figures
        reason = _REASONS[self.why].format(
            share=figures.get("share", 0.0),
            scaling=figures.get("scaling", 0.0),
            call=_duration(figures.get("call", 0.0)),
            error=figures.get("error", ""),
        )
        return f"{self.side} ({reason})"

    # -- watching a placed function -----------------------------------------------------------

    def observe(self, calls: int, wall: float, cpu: float | None) -> bool:
        """Take in a batch run where the function is placed; True if it should be measured
        again."""
        if calls <= 0 or wall <= 0.0:
            return False
        mean = wall / calls if self.per_call is None else self.per_call
        self.per_call = per_call = mean + _NEWEST * (wall / calls - mean)
        if cpu is not None:
            now = min(1.0, cpu / wall)
            share = now if self.cpu_share is None else self.cpu_share
            self.cpu_share = share + _NEWEST * (now - share)
        why = self.why
        if why == "short":  # its calls got long enough to be worth measuring
            return per_call >= REVISIT * SHORT_CALL
        if why == "waits":  # it computes now
            return self.cpu_share is not None and self.cpu_share > 0.9 and per_call >= SHORT_CALL
        if why == "gil":  # its calls got too short for processes
            return per_call < SHORT_CALL
        if why == "scales":  # inputs of another size may hold the GIL where these did not
            placed = self.placed_per_call
            if placed is None or placed <= 0.0:
                self.placed_per_call = per_call
                return False
            ratio = per_call / placed
            return ratio >= REVISIT or ratio <= 1 / REVISIT
        return False  # "kept", "one-cpu", "gil-off", "unmeasured", "failed": no change then


_REASONS = {
    "short": "calls of {call}: too short to gain from processes",
    "waits": "CPU {share:.0%} of wall: it waits (IO, a lock, a sleep)",
    "scales": "CPU {share:.0%} of wall, {scaling:.1f}x scaling on 2 threads",
    "gil": "CPU {share:.0%} of wall, {scaling:.1f}x scaling on 2 threads",
    "kept": "CPU {share:.0%} of wall, {scaling:.1f}x scaling on 2 threads, but {error}",
    "one-cpu": "one CPU: processes could not run it faster",
    "gil-off": "the GIL is disabled: threads run it in parallel",
    "unmeasured": "this platform gives no thread's CPU time to measure it by",
    "failed": "measuring it failed ({error})",
}


def _busy(waited: float, wall: float) -> float:
    """How many times more than usual to measure: more as the threads wait longer for a CPU
    (the machine is busy), since a wait still going on is not counted yet."""
    return 1.0 + BUSY_MORE * (waited / wall if wall > 0.0 else 0.0)


def _close(value: float, threshold: float) -> bool:
    return abs(value - threshold) < CLOSE * threshold


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.1f} s"
