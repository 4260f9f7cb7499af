"""Pools and pipelines awaited from async code: ``async with``, ``arun``, ``amap``,
``async for`` over a pipeline; the event loop is never blocked, cancellation reaches the call.

Responsiveness is shown without timing: a ticker task of the test's loop is what releases
the call being awaited, so a blocked loop would never let the call end.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from _process_funcs import Channel, identity, report_and_wait

import conveyor

WAIT = 60.0
BACKENDS = ["thread", "process", "asyncio"]


async def double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


async def count_up(n: int, pulled: list[int] | None = None) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0)
        if pulled is not None:
            pulled.append(i)
        yield i


@pytest.mark.parametrize("backend", BACKENDS)
def test_arun_and_amap_on_every_backend(backend: str) -> None:
    async def main() -> None:
        async with conveyor.Pool(backend, workers=2) as pool:
            assert await pool.arun(double, 21) == 42
            assert [y async for y in pool.amap(double, range(30))] == [2 * x for x in range(30)]
            unordered = [y async for y in pool.amap(double, count_up(30), ordered=False)]
            assert sorted(unordered) == [2 * x for x in range(30)]
            assert pool.statistics().completed == 61

    asyncio.run(main())


def test_arun_raises_the_call_s_exception() -> None:
    async def fail(x: int) -> int:
        raise KeyError(x)

    async def main() -> None:
        async with conveyor.Pool("asyncio") as pool:
            with pytest.raises(KeyError):
                await pool.arun(fail, 1)
        async with conveyor.Pool("thread") as pool:
            with pytest.raises(ZeroDivisionError):
                await pool.arun(divmod, 1, 0)

    asyncio.run(main())


def test_amap_raises_at_the_failing_position_after_the_results_before_it() -> None:
    async def invert(x: int) -> float:
        return 1 / x

    async def broken_source() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise OSError("source failed")

    async def main() -> None:
        async with conveyor.Pool("asyncio", workers=4) as pool:
            got: list[float] = []
            with pytest.raises(ZeroDivisionError):
                async for y in pool.amap(invert, [1, 2, 0, 4]):
                    got.append(y)
            assert got == [1.0, 0.5]
            got = []
            with pytest.raises(OSError, match="source failed"):
                async for y in pool.amap(invert, broken_source()):
                    got.append(y)
            assert got == [1.0, 0.5]

    asyncio.run(main())


def test_amap_is_lazy_and_bounded_over_an_endless_async_source() -> None:
    pulled: list[int] = []

    async def endless() -> AsyncIterator[int]:
        for i in itertools.count():
            pulled.append(i)
            yield i

    async def main() -> None:
        async with conveyor.Pool("asyncio", workers=4) as pool:
            results = pool.amap(double, endless(), buffersize=8)
            first = [await results.__anext__() for _ in range(20)]
            await results.aclose()
            assert first == [2 * x for x in range(20)]

    asyncio.run(main())
    # The window (8) and the read-ahead buffer (8) bound what was read past the 20 used.
    assert len(pulled) <= 20 + 8 + 8 + 1


def test_the_loop_keeps_ticking_while_a_process_call_runs(tmp_path: Path) -> None:
    started, release = Channel(tmp_path / "started"), Channel(tmp_path / "release")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1
            if ticks == 3:
                release.release(1)  # only a running loop lets the call end

    async def main() -> int:
        async with conveyor.Pool("process", workers=1) as pool:
            task = asyncio.create_task(ticker())
            try:
                return int(await pool.arun(report_and_wait, started.path, release.path, 7))
            finally:
                task.cancel()

    try:
        assert asyncio.run(main()) == 7
        assert ticks >= 3
    finally:
        started.close()
        release.close()


def test_leaving_async_with_waits_for_calls_without_blocking_the_loop(tmp_path: Path) -> None:
    started, release = Channel(tmp_path / "started"), Channel(tmp_path / "release")
    ticked = 0

    async def ticker() -> None:
        nonlocal ticked
        while True:
            await asyncio.sleep(0.05)
            ticked += 1
            if ticked == 3:
                release.release(1)

    async def main() -> object:
        task = asyncio.create_task(ticker())
        try:
            async with conveyor.Pool("thread", workers=1) as pool:
                future = pool.submit(report_and_wait, started.path, release.path, "done")
            # The pool waited for the call, which ended once the ticker released it.
            return future.result(timeout=0)
        finally:
            task.cancel()

    try:
        assert asyncio.run(main()) == "done"
        assert ticked >= 3
    finally:
        started.close()
        release.close()


def test_cancelling_the_awaiting_task_cancels_a_running_coroutine() -> None:
    stopped = threading.Event()
    running = asyncio.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def forever() -> None:
            loop.call_soon_threadsafe(running.set)
            try:
                await asyncio.Event().wait()
            finally:
                stopped.set()

        async with conveyor.Pool("asyncio", workers=1) as pool:
            task = asyncio.create_task(pool.arun(forever))
            await running.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await pool.arun(double, 2) == 4  # its place is free again

    asyncio.run(main())
    assert stopped.is_set()


def test_cancelling_the_awaiting_task_cancels_a_queued_process_call(tmp_path: Path) -> None:
    started, release = Channel(tmp_path / "started"), Channel(tmp_path / "release")

    async def main() -> None:
        async with conveyor.Pool("process", workers=1) as pool:
            first = asyncio.create_task(pool.arun(report_and_wait, started.path, release.path, 1))
            await asyncio.to_thread(started.read_line)
            queued = asyncio.create_task(pool.arun(identity, 2))
            await asyncio.sleep(0)  # one turn: the task runs up to its await, submitted
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            release.release(1)
            assert await first == 1
            stats = pool.statistics()
            assert stats.cancelled == 1 and stats.completed == 1

    try:
        asyncio.run(main())
    finally:
        started.close()
        release.close()


def test_arun_waits_for_room_at_max_pending_off_the_loop(tmp_path: Path) -> None:
    started, release = Channel(tmp_path / "started"), Channel(tmp_path / "release")

    async def main() -> list[object]:
        async with conveyor.Pool("thread", workers=1, max_pending=1) as pool:
            calls = [
                asyncio.create_task(pool.arun(report_and_wait, started.path, release.path, i))
                for i in range(8)
            ]
            await asyncio.to_thread(started.read_line)
            release.release(8)  # the loop is free: the release comes from it
            return list(await asyncio.gather(*calls))

    try:
        assert asyncio.run(main()) == list(range(8))
    finally:
        started.close()
        release.close()


def test_amap_refuses_bad_arguments() -> None:
    async def main() -> None:
        async with conveyor.Pool("asyncio") as pool:
            with pytest.raises(TypeError, match="async def"):
                pool.amap(abs, [1])
            with pytest.raises(TypeError, match="iterable"):
                pool.amap(double, 5)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="buffersize"):
                pool.amap(double, [1], buffersize=0)

    asyncio.run(main())
    with conveyor.Pool("asyncio") as pool:
        with pytest.raises(RuntimeError, match="running event loop"):
            pool.amap(double, [1])
        assert pool.statistics().submitted == 0


def test_a_pipeline_is_consumed_with_async_for() -> None:
    async def main() -> None:
        out = [y async for y in conveyor.Pipeline(range(20)).map(double, workers=5).map(str)]
        assert out == [str(2 * x) for x in range(20)]
        results = conveyor.Pipeline(itertools.count()).map(double, workers=3).__aiter__()
        assert [await results.__anext__() for _ in range(5)] == [0, 2, 4, 6, 8]
        await results.aclose()  # stops every stage: no thread is left (see conftest)

    asyncio.run(main())


SCRIPT = """\
import asyncio, sys
sys.path.insert(0, {tests!r})
import conveyor
from _process_funcs import report_and_hang

