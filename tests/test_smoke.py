"""A quick pass over the public API on every backend: the floor the other suites build on."""

from __future__ import annotations

import concurrent.futures as cf
import os
import pathlib
import time

import pytest

import conveyor


def _double(x: int) -> int:
    return 2 * x


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(x)
    return x


def _die_on_three(x: int) -> int:
    if x == 3:
        os._exit(7)
    return x


BACKENDS = ["thread", "process"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_method_gives_the_builtin_answer(backend: str) -> None:
    with conveyor.Pool(backend, 2) as pool:
        assert pool.submit(_double, 21).result(timeout=60) == 42
        assert list(pool.map(_double, range(50))) == [2 * x for x in range(50)]
        assert sorted(pool.imap_unordered(_double, range(50))) == [2 * x for x in range(50)]
        assert list(pool.imap(_double, iter(range(5)))) == [0, 2, 4, 6, 8]
        assert pool.starmap(max, [(1, 5), (7, 2)]) == [5, 7]
        assert pool.apply(_double, (4,)) == 8
        assert pool.apply_async(_double, (5,)).get(timeout=60) == 10
        done, _ = cf.wait([pool.submit(_double, i) for i in range(5)], timeout=60)
        assert sorted(f.result() for f in done) == [0, 2, 4, 6, 8]
        stats = pool.statistics()
    assert stats.completed == stats.submitted
    assert stats.failed == stats.cancelled == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_first_error_is_raised_at_its_position(backend: str) -> None:
    seen: list[int] = []
    with conveyor.Pool(backend, 2) as pool, pytest.raises(ValueError, match="3"):
        for value in pool.map(_fail_on_three, range(10)):
            seen.append(value)
    assert seen == [0, 1, 2]


def test_a_dead_worker_fails_only_its_own_call() -> None:
    with conveyor.Pool("process", 2) as pool:
        futures = [pool.submit(_die_on_three, i) for i in range(8)]
        outcomes = [f.exception(timeout=60) or f.result() for f in futures]
        assert isinstance(outcomes[3], conveyor.WorkerCrashed)
        assert outcomes[3].exitcode == 7
        assert [o for i, o in enumerate(outcomes) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
        assert pool.submit(_double, 1).result(timeout=60) == 2


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'thread', 'process'"):
        conveyor.Pool("gpu")


def _crash_or_count(directory: str, x: int) -> int:
    """Die on every third call; otherwise record how many calls run at once."""
    if x % 3 == 0:
        os._exit(3)
    marker = os.path.join(directory, f"running-{os.getpid()}")
    with open(marker, "w"):
        pass
    try:
        running = len([n for n in os.listdir(directory) if n.startswith("running-")])
        with open(os.path.join(directory, f"seen-{x}"), "w") as seen:
            seen.write(str(running))
        until = time.monotonic() + 0.01
        while time.monotonic() < until:
            pass  # busy for a moment, so that calls overlap
        return running
    finally:
        os.unlink(marker)


def test_workers_replaced_after_crashes_never_run_more_calls_than_workers(
    tmp_path: pathlib.Path,
) -> None:
    with conveyor.Pool("process", 2) as pool:
        futures = [pool.submit(_crash_or_count, str(tmp_path), x) for x in range(60)]
        crashed = [f for f in futures if isinstance(f.exception(timeout=60), BaseException)]
        counts = [f.result() for f in futures if f not in crashed]
        assert len(crashed) == 20
        assert all(isinstance(f.exception(), conveyor.WorkerCrashed) for f in crashed)
        assert len(counts) == 40
        assert max(counts) <= 2
        assert pool.statistics().workers == 2
        assert pool.submit(_double, 4).result(timeout=60) == 8
