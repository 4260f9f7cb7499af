"""The asyncio backend through the ordinary Pool API, async pipeline stages and the CLI.

Calls are real coroutines (``asyncio.sleep``, events of the pool's own loop). A call tells
the test that it runs through a ``threading.Event``; nothing waits by sleeping.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest

import conveyor
from conveyor import TaskTimeout

WAIT = 60.0


async def double(x: int) -> int:
    await asyncio.sleep(0.001)
    return 2 * x


class Gate:
    """Holds calls until ``size`` of them run at once, recording the most seen at once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.running = 0
        self.peak = 0
        self.opened: asyncio.Event | None = None  # made on the pool's loop

    async def __call__(self, x: int) -> int:
        if self.opened is None:
            self.opened = asyncio.Event()
        self.running += 1
        self.peak = max(self.peak, self.running)
        if self.running == self.size:
            self.opened.set()
        await self.opened.wait()
        await asyncio.sleep(0)
        self.running -= 1
        return x


def test_map_runs_workers_calls_at_once_and_keeps_input_order() -> None:
    gate = Gate(8)
    with conveyor.Pool("asyncio", workers=8) as pool:
        assert list(pool.map(gate, range(100))) == list(range(100))
        assert sorted(pool.imap_unordered(double, range(50))) == [2 * x for x in range(50)]
        stats = pool.statistics()
    # The gate opens only once 8 calls wait on it together: fewer would hang.
    assert gate.peak == 8
    assert stats.completed == 150 and stats.failed == 0 and stats.submitted == 150


def test_submit_returns_a_concurrent_future_that_wrap_future_accepts() -> None:
    with conveyor.Pool("asyncio", workers=4) as pool:
        future = pool.submit(double, 21)
        assert future.result(timeout=WAIT) == 42

        async def main() -> int:
            return await asyncio.wrap_future(pool.submit(double, 5))

        assert asyncio.run(main()) == 10


def test_a_plain_function_is_refused_with_the_fix() -> None:
    with conveyor.Pool("asyncio") as pool:
        with pytest.raises(TypeError, match=r"async def.*backend='thread'"):
            pool.submit(len, "abc")
        with pytest.raises(TypeError, match="coroutine functions"):
            pool.map(abs, [1])
        assert pool.statistics().submitted == 0


def test_a_timeout_cancels_the_coroutine_and_fails_only_its_call() -> None:
    stopped = threading.Event()

    async def slow_or_fast(x: int) -> int:
        if x == 3:
            try:
                await asyncio.Event().wait()  # never set
            finally:
                stopped.set()
        return x

    with conveyor.Pool("asyncio", workers=4, timeout=0.2) as pool:
        futures = [pool.submit(slow_or_fast, x) for x in range(6)]
        with pytest.raises(TaskTimeout, match=r"timeout of 0\.2 s"):
            futures[3].result(timeout=WAIT)
        assert [f.result(timeout=WAIT) for i, f in enumerate(futures) if i != 3] == [0, 1, 2, 4, 5]
        stats = pool.statistics()
    assert stopped.is_set()  # a real stop: the coroutine's finally ran
    assert stats.timed_out == 1 and stats.failed == 1 and stats.completed == 5


def test_retries_run_a_failing_coroutine_again() -> None:
    attempts: dict[int, int] = {}

    async def flaky(x: int) -> int:
        attempts[x] = attempts.get(x, 0) + 1
        if attempts[x] == 1:
            raise ConnectionError(f"first try of {x}")
        return x

    with conveyor.Pool("asyncio", workers=3, retries=1, retry_on=ConnectionError) as pool:
        assert list(pool.map(flaky, range(5))) == list(range(5))
        assert pool.statistics().retried == 5
    assert attempts == dict.fromkeys(range(5), 2)


def test_cancel_of_a_running_call_cancels_its_task() -> None:
    running = threading.Event()
    stopped = threading.Event()

    async def forever() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    with conveyor.Pool("asyncio", workers=1) as pool:
        future = pool.submit(forever)
        queued = pool.submit(double, 1)
        assert running.wait(WAIT)
        assert queued.cancel() and queued.cancelled()  # not started: the stdlib's cancel
        assert future.cancel()  # running: its task is cancelled
        with pytest.raises(CancelledError):
            future.result(timeout=WAIT)
    assert stopped.is_set()


def test_terminate_cancels_running_coroutines_and_tasks_they_left() -> None:
    running = threading.Event()
    stopped: list[str] = []

    async def orphan() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append("orphan")

    async def spawn_and_wait() -> None:
        asyncio.get_running_loop().create_task(orphan())
        running.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append("call")

    pool = conveyor.Pool("asyncio", workers=2)
    future = pool.submit(spawn_and_wait)
    assert running.wait(WAIT)
    pool.terminate()
    assert future.done() and not future.cancelled()
    assert sorted(stopped) == ["call", "orphan"]


def test_a_done_callback_may_wait_for_another_call_of_the_same_pool() -> None:
    seen: list[int] = []
    ended = threading.Event()

    with conveyor.Pool("asyncio", workers=2) as pool:

        def callback(_: Any) -> None:
            # Batches end on completer threads, not on the loop: this wait can end.
            seen.append(pool.submit(double, 2).result(timeout=WAIT))
            ended.set()

        pool.submit(double, 1).add_done_callback(callback)
        assert ended.wait(WAIT)
    assert seen == [4]


