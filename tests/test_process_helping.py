"""The thread that waits for a future may run the process pool's dispatcher meanwhile.

When the pool is idle its dispatcher thread parks; a call submitted then is sent by the
submitting thread, and its outcome read by the thread that waits for it. These tests check
that this happens, and that everything still ends exactly once around it: other threads'
calls, timeouts of the wait, crashes, Ctrl-C in the main thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import _process_funcs as funcs
import psutil
import pytest
from _process_funcs import WAIT, Channel, read_line

import conveyor


def _finisher(future: cf.Future[object], seen: list[str]) -> None:
    seen.append(threading.current_thread().name)


def _work_of_its_own() -> int:
    """What a caller does between two calls (a millisecond or so of CPU). Calls that follow
    each other at once can keep the dispatcher thread awake, doing every call itself: it
    reads one answer before its next call comes, and never parks in between. Whether it
    parks depends on how fast this Python runs, compared with the worker."""
    return sum(range(20_000))


def test_the_waiting_thread_reads_its_calls_outcome() -> None:
    seen: list[str] = []
    with conveyor.Pool("process", 2) as pool:
        assert pool.submit(funcs.double, 1).result(WAIT) == 2  # workers started
        for x in range(40):
            _work_of_its_own()
            future = pool.submit(funcs.double, x)
            future.add_done_callback(lambda f: _finisher(f, seen))
            assert future.result(WAIT) == 2 * x
            assert type(future) is cf.Future
    # A future's done callbacks run on the thread that completed it. The dispatcher thread
    # may still take a call now and then (a race it is allowed to win), not all of them.
    assert threading.current_thread().name in seen, seen


def test_apply_async_get_reads_its_calls_outcome_too() -> None:
    seen: list[str] = []
    with conveyor.Pool("process", 2) as pool:
        assert pool.apply(funcs.double, (1,)) == 2  # workers started
        for x in range(40):
            _work_of_its_own()
            outcome = pool.apply_async(
                funcs.double, (x,), callback=lambda _: seen.append(threading.current_thread().name)
            )
            assert outcome.get(WAIT) == 2 * x
            assert outcome.ready() and outcome.successful()
    assert len(seen) == 40  # get() returned after each call's callback, never before
    assert threading.current_thread().name in seen, seen


def test_a_wait_that_times_out_leaves_the_call_running(started: Channel, release: Channel) -> None:
    with conveyor.Pool("process", 2) as pool:
        slow = pool.submit(funcs.report_and_wait, started.path, release.path, "done")
        started.read_line()
        with pytest.raises(cf.TimeoutError):
            slow.result(timeout=0.05)
        # The pool goes on meanwhile, on its other worker.
        assert [pool.submit(funcs.double, x).result(WAIT) for x in range(20)] == [
            2 * x for x in range(20)
        ]
        release.release(1)
        assert slow.result(WAIT) == "done"


def test_waits_that_time_out_again_and_again_leave_nothing_behind(
    started: Channel, release: Channel
) -> None:
    with conveyor.Pool("process", 2) as pool:
        slow = pool.submit(funcs.report_and_wait, started.path, release.path, "done")
        started.read_line()
        callbacks = len(slow._done_callbacks)  # type: ignore[attr-defined]
        for _ in range(200):
            with pytest.raises(cf.TimeoutError):
                slow.result(timeout=0.001)
        # A waiting thread that runs the pool is woken by a callback on the future; a wait
        # that keeps timing out (a loop polling a long call) must not add one each time.
        assert len(slow._done_callbacks) <= callbacks + 1  # type: ignore[attr-defined]
        release.release(1)
        assert slow.result(WAIT) == "done"


def test_calls_of_other_threads_go_on_while_one_thread_waits(
    started: Channel, release: Channel
) -> None:
    with conveyor.Pool("process", 2) as pool:
        assert pool.submit(funcs.double, 1).result(WAIT) == 2
        slow = pool.submit(funcs.report_and_wait, started.path, release.path, "slow")
        started.read_line()
        results: list[int] = []
        finished = threading.Event()

        def other() -> None:
            results.extend(pool.submit(funcs.double, x).result(WAIT) for x in range(30))
            results.extend(pool.map(funcs.double, range(100)))
            finished.set()

        thread = threading.Thread(target=other)
        waiter = threading.Thread(target=lambda: slow.exception(WAIT))
        waiter.start()  # this thread waits for (and may be running the pool for) slow
        thread.start()
        assert finished.wait(WAIT), "calls of another thread stalled behind a waiting thread"
        assert results == [2 * x for x in range(30)] + [2 * x for x in range(100)]
        release.release(1)
        assert slow.result(WAIT) == "slow"
        thread.join(WAIT)
        waiter.join(WAIT)


def test_a_crash_while_the_waiting_thread_runs_the_pool_fails_only_that_call() -> None:
    with conveyor.Pool("process", 2) as pool:
        assert pool.submit(funcs.double, 1).result(WAIT) == 2
        for _ in range(3):
            error = pool.submit(funcs.exit_now, 5).exception(WAIT)
            assert isinstance(error, conveyor.WorkerCrashed), error
            assert error.exitcode == 5
            assert pool.submit(funcs.double, 4).result(WAIT) == 8


def test_fire_and_forget_calls_end_without_anyone_waiting_for_them() -> None:
    with conveyor.Pool("process", 2) as pool:
        assert pool.submit(funcs.double, 1).result(WAIT) == 2
        futures = [pool.submit(funcs.double, x) for x in range(50)]
        done, not_done = cf.wait(futures, timeout=WAIT)
        assert not not_done
        assert sorted(f.result() for f in done) == [2 * x for x in range(50)]


_CTRL_C_SCRIPT = textwrap.dedent(
    """
    import signal, sys, threading
    from pathlib import Path
    import conveyor
    sys.path.insert(0, sys.argv[1])
    import _process_funcs as funcs

    # As in a terminal, whatever this was started from (a shell's background job ignores it).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    started, release = funcs.Channel(Path("started")), funcs.Channel(Path("release"))
    with conveyor.Pool("process", 2) as pool:
        assert pool.submit(funcs.double, 1).result(60) == 2
        slow = pool.submit(funcs.report_and_wait, started.path, release.path, "slow")

        waiting = threading.Event()

        def interrupt():
            started.read_line()  # the call runs
            waiting.wait(60)  # and the main thread is in the try block below
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        threading.Thread(target=interrupt, daemon=True).start()
        try:
            waiting.set()
            slow.result(60)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        print(pool.submit(funcs.double, 21).result(60), flush=True)
        release.release(1)
        print(slow.result(60), flush=True)
    """
)


def test_ctrl_c_while_the_main_thread_waits_interrupts_the_wait_only(tmp_path: Path) -> None:
    tests = str(Path(__file__).parent)
    child = subprocess.Popen(
        [sys.executable, "-c", _CTRL_C_SCRIPT, tests],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        assert child.stdout is not None
        lines = [read_line(child.stdout, WAIT).strip() for _ in range(3)]
        assert lines == ["interrupted", "42", "slow"], (lines, child.stderr)
        assert child.wait(WAIT) == 0
    finally:
        child.kill()
        child.wait(WAIT)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def test_shutdown_in_a_done_callback_does_not_wait_for_itself() -> None:
    pool = conveyor.Pool("process", 2)
    try:
        assert pool.submit(funcs.double, 1).result(WAIT) == 2
        for x in range(5):
            future = pool.submit(funcs.double, x)
            if x == 4:
                # It may run on this thread, which may be running the pool's loop.
                future.add_done_callback(lambda f: pool.shutdown())
            assert future.result(WAIT) == 2 * x
    finally:
        pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(funcs.double, 1)


_WAITS = {
    "result": lambda pool: pool.submit(funcs.double, 3).result(WAIT),
    "apply_async": lambda pool: pool.apply_async(funcs.double, (3,)).get(WAIT),
    "map": lambda pool: list(pool.map(funcs.double, range(3), timeout=WAIT)),
    "shutdown": lambda pool: pool.shutdown(),
}


@pytest.mark.parametrize("wait", sorted(_WAITS))
def test_a_done_callback_that_waits_for_the_same_pool_is_served(
    wait: str, started: Channel, release: Channel
) -> None:
    # Done callbacks never run on a thread while it holds the pool's loop (the dispatcher
    # thread, or the thread that waits): they run after it lets go, or on a thread of the
    # pool's own. So a callback may wait for the same pool, and its wait ends.
    outcome: list[BaseException | None] = []
    called = threading.Event()

    def callback(_: cf.Future[object]) -> None:
        try:
            _WAITS[wait](pool)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        called.set()

    with conveyor.Pool("process", 2) as pool:
        first = pool.submit(funcs.report_and_wait, started.path, release.path, "first")
        started.read_line()
        first.add_done_callback(callback)  # added while the call runs
        release.release(1)
        assert first.result(WAIT) == "first"
        assert called.wait(WAIT)
        assert outcome == [None]
        if wait == "shutdown":
            with pytest.raises(RuntimeError, match="after shutdown"):
                pool.submit(funcs.double, 4)
        else:
            assert pool.submit(funcs.double, 4).result(WAIT) == 8


class _WatchedPoller:
    """A pool's poller that reports when ``thread`` is about to block in it."""

    def __init__(self, poller: Any, thread: threading.Thread, blocking: threading.Event) -> None:
        self._poller = poller
        self._thread = thread
        self._blocking = blocking

    def poll(self, *timeout: Any) -> Any:
        if threading.current_thread() is self._thread and timeout[:1] != (0,):
            self._blocking.set()
        return self._poller.poll(*timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)


