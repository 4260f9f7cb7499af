"""The completer (``_backends._completer``): the threads that end batches for the process,
asyncio and Dask backends. Quick pieces share one thread; a piece that blocks never holds up
the pieces behind it for long; every thread ends after ``stop``."""

from __future__ import annotations

import threading

from conveyor._backends._completer import Completer

WAIT = 30.0


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(name)]


def test_a_burst_of_quick_pieces_runs_on_a_thread_or_two() -> None:
    completer = Completer("test-burst")
    done = threading.Event()
    ran: list[int] = []
    pieces = 500
    for i in range(pieces):
        completer.run(lambda i=i: ran.append(i))
    completer.run(done.set)
    assert done.wait(WAIT)
    # One serving and one watching; a few more only if the machine stalls one for 5 ms.
    assert len(_threads("test-burst")) <= 10
    assert sorted(ran) == list(range(pieces))
    completer.stop()
    completer.join()
    assert not _threads("test-burst")


def test_a_piece_that_waits_for_a_later_one_gets_it_run() -> None:
    completer = Completer("test-blocked")
    later_ran = threading.Event()
    outcome: list[bool] = []
    finished = threading.Event()

    def waits_for_the_next() -> None:
        outcome.append(later_ran.wait(WAIT))
        finished.set()

    completer.run(waits_for_the_next)
    completer.run(later_ran.set)
    assert finished.wait(WAIT)
    assert outcome == [True]
    completer.stop()
    completer.join()
    assert not _threads("test-blocked")


def test_pieces_handed_over_after_stop_run_on_the_caller() -> None:
    completer = Completer("test-stopped")
    completer.run(lambda: None)
    completer.stop()
    where: list[threading.Thread] = []
    completer.run(lambda: where.append(threading.current_thread()))
    assert where == [threading.current_thread()]
    completer.join()
    assert not _threads("test-stopped")


def test_a_piece_that_raises_is_reported_and_the_next_still_runs() -> None:
    completer = Completer("test-raises")
    reported: list[BaseException | None] = []
    original = threading.excepthook
    threading.excepthook = lambda args: reported.append(args.exc_value)
    try:
        done = threading.Event()

        def fail() -> None:
            raise ValueError("a bug")

        completer.run(fail)
        completer.run(done.set)
        assert done.wait(WAIT)
    finally:
        threading.excepthook = original
        completer.stop()
        completer.join()
    assert len(reported) == 1 and isinstance(reported[0], ValueError)
