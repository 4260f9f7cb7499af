"""A fault in the process pool's own dispatching code ends the pool, never hangs it.

The dispatcher's loop runs on its thread, or on a thread that waits for a future while the
dispatcher thread is parked (see ``conveyor._backends.process``). Wherever it runs, an
exception there must end every call the pool holds with ``BrokenPool`` and stop its workers.
The fault is injected by replacing one step of the loop on one pool's backend.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any

import _process_funcs as funcs
import pytest
from _process_funcs import WAIT, Channel

import conveyor


def _break_reading(pool: conveyor.Pool) -> None:
    """From now on the pool fails as it reads a worker's message."""

    def broken(*_: Any) -> None:
        raise RuntimeError("injected fault in the dispatcher")

    pool._backend._handle = broken  # type: ignore[attr-defined]


def test_a_fault_on_the_waiting_thread_breaks_the_pool() -> None:
    with conveyor.Pool("process", 2) as pool:
        assert pool.submit(funcs.double, 1).result(WAIT) == 2
        _break_reading(pool)
        future = pool.submit(funcs.double, 2)
        # This thread reads the outcome itself (the dispatcher thread is parked), and meets
        # the fault: the pool ends, and the call with it.
        with pytest.raises(conveyor.BrokenPool, match="injected fault"):
            future.result(WAIT)
        with pytest.raises(conveyor.BrokenPool):
            pool.submit(funcs.double, 3)


def test_a_fault_on_the_dispatcher_thread_breaks_the_pool() -> None:
    with conveyor.Pool("process", 2) as pool:
        assert pool.submit(funcs.double, 1).result(WAIT) == 2
        _break_reading(pool)
        futures = []
        for x in range(6):
            try:
                futures.append(pool.submit(funcs.double, x))
            except conveyor.BrokenPool:
                break  # the first answers broke it already
        # cf.wait() does not run the pool's loop: the dispatcher thread reads, and fails.
        _, not_done = cf.wait(futures, timeout=WAIT)
        assert not not_done
        errors = [future.exception() for future in futures]
        assert all(isinstance(error, conveyor.BrokenPool) for error in errors), errors
        assert "injected fault" in str(errors[0])


def test_a_fault_breaks_the_pool_while_another_call_runs(
    started: Channel, release: Channel
) -> None:
    with conveyor.Pool("process", 2) as pool:
        assert pool.submit(funcs.double, 1).result(WAIT) == 2
        slow = pool.submit(funcs.report_and_wait, started.path, release.path, "slow")
        started.read_line()
        _break_reading(pool)
        with pytest.raises(conveyor.BrokenPool, match="injected fault"):
            pool.submit(funcs.double, 2).result(WAIT)
        # The call still running when the pool broke ends too: its worker is stopped.
        assert isinstance(slow.exception(WAIT), conveyor.BrokenPool)
