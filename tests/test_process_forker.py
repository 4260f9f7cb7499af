"""Workers of the default (fork server) start method come from a forker of the pool's own."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading

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


def test_terminate_stops_a_worker_whose_pid_has_not_come_yet(started: Channel) -> None:
    # A new worker is asked of the forker, which sends its pid once it has forked it. The
    # forker is held here (SIGSTOP) so that terminate() comes first: the pool must wait for
    # that pid to stop the worker, or the worker would run its call for ever, and terminate()
    # would wait for it for ever.
    pool = conveyor.Pool("process", 2)
    forker = pool.submit(os.getppid).result(WAIT)
    first = pool.submit(funcs.report_and_hang, started.path)
    (running,) = started.read_pids(1)
    os.kill(forker, signal.SIGSTOP)
    try:
        second = pool.submit(funcs.never_returns)  # for a second worker, not forked yet
        stopper = threading.Thread(target=pool.terminate, daemon=True)
        stopper.start()
        assert not wait_gone([running]), "terminate() did not stop the running worker"
    finally:
        os.kill(forker, signal.SIGCONT)
    stopper.join(WAIT)
    assert not stopper.is_alive(), "terminate() waits for a worker that it did not stop"
    for future in (first, second):
        assert future.done()
        assert future.cancelled() or future.exception(0) is not None


def test_terminate_ends_when_the_forker_never_answers(started: Channel) -> None:
    # The same, with a forker that stays held: the pool waits for the pid a few seconds,
    # then kills the forker, which takes its workers with it.
    pool = conveyor.Pool("process", 2)
    forker = pool.submit(os.getppid).result(WAIT)
    first = pool.submit(funcs.report_and_hang, started.path)
    started.read_pids(1)
    os.kill(forker, signal.SIGSTOP)
    try:
        second = pool.submit(funcs.never_returns)
        stopper = threading.Thread(target=pool.terminate, daemon=True)
        stopper.start()
        stopper.join(WAIT)
        assert not stopper.is_alive(), "terminate() waits for a forker that never answers"
    finally:
        with contextlib.suppress(ProcessLookupError):  # it is gone, as it should be
            os.kill(forker, signal.SIGCONT)
    assert not wait_gone([forker])
    for future in (first, second):
        assert future.done()
        assert future.cancelled() or future.exception(0) is not None
