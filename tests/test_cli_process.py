"""``conveyor run -b process``: the same command on worker processes."""

from __future__ import annotations

from pathlib import Path

from test_cli_support import (
    SIGINT,
    SIGKILL,
    Command,
    Fifo,
    gate_env,
    inputs_of,
    marker_and_gate,  # noqa: F401 - the fifos fixture
    run,
    wait_gone,
    work_directory,  # noqa: F401 - the work fixture
)

from conveyor.examples import fib


def test_fib_on_processes(work: Path) -> None:
    numbers = [str(n) for n in range(15, 25)]
    result = run(["run", "conveyor.examples:fib", "-b", "process"], work, input="\n".join(numbers))
    assert result.code == 0, result
    assert result.records == [{"input": n, "output": fib(int(n))} for n in numbers]


def test_a_module_of_the_current_directory_on_processes(work: Path) -> None:
    result = run(["run", "work:double", "-b", "process", "--unordered"], work, input="1\n2\n3\n")
    assert result.code == 0, result
    assert sorted(inputs_of(result.lines)) == ["1", "2", "3"]


def test_outputs_that_cannot_be_pickled_are_written_as_repr(work: Path) -> None:
    result = run(["run", "work:lazy", "-b", "process"], work, input="ab\n")
    assert result.code == 0, result
    (record,) = result.records
    assert str(record["output"]).startswith("<generator object lazy.<locals>.<genexpr>")


def test_a_crashed_worker_fails_its_input_alone(work: Path) -> None:
    result = run(["run", "work:crash", "-b", "process", "-j", "2"], work, input="a\ndie\nb\n")
    assert result.code == 1, result
    a, die, b = result.records
    assert (a["output"], b["output"]) == ("a", "b")
    error = die["error"]
    assert error["type"] == "conveyor.WorkerCrashed"  # type: ignore[index]
    assert "exit code 3" in error["message"]  # type: ignore[index]


def test_a_timeout_stops_the_worker(work: Path) -> None:
    result = run(
        ["run", "work:hang", "-b", "process", "--timeout", "0.5"], work, input="a\nhang\nb\n"
    )
    assert result.code == 1, result
    assert result.records[1]["error"]["type"] == "conveyor.TaskTimeout"  # type: ignore[index]
    assert [r.get("output") for r in result.records] == ["a", None, "b"]


def test_a_failure_traceback_comes_from_the_worker(work: Path) -> None:
    result = run(["run", "work:fail_odd", "-b", "process"], work, input="3\n")
    assert result.code == 1
    error = result.records[0]["error"]
    assert error["type"] == "ValueError"  # type: ignore[index]
    assert 'work.py", line' in error["traceback"]  # type: ignore[index]


def test_ctrl_c_on_processes(work: Path, fifos: tuple[Fifo, Fifo]) -> None:
    marker, gate = fifos
    (work / "in.txt").write_text("".join(f"{n}\n" for n in range(1, 301)))
    args = ["run", "work:gated", "in.txt", "-b", "process", "-j", "2", "--journal", "j"]
    command = Command(args, work, env=gate_env(fifos, "7"))
    try:
        assert marker.read_line() == "7"
        command.signal(SIGINT)
        command.wait_stderr("interrupted: finishing")
        gate.release()
        first = command.finish()
    finally:
        command.kill()
    assert first.code == 130, first
    assert "7" in inputs_of(first.lines)
    second = run([*args, "--resume"], work)
    assert second.code == 0, second
    inputs = inputs_of(first.lines + second.lines)
    assert sorted(inputs, key=int) == [str(n) for n in range(1, 301)]


def test_kill_9_then_resume_on_processes(work: Path, fifos: tuple[Fifo, Fifo]) -> None:
    marker, _ = fifos
    (work / "in.txt").write_text("".join(f"{n}\n" for n in range(1, 501)))
    args = ["run", "work:gated", "in.txt", "-b", "process", "--unordered"]
    args += ["--journal", "j", "-o", "out"]
    command = Command(args, work, env=gate_env(fifos, "250"))
    try:
        assert marker.read_line() == "250"
        workers = command.descendants()
        assert workers
        command.signal(SIGKILL)
        assert command.finish().code == -9
    finally:
        command.kill()
    wait_gone(workers)  # no orphans: the workers end with the command
    second = run([*args, "--resume"], work)
    assert second.code == 0, second
    inputs = inputs_of((work / "out").read_text().splitlines())
    assert sorted(inputs, key=int) == [str(n) for n in range(1, 501)]
