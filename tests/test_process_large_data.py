"""Large arguments travel through shared-memory segments that the pool writes again and again:
a segment is reused only once no worker can read it any more."""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _process_funcs as funcs
import numpy as np
import psutil
import pytest
from _process_funcs import WAIT, Channel, read_line, wait_gone

import conveyor
from conveyor._backends import _segments, _wire

TIMEOUT = 3.0
_kept: list[Any] = []


def keep_and_sum(array: Any) -> float:
    """Keep a reference to the argument (in this worker) and return its sum."""
    _kept.append(array)
    return float(array.sum())


def keep_every_fifth(array: Any) -> float:
    """Keep the argument if its first item (its number, see ``_numbered``) is a multiple of 5."""
    if int(array[0]) % 5 == 0:
        _kept.append(array)
    return float(array.sum())


def sums_of_kept() -> list[float]:
    return [float(array.sum()) for array in _kept]


def fill_and_sum(array: Any) -> float:
    """Write into the argument (the worker's view of it), then sum it."""
    array[:] = 1.0
    return float(array.sum())


def total(array: Any) -> float:
    return float(array.sum())


def segments_of(pid: int) -> list[str]:
    return glob.glob(f"/dev/shm/conveyor-{pid}-*")


def _arrays(count: int, seed: int = 3) -> list[Any]:
    rng = np.random.default_rng(seed)
    return [rng.random(1 << 18) for _ in range(count)]  # 2 MiB each


def _numbered(count: int) -> list[Any]:
    """2 MiB arrays, each starting with its number."""
    arrays = _arrays(count)
    for number, array in enumerate(arrays):
        array[0] = number
    return arrays


def _contents(name: str, size: int) -> bytes:
    with open(name, "rb") as file:
        return file.read(size)


def _segment_helpers() -> int:
    """The helper threads of Segments alive in this process."""
    return sum(1 for thread in threading.enumerate() if thread.name == "conveyor-segments")


def test_an_argument_a_call_keeps_is_never_overwritten_by_later_calls() -> None:
    first, *others = _arrays(12)
    with conveyor.Pool("process", 1) as pool:
        assert pool.submit(keep_and_sum, first).result(WAIT) == pytest.approx(first.sum())
        assert list(pool.map(total, others)) == pytest.approx([a.sum() for a in others])
        # The worker's kept array still holds the first array's data.
        assert pool.submit(sums_of_kept).result(WAIT) == pytest.approx([first.sum()])


def test_a_call_that_keeps_no_argument_leaves_its_segments_to_be_written_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    discarded: list[str] = []
    original = _segments.Segments.discard

    def spy(self: _segments.Segments, names: list[str]) -> None:
        discarded.extend(names)
        original(self, names)

    monkeypatch.setattr(_segments.Segments, "discard", spy)
    arrays = _arrays(12)
    with conveyor.Pool("process", 2) as pool:
        for array in arrays[:4]:  # a job of one call
            assert pool.submit(total, array).result(WAIT) == pytest.approx(array.sum())
        for _ in range(2):  # jobs of several calls
            assert list(pool.map(total, arrays, chunksize=3)) == pytest.approx(
                [a.sum() for a in arrays]
            )
        # A worker reports a segment as kept only while an object made from it lives on;
        # the pool then never writes it again, and has to make new ones.
        assert discarded == []
        assert pool.submit(keep_and_sum, arrays[0]).result(WAIT) == pytest.approx(arrays[0].sum())
        assert len(discarded) == 1


def test_segments_are_reused_and_gone_after_shutdown() -> None:
    arrays = _arrays(40)
    with conveyor.Pool("process", 2) as pool:
        for array in arrays:  # one at a time: each segment is free again for the next
            assert pool.submit(total, array).result(WAIT) == pytest.approx(array.sum())
        assert len(segments_of(os.getpid())) <= 4
        # a call writing into its argument changes neither the caller's array nor later calls
        assert pool.submit(fill_and_sum, arrays[0]).result(WAIT) == arrays[0].size
        assert arrays[0].sum() != arrays[0].size
        assert pool.submit(total, arrays[1]).result(WAIT) == pytest.approx(arrays[1].sum())
    assert segments_of(os.getpid()) == []


