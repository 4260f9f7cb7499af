"""Workers of the default (fork server) start method come from a forker of the pool's own."""

from __future__ import annotations

import multiprocessing
import os
import signal

import _process_funcs as funcs
from _process_funcs import WAIT, Channel, wait_gone

import conveyor


def _name() -> str:
    return multiprocessing.current_process().name


def test_a_forked_worker_is_named_as_a_worker_and_is_not_a_child_of_the_pool() -> None:
    with conveyor.Pool("process", 2) as pool:
        names = {pool.submit(_name).result(WAIT) for _ in range(4)}
        parents = {pool.submit(os.getppid).result(WAIT) for _ in range(4)}
    assert names and all(name.startswith("conveyor-worker-") for name in names), names
    assert os.getpid() not in parents


def test_killing_the_forker_fails_only_the_calls_its_workers_ran_and_the_pool_goes_on(
    started: Channel,
) -> None:
    with conveyor.Pool("process", 2) as pool:
        forker = pool.submit(os.getppid).result(WAIT)
        assert forker != os.getpid()
        stuck = pool.submit(funcs.report_and_hang, started.path)
        (worker,) = started.read_pids(1)
        os.kill(forker, signal.SIGKILL)
        error = stuck.exception(WAIT)
        assert isinstance(error, conveyor.WorkerCrashed), error
        # Its worker cannot be watched any more: the pool killed it.
        assert not wait_gone([worker])
        assert list(pool.map(funcs.double, range(50))) == [2 * x for x in range(50)]
        assert pool.submit(os.getppid).result(WAIT) not in (forker, os.getpid())


def test_a_worker_killed_from_outside_reports_its_signal_through_the_forker(
    started: Channel,
) -> None:
    with conveyor.Pool("process", 2) as pool:
        stuck = pool.submit(funcs.report_and_hang, started.path)
        (worker,) = started.read_pids(1)
        os.kill(worker, signal.SIGKILL)
        error = stuck.exception(WAIT)
        assert isinstance(error, conveyor.WorkerCrashed)
        assert error.exitcode == -signal.SIGKILL
        assert pool.submit(funcs.double, 4).result(WAIT) == 8
