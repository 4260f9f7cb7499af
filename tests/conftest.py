"""Shared fixtures: every test must leave no thread and no child process behind."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from _process_funcs import Channel

faulthandler.enable(file=sys.stderr, all_threads=True)

#: How long a test's threads and children get to finish after the test body returns.
LEAK_GRACE = 10.0


#: multiprocessing's own helpers live as long as the interpreter, by design: they are not
#: workers and no pool owns them.
_SHARED_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def _children() -> set[int]:
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:  # pragma: no cover
        return set()
    return {p.pid for p in children if _alive(p) and not _shared_helper(p)}


def _shared_helper(process: psutil.Process) -> bool:
    """One of multiprocessing's helpers: a child of ours with its command line. What the fork
    server forks (workers, forkers) has the same command line but is not our child."""
    try:
        if process.ppid() != os.getpid():
            return False
        command = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return any(name in command for name in _SHARED_HELPERS)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves a thread or a child process running."""
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        children = _children() - children_before
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            break
        # Polling here is waiting for an effect of the code under test (threads exiting),
        # bounded by LEAK_GRACE; there is no event to wait on for "a thread has ended".
        for t in threads:
            t.join(timeout=0.05)
        if not threads:
            time.sleep(0.05)
    pytest.fail(
        f"test left behind threads {[t.name for t in threads]} and child processes "
        f"{sorted(children)}"
    )


# Fixtures of the process suites: named pipes through which a running call tells the test
# that it started (``started``) and waits to be let go (``release``).


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Channel]:
    channel = Channel(tmp_path / "started")
    yield channel
    channel.close()


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Channel]:
    channel = Channel(tmp_path / "release")
    yield channel
    channel.close()
