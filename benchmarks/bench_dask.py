"""The Dask backend against Dask's own ``client.map``, ``client.submit`` and ``dask.bag``,
side by side in one run, on one ``LocalCluster``.

Run it with ``python benchmarks/bench_dask.py`` (or name some cases: ``... map trip``); it
needs ``pip install -e '.[bench,dask]'``. It prints a table per case and one line per floor:
``FLOOR <name>: <measured> (<comparison>) MET`` or ``MISSED``. It exits 0 either way.

Every contender uses the same cluster: as many worker processes of one thread as there are
CPUs, started once, no dashboard, made as a pool makes its own: Dask's connections keep their
last 16 messages for debugging (``distributed.admin.low-level-log-length``), not 1000.
Conveyor's pool is given the cluster's client (``Pool(backend="dask", client=client)``),
started and warmed up before it is timed.

Cases:

1. memory: a lazy map over a generator of 10 million ints, results discarded; this process's
   resident memory is sampled and the peak compared with the start. Floor: under 100 MB of
   growth. ``client.map`` must first build a list of 10 million futures: it is measured on
   5,000 items (a slow case for it) after conveyor, and its growth per item scaled up.
   This case runs first, before the others grow this process's heap.
2. map: ``x + 1`` over 20,000 ints: ``list(pool.map(inc, items))`` against
   ``client.gather(client.map(inc, items, pure=False))`` (one task per item) and
   ``dask.bag.from_sequence(items).map(inc).compute()`` (one task per partition, Dask's own
   batching). Floor: conveyor at least 5 times faster than ``client.map`` + ``gather``.
3. round trip: ``pool.submit(noop).result()`` against ``client.submit(noop).result()``,
   call by call on the warm cluster. Goal: no worse than 1.2 times Dask's own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
MAP_ITEMS, MAP_ROUNDS = 20_000, 3
TRIP_CALLS, TRIP_ROUNDS = 100, 3
MEMORY_ITEMS, DASK_MEMORY_ITEMS = 10_000_000, 5_000

_cluster: Any = None
_client: Any = None
_pool: conveyor.Pool | None = None


def _setup() -> tuple[Any, conveyor.Pool]:
    """The one cluster, its client and a warm pool on it, started on first use."""
    global _cluster, _client, _pool
    if _pool is None:
        import dask
        import distributed

        # As a pool's own cluster: Dask keeps a few recent messages per connection for
        # debugging, not 1000 (each of conveyor's messages holds a batch's arguments).
        with dask.config.set({"distributed.admin.low-level-log-length": 16}):
            _cluster = distributed.LocalCluster(
                n_workers=CPUS,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            )
            _client = distributed.Client(_cluster, set_as_default=False)
        _pool = conveyor.Pool(backend="dask", client=_client)
        list(_pool.map(inc, range(1000)))
        _client.gather(_client.map(inc, range(100), pure=False))
    return _client, _pool


def _teardown() -> None:
    if _pool is not None:
        _pool.shutdown()
    if _client is not None:
        _client.close()
    if _cluster is not None:
        _cluster.close()


# -- 1. map -----------------------------------------------------------------------------------


def _map_case() -> None:
    heading(f"map: x + 1 over {MAP_ITEMS:,} ints on {CPUS} Dask workers")
    client, pool = _setup()
    items = list(range(MAP_ITEMS))
    expected = sum(items) + MAP_ITEMS

    def conveyor_map() -> int:
        return sum(pool.map(inc, items))

    def client_map() -> int:
        return sum(client.gather(client.map(inc, items, pure=False)))

    def bag_map() -> int:
        import dask.bag

        bag = dask.bag.from_sequence(items, npartitions=4 * CPUS)
        return sum(bag.map(inc).compute(scheduler=client.get))

    def check(name: str, result: object) -> None:
        if result != expected:
            raise AssertionError(f"{name} summed to {result}")

    contenders: list[tuple[str, Callable[[], object]]] = [
        ('conveyor Pool(backend="dask").map', conveyor_map),
        ("client.map + client.gather", client_map),
        ("dask.bag.map(...).compute()", bag_map),
    ]
    # client.map takes tens of seconds here: once it has, it is not run again.
    results = rounds(contenders, MAP_ROUNDS, check=check, budget=10.0)
    base = results["client.map + client.gather"].median
    rows = []
    for name, timing in results.items():
        speedup = base / timing.median if timing.ok else float("nan")
        rows.append([name, fmt_seconds(timing.median), f"{speedup:.1f}x", timing.error or ""])
    table(["contender", "median", "vs client.map", ""], rows)
    ratio = base / results['conveyor Pool(backend="dask").map'].median
    floor(
        "dask map 20k trivial calls",
        f"{ratio:.1f}x faster than client.map + gather",
        "floor: 5x",
        ratio >= 5.0,
    )


# -- 2. round trip ----------------------------------------------------------------------------


def _round_trip_case() -> None:
    heading("round trip: one call of f() -> None on the warm cluster")
    client, pool = _setup()

    def conveyor_call() -> None:
        pool.submit(noop).result()

    def dask_call() -> None:
        client.submit(noop, pure=False).result()

    samples: dict[str, list[float]] = {"conveyor pool.submit": [], "client.submit": []}
    for index in range(TRIP_ROUNDS):
        order = list(samples) if index % 2 == 0 else list(reversed(samples))
        for name in order:
            call = conveyor_call if name == "conveyor pool.submit" else dask_call
            samples[name] += per_call(call, TRIP_CALLS, warmup=10)
    rows = [[name, fmt_seconds(median(values))] for name, values in samples.items()]
    table(["contender", "median per call"], rows)
    ratio = median(samples["conveyor pool.submit"]) / median(samples["client.submit"])
    note(f"conveyor / Dask: {ratio:.2f} (goal: at most 1.2). Conveyor's task reports its start")
    note("to the scheduler and waits for the answer before it runs: one more round trip.")


# -- 3. memory --------------------------------------------------------------------------------


def _memory_case() -> None:
    heading(f"memory: a lazy map over a generator of {MEMORY_ITEMS:,} ints, results discarded")
    client, pool = _setup()

    def numbers(count: int) -> Iterator[int]:
        yield from range(count)

    with PeakRss() as ours:
        done = 0
        for _ in pool.imap_unordered(inc, numbers(MEMORY_ITEMS)):
            done += 1
    assert done == MEMORY_ITEMS
    with PeakRss() as theirs:
        futures = client.map(inc, list(numbers(DASK_MEMORY_ITEMS)), pure=False)
        for _ in client.gather(futures):
            pass
        del futures
    per_item = theirs.growth / DASK_MEMORY_ITEMS
    table(
        ["contender", "items", "peak growth"],
        [
            ["conveyor pool.imap_unordered", f"{MEMORY_ITEMS:,}", fmt_bytes(ours.growth)],
            [
                "client.map + gather (after conveyor)",
                f"{DASK_MEMORY_ITEMS:,}",
                fmt_bytes(theirs.growth),
            ],
            [
                "client.map, scaled",
                f"{MEMORY_ITEMS:,}",
                fmt_bytes(per_item * MEMORY_ITEMS) + " (estimate)",
            ],
        ],
    )
    floor(
        "dask lazy map over 10M items",
        f"{fmt_bytes(ours.growth)} of client memory growth",
        "floor: under 100 MB",
        ours.growth < 100e6,
    )


# Memory first: the other cases leave this process's heap grown, which would hide growth.
CASES: dict[str, Callable[[], None]] = {
    "memory": _memory_case,
    "map": _map_case,
    "trip": _round_trip_case,
}


def main() -> None:
    """Run every case, or those named on the command line (``map``, ``trip``, ``memory``)."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        print("bench_dask: skipped, Dask's distributed is not installed (pip install '.[dask]')")
        return
    try:
        run_cases("bench_dask", CASES, f"; one LocalCluster of {CPUS} one-thread workers")
    finally:
        _teardown()


if __name__ == "__main__":
    main()