def test_a_timed_out_call_keeps_its_segment_until_its_worker_is_gone(started: Channel) -> None:
    first, second = _arrays(2)
    with conveyor.Pool("process", 1, timeout=TIMEOUT) as pool:
        stuck = pool.submit(funcs.report_and_hang, started.path)
        queued = pool.submit(total, first)
        (pid,) = started.read_pids(1)
        assert isinstance(stuck.exception(WAIT), conveyor.TaskTimeout)
        assert queued.result(WAIT) == pytest.approx(first.sum())
        assert pool.submit(total, second).result(WAIT) == pytest.approx(second.sum())
        assert not wait_gone([pid])
    assert segments_of(os.getpid()) == []


_KILLED_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys, threading
    import numpy as np
    import conveyor

    def total(array):
        return float(array.sum())

    if __name__ == "__main__":
        context = multiprocessing.get_context(sys.argv[1])
        pool = conveyor.Pool("process", 2, mp_context=context)
        arrays = [np.ones(1 << 18) * i for i in range(6)]
        assert list(pool.map(total, arrays)) == [float(a.sum()) for a in arrays]
        print("ready", flush=True)
        threading.Event().wait()
    """
)


@contextlib.contextmanager
def _script(tmp_path: Path, text: str, method: str) -> Iterator[subprocess.Popen[bytes]]:
    """A Python process running ``text`` with ``method`` as its argument; killed at the end."""
    script = tmp_path / "script.py"
    script.write_text(text)
    child = subprocess.Popen(
        [sys.executable, str(script), method], stdout=subprocess.PIPE, cwd=tmp_path
    )
    try:
        yield child
    finally:
        child.kill()
        child.wait(WAIT)
        if child.stdout is not None:
            child.stdout.close()


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_the_segments_of_a_killed_pools_process_are_removed(method: str, tmp_path: Path) -> None:
    with _script(tmp_path, _KILLED_SCRIPT, method) as parent:
        assert parent.stdout is not None
        assert read_line(parent.stdout, WAIT).strip() == "ready"
        assert segments_of(parent.pid)  # kept for the next calls
        # What cleans up after it (its forker, or each worker) does so before it exits.
        descendants = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
        parent.kill()
        parent.wait(WAIT)
        assert not wait_gone(descendants)
        assert segments_of(parent.pid) == []


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_large_bytes_and_bytearrays_travel_out_of_band(kind: type) -> None:
    data = kind(np.random.default_rng(5).bytes(2 << 20))
    # As a call's argument or result: alone, or in a tuple.
    for items, travelled in (([data], lambda back: back[0]), ([(7, data)], lambda b: b[0][1])):
        message = _wire.dumps(_wire.wrap_big_bytes(items))
        try:
            assert len(message) < 4096  # the 2 MiB are in shared memory, not in the message
        finally:
            back = _wire.loads(message)
        assert back == items
        assert type(travelled(back)) is kind


_PIPELINED_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys
    import conveyor

    def echo(x):
        return x

    if __name__ == "__main__":
        context = multiprocessing.get_context(sys.argv[1])
        # Each item and each result is pickled in band, far larger than a pipe's buffer.
        items = [list(range(300_000)) for _ in range(4)]
        with conveyor.Pool("process", 1, mp_context=context) as pool:
            assert pool.submit(echo, 1).result(60) == 1  # measured short: jobs may queue
            assert list(pool.map(echo, items)) == items
        print("done", flush=True)
    """
)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_large_messages_never_wait_in_a_pipe_behind_a_running_job(
    method: str, tmp_path: Path
) -> None:
    # A job queued in a busy worker's pipe while the worker sends a large result: if the
    # job's message were larger than the pipe, both sides would block sending for ever.
    with _script(tmp_path, _PIPELINED_SCRIPT, method) as child:
        assert child.stdout is not None
        assert read_line(child.stdout, WAIT).strip() == "done"
        assert child.wait(WAIT) == 0


def use_shm_dir(path: str) -> None:
    """A worker's initializer: write large results under ``path``, not /dev/shm."""
    _wire._SHM_DIR = path


@pytest.fixture
def small_shm(tmp_path: Path) -> Iterator[str]:
    """A 4 MB tmpfs, a /dev/shm with little room (Docker gives containers 64 MB)."""
    where = tmp_path / "shm"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield str(where)
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=False)


