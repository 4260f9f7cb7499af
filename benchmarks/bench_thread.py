"""The thread backend against ``concurrent.futures.ThreadPoolExecutor`` and
``multiprocessing.pool.ThreadPool``, side by side in one run.

Run it with ``python benchmarks/bench_thread.py`` (or name some cases: ``... io map``).
It prints a table per case and one line per
floor: ``FLOOR <name>: <measured> (<comparison>) MET`` or ``MISSED``. It exits 0 either way.

Cases:

1. io: 500 calls of ``time.sleep(0.01)`` on 50 workers, pool start and shutdown included;
   the ideal is 500 / 50 * 0.01 = 0.10 s.
2. round trip: ``pool.submit(f).result()`` on a warm pool, timed call by call. A hand-off
   between two threads costs what the operating system charges to wake a thread, and on a
   virtual machine that depends on where the threads run: waking a thread on an idle CPU is
   several times dearer than switching on the same CPU. So the calls are timed with every
   thread pinned to one CPU, with the caller and the pool's threads on two different CPUs, and
   as the OS places them; the floor must hold in both pinned placements.
3. map: ``list(pool.map(f, range(100_000)))`` of a trivial ``f`` with default arguments.
4. memory: ``map`` over a 10-million-item generator, results discarded; resident memory is
   sampled by a background thread and the peak compared with the start.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.pool import ThreadPool
from typing import Any

from _harness import (
    PeakRss,
    floor,
    fmt_bytes,
    fmt_seconds,
    heading,
    median,
    note,
    per_call,
    rounds,
    run_cases,
    table,
)
from _work import inc, noop

import conveyor

IO_CALLS, IO_WORKERS, IO_SLEEP = 500, 50, 0.01
IO_ROUNDS = 9
TRIP_ROUNDS, TRIP_CALLS = 4, 500
MAP_ITEMS, MAP_ROUNDS = 100_000, 5
MEMORY_ITEMS, MEMORY_ROUNDS = 10_000_000, 2
STDLIB = "concurrent.futures.ThreadPoolExecutor"


# -- 1. io ------------------------------------------------------------------------------------


def _io_case() -> None:
    heading(f"io: {IO_CALLS} x time.sleep({IO_SLEEP}) on {IO_WORKERS} workers, start to shutdown")
    naps = [IO_SLEEP] * IO_CALLS
    ideal = IO_CALLS / IO_WORKERS * IO_SLEEP

    def conveyor_pool() -> int:
        with conveyor.Pool(workers=IO_WORKERS) as pool:
            return len(list(pool.map(time.sleep, naps)))

    def conveyor_executor() -> int:
        with conveyor.ThreadPoolExecutor(max_workers=IO_WORKERS) as executor:
            return len(list(executor.map(time.sleep, naps)))

    def stdlib_executor() -> int:
        with cf.ThreadPoolExecutor(max_workers=IO_WORKERS) as executor:
            return len(list(executor.map(time.sleep, naps)))

    def thread_pool() -> int:
        pool = ThreadPool(IO_WORKERS)
        try:
            return len(pool.map(time.sleep, naps))
        finally:
            pool.close()
            pool.join()

    def serial_sleep() -> int:
        # What the operating system's timer costs: one worker's share of the sleeps, in a row.
        for _ in range(IO_CALLS // IO_WORKERS):
            time.sleep(IO_SLEEP)
        return IO_CALLS

    def bare_threads() -> int:
        # The least any pool of Python threads can take here: start the threads, give each
        # its share of the sleeps up front (no queue, no results), join them.
        threads = [threading.Thread(target=serial_sleep) for _ in range(IO_WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return IO_CALLS

    def check(name: str, result: object) -> None:
        if result != IO_CALLS:
            raise AssertionError(f"{name} returned {result} results")

    contenders: list[tuple[str, Callable[[], object]]] = [
        ("conveyor.Pool", conveyor_pool),
        ("conveyor.ThreadPoolExecutor", conveyor_executor),
        (STDLIB, stdlib_executor),
        ("multiprocessing.pool.ThreadPool", thread_pool),
        (f"reference: {IO_CALLS // IO_WORKERS} sleeps in a row", serial_sleep),
        (
            f"reference: {IO_WORKERS} bare threads, {IO_CALLS // IO_WORKERS} sleeps each",
            bare_threads,
        ),
    ]
    results = rounds(contenders, IO_ROUNDS, check=check)
    stdlib = results[STDLIB].median
    table(
        ["contender", "median", "best", "median/ideal", "stdlib/this"],
        [
            [
                t.name,
                fmt_seconds(t.median),
                fmt_seconds(t.best),
                f"{t.median / ideal:.3f}x",
                f"{stdlib / t.median:.2f}x",
            ]
            if t.ok
            else [t.name, t.error, "", "", ""]
            for t in results.values()
        ],
    )
    note(f"ideal {fmt_seconds(ideal)}; median of {IO_ROUNDS} rounds, interleaved")
    mine = results["conveyor.Pool"].median
    floor(
        "thread_io_50_workers",
        f"{fmt_seconds(mine)}, {mine / ideal:.3f}x the ideal {fmt_seconds(ideal)}",
        f"stdlib {stdlib / ideal:.3f}x; at most 1.05x",
        mine <= 1.05 * ideal,
    )


# -- 2. round trip ------------------------------------------------------------------------------


class _PingPong:
    """Two threads and two ``queue.SimpleQueue``s: the bare cost of a hand-off and back."""

    def __init__(self) -> None:
        self._there: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._back: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._echo, name="ping-pong", daemon=True)
        self._thread.start()

    def _echo(self) -> None:
        while (item := self._there.get()) is not None:
            self._back.put(item)

    def call(self) -> None:
        self._there.put(1)
        self._back.get()

    def close(self) -> None:
        self._there.put(None)
        self._thread.join()


def _all_cpus() -> set[int]:
    return set(range(os.cpu_count() or 1))


def _place(main: set[int], others: set[int]) -> None:
    """Pin the calling thread to ``main`` and every other thread of the process to
    ``others`` (threads started later inherit the caller's CPUs)."""
    me = threading.get_native_id()
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        try:
            os.sched_setaffinity(tid, main if tid == me else others)
        except OSError:
            pass  # the thread has just ended


def _round_trip_case() -> None:
    heading("round trip: pool.submit(f).result() on a warm pool, f returns None")
    conveyor_pool = conveyor.Pool()
    conveyor_executor = conveyor.ThreadPoolExecutor()
    stdlib = cf.ThreadPoolExecutor()
    thread_pool = ThreadPool()
    ping = _PingPong()
    contenders: list[tuple[str, Callable[[], object]]] = [
        ("conveyor.Pool", lambda: conveyor_pool.submit(noop).result()),
        ("conveyor.ThreadPoolExecutor", lambda: conveyor_executor.submit(noop).result()),
        (STDLIB, lambda: stdlib.submit(noop).result()),
        ("multiprocessing.pool.ThreadPool", lambda: thread_pool.apply_async(noop).get()),
        ("reference: bare SimpleQueue ping-pong", ping.call),
    ]
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    placements: list[tuple[str, Callable[[], None] | None]] = []
    if len(cpus) >= 2:
        a, b = {cpus[0]}, {cpus[1]}
        placements += [
            ("same CPU", lambda: _place(a, a)),
            ("across CPUs", lambda: _place(a, b)),
        ]
    everywhere = set(cpus)
    placements.append(
        ("as the OS places", (lambda: _place(everywhere, everywhere)) if cpus else None)
    )
    medians: dict[tuple[str, str], float] = {}
    try:
        for placement, pin in placements:
            samples: dict[str, list[float]] = {name: [] for name, _ in contenders}
            for index in range(TRIP_ROUNDS):
                shift = index % len(contenders)
                for name, call in contenders[shift:] + contenders[:shift]:
                    per_call(call, 50, warmup=0)  # threads started, caches warm
                    if pin is not None:
                        pin()
                    samples[name] += per_call(call, TRIP_CALLS, warmup=20)
            for name, values in samples.items():
                medians[placement, name] = median(values)
    finally:
        if cpus:
            _place(everywhere, everywhere)
        ping.close()
        thread_pool.close()
        thread_pool.join()
        stdlib.shutdown()
        conveyor_executor.shutdown()
        conveyor_pool.shutdown()
    names = [p for p, _ in placements]
    headers = ["contender"]
    for placement in names:
        headers += [placement, "/stdlib"]
    rows = []
    for name, _ in contenders:
        row = [name]
        for placement in names:
            value = medians[placement, name]
            row += [fmt_seconds(value), f"{value / medians[placement, STDLIB]:.2f}x"]
        rows.append(row)
    table(headers, rows)
    note(
        f"median of {TRIP_ROUNDS * TRIP_CALLS} calls per cell, in {TRIP_ROUNDS} interleaved rounds"
    )
    judged = [p for p in names if p != "as the OS places"] or names
    ratios = {p: medians[p, "conveyor.Pool"] / medians[p, STDLIB] for p in judged}
    floor(
        "thread_round_trip",
        ", ".join(f"{fmt_seconds(medians[p, 'conveyor.Pool'])} {p}" for p in judged),
        ", ".join(f"{ratios[p]:.2f}x stdlib {p}" for p in judged) + "; at most 0.5x",
        all(r <= 0.5 for r in ratios.values()),
    )


# -- 3. map throughput --------------------------------------------------------------------------


def _map_case() -> None:
    heading(f"map: list(pool.map(inc, range({MAP_ITEMS:,}))), default arguments, warm pools")
    conveyor_pool = conveyor.Pool()
    conveyor_executor = conveyor.ThreadPoolExecutor()
    stdlib = cf.ThreadPoolExecutor()
    thread_pool = ThreadPool()
    expected = list(range(1, MAP_ITEMS + 1))
    for warm in (conveyor_pool, conveyor_executor, stdlib, thread_pool):
        list(warm.map(inc, range(100)))
    contenders: list[tuple[str, Callable[[], object]]] = [
        ("conveyor.Pool", lambda: list(conveyor_pool.map(inc, range(MAP_ITEMS)))),
        ("conveyor.ThreadPoolExecutor", lambda: list(conveyor_executor.map(inc, range(MAP_ITEMS)))),
        (STDLIB, lambda: list(stdlib.map(inc, range(MAP_ITEMS)))),
        ("multiprocessing.pool.ThreadPool", lambda: thread_pool.map(inc, range(MAP_ITEMS))),
        ("reference: list(map(inc, ...)), one thread", lambda: list(map(inc, range(MAP_ITEMS)))),
    ]

    def check(name: str, result: object) -> None:
        if result != expected:
            raise AssertionError(f"{name} returned wrong results")

    try:
        results = rounds(contenders, MAP_ROUNDS, check=check, budget=8.0)
    finally:
        thread_pool.close()
        thread_pool.join()
        stdlib.shutdown()
        conveyor_executor.shutdown()
        conveyor_pool.shutdown()
    base = results[STDLIB].median
    table(
        ["contender", "median", "best", "items/s", "vs stdlib"],
        [
            [
                t.name,
                fmt_seconds(t.median),
                fmt_seconds(t.best),
                f"{MAP_ITEMS / t.median:,.0f}",
                f"{base / t.median:.1f}x",
            ]
            if t.ok
            else [t.name, t.error, "", "", ""]
            for t in results.values()
        ],
    )
    note(f"median of up to {MAP_ROUNDS} interleaved rounds; 'vs stdlib' is a throughput ratio")
    mine = results["conveyor.Pool"].median
    floor(
        "thread_map_trivial",
        f"{MAP_ITEMS / mine:,.0f} items/s",
        f"{base / mine:.1f}x {STDLIB}'s {MAP_ITEMS / base:,.0f} items/s; at least 3x",
        base / mine >= 3.0,
    )


# -- 4. memory ----------------------------------------------------------------------------------


def _generator(count: int) -> Iterator[int]:
    yield from range(count)


def _stdlib_has_buffersize() -> bool:
    return "buffersize" in inspect.signature(cf.ThreadPoolExecutor.map).parameters


def _memory_case() -> None:
    heading(f"memory: for _ in pool.map(inc, <generator of {MEMORY_ITEMS:,}>): pass")

    def conveyor_pool() -> int:
        count = 0
        with conveyor.Pool() as pool:
            for _ in pool.map(inc, _generator(MEMORY_ITEMS)):
                count += 1
        return count

    def stdlib_buffered() -> int:
        count = 0
        with cf.ThreadPoolExecutor() as executor:
            mapped: Any = executor.map  # buffersize is new in Python 3.14
            for _ in mapped(inc, _generator(MEMORY_ITEMS), buffersize=1024):
                count += 1
        return count

    contenders: list[tuple[str, Callable[[], int]]] = [("conveyor.Pool", conveyor_pool)]
    if _stdlib_has_buffersize():
        contenders.append((f"{STDLIB}, buffersize=1024", stdlib_buffered))
    growth: dict[str, list[int]] = {name: [] for name, _ in contenders}
    times: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for _ in range(MEMORY_ROUNDS):
        for name, run in contenders:
            start = time.perf_counter()
            with PeakRss() as memory:
                count = run()
            times[name].append(time.perf_counter() - start)
            if count != MEMORY_ITEMS:
                raise AssertionError(f"{name} yielded {count} results")
            growth[name].append(memory.growth)
    table(
        ["contender", "RSS growth, worst", "each round", "median time", "items/s"],
        [
            [
                name,
                fmt_bytes(max(growth[name])),
                " ".join(fmt_bytes(g) for g in growth[name]),
                fmt_seconds(median(times[name])),
                f"{MEMORY_ITEMS / median(times[name]):,.0f}",
            ]
            for name, _ in contenders
        ],
    )
    if not _stdlib_has_buffersize():
        note(f"{STDLIB}.map has no buffersize before Python 3.14 and reads all of its input")
        note("at once (10 million futures), so it is not run here")
    note("growth = peak resident memory (sampled every 5 ms) minus resident memory before")
    worst = max(growth["conveyor.Pool"])
    floor(
        "thread_map_memory",
        f"{fmt_bytes(worst)} resident at peak",
        f"worst of {MEMORY_ROUNDS} rounds over {MEMORY_ITEMS:,} items; under 50 MB",
        worst < 50e6,
    )


CASES: dict[str, Callable[[], None]] = {
    "io": _io_case,
    "round_trip": _round_trip_case,
    "map": _map_case,
    "memory": _memory_case,
}


def main() -> None:
    """Run every case, or those named on the command line (``io``, ``map``, ...)."""
    run_cases("bench_thread", CASES)


if __name__ == "__main__":
    main()
