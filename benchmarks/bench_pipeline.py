"""Pipeline benchmarks: conveyor against hand-written threads + queue.Queue and against pypeln.

Run it with ``python benchmarks/bench_pipeline.py``. It prints a table of timings (best of
several rounds) and one line per floor: ``FLOOR <name>: <measured> (<comparison>) MET`` or
``MISSED``. It always exits 0: the floors are for people reading the output, not for CI.

Cases:

* io: 500 calls of ``time.sleep(0.02)`` through one stage of 50 workers; ideal 0.20 s.
* trivial: ``x + 1`` then ``x * 2`` over 100,000 ints, one thread per stage, each holding up
  to 1000 items as the hand-written one does; what is measured is the cost of moving items
  between threads.
* error: how long after a call raises the consumer's loop gets the exception.
* stop: how long ``close()`` takes after leaving a loop over an endless source.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pypeln as pl  # type: ignore[import-untyped]

import conveyor

ROUNDS = 5
IO_ITEMS, IO_WORKERS, IO_SLEEP = 500, 50, 0.02
TRIVIAL_ITEMS = 100_000
_END = object()


# -- the cases' functions -------------------------------------------------------------------


def _sleep(x: int) -> int:
    time.sleep(IO_SLEEP)
    return x


def _add_one(x: int) -> int:
    return x + 1


def _double(x: int) -> int:
    return x * 2


# -- hand-written threads + queue.Queue -----------------------------------------------------


def _queue_pipeline(
    data: Iterable[Any], stages: list[tuple[Callable[[Any], Any], int]], maxsize: int = 1000
) -> Iterator[Any]:
    """One queue.Queue(maxsize) between stages, ``workers`` threads per stage; unordered."""
    queues: list[queue.Queue[Any]] = [queue.Queue(maxsize) for _ in range(len(stages) + 1)]

    def feed() -> None:
        for item in data:
            queues[0].put(item)
        queues[0].put(_END)

    def work(
        fn: Callable[[Any], Any],
        inbox: queue.Queue[Any],
        outbox: queue.Queue[Any],
        left: list[int],
        lock: threading.Lock,
    ) -> None:
        while (item := inbox.get()) is not _END:
            outbox.put(fn(item))
        inbox.put(_END)  # for the stage's other workers
        with lock:
            left[0] -= 1
            last = not left[0]
        if last:
            outbox.put(_END)

    threads = [threading.Thread(target=feed)]
    for index, (fn, workers) in enumerate(stages):
        left, lock = [workers], threading.Lock()
        threads += [
            threading.Thread(target=work, args=(fn, queues[index], queues[index + 1], left, lock))
            for _ in range(workers)
        ]
    for thread in threads:
        thread.start()
    out = queues[-1]
    while (item := out.get()) is not _END:
        yield item
    for thread in threads:
        thread.join()


# -- the three contenders for each case ------------------------------------------------------


def _conveyor_io() -> int:
    pipeline = conveyor.Pipeline(range(IO_ITEMS)).map(_sleep, workers=IO_WORKERS)
    return sum(1 for _ in pipeline)


def _queue_io() -> int:
    return sum(1 for _ in _queue_pipeline(range(IO_ITEMS), [(_sleep, IO_WORKERS)]))


def _pypeln_io() -> int:
    stage = pl.thread.map(_sleep, range(IO_ITEMS), workers=IO_WORKERS, maxsize=1000)
    return sum(1 for _ in stage)


def _conveyor_trivial() -> int:
    # The same bound as the queue.Queue(1000) between the hand-written stages.
    pipeline = (
        conveyor.Pipeline(range(TRIVIAL_ITEMS)).map(_add_one, buffer=1000).map(_double, buffer=1000)
    )
    return sum(pipeline)


def _queue_trivial() -> int:
    return sum(_queue_pipeline(range(TRIVIAL_ITEMS), [(_add_one, 1), (_double, 1)]))


def _pypeln_trivial() -> int:
    stage = pl.thread.map(_add_one, range(TRIVIAL_ITEMS), workers=1, maxsize=1000)
    stage = pl.thread.map(_double, stage, workers=1, maxsize=1000)
    return sum(stage)


def _best(fn: Callable[[], int], expected: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        assert result == expected, (fn.__name__, result, expected)
    return min(times), times


# -- latency of errors and of stopping -------------------------------------------------------


class _Boom(Exception):
    pass


def _fail_at_2000(x: int) -> int:
    if x == 2000:
        raise _Boom(time.time())  # the wall clock: comparable across processes
    return x


def _error_latency(backend: str) -> float:
    """Seconds from a call raising to the consumer's loop catching the exception."""

    def endless() -> Iterator[int]:
        n = 0
        while True:
            yield n
            n += 1

    pipeline = conveyor.Pipeline(endless()).map(_fail_at_2000, workers=4, backend=backend)
    try:
        with pipeline:
            for _ in pipeline:
                pass
    except _Boom as error:
        return time.time() - float(error.args[0])
    raise AssertionError("the error did not reach the consumer")


