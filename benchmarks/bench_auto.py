"""``backend="auto"`` against ``backend="thread"`` and ``backend="process"`` on the same work,
side by side in one run; every pool is timed from its start to its shutdown.

Run it with ``python benchmarks/bench_auto.py`` (or name some cases: ``... cpu io``).

Cases, each with its floor:

1. cpu: ``fib(26)`` x 16, pure Python that holds the GIL: within 1.15x of the faster of
   threads and processes.
2. gil_free: SHA-256 of a 32 MiB buffer x 12 (hashlib lets the GIL go): within 1.15x of the
   faster of the two.
3. io: 500 x ``time.sleep(0.01)`` on 50 workers: within 1.3x of the ideal 0.10 s.
4. mixed: a pipeline whose stages wait, compute, then wait again, every stage ``"auto"``:
   within 1.2x of the best hand-chosen backends (thread, process, thread).
5. trivial: ``map`` of ``x + 1`` over 100,000 ints on a warm pool: no floor; it shows that the
   measuring costs a map of tiny calls nothing.

Each case also prints the decision the auto pool made, as ``Pool.decisions()`` gives it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from _harness import Timings, floor, fmt_seconds, heading, note, rounds, run_cases, table
from _work import blob, fib, inc, nap, sha256_of_blob

import conveyor

CPU_N, CPU_CALLS = 26, 16
SHA_CALLS = 12
IO_CALLS, IO_WORKERS, IO_SLEEP = 500, 50, 0.01
MIXED_ITEMS, MIXED_IO_WORKERS, MIXED_SLEEP, MIXED_N = 200, 20, 0.01, 22
MIXED_CPU_WORKERS = 2
TRIVIAL_ITEMS = 100_000
ROUNDS = 7
BACKENDS = ("thread", "process", "auto")

# The gil_free case's buffer, made at import: worker processes, forked from a process that
# imported this script, have it as the pool's process has it, rather than each making its own
# inside the timed rounds.
blob()


def _pool_run(
    backend: str, fn: Callable[[object], object], items: list[object], workers: int | None
) -> Callable[[], object]:
    def run() -> object:
        with conveyor.Pool(backend, workers) as pool:
            results = list(pool.map(fn, items))
            if backend == "auto":
                _decided[backend] = pool.decisions()
            return len(results)

    return run


_decided: dict[str, dict[str, str]] = {}


def _versus_best(
    case: str, title: str, fn: Callable[[object], object], items: list[object], workers: int | None
) -> None:
    heading(title)
    contenders = [(_name(b), _pool_run(b, fn, items, workers)) for b in BACKENDS]
    results = rounds(contenders, ROUNDS, check=_expect(len(items)))
    best = min(results[_name(b)].median for b in ("thread", "process"))
    _table(results, best, "best of thread/process")
    _print_decision()
    mine = results[_name("auto")].median
    floor(
        f"auto_{case}",
        f"{fmt_seconds(mine)}, {mine / best:.2f}x the faster of thread and process",
        f"{fmt_seconds(best)}; at most 1.15x",
        mine <= 1.15 * best,
    )


def _cpu_case() -> None:
    _versus_best(
        "cpu",
        f"cpu: fib({CPU_N}) x {CPU_CALLS}, default workers, start to shutdown",
        fib,
        [CPU_N] * CPU_CALLS,
        None,
    )


def _gil_free_case() -> None:
    _versus_best(
        "gil_free",
        f"gil_free: sha256 of 32 MiB x {SHA_CALLS}, default workers, start to shutdown",
        sha256_of_blob,
        list(range(SHA_CALLS)),
        None,
    )


def _io_case() -> None:
    heading(f"io: {IO_CALLS} x time.sleep({IO_SLEEP}) on {IO_WORKERS} workers, start to shutdown")
    items: list[object] = [IO_SLEEP] * IO_CALLS
    ideal = IO_CALLS / IO_WORKERS * IO_SLEEP
    contenders = [(_name(b), _pool_run(b, nap, items, IO_WORKERS)) for b in BACKENDS]
    results = rounds(contenders, ROUNDS, check=_expect(IO_CALLS))
    _table(results, ideal, "the ideal")
    _print_decision()
    mine = results[_name("auto")].median
    floor(
        "auto_io",
        f"{fmt_seconds(mine)}, {mine / ideal:.2f}x the ideal {fmt_seconds(ideal)}",
        f"threads {results[_name('thread')].median / ideal:.2f}x; at most 1.3x",
        mine <= 1.3 * ideal,
    )


def _name(backend: str) -> str:
    return f"Pool({backend!r})"


def _stage_io(x: int) -> int:
    time.sleep(MIXED_SLEEP)
    return x


def _stage_cpu(x: int) -> int:
    return fib(MIXED_N) + x


def _mixed(backends: tuple[str, str, str]) -> Callable[[], object]:
    first, middle, last = backends

    def run() -> object:
        pipeline = (
            conveyor.Pipeline(range(MIXED_ITEMS))
            .map(_stage_io, workers=MIXED_IO_WORKERS, backend=first)
            .map(_stage_cpu, workers=MIXED_CPU_WORKERS, backend=middle)
            .map(_stage_io, workers=MIXED_IO_WORKERS, backend=last)
        )
        return sum(1 for _ in pipeline)

    return run


def _mixed_case() -> None:
    heading(
        f"mixed: a pipeline of {MIXED_ITEMS} items: sleep({MIXED_SLEEP}) on {MIXED_IO_WORKERS} "
        f"workers, fib({MIXED_N}) on {MIXED_CPU_WORKERS}, sleep again on {MIXED_IO_WORKERS}"
    )
    hand = ("thread", "process", "thread")
    contenders = [
        ("hand-chosen: thread, process, thread", _mixed(hand)),
        ("all thread", _mixed(("thread",) * 3)),
        ("all auto", _mixed(("auto",) * 3)),
    ]
    results = rounds(contenders, ROUNDS, check=_expect(MIXED_ITEMS))
    best = results["hand-chosen: thread, process, thread"].median
    _table(results, best, "hand-chosen")
    mine = results["all auto"].median
    floor(
        "auto_mixed_pipeline",
        f"{fmt_seconds(mine)}, {mine / best:.2f}x the hand-chosen backends",
        f"{fmt_seconds(best)}; at most 1.2x",
        mine <= 1.2 * best,
    )


def _trivial_case() -> None:
    heading(f"trivial: list(pool.map(inc, range({TRIVIAL_ITEMS:,}))) on a warm pool")
    pools = {b: conveyor.Pool(b) for b in ("thread", "auto")}
    try:
        for pool in pools.values():
            list(pool.map(inc, range(TRIVIAL_ITEMS)))

        def mapper(pool: conveyor.Pool) -> Callable[[], object]:
            return lambda: len(list(pool.map(inc, range(TRIVIAL_ITEMS))))

        contenders = [(_name(b), mapper(pool)) for b, pool in pools.items()]
        results = rounds(contenders, ROUNDS, check=_expect(TRIVIAL_ITEMS))
        _table(results, results[_name("thread")].median, "threads")
        note(f"decision: {pools['auto'].decisions()}")
    finally:
        for pool in pools.values():
            pool.shutdown()


def _expect(count: int) -> Callable[[str, object], None]:
    def check(name: str, result: object) -> None:
        if result != count:
            raise AssertionError(f"{name} returned {result} results, not {count}")

    return check


def _table(results: dict[str, Timings], reference: float, against: str) -> None:
    table(
        ["contender", "median", "best", f"vs {against}"],
        [
            [t.name, fmt_seconds(t.median), fmt_seconds(t.best), f"{t.median / reference:.2f}x"]
            if t.ok
            else [t.name, t.error, "", ""]
            for t in results.values()
        ],
    )
    note(f"median of {ROUNDS} rounds, interleaved")


def _print_decision() -> None:
    note(f"decision: {_decided.get('auto')}")


CASES = {
    "cpu": _cpu_case,
    "gil_free": _gil_free_case,
    "io": _io_case,
    "mixed": _mixed_case,
    "trivial": _trivial_case,
}


def main() -> None:
    run_cases("bench_auto", CASES)


if __name__ == "__main__":
    main()
