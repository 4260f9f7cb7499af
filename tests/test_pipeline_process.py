"""Pipeline stages on the process backend: results, errors across the process boundary,
collected failures, crashes, timeouts and stopping with nothing left running."""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from conveyor import Failed, Pipeline, TaskTimeout, WorkerCrashed

WAIT = 30.0


class Boom(Exception):
    pass


def _triple(x: int) -> int:
    return 3 * x


def _even(x: int) -> bool:
    return x % 2 == 0


def _pair(x: int) -> list[int]:
    return [x, -x]


def _noop(x: int) -> None:
    return None


def _same(x: int) -> int:
    return x


def _fails_at_50(x: int) -> int:
    if x == 50:
        raise Boom(x)
    return x


def _exit_on_3(x: int) -> int:
    if x == 3:
        os._exit(9)
    return x


def _sleep_on_1(x: int) -> int:
    if x == 1:
        time.sleep(60)
    return x


def _sleep_on_0(x: int) -> int:
    if x == 0:
        time.sleep(60)
    return x


def _workers() -> list[psutil.Process]:
    """Live child processes other than multiprocessing's own long-lived helpers."""
    alive = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            command = " ".join(process.cmdline())
        except psutil.Error:  # it ended while we looked
            continue
        if "forkserver" not in command and "resource_tracker" not in command:
            alive.append(process)
    return alive


def _conveyor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("conveyor-") and t.is_alive()]


@pytest.mark.parametrize("ordered", [True, False])
def test_every_kind_of_stage_runs_on_processes(ordered: bool) -> None:
    out = list(
        Pipeline(range(300))
        .map(_triple, backend="process", workers=2, ordered=ordered)
        .filter(_even, backend="process", workers=2, ordered=ordered)
        .flat_map(_pair, backend="process", ordered=ordered)
        .each(_noop, backend="process", ordered=ordered)
    )
    expected = [y for x in range(300) if (3 * x) % 2 == 0 for y in (3 * x, -3 * x)]
    assert out == expected if ordered else sorted(out) == sorted(expected)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_an_error_crosses_the_process_boundary_as_itself(position: int) -> None:
    p = Pipeline(itertools.count())
    for index in range(3):
        p = p.map(_fails_at_50 if index == position else _same, backend="process", workers=2)
    with pytest.raises(Boom) as caught, p:
        for _ in p:
            pass
    assert caught.value.args == (50,)
    cause = caught.value.__cause__
    assert cause is not None and "_fails_at_50" in str(cause)  # the worker's traceback
    assert not _conveyor_threads() and not _workers()


def test_a_source_error_stops_process_stages() -> None:
    error = Boom("source")

    def source() -> Iterator[int]:
        yield from range(100)
        raise error

    p = Pipeline(source()).map(_triple, backend="process", workers=2)
    with pytest.raises(Boom) as caught, p:
        list(p)
    assert caught.value is error
    assert not _conveyor_threads() and not _workers()


def test_failed_records_pass_a_process_stage_without_being_pickled() -> None:
    class Unpicklable(Exception):  # a local class: pickle cannot send it to a worker
        pass

    def fragile(x: int) -> int:
        if x % 4 == 0:
            raise Unpicklable(x)
        return x

    out = list(
        Pipeline(range(12), errors="collect")
        .map(fragile, workers=2, name="fragile")
        .map(_triple, backend="process", workers=2)
    )
    assert [o.item if isinstance(o, Failed) else o for o in out] == [
        x if x % 4 == 0 else 3 * x for x in range(12)
    ]
    assert all(isinstance(o.exception, Unpicklable) for o in out if isinstance(o, Failed))


def test_a_crashed_worker_fails_only_its_item_when_collecting() -> None:
    p = Pipeline(range(8), errors="collect").map(_exit_on_3, backend="process", workers=2)
    out = list(p)
    assert [o for o in out if not isinstance(o, Failed)] == [0, 1, 2, 4, 5, 6, 7]
    (crashed,) = [o for o in out if isinstance(o, Failed)]
    assert crashed.item == 3 and isinstance(crashed.exception, WorkerCrashed)
    assert p.statistics()[0].failures == 1


def test_a_timed_out_process_call_becomes_a_failed_record() -> None:
    out = list(
        Pipeline(range(4), errors="collect").map(
            _sleep_on_1, backend="process", workers=2, timeout=2.0
        )
    )
    assert out[0] == 0 and out[2:] == [2, 3]
    assert isinstance(out[1], Failed) and isinstance(out[1].exception, TaskTimeout)


def test_close_stops_a_running_process_call_at_once() -> None:
    p = Pipeline(range(1000)).map(_sleep_on_0, backend="process", workers=2, ordered=False)
    got = list(itertools.islice(iter(p), 5))
    started = time.monotonic()
    p.close()
    # The call sleeps 60 s; close() kills its worker instead of waiting (generous bound).
    assert time.monotonic() - started < WAIT
    assert len(got) == 5 and 0 not in got
    assert not _conveyor_threads() and not _workers()


def test_breaking_out_leaves_no_process_behind() -> None:
    p = (
        Pipeline(itertools.count())
        .map(_triple, backend="process", workers=2)
        .map(_triple, backend="process", ordered=False)
    )
    with p:
        for x in p:
            if x > 900:
                break
    assert x == 909
    assert not _conveyor_threads() and not _workers()


def test_a_process_stage_hands_on_results_while_its_input_waits() -> None:
    seen: queue.Queue[int] = queue.Queue()
    timed_out: list[int] = []

    def feedback() -> Iterator[int]:
        for n in range(10):
            yield n
            try:
                seen.get(timeout=WAIT)
            except queue.Empty:
                timed_out.append(n)
                return

    out = []
    with Pipeline(feedback()).map(_triple, backend="process", workers=2) as p:
        for x in p:
            out.append(x)
            seen.put(x)
    assert not timed_out
    assert out == [3 * n for n in range(10)]