def test_large_data_travels_in_the_pipe_when_shared_memory_is_full(
    small_shm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Writing through a mapping of a file that the tmpfs has no room for kills the process
    # with SIGBUS: the pool must find out before it writes, and send the data another way.
    monkeypatch.setattr(_wire, "_SHM_DIR", small_shm)
    array = np.arange(2_000_000, dtype=np.float64)  # 16 MB, four times the room
    with conveyor.Pool("process", 2, initializer=use_shm_dir, initargs=(small_shm,)) as pool:
        assert pool.submit(total, array).result(WAIT) == float(array.sum())
        assert np.array_equal(pool.submit(funcs.identity, array).result(WAIT), array)
        small = np.arange(200_000, dtype=np.float64)  # 1.6 MB: fits, and still goes that way
        assert pool.submit(total, small).result(WAIT) == float(small.sum())
    assert os.listdir(small_shm) == []


def test_arguments_calls_keep_are_never_overwritten_across_maps_on_a_new_pool() -> None:
    # The maps write new segments, blank ones made ahead and released ones again: none that a
    # call still holds.
    arrays = _numbered(30)
    with conveyor.Pool("process", 1) as pool:
        for _ in range(4):
            sums = list(pool.map(keep_every_fifth, arrays))
            assert sums == pytest.approx([a.sum() for a in arrays])
        kept = pool.submit(sums_of_kept).result(WAIT)
    assert kept == pytest.approx([arrays[i].sum() for i in range(0, 30, 5)] * 4)
    assert segments_of(os.getpid()) == []


def test_maps_of_arrays_of_mixed_sizes_on_a_new_pool_and_nothing_left_after() -> None:
    helpers = _segment_helpers()
    rng = np.random.default_rng(11)
    sizes = [3 << 16, 1 << 18, 5 << 16, 1 << 19]  # 1.5, 2, 2.5 and 4 MiB of float64
    with conveyor.Pool("process", 2) as pool:
        for shift in range(5):
            arrays = [rng.random(sizes[(i + shift) % 4]) for i in range(12)]
            assert list(pool.map(total, arrays)) == pytest.approx([a.sum() for a in arrays])
            back = list(pool.map(funcs.identity, arrays[:3]))
            assert all(np.array_equal(a, b) for a, b in zip(arrays, back, strict=False))
    assert segments_of(os.getpid()) == []
    assert _segment_helpers() == helpers


def test_a_segment_is_written_again_once_released_and_never_once_discarded() -> None:
    helpers = _segment_helpers()
    first, second = np.full(1 << 18, 1.0), np.full(1 << 18, 2.0)
    segments = _wire.Segments()
    try:
        name, size = segments.write(memoryview(first).cast("B"))
        other, _ = segments.write(memoryview(second).cast("B"))  # the first is in use
        assert other != name
        assert _contents(name, size) == first.tobytes()
        assert _contents(other, size) == second.tobytes()
        segments.release([name])
        # The released segment, not a blank one the helper may have made meanwhile.
        assert segments.write(memoryview(second).cast("B")) == (name, size)
        assert _contents(name, size) == second.tobytes()
        segments.discard([other])  # a receiver holds it: it is forgotten, not written
        assert not os.path.exists(other)
        for _ in range(3):
            assert segments.write(memoryview(first).cast("B"))[0] not in (name, other)
        # Written again and again, before the helper maps it and after: each time it holds
        # what was written last.
        segments.release([name])
        for value in range(10):
            data = np.full(1 << 18, float(value))
            assert segments.write(memoryview(data).cast("B")) == (name, size)
            assert _contents(name, size) == data.tobytes()
            segments.release([name])
    finally:
        segments.close()
    assert segments_of(os.getpid()) == []
    assert _segment_helpers() == helpers


def test_segments_in_a_full_shared_memory_raise_oserror_and_leave_nothing(
    small_shm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 4 MB tmpfs holds two segments of 2 MiB, whether the helper made one of them blank
    # ahead or not: a third buffer finds no room at the latest, and the pool would send it
    # another way.
    monkeypatch.setattr(_wire, "_SHM_DIR", small_shm)
    data = memoryview(np.random.default_rng(2).random(3 << 16)).cast("B")  # 1.5 MiB
    segments = _wire.Segments()
    written = []
    try:
        with pytest.raises(OSError):
            for _ in range(3):
                written.append(segments.write(data))
        assert 1 <= len(written) <= 2
        for name, size in written:
            assert _contents(name, size) == data.tobytes()
        segments.release([name for name, _ in written])
        assert segments.write(data) in written  # written again where it was
    finally:
        segments.close()
    assert os.listdir(small_shm) == []
