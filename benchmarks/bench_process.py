"""The process backend against ``concurrent.futures.ProcessPoolExecutor``,
``multiprocessing.Pool``, loky, mpire, pebble and joblib, side by side in one run.

Run it with ``python benchmarks/bench_process.py`` (or name some cases: ``... numpy start``).
It prints a table per case and one line per
floor: ``FLOOR <name>: <measured> (<comparison>) MET`` or ``MISSED``. It exits 0 either way.

Cases (every pool gets as many workers as there are CPUs, which is each library's default
except joblib's, and is started and warmed up before it is timed unless the case is about
starting):

1. map: ``x + 1`` over 100,000 ints with default arguments; and ``imap_unordered`` over a
   generator of them, which has no ``len()`` to size chunks from.
2. cpu: recursive ``fib(n)`` for n in 25..30, five times over (30 calls), on 2 workers, as a
   speedup over the same calls run one after another in this process.
3. numpy: 20 arrays of 8 MB, each summed in a worker: megabytes handed over per second, on
   warm pools and in the first map of a new pool (each round in a process of its own, see
   ``_fresh_map.py``).
4. round trip: ``submit(f).result()`` (or the library's equivalent) on a warm pool, call by
   call, with a bare ``multiprocessing.Pipe`` ping-pong to a child process for reference.
5. start: start 2 workers, run one call, shut down.
6. crashes: 1,000 calls, of which every 20th kills its worker with ``os._exit(1)``.

The peer libraries are imported inside the cases, not at the top: workers started by
``forkserver`` or ``spawn`` run this script's top-level imports again (before Python 3.13 the
forkserver cannot preload ``__main__``), and would otherwise all pay for importing every peer.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
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
    CPUS,
    MP_POOL,
    PEERS,
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
from _work import CRASH_EVERY, array_sum, crash_every_20, echo, fib, fib_all, inc, noop

import conveyor

MAP_ITEMS, MAP_ROUNDS, MAP_BUDGET = 100_000, 5, 4.0
FIB_NS, FIB_REPEAT, FIB_WORKERS, FIB_ROUNDS = range(25, 31), 5, 2, 5
ARRAYS, ARRAY_ITEMS, ARRAY_ROUNDS = 20, 1_000_000, 5  # 1,000,000 float64 = 8 MB
FRESH_ROUNDS, FRESH_TIMEOUT = 7, 120.0
TRIP_ROUNDS, TRIP_CALLS = 4, 500
START_ROUNDS, START_WORKERS = 7, 2
CRASH_CALLS, CRASH_ROUNDS, CRASH_WAIT = 1_000, 3, 60.0
BOTH_STARTED = "conveyor.Pool, both workers"
HERE = Path(__file__).resolve().parent


# -- 1. map -------------------------------------------------------------------------------------


def _generator(count: int) -> Iterator[int]:
    yield from range(count)


def _lazy(imap_unordered: Callable[[Callable[[Any], Any], Any], list[Any]]) -> list[Any]:
    return imap_unordered(inc, _generator(MAP_ITEMS))


def _map_case() -> None:
    heading(f"map: inc over {MAP_ITEMS:,} ints, default arguments, warm pools")
    expected = list(range(1, MAP_ITEMS + 1))
    peers = _started()
    try:
        ordered = rounds(
            [(p.name, partial(p.map, inc, range(MAP_ITEMS))) for p in peers],
            MAP_ROUNDS,
            check=lambda name, result: _check(name, result == expected),
            budget=MAP_BUDGET,
        )
        listed = list(range(MAP_ITEMS))
        as_list = rounds(
            [
                (p.name, partial(p.map, inc, listed))
                for p in peers
                if isinstance(p, (ConveyorPeer, MultiprocessingPeer))
            ],
            MAP_ROUNDS,
            check=lambda name, result: _check(name, result == expected),
            budget=MAP_BUDGET,
        )
        lazy: list[tuple[str, Callable[[], object]]] = [
            (f"{p.name}.imap_unordered", partial(_lazy, p.imap_unordered))
            for p in peers
            if isinstance(p, (ConveyorPeer, MultiprocessingPeer, MpirePeer))
        ]
        unordered = rounds(
            lazy,
            MAP_ROUNDS,
            check=lambda name, result: _check(name, sorted(result) == expected),  # type: ignore[call-overload,arg-type]
            budget=MAP_BUDGET,
        )
    finally:
        _stop(peers)
    base = ordered[MP_POOL].median
    table(
        ["map(inc, range(100,000))", "median", "best", "rounds", "items/s", "vs mp.Pool"],
        [
            _cells(
                t,
                fmt_seconds(t.median),
                fmt_seconds(t.best),
                str(len(t.times)),
                f"{MAP_ITEMS / t.median:,.0f}",
                f"{_ratio(base, t.median):.2f}x",
            )
            for t in ordered.values()
        ],
    )
    _failures(ordered)
    note("default chunksize everywhere: the stdlib executor, loky and pebble send one call per")
    note("message; a contender slower than the rest runs fewer rounds")
    print()
    list_base = as_list[MP_POOL].median
    table(
        ["map(inc, <list of 100,000 ints>)", "median", "best", "rounds", "items/s", "vs mp.Pool"],
        [
            _cells(
                t,
                fmt_seconds(t.median),
                fmt_seconds(t.best),
                str(len(t.times)),
                f"{MAP_ITEMS / t.median:,.0f}",
                f"{_ratio(list_base, t.median):.2f}x",
            )
            for t in as_list.values()
        ],
    )
    _failures(as_list)
    note("conveyor sends the batches of a range as ranges; a list's items are pickled one by one")
    print()
    mine = unordered[f"{CONVEYOR}.imap_unordered"].median
    mpire = unordered["mpire.WorkerPool.imap_unordered"].median
    table(
        ["imap_unordered(inc, <generator>)", "median", "best", "rounds", "items/s", "vs conveyor"],
        [
            _cells(
                t,
                fmt_seconds(t.median),
                fmt_seconds(t.best),
                str(len(t.times)),
                f"{MAP_ITEMS / t.median:,.0f}",
                f"{_ratio(mine, t.median):.3f}x",
            )
            for t in unordered.values()
        ],
    )
    _failures(unordered)
    note("a generator has no len(): mpire falls back to chunks of 4, multiprocessing to 1")
    conveyor_map = ordered[CONVEYOR].median
    floor(
        "process_map_trivial",
        f"{MAP_ITEMS / conveyor_map:,.0f} items/s",
        f"{_ratio(base, conveyor_map):.2f}x {MP_POOL}.map's {MAP_ITEMS / base:,.0f} items/s; "
        "at least 1.0x",
        base / conveyor_map >= 1.0,
    )
    floor(
        "process_imap_unordered_generator",
        f"{MAP_ITEMS / mine:,.0f} items/s",
        f"{_ratio(mpire, mine):.1f}x mpire's imap_unordered, {MAP_ITEMS / mpire:,.0f} items/s; "
        "at least 10x",
        mpire / mine >= 10.0,
    )


# -- 2. cpu -------------------------------------------------------------------------------------


def _cpu_case() -> None:
    ns = list(FIB_NS) * FIB_REPEAT
    heading(
        f"cpu: fib(n) for n in {FIB_NS.start}..{FIB_NS.stop - 1}, {FIB_REPEAT} times "
        f"({len(ns)} calls), {FIB_WORKERS} workers, warm pools"
    )
    expected = [fib(n) for n in ns]
    durations = [_seconds_of(fib, n) for n in ns]
    bound = _in_order_bound(durations, FIB_WORKERS)
    shares = _balanced_shares(ns, durations, FIB_WORKERS)
    peers = _started(FIB_WORKERS)
    split_pool = multiprocessing.Pool(FIB_WORKERS)
    serial = "reference: serial, in this process"
    split = f"reference: split ahead of time into {FIB_WORKERS} equal shares, one call each"

    def run_split() -> list[int]:
        # What a pool that knew every call's duration could do: the longest calls first, each
        # to the lighter share (from the durations measured above), one call per worker.
        pending = [split_pool.apply_async(fib_all, (share,)) for share in shares]
        value: dict[int, int] = {}
        for share, outcome in zip(shares, pending, strict=True):
            value.update(zip(share, outcome.get(), strict=True))
        return [value[n] for n in ns]

    try:
        split_pool.map(fib_all, [[25]] * FIB_WORKERS)  # warm
        contenders: list[tuple[str, Callable[[], object]]] = [
            (serial, lambda: [fib(n) for n in ns]),
            (split, run_split),
        ]
        contenders += [(p.name, partial(p.map, fib, ns)) for p in peers]
        results = rounds(
            contenders,
            FIB_ROUNDS,
            check=lambda name, result: _check(name, result == expected),
            settle=0.2,  # let the last contender's processes go idle first
        )
    finally:
        split_pool.terminate()
        split_pool.join()
        _stop(peers)
    base = results[serial].median
    table(
        ["contender", "median", "best", "speedup", "per round"],
        [
            _cells(
                t,
                fmt_seconds(t.median),
                fmt_seconds(t.best),
                f"{_ratio(base, t.median):.2f}x",
                " ".join(f"{s:.3f}" for s in t.times),
            )
            for t in results.values()
        ],
    )
    _failures(results)
    note(f"speedup = serial median / contender median, {FIB_ROUNDS} interleaved rounds")
    note(
        f"ceiling for calls handed out in input order, each to the first free worker, with no "
        f"cost at all: {bound:.3f}x (from each fib(n)'s measured time here)"
    )
    note(
        f"equal shares: what knowing each call's duration ahead of time gives here, "
        f"{_ratio(base, results[split].median):.2f}x where {FIB_WORKERS} equal CPUs would give "
        f"{FIB_WORKERS}x; a share cannot move off a CPU that slows down, a pool's next call can"
    )
    mine = results[CONVEYOR].median
    floor(
        "process_cpu_speedup",
        f"{_ratio(base, mine):.2f}x serial",
        f"{fmt_seconds(mine)} vs serial {fmt_seconds(base)} on {FIB_WORKERS} workers; "
        f"in-order ceiling {bound:.3f}x, equal shares "
        f"{_ratio(base, results[split].median):.2f}x; at least 1.92x",
        base / mine >= 1.92,
    )


def _seconds_of(fn: Callable[[int], object], arg: int, repeat: int = 3) -> float:
    """The best of ``repeat`` timings of ``fn(arg)`` in this process."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return min(times)


