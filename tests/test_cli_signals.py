"""``conveyor run`` interrupted: Ctrl-C once, Ctrl-C twice, and ``kill -9`` then ``--resume``.

Each run blocks one call (``work:gated``) until the test says so; the call announces itself on
a FIFO first, so the test acts while the run is surely under way, without sleeping.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli_support import (
    SIGINT,
    SIGKILL,
    Command,
    Fifo,
    gate_env,
    inputs_of,
    marker_and_gate,  # noqa: F401 - the fifos fixture
    run,
    work_directory,  # noqa: F401 - the work fixture
)

COUNT = 1000
NUMBERS = [str(n) for n in range(1, COUNT + 1)]


def _input_file(work: Path, count: int = COUNT) -> None:
    (work / "in.txt").write_text("".join(f"{n}\n" for n in range(1, count + 1)))


def _assert_once_each(lines: list[str], count: int = COUNT) -> None:
    inputs = inputs_of(lines)
    assert len(inputs) == len(set(inputs)), "an input has two output lines"
    assert sorted(inputs, key=int) == [str(n) for n in range(1, count + 1)]


def test_first_ctrl_c_finishes_running_calls_then_exits_130(
    work: Path, fifos: tuple[Fifo, Fifo]
) -> None:
    marker, gate = fifos
    _input_file(work)
    args = ["run", "work:gated", "in.txt", "-j", "2", "--journal", "j"]
    command = Command(args, work, env=gate_env(fifos, "5"))
    try:
        assert marker.read_line() == "5"
        command.signal(SIGINT)
        command.wait_stderr("interrupted: finishing")
        gate.release()  # the running call may now end: its outcome is kept
        first = command.finish()
    finally:
        command.kill()
    assert first.code == 130, first
    assert "press Ctrl-C again to stop at once" in first.stderr
    assert "; run again with --resume to go on" in first.stderr
    done = inputs_of(first.lines)
    assert "5" in done  # the call that was running finished and was written
    assert len(done) < COUNT  # input stopped being taken
    second = run([*args, "--resume"], work)
    assert second.code == 0, second
    _assert_once_each(first.lines + second.lines)


def test_ctrl_c_with_a_timeout_fails_the_running_call_on_time(
    work: Path, fifos: tuple[Fifo, Fifo]
) -> None:
    marker, _ = fifos
    _input_file(work, 50)
    command = Command(
        ["run", "work:gated", "in.txt", "--timeout", "1"], work, env=gate_env(fifos, "3")
    )
    try:
        assert marker.read_line() == "3"
        command.signal(SIGINT)
        result = command.finish()  # the gate never opens: the timeout ends the call
    finally:
        command.kill()
    assert result.code == 130, result
    by_input = {r["input"]: r for r in result.records}
    assert by_input["3"]["error"]["type"] == "conveyor.TaskTimeout"  # type: ignore[index]
    assert by_input["1"] == {"input": "1", "output": 2}


def test_second_ctrl_c_exits_at_once_and_the_journal_holds(
    work: Path, fifos: tuple[Fifo, Fifo]
) -> None:
    marker, _ = fifos
    _input_file(work)
    args = ["run", "work:gated", "in.txt", "-j", "4", "--journal", "j", "-o", "out"]
    command = Command(args, work, env=gate_env(fifos, "300"))
    try:
        assert marker.read_line() == "300"
        command.signal(SIGINT)
        command.wait_stderr("press Ctrl-C again")
        command.signal(SIGINT)  # the gated call never ends: only this gets us out
        first = command.finish()
    finally:
        command.kill()
    assert first.code == 130, first
    assert "stopped at once" in first.stderr
    second = run([*args, "--resume"], work)
    assert second.code == 0, second
    _assert_once_each((work / "out").read_text().splitlines())


@pytest.mark.parametrize("order", ["--ordered", "--unordered"])
@pytest.mark.parametrize("to_file", [True, False], ids=["output-file", "stdout"])
@pytest.mark.parametrize("block_at", ["1", "600"])
def test_kill_9_then_resume_gives_each_input_exactly_one_line(
    work: Path, fifos: tuple[Fifo, Fifo], order: str, to_file: bool, block_at: str
) -> None:
    marker, _ = fifos
    _input_file(work)
    args = ["run", "work:gated", "in.txt", "-j", "4", "--journal", "j", order]
    if to_file:
        args += ["-o", "out"]
    command = Command(args, work, env=gate_env(fifos, block_at))
    try:
        assert marker.read_line() == block_at
        command.signal(SIGKILL)  # whatever the run was doing at this moment
        first = command.finish()
    finally:
        command.kill()
    assert first.code == -9
    second = run([*args, "--resume"], work)
    assert second.code == 0, second
    if to_file:
        assert second.stdout == ""
        _assert_once_each((work / "out").read_text().splitlines())
    else:
        _assert_once_each(first.lines + second.lines)
