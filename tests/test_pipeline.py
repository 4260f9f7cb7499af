"""Pipeline on threads: API, ordering, limits, backpressure, errors, stopping, statistics.

Blocking calls wait on events with generous timeouts and record whether they timed out, so
that a test fails (rather than hangs) when the pipeline does not do what it promises. No test
asserts on speed; the benchmark does.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import conveyor
from conveyor import Failed, Pipeline, TaskTimeout
from conveyor._pipeline import BUFFER_PER_WORKER, _parse_rate
from conveyor._pipeline_stage import _Pacer

WAIT = 30.0  # seconds any test waits for an event before it calls the wait a failure


class Boom(Exception):
    pass


def _conveyor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("conveyor-") and t.is_alive()]


def _counting(items: Iterator[int] | range, pulled: list[int]) -> Iterator[int]:
    for item in items:
        pulled[0] += 1
        yield item


# -- building and the public API -----------------------------------------------------------


def test_public_names() -> None:
    assert {"Pipeline", "Failed", "PipelineSummary", "StageStatistics"} <= set(conveyor.__all__)
    assert conveyor.Pipeline is Pipeline and conveyor.Failed is Failed
    # What run() and statistics() return can be named in annotations.
    pipeline = Pipeline(range(3)).map(abs)
    assert isinstance(pipeline.run(), conveyor.PipelineSummary)
    assert all(isinstance(s, conveyor.StageStatistics) for s in pipeline.statistics())


def test_each_kind_of_stage_matches_its_builtin() -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def remember(x: int) -> None:
        with lock:
            seen.append(x)

    out = list(
        Pipeline(range(20))
        .map(lambda x: x * 3, workers=3)
        .filter(lambda x: x % 2 == 0, workers=2)
        .flat_map(lambda x: [x, -x], workers=2)
        .each(remember, workers=4)
    )
    expected = [y for x in range(20) if (x * 3) % 2 == 0 for y in (x * 3, -x * 3)]
    assert out == expected
    assert sorted(seen) == sorted(expected)


def test_a_pipeline_without_stages_yields_its_source() -> None:
    assert list(Pipeline(iter("abc"))) == ["a", "b", "c"]
    assert list(Pipeline([])) == []
    assert list(Pipeline([]).map(abs)) == []


def test_stages_return_the_pipeline_for_chaining() -> None:
    p = Pipeline(range(3))
    assert p.map(abs) is p
    assert p.filter(bool).each(print).flat_map(lambda x: [x]) is p


def test_a_pipeline_runs_once() -> None:
    p = Pipeline(range(3)).map(abs)
    assert list(p) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="iterated once"):
        iter(p)
    with pytest.raises(RuntimeError, match="iterated once"):
        p.run()
    with pytest.raises(RuntimeError, match="started or closed"):
        p.map(abs)


def test_a_closed_pipeline_does_not_run() -> None:
    p = Pipeline(range(3))
    p.close()
    with pytest.raises(RuntimeError, match="closed before it ran"):
        list(p)


def test_run_returns_a_summary() -> None:
    summary = (
        Pipeline(range(10), errors="collect")
        .map(lambda x: 10 // (x % 5), name="divide")
        .filter(lambda x: x > 2)
        .run()
    )
    assert summary.outputs == 8  # 10, 5, 3 twice, and two Failed records
    assert [f.item for f in summary.errors] == [0, 5]
    assert all(isinstance(f.exception, ZeroDivisionError) for f in summary.errors)
    assert [s.name for s in summary.stages] == ["divide", "1:<lambda>"]
    assert summary.stages[0].failures == 2
    assert (summary.stages[0].items_in, summary.stages[0].items_out) == (10, 10)
    assert (summary.stages[1].items_in, summary.stages[1].items_out) == (10, 8)


@pytest.mark.parametrize(
    "rate, per_second",
    [
        ("5/s", 5.0),
        ("30/min", 0.5),
        ("7200/h", 2.0),
        (" 2.5 / s ", 2.5),
        (".5/s", 0.5),
        (3, 3.0),
        (0.25, 0.25),
        (None, None),
    ],
)
def test_rate_forms(rate: object, per_second: float | None) -> None:
    assert _parse_rate(rate) == per_second


@pytest.mark.parametrize("rate", ["5", "5/x", "fast", "5/sec", "-1/s", "0/s", "/s", "5/s/s", ""])
def test_bad_rate_strings_name_the_argument_and_the_accepted_forms(rate: str) -> None:
    with pytest.raises(ValueError, match=r"rate .*'N/s'.*'N/min'.*'N/h'|rate must be more"):
        Pipeline([1]).map(abs, rate=rate)


@pytest.mark.parametrize("rate", [0, -2, float("inf"), float("nan")])
def test_rates_must_be_positive_and_finite(rate: float) -> None:
    with pytest.raises(ValueError, match="rate must be more than 0"):
        Pipeline([1]).map(abs, rate=rate)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"rate": [5]}, TypeError, "rate"),
        ({"rate": True}, TypeError, "rate"),
        ({"workers": 0}, ValueError, "workers"),
        ({"workers": 1.5}, TypeError, "workers"),
        ({"backend": "gpu"}, ValueError, "backend"),
        ({"ordered": "yes"}, TypeError, "ordered"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"retries": -1}, ValueError, "retries"),
        ({"buffersize": 0}, ValueError, "buffersize"),
        ({"buffer": 0}, ValueError, "buffer"),
        ({"buffer": "8"}, TypeError, "buffer"),
        ({"name": 3}, TypeError, "name"),
    ],
)
def test_bad_stage_arguments(kwargs: dict[str, object], error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        Pipeline([1]).map(abs, **kwargs)  # type: ignore[arg-type]


def test_bad_pipeline_arguments() -> None:
    with pytest.raises(TypeError, match="iterable source"):
        Pipeline(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'raise' or 'collect'"):
        Pipeline([1], errors="ignore")
    with pytest.raises(TypeError, match="callable"):
        Pipeline([1]).map(5)  # type: ignore[arg-type]


# -- ordering -----------------------------------------------------------------------------


def test_ordered_stages_yield_in_source_order_when_later_items_finish_first() -> None:
    later_done = threading.Event()
    waited: list[bool] = []

    def slow_first(x: int) -> int:
        if x == 0:
            waited.append(later_done.wait(WAIT))
        elif x == 5:
            later_done.set()
        return x

    out = list(Pipeline(range(10)).map(slow_first, workers=4, buffersize=8))
    assert waited == [True]
    assert out == list(range(10))


def test_unordered_stages_yield_as_items_complete() -> None:
    seen_one = threading.Event()
    waited: list[bool] = []

    def first_waits_for_the_consumer(x: int) -> int:
        if x == 0:
            waited.append(seen_one.wait(WAIT))
        return x

    out = []
    with Pipeline(range(2)).map(first_waits_for_the_consumer, workers=2, ordered=False) as p:
        for x in p:
            out.append(x)
            if x == 1:
                seen_one.set()
    assert out == [1, 0]
    assert waited == [True]


def test_the_reorder_window_is_bounded() -> None:
    """A stuck head item must not let the stage pull its source without end."""
    release = threading.Event()
    overflow = threading.Event()
    pulled = [0]
    window = 16
    bound = 4 * window + 2  # input buffer, taken chunk, pool window, batch being filled

    def source() -> Iterator[int]:
        for n in itertools.count():
            pulled[0] += 1
            if pulled[0] > bound:
                overflow.set()
            yield n

    def head_waits(x: int) -> int:
        if x == 0:
            release.wait(WAIT)
        return x

    with Pipeline(source()).map(head_waits, workers=2, buffersize=window) as p:
        out = iter(p)
        # A correct pipeline never sets ``overflow``; waiting gives a wrong one time to.
        assert not overflow.wait(0.5)
        assert pulled[0] > window  # it did pull ahead as far as its window allows
        release.set()
        assert list(itertools.islice(out, 100)) == list(range(100))


# -- limits -------------------------------------------------------------------------------


def test_workers_cap_the_concurrency_of_a_stage() -> None:
    lock = threading.Lock()
    running = [0]
    highest = [0]
    all_three = threading.Barrier(3)
    timed_out: list[bool] = []

    def track(x: int) -> int:
        with lock:
            running[0] += 1
            highest[0] = max(highest[0], running[0])
        if x < 3:
            try:
                all_three.wait(WAIT)
            except threading.BrokenBarrierError:
                timed_out.append(True)
        with lock:
            running[0] -= 1
        return x

    assert list(Pipeline(range(30)).map(track, workers=3)) == list(range(30))
    assert highest[0] == 3
    assert not timed_out


def test_the_pacer_spaces_starts_evenly_without_bursts() -> None:
    pacer = _Pacer(per_second=4.0)  # one start each 0.25 s
    pacer.started(100.0)
    assert pacer.next_start == 100.25
    pacer.started(100.25)  # on time
    assert pacer.next_start == 100.5
    pacer.started(100.6)  # late: the next one counts from now
    assert pacer.next_start == pytest.approx(100.85)
    pacer.started(200.0)  # after idle time: still one interval, no saved-up burst
    assert pacer.next_start == 200.25


def test_a_rate_limited_stage_spaces_its_starts() -> None:
    starts: list[float] = []
    lock = threading.Lock()

    def record(x: int) -> int:
        with lock:
            starts.append(time.monotonic())
        return x

    out = list(Pipeline(range(5)).map(record, workers=4, rate="10/s"))
    assert sorted(out) == list(range(5))
    starts.sort()
    # Four intervals of 0.1 s at least, between handing the first and the last item over;
    # half of it is left for a first start that a loaded machine delays.
    assert starts[-1] - starts[0] >= 0.2


# -- backpressure -------------------------------------------------------------------------


def test_an_endless_source_is_pulled_only_as_room_frees() -> None:
    pulled = [0]
    buffersize = 8
    stages = 3
    # Per stage: input buffer, taken chunk, pool window, batch being filled; plus the output
    # buffer and the consumer's chunk of it, each no larger than the last stage's buffer.
    bound = stages * (4 * buffersize + 2) + 2 * buffersize + 2
    consumed = 0
    most_ahead = 0
    p = Pipeline(_counting(itertools.count(), pulled))
    for _ in range(stages):
        p = p.map(lambda x: x + 1, workers=2, buffersize=buffersize)
    with p:
        for value in p:
            assert value == consumed + stages  # in order, none lost
            consumed += 1
            most_ahead = max(most_ahead, pulled[0] - consumed)
            if consumed == 5000:
                break
    assert 0 < most_ahead <= bound


def test_by_default_a_stage_reads_ahead_a_few_items_per_worker() -> None:
    # An endless source, two trivial stages and a consumer that takes its time: the source
    # is read ahead by a few items per worker, not by thousands.
    pulled = [0]
    workers = 2
    buffer = BUFFER_PER_WORKER * workers
    bound = 2 * (4 * buffer + 2) + 2 * buffer + 2
    consumed = 0
    most_ahead = 0
    p = (
        Pipeline(_counting(itertools.count(), pulled))
        .map(lambda x: x + 1, workers=workers)
        .map(lambda x: x * 2, workers=workers)
    )
    with p:
        for value in p:
            assert value == (consumed + 1) * 2
            consumed += 1
            most_ahead = max(most_ahead, pulled[0] - consumed)
            sum(range(2_000))  # the consumer's own work on each item
            if consumed == 3000:
                break
    assert 0 < most_ahead <= bound


def test_buffer_has_an_older_name() -> None:
    assert list(Pipeline(range(5)).map(abs, buffersize=2)) == list(range(5))
    with pytest.raises(TypeError, match="not both"):
        Pipeline(range(5)).map(abs, buffer=2, buffersize=2)


def test_a_slow_consumer_holds_every_stage_back() -> None:
    overflow = threading.Event()
    pulled = [0]
    # Two stages of input buffer, taken chunk, window and batch, the output buffer and the
    # consumer's chunk of it.
    bound = 2 * (4 * 4 + 2) + 2 * 4 + 2

    def source() -> Iterator[int]:
        for n in range(100_000):
            pulled[0] += 1
            if pulled[0] > bound:
                overflow.set()
            yield n

    p = Pipeline(source()).map(lambda x: x, buffersize=4).flat_map(lambda x: [x, x], buffersize=4)
    with p:
        out = iter(p)
        assert next(out) == 0
        # A correct pipeline never sets ``overflow``; waiting gives a wrong one time to.
        assert not overflow.wait(0.5)
        stats = p.statistics()
    assert 0 < pulled[0] <= bound
    assert all(s.queued <= 4 * 4 + 2 for s in stats)


def test_a_stage_hands_on_results_while_its_input_waits() -> None:
    """A source that waits for the consumer to see each item must not stall the stages."""
    seen: queue.Queue[int] = queue.Queue()
    timed_out: list[int] = []

    def feedback() -> Iterator[int]:
        for n in range(20):
            yield n
            try:
                seen.get(timeout=WAIT)
            except queue.Empty:
                timed_out.append(n)
                return

    p = (
        Pipeline(feedback())
        .map(lambda x: x * 2, workers=3)
        .filter(lambda x: x >= 0, workers=2, ordered=False)
        .flat_map(lambda x: [x], workers=2)
    )
    out = []
    with p:
        for x in p:
            out.append(x)
            seen.put(x)
    assert not timed_out
    assert out == [2 * n for n in range(20)]


# -- errors -------------------------------------------------------------------------------


def _raising_at(position: str, error: BaseException) -> Pipeline[int]:
    """A three-stage pipeline over an endless source that raises ``error`` at item 50."""

    def source() -> Iterator[int]:
        for n in itertools.count():
            if position == "source" and n == 50:
                raise error
            yield n

    def stage(name: str) -> Callable[[int], int]:
        def call(x: int) -> int:
            if name == position and x == 50:
                raise error
            return x

        return call

    return (
        Pipeline(source())
        .map(stage("first"), workers=2)
        .map(stage("middle"), workers=3, ordered=False)
        .map(stage("last"), workers=2)
    )


@pytest.mark.parametrize("position", ["source", "first", "middle", "last"])
def test_the_first_error_is_raised_as_itself_from_any_position(position: str) -> None:
    error = Boom(position)
    p = _raising_at(position, error)
    with pytest.raises(Boom) as caught, p:
        for _ in p:
            pass
    assert caught.value is error
    assert not _conveyor_threads()  # leaving the `with` block waited for every thread


def test_an_error_reaches_the_consumer_while_a_later_stage_is_still_busy() -> None:
    release = threading.Event()
    timed_out: list[bool] = []

    def later(x: int) -> int:
        if not release.wait(WAIT):
            timed_out.append(True)
        return x

    def fails_on_one(x: int) -> int:
        if x == 1:
            raise Boom(x)
        return x

    p = Pipeline(range(10)).map(fails_on_one).map(later)
    try:
        with pytest.raises(Boom):
            for _ in p:
                pass
        assert not timed_out  # the error came while later(0) still waited
    finally:
        release.set()
        p.close()


def test_an_error_cancels_pending_work() -> None:
    calls = [0]

    def count_then_fail(x: int) -> int:
        calls[0] += 1
        if x == 10:
            raise Boom(x)
        return x

    with pytest.raises(Boom), Pipeline(itertools.count()).map(count_then_fail, buffersize=64) as p:
        list(p)
    assert 10 < calls[0] <= 10 + 2 * 64


def test_collected_errors_flow_as_failed_records_that_later_stages_pass_on() -> None:
    later_saw: list[object] = []

    def half(x: int) -> float:
        if x % 3 == 0:
            raise ValueError(x)
        return x / 2

    def later(x: float) -> float:
        later_saw.append(x)
        return x + 1

    out = list(
        Pipeline(range(9), errors="collect")
        .map(half, workers=2, name="half")
        .map(later, workers=2)
        .filter(lambda x: x > 2)
    )
    failed = [o for o in out if isinstance(o, Failed)]
    assert [f.item for f in failed] == [0, 3, 6]
    assert all(f.stage == "half" and isinstance(f.exception, ValueError) for f in failed)
    assert [o for o in out if not isinstance(o, Failed)] == [x / 2 + 1 for x in (4, 5, 7, 8)]
    assert not any(isinstance(x, Failed) for x in later_saw)
    assert out[0] is failed[0]  # passed on in its place


def test_failed_is_a_small_frozen_record() -> None:
    record = Failed(1, ValueError("x"), "0:f")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.item = 2  # type: ignore[misc]
    assert (record.item, record.stage) == (1, "0:f")


def test_a_timed_out_call_becomes_a_failed_record() -> None:
    release = threading.Event()

    def stuck(x: int) -> int:
        if x == 1:
            release.wait(WAIT)
        return x

    p = Pipeline(range(3), errors="collect").map(stuck, workers=2, timeout=1.0)
    try:
        out = list(p)
    finally:
        release.set()
    assert out[0] == 0 and out[2] == 2
    assert isinstance(out[1], Failed) and isinstance(out[1].exception, TaskTimeout)
    assert p.statistics()[0].failures == 1


def test_retries_run_a_failing_call_again() -> None:
    attempts: dict[int, int] = {}
    lock = threading.Lock()

    def flaky(x: int) -> int:
        with lock:
            attempts[x] = attempts.get(x, 0) + 1
            first = attempts[x] == 1
        if first:
            raise Boom(x)
        return x

    assert list(Pipeline(range(5)).map(flaky, workers=2, retries=1)) == list(range(5))
    assert attempts == dict.fromkeys(range(5), 2)


def test_a_source_error_is_raised_after_the_items_before_it_when_collecting() -> None:
    error = Boom("source")

    def source() -> Iterator[int]:
        yield from range(5)
        raise error

    out: list[int] = []
    with pytest.raises(Boom) as caught:
        for x in Pipeline(source(), errors="collect").map(lambda x: x * 2):
            out.append(x)
    assert caught.value is error
    assert out == [0, 2, 4, 6, 8]


# -- stopping -----------------------------------------------------------------------------


def test_break_stops_every_stage() -> None:
    calls = [0]

    def count(x: int) -> int:
        calls[0] += 1
        return x

    p = Pipeline(itertools.count()).map(count, workers=4).map(count, workers=2, ordered=False)
    for x in p:
        if x > 100:
            break
    p.close()
    assert not _conveyor_threads()  # so no call can start any more
    assert calls[0] > 100


def test_an_exception_in_the_loop_body_stops_every_stage() -> None:
    p = Pipeline(itertools.count()).map(lambda x: x, workers=3)
    with pytest.raises(KeyError), p:
        for _ in p:
            raise KeyError("consumer")
    assert not _conveyor_threads()


def test_losing_the_iterator_stops_every_stage() -> None:
    p = Pipeline(itertools.count()).map(lambda x: x, workers=3).map(lambda x: x, workers=2)
    out = iter(p)
    assert next(out) == 0
    threads = _conveyor_threads()
    assert threads
    del out
    gc.collect()
    for thread in threads:
        thread.join(WAIT)
    assert not any(t.is_alive() for t in threads)


def test_a_never_started_iterator_stops_when_lost() -> None:
    p = Pipeline(itertools.count()).map(lambda x: x)
    out = iter(p)
    threads = _conveyor_threads()
    assert threads
    del out
    gc.collect()
    for thread in threads:
        thread.join(WAIT)
    assert not any(t.is_alive() for t in threads)


def test_close_in_the_loop_ends_the_iteration_with_an_error() -> None:
    p = Pipeline(itertools.count()).map(lambda x: x)
    out = iter(p)
    assert next(out) == 0
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        list(out)
    assert not _conveyor_threads()


# -- statistics ---------------------------------------------------------------------------


def test_statistics_are_immutable_snapshots_of_each_stage() -> None:
    release = threading.Event()
    both_running = threading.Barrier(3)
    timed_out: list[bool] = []

    def blocked(x: int) -> int:
        if x < 2:
            try:
                both_running.wait(WAIT)
            except threading.BrokenBarrierError:
                timed_out.append(True)
            release.wait(WAIT)
        return x

    p = Pipeline(range(40)).map(blocked, workers=2, name="blocked").filter(lambda x: x % 2)
    assert p.statistics()[0].items_in == 0  # before it runs
    with p:
        out = iter(p)
        both_running.wait(WAIT)
        during = p.statistics()
        release.set()
        rest = list(out)
    after = p.statistics()
    assert not timed_out
    assert during[0].busy == 2 and during[0].name == "blocked" and during[0].workers == 2
    assert during[0].queued >= 2 and during[0].items_out == 0
    assert rest == list(range(1, 40, 2))
    assert (after[0].items_in, after[0].items_out, after[0].queued) == (40, 40, 0)
    assert (after[1].items_in, after[1].items_out, after[1].failures) == (40, 20, 0)
    assert after[0].throughput > 0 and after[0].busy == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        after[0].busy = 1  # type: ignore[misc]