def _balanced_shares(ns: list[int], durations: list[float], workers: int) -> list[list[int]]:
    """``ns`` split into ``workers`` shares of about equal measured time: the longest first,
    each to the share with the least time so far."""
    shares: list[list[int]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for seconds, n in sorted(zip(durations, ns, strict=True), reverse=True):
        lightest = loads.index(min(loads))
        shares[lightest].append(n)
        loads[lightest] += seconds
    return shares


def _in_order_bound(durations: list[float], workers: int) -> float:
    """The speedup over serial of a pool that costs nothing and hands the calls out in
    order, each to the worker that becomes free first."""
    free_at = [0.0] * workers
    for seconds in durations:
        first = free_at.index(min(free_at))
        free_at[first] += seconds
    return sum(durations) / max(free_at)


# -- 3. numpy -----------------------------------------------------------------------------------


def _megabytes_table(first: str, results: dict[str, Timings], megabytes: float) -> None:
    """Each contender's times and rate over ``megabytes``, against ``multiprocessing.Pool``'s,
    with the rate of each round; then the contenders that failed."""
    base = results[MP_POOL].median
    table(
        [first, "median", "best", "MB/s", "vs mp.Pool", "MB/s in each round"],
        [
            _cells(
                t,
                fmt_seconds(t.median),
                fmt_seconds(t.best),
                f"{megabytes / t.median:,.0f}",
                f"{_ratio(base, t.median):.2f}x",
                " ".join(f"{megabytes / x:,.0f}" for x in t.times),
            )
            for t in results.values()
        ],
    )
    _failures(results)


def _numpy_case() -> None:
    import numpy as np

    megabytes = ARRAYS * ARRAY_ITEMS * 8 / 1e6
    heading(
        f"numpy: {ARRAYS} arrays of {ARRAY_ITEMS * 8 / 1e6:g} MB, fn returns arr.sum(), warm pools"
    )
    arrays = [np.arange(ARRAY_ITEMS, dtype=np.float64) + i for i in range(ARRAYS)]
    expected = [array_sum(a) for a in arrays]
    peers = _started()
    serial = "reference: serial, in this process"
    try:
        contenders: list[tuple[str, Callable[[], object]]] = [
            (serial, lambda: [array_sum(a) for a in arrays])
        ]
        contenders += [(p.name, partial(p.map, array_sum, arrays)) for p in peers]
        results = rounds(
            contenders,
            ARRAY_ROUNDS,
            check=lambda name, result: _check(name, result == expected),
            budget=3.0,
            settle=0.2,  # joblib deletes its memory-mapped copies after its run
        )
    finally:
        _stop(peers)
    base = results[MP_POOL].median
    _megabytes_table("contender", results, megabytes)
    note(f"{megabytes:g} MB per round; MB/s = megabytes / median time")
    mine = results[CONVEYOR].median
    floor(
        "process_numpy_throughput",
        f"{megabytes / mine:,.0f} MB/s",
        f"{_ratio(base, mine):.2f}x {MP_POOL}'s {megabytes / base:,.0f} MB/s; at least 2,000 MB/s",
        megabytes / mine >= 2000,
    )
    _numpy_fresh(megabytes)


def _fresh_map(name: str) -> float:
    """Seconds the first map of a new pool of ``name`` took, in a process of its own."""
    done = subprocess.run(
        [sys.executable, str(HERE / "_fresh_map.py"), name],
        capture_output=True,
        text=True,
        timeout=FRESH_TIMEOUT,
        cwd=HERE,
        check=False,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise RuntimeError(lines[-1])
    return float(done.stdout)


def _numpy_fresh(megabytes: float) -> None:
    """The first map of the numpy case on a new pool of each kind, interleaved rounds."""
    print()
    kinds = [ConveyorPeer, StdlibPeer, MultiprocessingPeer, LokyPeer]
    names = [kind.name for kind in kinds]
    results = {name: Timings(name) for name in names}
    for index in range(FRESH_ROUNDS):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            timing = results[name]
            if timing.error:
                continue
            try:
                timing.times.append(_fresh_map(name))
            except Exception as exc:
                timing.error = f"{type(exc).__name__}: {exc}"[:200]
    base = results[MP_POOL].median
    _megabytes_table("first map, new pool", results, megabytes)
    note("each round runs _fresh_map.py once per contender, in a new process, as a user's")
    note("script: numpy imported at its top, the pool created, then only pool.map(fn, arrays)")
    note("timed; conveyor, the stdlib's executor and loky start their workers inside it")
    note("(multiprocessing.Pool before it); a first pool of the kind ran one call before, so")
    note("that what a process starts once (conveyor's fork server) is not inside it")
    mine = results[CONVEYOR].median
    floor(
        "process_numpy_fresh",
        f"{megabytes / mine:,.0f} MB/s",
        f"{_ratio(base, mine):.2f}x {MP_POOL}'s {megabytes / base:,.0f} MB/s; at least 2,000 MB/s",
        megabytes / mine >= 2000,
    )


# -- 4. round trip ------------------------------------------------------------------------------


class _PipePingPong:
    """A child process echoing over a ``multiprocessing.Pipe``: the bare cost of a round trip
    to another process."""

    name = "reference: bare multiprocessing.Pipe ping-pong"

    def __init__(self) -> None:
        self.conn, child_end = multiprocessing.Pipe()
        self.process = multiprocessing.Process(target=echo, args=(child_end,), daemon=True)
        self.process.start()
        child_end.close()

    def call(self) -> None:
        self.conn.send(b"x")
        self.conn.recv()

    def stop(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=10)


def _round_trip_case() -> None:
    heading("round trip: one call of f() -> None on a warm pool")
    peers = _started()
    ping = _PipePingPong()
    calls: dict[str, Callable[[], object]] = {p.name: partial(p.call, noop) for p in peers}
    calls[ping.name] = ping.call
    how = {
        CONVEYOR: "pool.submit(f).result()",
        StdlibPeer.name: "pool.submit(f).result()",
        MP_POOL: "pool.apply(f)",
        LokyPeer.name: "pool.submit(f).result()",
        MpirePeer.name: "pool.apply(f)",
        PebblePeer.name: "pool.schedule(f).result()",
        JoblibPeer.name: "parallel([delayed(f)()])",
        ping.name: "conn.send(b'x'); conn.recv()",
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    try:
        # A contender whose calls take milliseconds gets fewer of them.
        count = {
            name: TRIP_CALLS if median(per_call(call, 20)) < 1e-3 else 25
            for name, call in calls.items()
        }
        names = list(calls)
        for index in range(TRIP_ROUNDS):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name] += per_call(calls[name], count[name], warmup=20)
    finally:
        ping.stop()
        _stop(peers)
    base = median(samples[MP_POOL])
    table(
        ["contender", "call", "median", "p10", "p90", "calls", "vs mp.Pool"],
        [
            [
                name,
                how[name],
                fmt_seconds(median(values)),
                fmt_seconds(sorted(values)[len(values) // 10]),
                fmt_seconds(sorted(values)[len(values) * 9 // 10]),
                str(len(values)),
                f"{_ratio(median(values), base):.2f}x",
            ]
            for name, values in samples.items()
        ],
    )
    note(f"{TRIP_ROUNDS} interleaved rounds; 'vs mp.Pool' is a ratio of times (lower is faster)")
    mine = median(samples[CONVEYOR])
    bare = median(samples[ping.name])
    floor(
        "process_round_trip",
        f"{fmt_seconds(mine)} median",
        f"{_ratio(mine, bare):.1f}x a bare Pipe ping-pong's {fmt_seconds(bare)}, "
        f"{_ratio(mine, base):.2f}x {MP_POOL}'s; at most 100 µs",
        mine <= 100e-6,
    )


# -- 5. start -----------------------------------------------------------------------------------


def _start_case() -> None:
    heading(f"start: start {START_WORKERS} workers, run one call, shut down")

    def run(kind: type[Peer]) -> None:
        peer = kind(START_WORKERS)
        peer.start()
        peer.call(noop)
        peer.stop()

    def run_both() -> None:
        # conveyor starts workers as calls come: one call starts one. Two at once start both.
        with conveyor.Pool(backend="process", workers=START_WORKERS) as pool:
            for future in [pool.submit(noop) for _ in range(START_WORKERS)]:
                future.result()

    contenders: list[tuple[str, Callable[[], object]]] = [
        (kind.name, partial(run, kind)) for kind in PEERS
    ]
    contenders.append((BOTH_STARTED, run_both))
    rounds(contenders, 1)  # untimed: start fork servers and import what each needs
    # A pool's workers go on exiting (and being reaped) after its shutdown returns: settle,
    # so that the next contender is not timed while the last one's processes still run.
    results = rounds(contenders, START_ROUNDS, budget=5.0, settle=0.25)
    how = {kind.name: kind.how for kind in PEERS}
    how[BOTH_STARTED] = f"forkserver; {START_WORKERS} calls at once, so both workers start"
    base = results[MP_POOL].median
    table(
        ["contender", "median", "best", "rounds", "vs mp.Pool", "start method"],
        [
            _cells(
                t,
                fmt_seconds(t.median),
                fmt_seconds(t.best),
                str(len(t.times)),
                f"{_ratio(t.median, base):.2f}x",
                how[t.name],
            )
            for t in results.values()
        ],
    )
    _failures(results)
    note("after one untimed round each; 'vs mp.Pool' is a ratio of times (lower is faster)")
    note(
        f"{CONVEYOR} starts workers as calls come: for one call it starts one of its "
        f"{START_WORKERS}, as the stdlib's executor does under forkserver and spawn"
    )
    mine = results[CONVEYOR].median
    floor(
        "process_start_call_stop",
        f"{fmt_seconds(mine)} median of {len(results[CONVEYOR].times)}",
        f"{_ratio(mine, base):.2f}x {MP_POOL}'s {fmt_seconds(base)}; at most 20 ms",
        mine <= 20e-3,
    )


# -- 6. crashes ---------------------------------------------------------------------------------


def _outcomes(futures: list[cf.Future[Any]], refused: int) -> collections.Counter[str]:
    """How each call ended, waiting at most CRASH_WAIT seconds in all."""
    done, not_done = cf.wait(futures, timeout=CRASH_WAIT)
    counts: collections.Counter[str] = collections.Counter()
    for future in done:
        error = future.exception()
        counts["result" if error is None else type(error).__name__] += 1
    counts["never ended"] += len(not_done)
    counts["refused at submit"] += refused
    for future in not_done:
        future.cancel()
    return counts


def _submit_all(
    submit: Callable[[Callable[[int], int], int], cf.Future[Any]], fn: Callable[[int], int]
) -> tuple[list[cf.Future[Any]], int]:
    futures, refused = [], 0
    for x in range(CRASH_CALLS):
        try:
            futures.append(submit(fn, x))
        except Exception:
            refused += 1
    return futures, refused


def _crash_run(kind: str, fn: Callable[[int], int]) -> tuple[float, collections.Counter[str]]:
    """Start a warm pool, then time CRASH_CALLS submits of ``fn`` until every future has
    ended; the pool's start and shutdown are not timed."""
    if kind == CONVEYOR:
        pool: Any = conveyor.Pool(backend="process", workers=CPUS)
        submit = pool.submit
        stop = pool.shutdown
    else:
        import pebble

        pool = pebble.ProcessPool(max_workers=CPUS)

        def submit(f: Callable[[int], int], x: int) -> cf.Future[Any]:
            return pool.schedule(f, args=(x,))  # type: ignore[no-any-return]

        def stop() -> None:
            pool.close()
            pool.join()

    try:
        for future in [submit(inc, x) for x in range(200)]:
            future.result(timeout=CRASH_WAIT)
        start = time.perf_counter()
        futures, refused = _submit_all(submit, fn)
        counts = _outcomes(futures, refused)
        return time.perf_counter() - start, counts
    finally:
        stop()


def _broken_peers() -> list[list[str]]:
    """How the peers that cannot survive a dead worker end the same run (one try each)."""
    import joblib  # type: ignore[import-untyped]
    import loky  # type: ignore[import-untyped]

    rows = []

    def describe(counts: collections.Counter[str]) -> str:
        return ", ".join(f"{n} {what}" for what, n in counts.most_common() if n)

    for name, make in (
        (StdlibPeer.name, lambda: cf.ProcessPoolExecutor(max_workers=CPUS)),
        (LokyPeer.name, lambda: loky.ProcessPoolExecutor(max_workers=CPUS)),
    ):
        pool = make()
        start = time.perf_counter()
        futures, refused = _submit_all(pool.submit, crash_every_20)
        counts = _outcomes(futures, refused)
        rows.append([name, describe(counts), fmt_seconds(time.perf_counter() - start)])
        pool.shutdown(wait=False)

    # multiprocessing.Pool replaces a dead worker but loses its call: those results never come.
    mp_pool = multiprocessing.Pool(CPUS)
    start = time.perf_counter()
    pending = [mp_pool.apply_async(crash_every_20, (x,)) for x in range(CRASH_CALLS)]
    deadline = time.monotonic() + 3.0
    counts: collections.Counter[str] = collections.Counter()
    for result in pending:
        result.wait(max(0.0, deadline - time.monotonic()))
        counts["result" if result.ready() else "never ended (waited 3 s)"] += 1
    rows.append([MP_POOL, describe(counts), fmt_seconds(time.perf_counter() - start)])
    mp_pool.terminate()
    mp_pool.join()

    start = time.perf_counter()
    try:
        joblib.Parallel(n_jobs=CPUS)(joblib.delayed(crash_every_20)(x) for x in range(CRASH_CALLS))
        outcome = "finished?"
    except Exception as exc:
        outcome = f"the whole call raised {type(exc).__name__}, no results"
    rows.append([JoblibPeer.name, outcome, fmt_seconds(time.perf_counter() - start)])
    return rows


def _crash_case() -> None:
    heading(
        f"crashes: {CRASH_CALLS:,} submits, every {CRASH_EVERY}th call os._exit(1)s its worker, "
        f"{CPUS} workers"
    )
    runs: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    outcomes: dict[str, collections.Counter[str]] = {}
    plan = [
        (CONVEYOR, "no crashes", inc),
        (CONVEYOR, "crashes", crash_every_20),
        (PebblePeer.name, "no crashes", inc),
        (PebblePeer.name, "crashes", crash_every_20),
    ]
    for index in range(CRASH_ROUNDS):
        shift = index % len(plan)
        for kind, label, fn in plan[shift:] + plan[:shift]:
            seconds, counts = _crash_run(kind, fn)
            runs[kind, label].append(seconds)
            # Keep the worst outcome seen: a single lost call must show.
            key = f"{kind}|{label}"
            if key not in outcomes or counts["result"] < outcomes[key]["result"]:
                outcomes[key] = counts
    rows = []
    for kind in (CONVEYOR, PebblePeer.name):
        clean = median(runs[kind, "no crashes"])
        crashed = median(runs[kind, "crashes"])
        for label, seconds in (("no crashes", clean), ("crashes", crashed)):
            counts = outcomes[f"{kind}|{label}"]
            rows.append(
                [
                    f"{kind}, {label}",
                    ", ".join(f"{n} {what}" for what, n in counts.most_common() if n),
                    fmt_seconds(seconds),
                    f"{seconds / clean:.1f}x",
                ]
            )
    table(["contender", "outcomes (worst round)", "median", "vs no crashes"], rows)
    note(f"{CRASH_ROUNDS} interleaved rounds; submit to last outcome, warm pools")
    note("pebble fails a dead worker's call with ProcessExpired and goes on, as conveyor does")
    print()
    table(["peer, same run with crashes", "outcomes", "time"], _broken_peers())

    counts = outcomes[f"{CONVEYOR}|crashes"]
    clean = median(runs[CONVEYOR, "no crashes"])
    crashed = median(runs[CONVEYOR, "crashes"])
    expected_crashes = CRASH_CALLS // CRASH_EVERY
    right = (
        counts["result"] == CRASH_CALLS - expected_crashes
        and counts["WorkerCrashed"] == expected_crashes
        and sum(counts.values()) == CRASH_CALLS
    )
    floor(
        "process_crash_isolation",
        f"{counts['result']} results + {counts['WorkerCrashed']} WorkerCrashed, "
        f"{CRASH_CALLS - counts['result'] - counts['WorkerCrashed']} other, "
        f"in {fmt_seconds(crashed)}",
        f"{crashed / clean:.1f}x the {fmt_seconds(clean)} without crashes; "
        f"want {CRASH_CALLS - expected_crashes} + {expected_crashes} in at most 3x",
        right and crashed <= 3 * clean,
    )


CASES: dict[str, Callable[[], None]] = {
    "map": _map_case,
    "cpu": _cpu_case,
    "numpy": _numpy_case,
    "round_trip": _round_trip_case,
    "start": _start_case,
    "crash": _crash_case,
}


def main() -> None:
    """Run every case, or those named on the command line (``map``, ``cpu``, ...)."""
    run_cases("bench_process", CASES, f"; pools get {CPUS} workers unless a case says otherwise")


if __name__ == "__main__":
    main()
