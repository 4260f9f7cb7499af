"""Short jobs queued for a worker travel together: one message out, one back (``_schedule``
``_send``, ``_worker._run_many``); a job of steady length gets the next one queued behind it
just before it ends (``_schedule._prefetch_at``). Every call still has exactly one outcome, in
its own future, and a fault fails only the call that was running.

The tests count the messages of several jobs the pool sends (a spy on ``_worker.bundle``, in
the pool's process), so that a test of faults inside them cannot pass without any."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _process_funcs as funcs
import pytest

import conveyor
from conveyor._backends import _schedule, _worker

CALLS = 600


@pytest.fixture
def bundles(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The number of jobs in each message of several jobs sent to a worker."""
    sizes: list[int] = []
    lock = threading.Lock()
    original = _worker.bundle

    def spy(messages: Any, kind: int = _worker.MANY) -> bytes:
        if kind == _worker.RUN_MANY:
            with lock:
                sizes.append(len(messages))
        return original(messages, kind)

    monkeypatch.setattr(_worker, "bundle", spy)
    yield sizes


def _measured(pool: conveyor.Pool, fn: Any, *args: Any) -> None:
    """Run a few calls of ``fn`` first: only calls measured to be short travel together."""
    for future in [pool.submit(fn, *args) for _ in range(8)]:
        future.result(timeout=funcs.WAIT)


def test_bundle_and_unbundle_keep_every_message_whole() -> None:
    parts = [b"", b"a", bytes(range(256)) * 3]
    packed = _worker.bundle(parts, _worker.RUN_MANY)
    assert packed[0] == _worker.RUN_MANY
    assert [bytes(part) for part in _worker.unbundle(memoryview(packed)[1:])] == parts
    assert _worker.bundle([b"alone"]) == b"alone"  # one outcome message goes as itself


def test_many_submits_travel_together_and_each_future_gets_its_own_result(
    bundles: list[int],
) -> None:
    with conveyor.Pool("process", 2) as pool:
        _measured(pool, funcs.double, 1)
        futures = [pool.submit(funcs.double, i) for i in range(CALLS)]
        assert [f.result(timeout=funcs.WAIT) for f in futures] == [2 * i for i in range(CALLS)]
        assert pool.statistics().completed == CALLS + 8
    assert max(bundles, default=0) > 1


def test_errors_inside_a_message_reach_their_own_calls(bundles: list[int]) -> None:
    with conveyor.Pool("process", 2) as pool:
        _measured(pool, funcs.raise_on, 0, -1)
        futures = [pool.submit(funcs.raise_on, i, i if i % 3 == 0 else -1) for i in range(CALLS)]
        for i, future in enumerate(futures):
            if i % 3 == 0:
                with pytest.raises(funcs.Boom, match=f"boom {i}$"):
                    future.result(timeout=funcs.WAIT)
            else:
                assert future.result(timeout=funcs.WAIT) == i
    assert max(bundles, default=0) > 1


