"""asyncio benchmarks: coroutine calls on conveyor's asyncio backend against raw asyncio and
pypeln's task stage.

Run it with ``python benchmarks/bench_asyncio.py [CASE ...]``. Each case prints a table (median
and best of interleaved rounds, ratios to raw asyncio) and its ``FLOOR`` lines; the script
always exits 0.

Cases:

* sleep: 10,000 calls of ``await asyncio.sleep(0.01)`` with 1,000 in flight (ideal 0.10 s).
  Contenders, each from a fresh start (a new event loop or pool every round):
  raw asyncio (``asyncio.gather`` over tasks that hold an ``asyncio.Semaphore(1000)``),
  ``Pool("asyncio", workers=1000).map`` from plain code, ``pool.amap`` under ``async for``
  from async code, a one-stage ``Pipeline`` whose stage is the coroutine function, and
  pypeln's ``pl.task.map(..., workers=1000)``.
  Floor: ``Pool.map`` and ``amap`` each within 1.5x raw asyncio, in the same run.
* arun: 2,000 awaited ``pool.arun`` calls of a thread pool (``asyncio.gather`` over them)
  against ``loop.run_in_executor`` on a ``concurrent.futures.ThreadPoolExecutor`` of the same
  size: the cost of awaiting a pool from async code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

import pypeln as pl  # type: ignore[import-untyped]
from _harness import floor, fmt_seconds, heading, note, rounds, run_cases, table

import conveyor

ROUNDS = 7
CALLS, IN_FLIGHT, SLEEP = 10_000, 1_000, 0.01
ARUN_CALLS, ARUN_WORKERS = 2_000, 8


async def _nap(x: int) -> int:
    await asyncio.sleep(SLEEP)
    return x


def _raw_asyncio() -> list[int]:
    async def main() -> list[int]:
        limit = asyncio.Semaphore(IN_FLIGHT)

        async def one(x: int) -> int:
            async with limit:
                return await _nap(x)

        return list(await asyncio.gather(*(one(x) for x in range(CALLS))))

    return asyncio.run(main())


def _pool_map() -> list[int]:
    with conveyor.Pool("asyncio", workers=IN_FLIGHT) as pool:
        return list(pool.map(_nap, range(CALLS)))


def _pool_amap() -> list[int]:
    async def main() -> list[int]:
        async with conveyor.Pool("asyncio", workers=IN_FLIGHT) as pool:
            return [x async for x in pool.amap(_nap, range(CALLS))]

    return asyncio.run(main())


def _pipeline() -> list[int]:
    return list(conveyor.Pipeline(range(CALLS)).map(_nap, workers=IN_FLIGHT))


def _pypeln_task() -> list[int]:
    return sorted(pl.task.map(_nap, range(CALLS), workers=IN_FLIGHT))


def _check(expected: list[int]) -> Callable[[str, object], None]:
    def check(name: str, result: object) -> None:
        if result != expected:
            raise AssertionError(f"{name} returned wrong results")

    return check


def _report(results: dict[str, Any], baseline: str, ideal: float | None = None) -> None:
    base = results[baseline].median
    rows = []
    for name, timing in results.items():
        if not timing.ok:
            rows.append((name, "-", "-", "-", timing.error))
            continue
        rows.append(
            (
                name,
                fmt_seconds(timing.median),
                fmt_seconds(timing.best),
                f"{timing.median / base:.2f}x",
                "" if ideal is None else f"{timing.median / ideal:.2f}x ideal",
            )
        )
    table(["contender", "median", "best", f"vs {baseline}", ""], rows)


def case_sleep() -> None:
    heading(f"sleep: {CALLS:,} calls of asyncio.sleep({SLEEP}) at {IN_FLIGHT:,} in flight")
    contenders = [
        ("raw asyncio", _raw_asyncio),
        ("Pool.map", _pool_map),
        ("Pool.amap", _pool_amap),
        ("Pipeline", _pipeline),
        ("pypeln task", _pypeln_task),
    ]
    results = rounds(contenders, ROUNDS, check=_check(list(range(CALLS))), budget=10.0)
    ideal = CALLS / IN_FLIGHT * SLEEP
    _report(results, "raw asyncio", ideal)
    raw = results["raw asyncio"].median
    for name, floor_name in (("Pool.map", "asyncio_map"), ("Pool.amap", "asyncio_amap")):
        timing = results[name]
        ratio = timing.median / raw if timing.ok else float("inf")
        floor(
            f"{floor_name}_10k_sleeps_1000_in_flight",
            fmt_seconds(timing.median),
            f"{ratio:.2f}x raw asyncio gather + Semaphore(1000), at most 1.5x",
            ratio <= 1.5,
        )


def _nap_blocking(x: int) -> int:
    return x


def _arun() -> list[int]:
    async def main() -> list[int]:
        async with conveyor.Pool("thread", workers=ARUN_WORKERS) as pool:
            return list(
                await asyncio.gather(*(pool.arun(_nap_blocking, x) for x in range(ARUN_CALLS)))
            )

    return asyncio.run(main())


def _run_in_executor() -> list[int]:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(ARUN_WORKERS) as executor:
            calls = (loop.run_in_executor(executor, _nap_blocking, x) for x in range(ARUN_CALLS))
            return list(await asyncio.gather(*calls))

    return asyncio.run(main())


def case_arun() -> None:
    heading(f"arun: {ARUN_CALLS:,} awaited calls of a trivial function, {ARUN_WORKERS} threads")
    contenders = [("run_in_executor", _run_in_executor), ("Pool.arun", _arun)]
    results = rounds(contenders, ROUNDS, check=_check(list(range(ARUN_CALLS))), budget=10.0)
    _report(results, "run_in_executor")
    note("no floor: what awaiting a pool costs next to the stdlib's way")


if __name__ == "__main__":
    run_cases("bench_asyncio.py", {"sleep": case_sleep, "arun": case_arun})
