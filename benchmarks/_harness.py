"""Shared pieces of the benchmark scripts: timing in interleaved rounds, medians, tables,
resident-memory sampling and the ``FLOOR`` lines that ``run.py`` collects.

The machine the benchmarks run on may be small and shared, so:

* contenders are timed side by side in one process, in rounds, and each round runs them in a
  rotated order, so that a burst of outside load hits all of them alike;
* a result is the median (or the best) of several rounds, never a single run;
* comparisons are printed as ratios, which travel between machines better than seconds.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PeakRss",
    "Timings",
    "best",
    "cpu_note",
    "floor",
    "fmt_bytes",
    "fmt_seconds",
    "heading",
    "median",
    "note",
    "per_call",
    "rounds",
    "rss",
    "run_cases",
    "table",
]

clock = time.perf_counter


# -- statistics -------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    """The median; ``nan`` for no values."""
    data = list(values)
    return statistics.median(data) if data else float("nan")


def best(values: Iterable[float]) -> float:
    """The smallest value; ``nan`` for no values."""
    data = list(values)
    return min(data) if data else float("nan")


# -- timing -----------------------------------------------------------------------------------


@dataclass
class Timings:
    """Seconds per round of one contender, plus what went wrong if it could not run."""

    name: str
    times: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def median(self) -> float:
        return median(self.times)

    @property
    def best(self) -> float:
        return best(self.times)

    @property
    def ok(self) -> bool:
        return bool(self.times) and not self.error


def rounds(
    contenders: Sequence[tuple[str, Callable[[], object]]],
    count: int,
    *,
    check: Callable[[str, object], None] | None = None,
    budget: float | None = None,
    setup: Callable[[str], None] | None = None,
    settle: float = 0.0,
) -> dict[str, Timings]:
    """Time each contender ``count`` times, interleaved, in a rotated order each round.

    ``check(name, result)`` may raise to reject a wrong answer (the contender is then
    reported with its error and not run again). A contender whose rounds so far took more
    than ``budget`` seconds in all is not run again (it keeps at least one round), so that a
    slow peer does not stretch the whole script. ``setup(name)`` runs before each timed call,
    outside the timing. ``settle`` seconds pass before each timed call, so that what the
    previous contender left running in the background (cleaning up files, say) is done.
    """
    results = {name: Timings(name) for name, _ in contenders}
    spent = dict.fromkeys(results, 0.0)
    for index in range(count):
        shift = index % len(contenders)
        for name, fn in list(contenders[shift:]) + list(contenders[:shift]):
            timing = results[name]
            if timing.error or (budget is not None and timing.times and spent[name] > budget):
                continue
            if setup is not None:
                setup(name)
            gc.collect()
            if settle:
                time.sleep(settle)
            start = clock()
            try:
                result = fn()
                elapsed = clock() - start
                if check is not None:
                    check(name, result)
            except Exception as exc:
                timing.error = f"{type(exc).__name__}: {exc}"[:200]
                continue
            timing.times.append(elapsed)
            spent[name] += elapsed
    return results


def per_call(call: Callable[[], object], count: int, warmup: int = 100) -> list[float]:
    """Seconds taken by each of ``count`` calls of ``call``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    now = time.perf_counter_ns
    samples = []
    for _ in range(count):
        start = now()
        call()
        samples.append(now() - start)
    return [ns / 1e9 for ns in samples]


# -- memory -----------------------------------------------------------------------------------


def rss(children: bool = False) -> int:
    """Resident bytes of this process (and of its live children, if asked)."""
    # Imported here, not at the top: worker processes started by ``forkserver`` or ``spawn``
    # run the benchmark script's top-level imports again, and should not pay for this one.
    import psutil

    me = psutil.Process()
    total = int(me.memory_info().rss)
    if children:
        for child in me.children(recursive=True):
            try:
                total += int(child.memory_info().rss)
            except psutil.Error:
                pass
    return total


class PeakRss:
    """Sample resident memory from a background thread while the ``with`` block runs.

    ``before`` is taken after a garbage collection at entry, ``peak`` is the largest sample
    (the exit's own sample included) and ``growth`` is ``peak - before``.
    """

    def __init__(self, interval: float = 0.005, children: bool = False) -> None:
        self.interval = interval
        self.children = children
        self.before = 0
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def growth(self) -> int:
        return self.peak - self.before

    def _sample(self) -> None:
        value = rss(self.children)
        self.samples += 1
        if value > self.peak:
            self.peak = value

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.before = rss(self.children)
        self.peak = self.before
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sample()


# -- output -----------------------------------------------------------------------------------


def fmt_seconds(seconds: float) -> str:
    """Seconds in a readable unit: ``1.23 s``, ``45.6 ms``, ``7.8 µs``."""
    if seconds != seconds:  # nan
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_bytes(count: float) -> str:
    """Bytes in MB (10**6), with a sign."""
    return f"{count / 1e6:+.1f} MB"


def heading(title: str) -> None:
    print()
    print(f"== {title}")


def note(text: str) -> None:
    print(f"   {text}")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print rows under headers; the first column is left-aligned, the others right."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "   " + "  ".join(parts).rstrip()

    print(line(headers))
    print("   " + "  ".join("-" * w for w in widths))
    for row in text_rows:
        print(line(row))


def floor(name: str, measured: str, comparison: str, met: bool) -> bool:
    """Print ``FLOOR <name>: <measured> (<comparison>) MET|MISSED``; return ``met``."""
    print(f"FLOOR {name}: {measured} ({comparison}) {'MET' if met else 'MISSED'}", flush=True)
    return met


def cpu_note() -> str:
    """One line on the machine: CPUs usable and the load average."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{cpus} CPUs usable, load average {load}"


def run_cases(script: str, cases: dict[str, Callable[[], None]], machine_note: str = "") -> None:
    """Run every case, or those named on the command line, after a heading line."""
    import conveyor

    unknown = [name for name in sys.argv[1:] if name not in cases]
    if unknown:
        sys.exit(f"unknown case {unknown[0]!r}; the cases are {', '.join(cases)}")
    print(f"{script}: conveyor {conveyor.__version__}, Python {sys.version.split()[0]}")
    print(f"   {cpu_note()}{machine_note}")
    started = time.perf_counter()
    for name in sys.argv[1:] or list(cases):
        cases[name]()
    print(f"\n   ran in {time.perf_counter() - started:.0f} s")