def _end_the_future(how: str, pool: conveyor.Pool, future: cf.Future[object]) -> None:
    if how == "cancel":
        assert future.cancel()
    else:
        pool.shutdown(wait=False, cancel_futures=True)


@pytest.mark.parametrize("how", ["cancel", "shutdown"])
def test_a_waiting_thread_running_the_pool_sees_its_future_cancelled_elsewhere(
    how: str, started: Channel, release: Channel
) -> None:
    pool = conveyor.Pool("process", 1)
    try:
        backend: Any = pool._backend
        # Helping or not (it helps unless the dispatcher thread happens to be awake), the
        # waiting thread comes to a point where the cancel must reach it.
        ready = threading.Event()
        offered = backend.help

        def help(future: cf.Future[object], timeout: float | None) -> None:
            offered(future, timeout)
            ready.set()  # it could not help, or stopped helping

        backend.help = help
        assert pool.submit(funcs.double, 1).result(WAIT) == 2
        slow = pool.submit(funcs.report_and_wait, started.path, release.path, "slow")
        started.read_line()  # the only worker is busy
        queued = pool.submit(funcs.double, 2)  # so this waits in the pool's queue
        outcome: list[object] = []

        def wait() -> None:
            try:
                outcome.append(queued.result(WAIT))
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        backend._crew.poller = _WatchedPoller(backend._crew.poller, waiter, ready)
        waiter.start()
        assert ready.wait(WAIT)
        _end_the_future(how, pool, queued)
        waiter.join(WAIT)
        assert not waiter.is_alive(), "the waiting thread did not see its future cancelled"
        assert len(outcome) == 1 and isinstance(outcome[0], cf.CancelledError), outcome
        release.release(1)
        assert slow.result(WAIT) == "slow"
    finally:
        release.release(1)
        pool.shutdown()