def test_jobs_a_dead_worker_hands_back_are_not_pickled_again(
    bundles: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    requeued = []
    original = _schedule.Scheduling._requeue

    def spy(self: _schedule.Scheduling, job: Any) -> None:
        requeued.append(len(job.indexes) - job.received)
        original(self, job)

    monkeypatch.setattr(_schedule.Scheduling, "_requeue", spy)
    bad = CALLS // 2
    with conveyor.Pool("process", 2) as pool:
        _measured(pool, funcs.exit_on, 0, -1)
        funcs.PickleCounted.pickled = 0
        futures = [pool.submit(funcs.exit_on, funcs.PickleCounted(i), bad) for i in range(CALLS)]
        for i, future in enumerate(futures):
            if i == bad:
                assert isinstance(future.exception(timeout=funcs.WAIT), conveyor.WorkerCrashed)
            else:
                assert future.result(timeout=funcs.WAIT) == i
    assert max(bundles, default=0) > 1
    # The dead worker had calls queued behind the fatal one (else this shows nothing): they
    # ran elsewhere, sent as they were first packed. Only a job that is the first of its
    # function to a worker that does not know it yet (the replacement) is packed again.
    assert sum(requeued) > 1
    assert funcs.PickleCounted.pickled <= CALLS + 2, (funcs.PickleCounted.pickled, requeued)


@pytest.mark.parametrize("how", ["exit", "sigkill", "segfault"])
def test_a_crash_inside_a_message_fails_only_the_call_that_was_running(
    bundles: list[int], how: str, tmp_path: Path
) -> None:
    bad = CALLS // 2
    runs = tmp_path / "runs"
    with conveyor.Pool("process", 2) as pool:
        _measured(pool, funcs.crash_on_noting, 0, -1, how, str(runs))
        futures = [pool.submit(funcs.crash_on_noting, i, bad, how, str(runs)) for i in range(CALLS)]
        outcomes: Counter[str] = Counter()
        for i, future in enumerate(futures):
            error = future.exception(timeout=funcs.WAIT)
            if i == bad:
                assert isinstance(error, conveyor.WorkerCrashed)
            else:
                assert error is None, (i, error)
                assert future.result() == i
            outcomes["crashed" if error else "ok"] += 1
        assert outcomes == {"ok": CALLS - 1, "crashed": 1}
        # The pool knew which call killed the worker: it did not run it again to find out.
        assert runs.read_text() == f"{bad}\n"
        # The pool goes on, with a new worker.
        assert pool.submit(funcs.double, 21).result(timeout=funcs.WAIT) == 42
    assert max(bundles, default=0) > 1


def test_an_unpicklable_argument_inside_a_message_fails_only_its_call(
    bundles: list[int],
) -> None:
    with conveyor.Pool("process", 2) as pool:
        _measured(pool, funcs.identity, 0)
        lock = threading.Lock()
        values: list[Any] = list(range(CALLS))
        values[CALLS // 2] = lock
        futures = [pool.submit(funcs.identity, value) for value in values]
        for i, future in enumerate(futures):
            if i == CALLS // 2:
                with pytest.raises(conveyor.PicklingFailed):
                    future.result(timeout=funcs.WAIT)
            else:
                assert future.result(timeout=funcs.WAIT) == i
    assert max(bundles, default=0) > 1


def test_max_tasks_per_worker_counts_every_call_of_a_message(bundles: list[int]) -> None:
    with conveyor.Pool("process", 2, max_tasks_per_worker=25) as pool:
        _measured(pool, funcs.pid, 0)
        futures = [pool.submit(funcs.pid, i) for i in range(CALLS)]
        per_worker = Counter(f.result(timeout=funcs.WAIT) for f in futures)
    assert max(per_worker.values()) <= 25
    assert sum(per_worker.values()) == CALLS


def test_a_map_of_single_calls_keeps_its_order(bundles: list[int]) -> None:
    with conveyor.Pool("process", 2) as pool:
        results = list(pool.map(funcs.double, range(3 * CALLS), chunksize=1))
    assert results == [2 * i for i in range(3 * CALLS)]
    assert max(bundles, default=0) > 1


def test_a_crash_while_the_next_job_waits_behind_it_runs_that_job_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    queued_ahead = []
    original = _schedule.Scheduling._prefetch_now

    def spy(self: _schedule.Scheduling, proc: Any) -> bool:
        due = original(self, proc)
        if due:
            queued_ahead.append(proc)
        return due

    monkeypatch.setattr(_schedule.Scheduling, "_prefetch_now", spy)
    runs = tmp_path / "runs"
    calls, bad = 80, 60
    with conveyor.Pool("process", 2) as pool:
        futures = [pool.submit(funcs.nap_noting_or_exit, i, bad, str(runs)) for i in range(calls)]
        for i, future in enumerate(futures):
            error = future.exception(timeout=funcs.WAIT)
            if i == bad:
                assert isinstance(error, conveyor.WorkerCrashed)
            else:
                assert error is None and future.result() == i
    # Each call ran once: the job queued behind the crashed one had not begun.
    assert sorted(int(line) for line in runs.read_text().split()) == list(range(calls))
    assert queued_ahead


def test_a_map_sends_each_chunk_whole_to_one_worker_and_spreads_the_chunks() -> None:
    chunk = 10
    with conveyor.Pool("process", 2) as pool:
        list(pool.map(funcs.pid, range(200), chunksize=chunk))  # measured: batches grow
        pids = list(pool.map(funcs.pid, range(4000), chunksize=chunk))
        seconds = list(pool.map(funcs.sleep_then_pid, [0.01] * 40, chunksize=1))
    chunks = [set(pids[i : i + chunk]) for i in range(0, len(pids), chunk)]
    assert all(len(workers) == 1 for workers in chunks)
    assert len(set(seconds)) == 2  # calls of 10 ms: both workers took some
