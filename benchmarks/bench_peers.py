"""``conveyor.Pool("process", 2)`` beside its peers on four everyday jobs, one floor each:
``concurrent.futures.ProcessPoolExecutor``, ``multiprocessing.Pool``, loky, mpire, pebble and
joblib, installed from PyPI and timed side by side in one run.

Run it with ``python benchmarks/bench_peers.py`` (or name some cases: ``... fib sleep``); it
takes about three minutes on 2 CPUs. It prints a table per case and one line per floor:
``FLOOR <name>: <measured> (<comparison>) MET`` or ``MISSED``. It exits 0 either way.

Every pool has 2 workers, is started, and first runs what its case times on a small input
(the warm-up a user's program gives it); then the contenders are timed in interleaved rounds,
in a rotated order, and compared by their medians. Cases:

1. fib: ``map(fib, ns)`` with default arguments, ns = 25, 26, ..., 30 six times over (36
   calls), after a warm-up of ``map(fib, [20, 20])``: conveyor no slower than the best of
   pebble, mpire and joblib (1.02x at most).
2. submit: 5,000 ``submit(inc, i)``, then the result of each: conveyor's calls per second at
   least ``multiprocessing.Pool.apply_async`` and ``.get()``'s.
3. chunk1: ``map(inc, range(10,000), chunksize=1)``, every result consumed: conveyor's items
   per second at least ``multiprocessing.Pool.imap(..., chunksize=1)``'s.
4. sleep: 500 calls of ``time.sleep(0.01)`` by ``map`` with default arguments and by submit
   and result: within 1.02x of the ideal 2.50 s (500 x 10 ms / 2 workers).

The pools are the wrappers of ``_peers.py``; the peer libraries are imported when their pool
starts, not at the top (workers started by ``forkserver`` run this script's imports again).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from _harness import (
    Timings,
    floor,
    fmt_seconds,
    heading,
    median,
    note,
    per_call,
    rounds,
    run_cases,
    table,
)
from _peers import (
    CONVEYOR,
    MP_POOL,
    ConveyorExecutorPeer,
    ConveyorPeer,
    JoblibPeer,
    LokyPeer,
    MpirePeer,
    MultiprocessingPeer,
    PebblePeer,
    Peer,
    StdlibPeer,
    _cells,
    _check,
    _failures,
    _ratio,
    _started,
    _stop,
)
from _work import fib, inc, nap

WORKERS = 2
FIB_NS, FIB_REPEAT, FIB_WARM, FIB_ROUNDS = range(25, 31), 6, [20, 20], 5
SUBMIT_CALLS, SUBMIT_ROUNDS, SUBMIT_BUDGET = 5_000, 7, 3.0
CHUNK1_ITEMS, CHUNK1_ROUNDS, CHUNK1_BUDGET = 10_000, 7, 6.0
SLEEP_CALLS, SLEEP_SECONDS, SLEEP_ROUNDS, SLEEP_PROBES = 500, 0.01, 3, 50
TOLERANCE = 1.02  # "no slower than" for fib, "within" the ideal for sleep
FIB_RIVALS = (PebblePeer.name, MpirePeer.name, JoblibPeer.name)
MP_IMAP = f"{MP_POOL}.imap"


def _per_round(t: Timings) -> str:
    return " ".join(f"{s:.3f}" for s in t.times)


# -- 1. fib -------------------------------------------------------------------------------------


def _throughput_table(
    results: dict[str, Timings],
    how: dict[str, str],
    base: float,
    count: int,
    unit: str,
    versus: str,
) -> None:
    """Each contender's call, times and rate (``count`` per median), and its rate against
    the contender whose median is ``base``; then the contenders that failed."""
    table(
        ["contender", "call", "median", "best", "rounds", unit, versus],
        [
            _cells(
                t,
                how[t.name],
                fmt_seconds(t.median),
                fmt_seconds(t.best),
                str(len(t.times)),
                f"{count / t.median:,.0f}",
                f"{_ratio(base, t.median):.2f}x",
            )
            for t in results.values()
        ],
    )
    _failures(results)


def _in_order_makespan(durations: Sequence[float], workers: int) -> float:
    """Seconds a pool that costs nothing takes for calls handed out in input order, each to
    the worker that becomes free first."""
    free_at = [0.0] * workers
    for seconds in durations:
        first = free_at.index(min(free_at))
        free_at[first] += seconds
    return max(free_at)


def _fib_case() -> None:
    ns = list(FIB_NS) * FIB_REPEAT
    heading(
        f"fib: map(fib, ns) for ns = {FIB_NS.start}..{FIB_NS.stop - 1} x {FIB_REPEAT} "
        f"({len(ns)} calls, in input order), {WORKERS} workers, default arguments, "
        f"after map(fib, {FIB_WARM})"
    )
    # Each fib(n) once here, best of two: the expected results and the ideal schedule.
    seconds: dict[int, float] = {}
    values: dict[int, int] = {}
    for n in FIB_NS:
        for _ in range(2):
            start = time.perf_counter()
            values[n] = fib(n)
            elapsed = time.perf_counter() - start
            seconds[n] = min(seconds.get(n, elapsed), elapsed)
    expected = [values[n] for n in ns]
    serial = sum(seconds[n] for n in ns)
    ideal = _in_order_makespan([seconds[n] for n in ns], WORKERS)

    peers = _started(WORKERS, warm=lambda peer: peer.map(fib, FIB_WARM))
    try:
        results = rounds(
            [(p.name, partial(p.map, fib, ns)) for p in peers],
            FIB_ROUNDS,
            check=lambda name, result: _check(name, result == expected),
            settle=0.2,  # let the last contender's workers go idle first
        )
    finally:
        _stop(peers)
    rivals = [results[name] for name in FIB_RIVALS if results[name].ok]
    best_rival = min(rivals, key=lambda t: t.median) if rivals else None
    base = best_rival.median if best_rival else float("nan")
    table(
        ["map(fib, ns)", "median", "best", "vs serial", "vs best rival", "seconds per round"],
        [
            _cells(
                t,
                fmt_seconds(t.median),
                fmt_seconds(t.best),
                f"{_ratio(serial, t.median):.2f}x",
                f"{_ratio(t.median, base):.3f}",
                _per_round(t),
            )
            for t in results.values()
        ],
    )
    _failures(results)
    note(f"'vs serial': a speedup over the {fmt_seconds(serial)} the calls took one after another")
    note(
        f"here, before the rounds; a pool that costs nothing, handing them out in order, takes "
        f"{fmt_seconds(ideal)} ({_ratio(serial, ideal):.2f}x)"
    )
    note("'vs best rival': a ratio of median times (lower is faster) to the fastest of pebble,")
    note(f"mpire and joblib, {best_rival.name if best_rival else '-'}")
    note("round 1 is every pool's first map of fib(25..30), after its warm-up on fib(20)")
    mine = results[CONVEYOR].median
    floor(
        "process_peers_fib_map",
        f"{fmt_seconds(mine)} median",
        f"{_ratio(mine, base):.3f}x {best_rival.name if best_rival else 'the best rival'}'s "
        f"{fmt_seconds(base)}, the best of pebble, mpire and joblib; at most {TOLERANCE}x",
        mine <= TOLERANCE * base,
    )


# -- 2. submit ----------------------------------------------------------------------------------


def _submit_all(peer: Peer, count: int) -> list[Any]:
    """Submit ``count`` calls one by one, then wait for each result in turn."""
    handles = [peer.submit(inc, x) for x in range(count)]
    return [peer.result(handle) for handle in handles]


def _submit_case() -> None:
    heading(
        f"submit: {SUBMIT_CALLS:,} x submit(inc, x), then each result in turn, "
        f"{WORKERS} workers, warm pools"
    )
    expected = list(range(1, SUBMIT_CALLS + 1))
    kinds = [
        ConveyorPeer,
        ConveyorExecutorPeer,
        MultiprocessingPeer,
        StdlibPeer,
        PebblePeer,
        LokyPeer,
        MpirePeer,
    ]
    peers = _started(WORKERS, kinds, warm=lambda peer: _submit_all(peer, 100))
    try:
        results = rounds(
            [(p.name, partial(_submit_all, p, SUBMIT_CALLS)) for p in peers],
            SUBMIT_ROUNDS,
            check=lambda name, result: _check(name, result == expected),
            budget=SUBMIT_BUDGET,
        )
    finally:
        _stop(peers)
    how = {p.name: p.submits for p in peers}
    base = results[MP_POOL].median
    _throughput_table(results, how, base, SUBMIT_CALLS, "calls/s", "vs mp.Pool")
    note("'vs mp.Pool' is a ratio of throughputs (higher is faster); every submit comes before")
    note("the first result is asked for, as with [executor.submit(f, x) for x in xs]")
    mine = results[CONVEYOR].median
    drop_in = results[ConveyorExecutorPeer.name]
    floor(
        "process_peers_submit",
        f"{SUBMIT_CALLS / mine:,.0f} calls/s",
        f"{_ratio(base, mine):.2f}x {MP_POOL}.apply_async's {SUBMIT_CALLS / base:,.0f} calls/s; "
        f"{ConveyorExecutorPeer.name} {SUBMIT_CALLS / drop_in.median:,.0f}; at least 1.0x",
        mine <= base,
    )


# -- 3. map, chunksize=1 ------------------------------------------------------------------------


def _chunk1_case() -> None:
    heading(
        f"chunk1: map(inc, range({CHUNK1_ITEMS:,}), chunksize=1), every result consumed, "
        f"{WORKERS} workers, warm pools"
    )
    expected = list(range(1, CHUNK1_ITEMS + 1))
    items = range(CHUNK1_ITEMS)

    def warm(peer: Peer) -> None:
        peer.map(inc, range(100), chunksize=1)
        if isinstance(peer, MultiprocessingPeer):
            peer.imap(inc, range(100), chunksize=1)

    peers = _started(WORKERS, warm=warm)
    contenders: list[tuple[str, Callable[[], object]]] = []
    how: dict[str, str] = {}
    keyword: dict[type[Peer], str] = {JoblibPeer: "batch_size", MpirePeer: "chunk_size"}
    for p in peers:
        contenders.append((p.name, partial(p.map, inc, items, chunksize=1)))
        how[p.name] = f"map(inc, range(n), {keyword.get(type(p), 'chunksize')}=1)"
        if isinstance(p, MultiprocessingPeer):
            contenders.append((MP_IMAP, partial(p.imap, inc, items, chunksize=1)))
            how[MP_IMAP] = "imap(inc, range(n), chunksize=1)"
    try:
        results = rounds(
            contenders,
            CHUNK1_ROUNDS,
            check=lambda name, result: _check(name, result == expected),
            budget=CHUNK1_BUDGET,
        )
    finally:
        _stop(peers)
    base = results[MP_IMAP].median
    _throughput_table(results, how, base, CHUNK1_ITEMS, "items/s", "vs mp.Pool.imap")
    note("'vs mp.Pool.imap' is a ratio of throughputs (higher is faster); joblib's batch_size")
    note("and mpire's chunk_size are their names for chunksize; a slow contender runs fewer rounds")
    mine = results[CONVEYOR].median
    floor(
        "process_peers_map_chunk1",
        f"{CHUNK1_ITEMS / mine:,.0f} items/s",
        f"{_ratio(base, mine):.2f}x {MP_IMAP}(chunksize=1)'s {CHUNK1_ITEMS / base:,.0f} "
        "items/s; at least 1.0x",
        mine <= base,
    )


# -- 4. sleep -----------------------------------------------------------------------------------


def _nap_all(peer: Peer, count: int) -> list[Any]:
    handles = [peer.submit(nap, SLEEP_SECONDS) for _ in range(count)]
    return [peer.result(handle) for handle in handles]


def _sleep_case() -> None:
    ideal = SLEEP_CALLS * SLEEP_SECONDS / WORKERS
    heading(
        f"sleep: {SLEEP_CALLS} x time.sleep({SLEEP_SECONDS}) on {WORKERS} workers, "
        f"ideal {ideal:.2f} s, warm pools"
    )
    naps = [SLEEP_SECONDS] * SLEEP_CALLS
    # How long a sleep lasts here: the kernel wakes a sleeper late by its timer slack and more
    # under load, which no pool can help.
    slept = median(per_call(partial(nap, SLEEP_SECONDS), SLEEP_PROBES, warmup=2))
    reachable = SLEEP_CALLS * slept / WORKERS
    expected = [None] * SLEEP_CALLS
    submitted = f"{CONVEYOR}, submit"
    applied = f"{MP_POOL}, apply_async"

    def warm(peer: Peer) -> None:
        peer.map(nap, naps[:WORKERS])
        if isinstance(peer, (ConveyorPeer, MultiprocessingPeer)):
            _nap_all(peer, WORKERS)

    peers = _started(WORKERS, [ConveyorPeer, MultiprocessingPeer, StdlibPeer], warm=warm)
    contenders: list[tuple[str, Callable[[], object]]] = [
        (p.name, partial(p.map, nap, naps)) for p in peers
    ]
    mine_peer = next(p for p in peers if isinstance(p, ConveyorPeer))
    mp_peer = next(p for p in peers if isinstance(p, MultiprocessingPeer))
    contenders.append((submitted, partial(_nap_all, mine_peer, SLEEP_CALLS)))
    contenders.append((applied, partial(_nap_all, mp_peer, SLEEP_CALLS)))
    how = {p.name: "map(nap, naps)" for p in peers}
    how[submitted] = "submit(nap, 0.01) x 500, then each result"
    how[applied] = "apply_async(nap, (0.01,)) x 500, then each get()"
    try:
        results = rounds(
            contenders,
            SLEEP_ROUNDS,
            check=lambda name, result: _check(name, result == expected),
        )
    finally:
        _stop(peers)
    table(
        ["contender", "call", "median", "best", "vs ideal", "seconds per round"],
        [
            _cells(
                t,
                how[t.name],
                fmt_seconds(t.median),
                fmt_seconds(t.best),
                f"{_ratio(t.median, ideal):.3f}x",
                _per_round(t),
            )
            for t in results.values()
        ],
    )
    _failures(results)
    note(f"'vs ideal' is the median over {ideal:.2f} s, every worker sleeping all the time;")
    note(
        f"time.sleep({SLEEP_SECONDS}) itself took {slept * 1e3:.2f} ms here "
        f"(median of {SLEEP_PROBES}),"
    )
    note(
        f"so a pool that cost nothing would take {fmt_seconds(reachable)} "
        f"({_ratio(reachable, ideal):.3f}x the ideal)"
    )
    note("default arguments: multiprocessing.Pool.map cuts 500 items into chunks of 63")
    note(
        "one call per submit: each result leaves its worker alone, which costs a worker just "
        "woken from a sleep 50-100 us here"
    )
    mine = results[CONVEYOR].median
    mine_submit = results[submitted].median
    mp_map = results[MP_POOL].median
    mp_submit = results[applied].median
    stdlib = results[StdlibPeer.name].median
    floor(
        "process_peers_sleep",
        f"map {_ratio(mine, ideal):.3f}x the ideal",
        f"{fmt_seconds(mine)} vs {ideal:.2f} s; {MP_POOL}.map {_ratio(mp_map, ideal):.3f}x, "
        f"{StdlibPeer.name}.map {_ratio(stdlib, ideal):.3f}x; at most {TOLERANCE}x "
        f"(by submit: conveyor {_ratio(mine_submit, ideal):.3f}x, {MP_POOL}.apply_async "
        f"{_ratio(mp_submit, ideal):.3f}x)",
        mine <= TOLERANCE * ideal,
    )


CASES: dict[str, Callable[[], None]] = {
    "fib": _fib_case,
    "submit": _submit_case,
    "chunk1": _chunk1_case,
    "sleep": _sleep_case,
}


def main() -> None:
    """Run every case, or those named on the command line (``fib``, ``submit``, ...)."""
    run_cases("bench_peers", CASES, f"; every pool gets {WORKERS} workers")


if __name__ == "__main__":
    main()