def test_a_call_that_blocks_on_its_own_pool_is_refused_not_hung() -> None:
    with conveyor.Pool("asyncio", workers=2) as pool:

        async def wait_for_sibling() -> Any:
            return pool.submit(double, 1).result(timeout=WAIT)  # would block the loop

        async def await_sibling() -> Any:
            return await pool.arun(double, 3)  # the right way

        with pytest.raises(RuntimeError, match="would wait for ever"):
            pool.submit(wait_for_sibling).result(timeout=WAIT)
        assert pool.submit(await_sibling).result(timeout=WAIT) == 6


def test_coroutine_functions_run_on_their_own_loop_on_the_thread_backend() -> None:
    async def where(_: int) -> str:
        await asyncio.sleep(0)
        asyncio.get_running_loop()  # raises outside a running loop
        return threading.current_thread().name

    with conveyor.Pool("thread", workers=2) as pool:
        names = list(pool.map(where, range(4)))
        assert pool.submit(double, 4).result(timeout=WAIT) == 8
    assert all(name.startswith("conveyor-thread") for name in names)


def test_coroutine_functions_run_on_the_process_backend() -> None:
    with conveyor.Pool("process", workers=2) as pool:
        assert list(pool.map(double, range(5))) == [0, 2, 4, 6, 8]


def test_progress_and_initializer_work_on_the_asyncio_backend(
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen: list[int] = []

    async def setup() -> None:
        seen.append(threading.get_ident())

    with conveyor.Pool("asyncio", workers=5, initializer=setup) as pool:
        assert list(pool.map(double, range(20), progress=True)) == [2 * x for x in range(20)]
    assert len(seen) == 1


# -- pipelines --------------------------------------------------------------------------------


async def add_one(x: int) -> int:
    await asyncio.sleep(0)
    return x + 1


async def keep_even(x: int) -> bool:
    return x % 2 == 0


async def twice(x: int) -> Any:
    for _ in range(2):
        await asyncio.sleep(0)
        yield x


def test_async_stages_run_beside_thread_stages() -> None:
    p = (
        conveyor.Pipeline(range(40))
        .map(add_one, workers=20, rate="2000/s")
        .filter(keep_even, workers=5)
        .flat_map(twice, workers=5)
        .map(str, workers=2)
    )
    out = list(p)
    expected = [str(x) for x in range(1, 41) if x % 2 == 0 for _ in range(2)]
    assert out == expected
    stats = p.statistics()
    assert [s.workers for s in stats] == [20, 5, 5, 2]
    assert stats[0].items_out == 40


def test_an_async_stage_on_the_process_backend_runs_each_item_on_its_own_loop() -> None:
    out = list(conveyor.Pipeline(range(6)).map(double, backend="process", workers=2))
    assert out == [0, 2, 4, 6, 8, 10]


def test_a_plain_function_cannot_be_an_asyncio_stage() -> None:
    with pytest.raises(TypeError, match="async def"):
        conveyor.Pipeline(range(3)).map(abs, backend="asyncio")


def test_errors_collect_in_an_async_stage() -> None:
    async def invert(x: int) -> float:
        return 1 / x

    out = list(conveyor.Pipeline([1, 0, 2], errors="collect").map(invert, workers=3))
    assert out[0] == 1.0 and out[2] == 0.5
    assert isinstance(out[1], conveyor.Failed)
    assert isinstance(out[1].exception, ZeroDivisionError)


# -- the command line -------------------------------------------------------------------------


MODULE = """\
import asyncio
import threading

async def where(line):
    return threading.current_thread().name

async def shout(line):
    await asyncio.sleep(0.001)
    if line == "bad":
        raise ValueError("bad line")
    return line.upper()

def plain(line):
    return line
"""


def _conveyor(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor", "run", *args],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


def test_the_cli_runs_a_coroutine_function_on_the_asyncio_backend(tmp_path: Path) -> None:
    (tmp_path / "amod.py").write_text(MODULE)
    words = [f"w{i}" for i in range(200)] + ["bad"]
    (tmp_path / "in.txt").write_text("".join(f"{w}\n" for w in words))
    done = _conveyor(tmp_path, "amod:shout", "in.txt", "-j", "50")
    assert done.returncode == 1, done.stderr  # one input failed
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["input"] for line in lines] == words
    assert [line["output"] for line in lines[:-1]] == [w.upper() for w in words[:-1]]
    assert lines[-1]["error"]["type"] == "ValueError"
    assert "bad line" in lines[-1]["error"]["traceback"]
    done = _conveyor(tmp_path, "amod:where", "in.txt", "-j", "3")
    assert json.loads(done.stdout.splitlines()[0])["output"].startswith("conveyor-asyncio")


def test_the_cli_refuses_a_plain_function_on_asyncio(tmp_path: Path) -> None:
    (tmp_path / "amod.py").write_text(MODULE)
    (tmp_path / "in.txt").write_text("a\n")
    done = _conveyor(tmp_path, "amod:plain", "in.txt", "-b", "asyncio")
    assert done.returncode == 2
    assert "async def" in done.stderr and done.stdout == ""
    # A coroutine function on the process backend runs each call on a loop of its own.
    done = _conveyor(tmp_path, "amod:shout", "in.txt", "-b", "process", "-j", "1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == "A"


def test_map_over_an_endless_generator_is_lazy_and_bounded() -> None:
    pulled = 0

    def endless() -> Any:
        nonlocal pulled
        while True:
            pulled += 1
            yield pulled

    with conveyor.Pool("asyncio", workers=4) as pool:
        results = pool.map(double, endless(), buffersize=16)
        assert [next(results) for _ in range(50)] == [2 * x for x in range(1, 51)]
        results.close()  # type: ignore[attr-defined]
        assert pool.statistics().cancelled <= 16
    assert pulled <= 50 + 16