async def main(started):
    async with conveyor.Pool("process", workers=2) as pool:
        await pool.arun(report_and_hang, started)

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
"""


def test_ctrl_c_ends_an_asyncio_program_using_a_process_pool(tmp_path: Path) -> None:
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    started = Channel(tmp_path / "started")
    child = subprocess.Popen(
        [sys.executable, str(script), started.path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        worker = int(started.read_line())  # the call runs: its worker told us its pid
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=WAIT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        started.close()
    assert child.returncode != 0
    assert "KeyboardInterrupt" in err, err
    try:
        psutil.Process(worker).wait(timeout=WAIT)
    except psutil.NoSuchProcess:
        pass
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie"


def test_import_conveyor_does_not_import_asyncio() -> None:
    code = "import sys, conveyor; print('asyncio' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=True
    )
    assert done.stdout.strip() == "False"
    assert os.path.exists(conveyor.__file__)


def test_the_event_loop_thread_never_helps_the_process_backend(tmp_path: Path) -> None:
    started, release = Channel(tmp_path / "started"), Channel(tmp_path / "release")
    helpers: list[int] = []

    async def let_go() -> None:
        await asyncio.to_thread(started.read_line)
        release.release(1)

    async def main() -> int:
        async with conveyor.Pool("process", workers=2) as pool:
            original = pool._backend.help

            def recording_help(future: object, timeout: float | None) -> None:
                helpers.append(threading.get_ident())
                original(future, timeout)  # type: ignore[arg-type]

            pool._backend.help = recording_help  # type: ignore[method-assign]
            results = [await pool.arun(identity, i) for i in range(20)]
            results += [y async for y in pool.amap(identity, range(20))]
            # A plain thread waiting with result() is offered to help: the recorder works.
            future = pool.submit(report_and_wait, started.path, release.path, 0)
            await asyncio.gather(asyncio.to_thread(future.result, WAIT), let_go())
            assert results == list(range(20)) * 2
            return threading.get_ident()

    try:
        loop_thread = asyncio.run(main())
    finally:
        started.close()
        release.close()
    assert helpers and loop_thread not in helpers