def _use_from_the_main_thread(pool: conveyor.Pool) -> None:
    """Calls waited for by the main thread, which takes the dispatcher role for many."""
    assert threading.current_thread() is threading.main_thread()
    for x in range(20):
        _work_of_its_own()
        assert pool.submit(funcs.double, x).result(WAIT) == 2 * x
    assert list(pool.map(funcs.double, range(50), timeout=WAIT)) == [2 * x for x in range(50)]


def _own_handler(signum: int, frame: object) -> None:
    raise AssertionError("not called in this test")


@pytest.mark.parametrize("handler", ["default", "own"])
def test_a_process_pool_leaves_the_sigint_handler_alone(handler: str) -> None:
    # asyncio.run, for one, takes Ctrl-C over only from Python's default handler.
    wanted: Any = signal.default_int_handler if handler == "default" else _own_handler
    previous = signal.signal(signal.SIGINT, wanted)
    try:
        with conveyor.Pool("process", 2) as pool:
            _use_from_the_main_thread(pool)
            assert signal.getsignal(signal.SIGINT) is wanted
            _use_from_the_main_thread(pool)
        assert signal.getsignal(signal.SIGINT) is wanted
    finally:
        signal.signal(signal.SIGINT, previous)


_ASYNCIO_CTRL_C_SCRIPT = textwrap.dedent(
    """
    import asyncio, signal, sys
    from pathlib import Path
    import conveyor
    sys.path.insert(0, sys.argv[1])
    import _process_funcs as funcs

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    started, release = sys.argv[2], sys.argv[3]

    async def main(pool):
        handler = signal.getsignal(signal.SIGINT)
        print(getattr(getattr(handler, "func", None), "__name__", repr(handler)), flush=True)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(pool, funcs.report_and_wait, started, release, "slow")
        except asyncio.CancelledError:
            print("cancelled", flush=True)
            raise

    pool = conveyor.Pool("process", 2)
    for x in range(20):  # the main thread used the pool (and took its role for some calls)
        sum(range(20_000))
        assert pool.submit(funcs.double, x).result(60) == 2 * x
    try:
        asyncio.run(main(pool))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        pool.terminate()
    """
)


def test_ctrl_c_reaches_asyncio_in_a_program_that_used_a_process_pool(
    tmp_path: Path, started: Channel, release: Channel
) -> None:
    tests = str(Path(__file__).parent)
    child = subprocess.Popen(
        [sys.executable, "-c", _ASYNCIO_CTRL_C_SCRIPT, tests, started.path, release.path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        assert child.stdout is not None
        # asyncio.run put its own Ctrl-C handling in place: the pool had left the default.
        assert read_line(child.stdout, WAIT).strip() == "_on_sigint"
        (worker,) = started.read_pids(1)  # the call runs
        child.send_signal(signal.SIGINT)
        lines = [read_line(child.stdout, WAIT).strip() for _ in range(2)]
        assert lines == ["cancelled", "interrupted"], lines
        assert child.wait(WAIT) == 0
        try:
            gone = psutil.Process(worker)
        except psutil.NoSuchProcess:
            pass  # the worker is gone already
        else:
            _, alive = psutil.wait_procs([gone], timeout=WAIT)
            assert not alive, f"the worker outlived the program: {alive}"
    finally:
        child.kill()
        child.wait(WAIT)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