def _stop_latency() -> float:
    """Seconds from leaving a loop over an endless two-stage pipeline to the end of
    ``close()``, when every thread has ended."""

    def endless() -> Iterator[int]:
        n = 0
        while True:
            yield n
            n += 1

    pipeline = conveyor.Pipeline(endless()).map(_add_one, workers=4).map(_double, workers=4)
    start = 0.0
    for item in pipeline:
        if item > 10_000:
            start = time.perf_counter()
            break
    pipeline.close()
    return time.perf_counter() - start


# -- report ---------------------------------------------------------------------------------


def _floor(name: str, measured: str, comparison: str, met: bool) -> None:
    print(f"FLOOR {name}: {measured} ({comparison}) {'MET' if met else 'MISSED'}")


def main() -> None:
    io_expected = IO_ITEMS
    trivial_expected = sum((x + 1) * 2 for x in range(TRIVIAL_ITEMS))
    rows: list[tuple[str, str, float, list[float]]] = []
    results: dict[tuple[str, str], float] = {}
    for case, expected, contenders in (
        ("io", io_expected, [_conveyor_io, _queue_io, _pypeln_io]),
        ("trivial", trivial_expected, [_conveyor_trivial, _queue_trivial, _pypeln_trivial]),
    ):
        for fn in contenders:
            who = fn.__name__.split("_")[1]
            best, times = _best(fn, expected)
            results[case, who] = best
            rows.append((case, who, best, times))

    print(f"{'case':<9}{'contender':<11}{'best s':>9}{'median s':>10}{'items/s':>12}")
    for case, who, best, times in rows:
        items = IO_ITEMS if case == "io" else TRIVIAL_ITEMS
        print(
            f"{case:<9}{who:<11}{best:>9.3f}{statistics.median(times):>10.3f}{items / best:>12,.0f}"
        )
    error_thread = min(_error_latency("thread") for _ in range(3))
    error_process = min(_error_latency("process") for _ in range(3))
    stop = min(_stop_latency() for _ in range(3))
    print(f"error latency: thread {error_thread * 1000:.1f} ms, ", end="")
    print(f"process {error_process * 1000:.1f} ms")
    print(f"stop latency: {stop * 1000:.1f} ms")
    print()

    ideal = IO_ITEMS / IO_WORKERS * IO_SLEEP
    io = results["io", "conveyor"]
    _floor(
        "io_50_workers",
        f"{io:.3f} s",
        f"{io / ideal:.2f}x the ideal {ideal:.2f} s, at most 1.15x",
        io <= 1.15 * ideal,
    )
    trivial = results["trivial", "conveyor"]
    vs_queue = results["trivial", "queue"] / trivial
    _floor(
        "trivial_vs_threads_queue",
        f"{TRIVIAL_ITEMS / trivial:,.0f} items/s",
        f"{vs_queue:.2f}x threads + queue.Queue(1000), at least 1.0x",
        vs_queue >= 1.0,
    )
    vs_pypeln = results["trivial", "pypeln"] / trivial
    _floor(
        "trivial_vs_pypeln",
        f"{TRIVIAL_ITEMS / trivial:,.0f} items/s",
        f"{vs_pypeln:.2f}x pypeln thread stages, at least 2.0x",
        vs_pypeln >= 2.0,
    )
    worst_error = max(error_thread, error_process)
    _floor(
        "error_reaches_consumer",
        f"{worst_error * 1000:.1f} ms",
        "worst of thread and process stages, under 1000 ms",
        worst_error < 1.0,
    )
    _floor(
        "stop_endless_pipeline",
        f"{stop * 1000:.1f} ms",
        "close() after break, under 1000 ms",
        stop < 1.0,
    )


if __name__ == "__main__":
    main()
