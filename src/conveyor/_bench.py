"""``conveyor bench``: the classic experiments, run on the user's machine in under 30 s.

1. CPU-bound work (recursive ``fib``) on threads and on processes: the GIL lets one thread
   compute at a time, processes compute on every core.
2. Work that only waits (``time.sleep``) on threads and on processes: both overlap the
   waits, threads start faster.
3. conveyor against the standard library's pools, on the same two kinds of work and on many
   tiny calls, where the cost per call dominates.

Each time includes starting and stopping the pool: that cost is part of the choice. A part
that fails (a backend that cannot start here, say) is reported in its row; the others go on.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._pool import Pool
from .examples import fib, sleep

__all__ = ["run_bench"]

#: Seconds one fib call should take: long enough to dwarf the cost of a call.
FIB_SECONDS = 0.1
#: The waiting experiment: this many sleeps of SLEEP_SECONDS on SLEEP_WORKERS workers.
SLEEP_CALLS, SLEEP_SECONDS, SLEEP_WORKERS = 32, 0.05, 16
#: The per-call cost experiment.
TINY_CALLS = 20_000


@dataclass
class _Row:
    work: str
    runner: str
    seconds: float | None
    error: str = ""


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _fib_size() -> int:
    """The n for which ``fib(n)`` takes about FIB_SECONDS here."""
    n, seconds = 18, 0.0
    while seconds < FIB_SECONDS / 1.618 and n < 40:
        n += 1
        started = time.perf_counter()
        fib(n)
        seconds = time.perf_counter() - started
    return n


def _timed(run: Callable[[], object]) -> tuple[float | None, str]:
    started = time.perf_counter()
    try:
        run()
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:60]
    return time.perf_counter() - started, ""


def _conveyor(backend: str, workers: int, fn: Callable[[Any], object], args: list[Any]) -> None:
    with Pool(backend, workers) as pool:
        for _ in pool.map(fn, args):
            pass


def _stdlib_threads(workers: int, fn: Callable[[Any], object], args: list[Any]) -> None:
    with cf.ThreadPoolExecutor(workers) as executor:
        for _ in executor.map(fn, args):
            pass


def _stdlib_processes(workers: int, fn: Callable[[Any], object], args: list[Any]) -> None:
    with cf.ProcessPoolExecutor(workers) as executor:
        for _ in executor.map(fn, args):
            pass


def _multiprocessing(workers: int, fn: Callable[[Any], object], args: list[Any]) -> None:
    with multiprocessing.Pool(workers) as pool:
        pool.map(fn, args)


def _experiments(cpus: int) -> list[tuple[str, list[tuple[str, Callable[[], object]]]]]:
    n = _fib_size()
    cpu_args = [n] * (4 * cpus)
    sleep_args = [SLEEP_SECONDS] * SLEEP_CALLS
    tiny_args = list(range(TINY_CALLS))
    w = SLEEP_WORKERS
    naps: list[Any] = sleep_args
    return [
        (
            f"fib({n}) x {len(cpu_args)}: computing",
            [
                ("conveyor threads", lambda: _conveyor("thread", cpus, fib, cpu_args)),
                ("conveyor processes", lambda: _conveyor("process", cpus, fib, cpu_args)),
                ("stdlib ThreadPoolExecutor", lambda: _stdlib_threads(cpus, fib, cpu_args)),
                ("stdlib ProcessPoolExecutor", lambda: _stdlib_processes(cpus, fib, cpu_args)),
            ],
        ),
        (
            f"sleep({SLEEP_SECONDS}) x {SLEEP_CALLS}: waiting",
            [
                (f"conveyor threads ({w})", lambda: _conveyor("thread", w, sleep, naps)),
                (f"conveyor processes ({w})", lambda: _conveyor("process", w, sleep, naps)),
                (f"stdlib ThreadPoolExecutor ({w})", lambda: _stdlib_threads(w, sleep, naps)),
                (f"stdlib ProcessPoolExecutor ({w})", lambda: _stdlib_processes(w, sleep, naps)),
            ],
        ),
        (
            f"abs() x {TINY_CALLS}: cost per call",
            [
                ("conveyor threads", lambda: _conveyor("thread", cpus, abs, tiny_args)),
                ("conveyor processes", lambda: _conveyor("process", cpus, abs, tiny_args)),
                ("stdlib ThreadPoolExecutor", lambda: _stdlib_threads(cpus, abs, tiny_args)),
                ("stdlib ProcessPoolExecutor", lambda: _stdlib_processes(cpus, abs, tiny_args)),
                ("multiprocessing.Pool", lambda: _multiprocessing(cpus, abs, tiny_args)),
            ],
        ),
    ]


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_bench() -> int:
    """Run the experiments, print the table and the verdict; returns the exit status
    (1 if a part failed).

    Example (takes about 30 s, so not run here):
        >>> from conveyor._bench import run_bench
        >>> run_bench()  # doctest: +SKIP
    """
    cpus = _cpus()
    started = time.perf_counter()
    _print(f"conveyor bench: Python {sys.version.split()[0]} on {sys.platform}, {cpus} CPUs")
    _print("(each time includes starting and stopping the pool)")
    _print("")
    _print(f"{'work':<30} {'runner':<34} {'seconds':>8} {'vs best':>8}")
    rows: list[list[_Row]] = []
    for work, runners in _experiments(cpus):
        group = []
        for runner, run in runners:
            seconds, error = _timed(run)
            group.append(_Row(work, runner, seconds, error))
        best = min((r.seconds for r in group if r.seconds is not None), default=None)
        for i, row in enumerate(group):
            label = work if i == 0 else ""
            if row.seconds is None:
                _print(f"{label:<30} {row.runner:<34} failed: {row.error}")
            else:
                ratio = f"{row.seconds / best:.1f}x" if best else ""
                _print(f"{label:<30} {row.runner:<34} {row.seconds:>8.3f} {ratio:>8}")
        rows.append(group)
    _print("")
    _print(_verdict(rows, cpus))
    _print(f"(bench took {time.perf_counter() - started:.0f} s)")
    failed = any(row.seconds is None for group in rows for row in group)
    return 1 if failed else 0


def _seconds(group: list[_Row], runner: str) -> float | None:
    for row in group:
        if row.runner.startswith(runner):
            return row.seconds
    return None


def _verdict(rows: list[list[_Row]], cpus: int) -> str:
    cpu, wait, tiny = rows
    parts = []
    threads, processes = _seconds(cpu, "conveyor threads"), _seconds(cpu, "conveyor processes")
    if threads and processes:
        if processes < threads * 0.9:
            parts.append(
                f"computing -> processes ({threads / processes:.1f}x faster than threads on "
                f"{cpus} CPUs)"
            )
        else:
            parts.append(
                f"computing -> either (processes gain no speed on {cpus} CPU"
                f"{'' if cpus == 1 else 's'} here)"
            )
    else:
        parts.append("computing -> threads only: the process backend failed here")
    threads, processes = _seconds(wait, "conveyor threads"), _seconds(wait, "conveyor processes")
    if threads and processes:
        parts.append(
            f"waiting -> threads ({processes / threads:.1f}x the speed of processes, which "
            "must start first)"
            if threads < processes
            else "waiting -> either"
        )
    ours, stdlib = _seconds(tiny, "conveyor threads"), _seconds(tiny, "stdlib ThreadPool")
    if ours and stdlib:
        parts.append(f"tiny calls: conveyor's map {stdlib / ours:.0f}x the stdlib threads'")
    return "verdict: here, " + "; ".join(parts) + "."
