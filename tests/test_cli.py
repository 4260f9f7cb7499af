"""``conveyor run`` on the thread backend, driven as a user would: in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_support import WAIT, Command, inputs_of, run, work_directory  # noqa: F401

# -- inputs and outputs ------------------------------------------------------------------------


def test_stdin_in_order(work: Path) -> None:
    numbers = [str(n) for n in range(300)]
    result = run(["run", "work:double", "-j", "8"], work, input="\n".join(numbers) + "\n")
    assert result.code == 0, result
    assert result.records == [{"input": n, "output": 2 * int(n)} for n in numbers]
    assert result.stderr == ""


def test_files_and_dash_in_the_given_order(work: Path) -> None:
    (work / "a.txt").write_text("1\n2\n")
    (work / "b.txt").write_text("5\r\n6")  # CRLF endings and no final newline
    result = run(["run", "work:double", "a.txt", "-", "b.txt"], work, input="3\n4\n")
    assert result.code == 0, result
    assert inputs_of(result.lines) == ["1", "2", "3", "4", "5", "6"]


def test_an_empty_line_is_an_input(work: Path) -> None:
    result = run(["run", "work:show"], work, input="a\n\nb\n")
    assert [r["input"] for r in result.records] == ["a", "", "b"]


def test_unordered_gives_every_input_once(work: Path) -> None:
    numbers = [str(n) for n in range(500)]
    result = run(["run", "work:double", "--unordered", "-j", "4"], work, input="\n".join(numbers))
    assert result.code == 0, result
    assert sorted(inputs_of(result.lines), key=int) == numbers


def test_failures_are_lines_and_exit_1(work: Path) -> None:
    result = run(["run", "work:fail_odd"], work, input="2\n3\n4\n")
    assert result.code == 1, result
    first, second, third = result.records
    assert first == {"input": "2", "output": 2}
    assert third == {"input": "4", "output": 4}
    assert second["input"] == "3"
    error = second["error"]
    assert isinstance(error, dict)
    assert error["type"] == "ValueError"
    assert error["message"] == "odd: 3"
    assert "work.py" in error["traceback"] and "fail_odd" in error["traceback"]
    assert "_cli_call.py" not in error["traceback"]  # only the function's own frames


def test_every_input_fails_exit_1(work: Path) -> None:
    result = run(["run", "work:fail_odd"], work, input="1\n3\n")
    assert result.code == 1
    assert all("error" in r for r in result.records)


def test_empty_input_exit_0(work: Path) -> None:
    result = run(["run", "work:double"], work, input="")
    assert (result.code, result.stdout) == (0, "")


def test_outputs_that_are_not_json_are_written_as_repr(work: Path) -> None:
    result = run(["run", "work:a_set"], work, input="x\n")
    assert result.records == [{"input": "x", "output": "{'x'}"}]


def test_json_arrays_objects_and_scalars(work: Path) -> None:
    lines = '[1, "a"]\n{"k": 2}\n7\n"s"\nnull\n'
    result = run(["run", "work:show", "--json"], work, input=lines)
    assert result.code == 0, result
    assert result.records == [
        {"input": [1, "a"], "output": {"args": [1, "a"], "kwargs": {}}},
        {"input": {"k": 2}, "output": {"args": [], "kwargs": {"k": 2}}},
        {"input": 7, "output": {"args": [7], "kwargs": {}}},
        {"input": "s", "output": {"args": ["s"], "kwargs": {}}},
        {"input": None, "output": {"args": [None], "kwargs": {}}},
    ]


def test_non_utf8_input_gives_valid_json(work: Path) -> None:
    command = Command(["run", "work:show"], work, stdin=subprocess.PIPE)
    out, err = command.proc.communicate(b"caf\xe9\n\xc3\xa9t\xc3\xa9\n", timeout=WAIT)
    assert command.proc.returncode == 0, err
    records = [json.loads(line) for line in out.decode("utf-8").splitlines()]
    assert records[0]["input"] == "caf\udce9"  # the undecodable byte, escaped
    assert records[1]["input"] == "été"


def test_output_file(work: Path) -> None:
    (work / "out.jsonl").write_text("old content\n")
    result = run(["run", "work:double", "-o", "out.jsonl"], work, input="1\n2\n")
    assert (result.code, result.stdout) == (0, "")
    assert (work / "out.jsonl").read_text().splitlines() == [
        '{"input": "1", "output": 2}',
        '{"input": "2", "output": 4}',
    ]


def test_nothing_but_json_on_stdout(work: Path) -> None:
    result = run(["run", "work:noisy", "-j", "1"], work, input="a\nb\n")
    assert result.code == 0, result
    assert result.records == [{"input": "a", "output": "a"}, {"input": "b", "output": "b"}]
    assert "print from a" in result.stderr
    assert "raw write to fd 1" in result.stderr


def test_progress_on_stderr_is_wiped_at_the_end(work: Path) -> None:
    (work / "in.txt").write_text("".join(f"{n}\n" for n in range(50)))
    # (On threads: with the default, -b auto, a line saying where the function runs comes too.)
    result = run(["run", "work:double", "in.txt", "--progress", "-b", "thread"], work)
    assert result.code == 0, result
    assert len(result.lines) == 50
    *draws, wipe, summary = result.stderr.split("\r")
    assert draws[0] == ""  # each draw starts at the beginning of the line
    assert all(re.match(r"\d+/50 \d+% \| [\d.]+/s \| ", draw) for draw in draws[1:]), draws
    assert wipe.strip() == ""  # wiped with spaces, no escape codes
    assert re.fullmatch(r"conveyor: 50 inputs in [\d.]+ s, 0 failed\n", summary), summary


def test_verbose_says_once_where_auto_runs_the_function(work: Path) -> None:
    (work / "in.txt").write_text("".join(f"{n}\n" for n in range(50)))
    result = run(["run", "work:double", "in.txt", "-v"], work)
    assert result.code == 0, result
    assert len(result.lines) == 50
    told = [line for line in result.stderr.splitlines() if " runs on " in line]
    assert len(told) == 1, result.stderr
    assert re.fullmatch(r"conveyor: work:double runs on (thread|process) \(.+\)", told[0])


def test_progress_without_a_total_on_a_pipe(work: Path) -> None:
    result = run(["run", "work:fail_odd", "--progress"], work, input="1\n2\n")
    assert result.code == 1
    *draws, wipe, summary = result.stderr.split("\r")
    # No total on a pipe: the count alone (what each draw shows depends on timing).
    assert all(re.match(r"\d+ done \| [\d.]+/s \| ", draw) for draw in draws[1:]), draws
    assert wipe.strip() == ""
    assert re.fullmatch(r"conveyor: 2 inputs in [\d.]+ s, 1 failed\n", summary), summary


def test_no_progress_by_default_off_a_terminal(work: Path) -> None:
    result = run(["run", "work:double"], work, input="1\n")
    assert result.stderr == ""


def test_timeout_fails_the_call_alone(work: Path) -> None:
    result = run(["run", "work:hang", "--timeout", "0.2"], work, input="a\nhang\nb\n")
    assert result.code == 1, result
    a, hang, b = result.records
    assert a == {"input": "a", "output": "a"} and b == {"input": "b", "output": "b"}
    assert hang["error"]["type"] == "conveyor.TaskTimeout"  # type: ignore[index]


def test_retries(work: Path) -> None:
    (work / "flaky.py").write_text(
        "import os\n"
        "def once(x):\n"
        "    path = x + '.seen'\n"
        "    if not os.path.exists(path):\n"
        "        open(path, 'w').close()\n"
        "        raise ConnectionError(x)\n"
        "    return x\n"
    )
    assert run(["run", "flaky:once"], work, input="a\n").code == 1
    result = run(["run", "flaky:once", "--retries", "1"], work, input="b\n")
    assert result.records == [{"input": "b", "output": "b"}]


def test_endless_stdin_streams_and_ctrl_c_ends_it(work: Path) -> None:
    command = Command(["run", "work:double"], work, stdin=subprocess.PIPE)
    try:
        assert command.proc.stdin is not None
        command.proc.stdin.write(b"1\n2\n")
        command.proc.stdin.flush()
        # Outputs come while stdin stays open: the input is read lazily.
        assert command.read_stdout_lines(2) == [
            '{"input": "1", "output": 2}',
            '{"input": "2", "output": 4}',
        ]
        command.signal(__import__("signal").SIGINT)
        command.wait_stderr("interrupted after 2 inputs")
        result = command.finish()
    finally:
        command.kill()
    assert result.code == 130, result
    assert len(result.lines) == 2


def test_closing_stdout_early_ends_the_run(work: Path) -> None:
    command = Command(["run", "work:double"], work, stdin=subprocess.PIPE)
    try:
        assert command.proc.stdin is not None and command.proc.stdout is not None
        command.proc.stdin.write(b"1\n")
        command.proc.stdin.flush()
        assert command.read_stdout_lines(1) == ['{"input": "1", "output": 2}']
        command.proc.stdout.close()  # like `| head -1`
        command.proc.stdin.write(b"2\n")
        command.proc.stdin.close()
        code = command.proc.wait(timeout=WAIT)
    finally:
        command.kill()
    assert code == -13  # SIGPIPE, as the Unix tools end


# -- bad usage: one line on stderr, exit 2 -----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "work"], "'work' names no function: write MODULE:FUNCTION"),
        (["run", "no_such_module:f"], "no module named 'no_such_module'"),
        (["run", "work:missing"], "module 'work' has no function 'missing'"),
        (["run", "work:not_callable"], "work:not_callable is a int, not a function"),
        (["run", ":double"], "both MODULE and FUNCTION are needed"),
        (["run", "work:double", "missing.txt"], "cannot read 'missing.txt': No such file"),
        (["run", "work:double", "."], "cannot read '.': it is a directory"),
        (["run", "work:double", "--resume"], "--resume needs --journal FILE"),
        (["run", "work:double", "-j", "0"], "argument -j/--workers: must be at least 1"),
        (["run", "work:double", "--timeout", "soon"], "not a number of seconds: 'soon'"),
        (["run", "work:double", "-b", "gpu"], "invalid choice: 'gpu'"),
        (["run", "work:double", "--retries", "-1"], "must be 0 or more"),
        (["run"], "the following arguments are required: MODULE:FUNCTION"),
        (["fly"], "invalid choice: 'fly'"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(work: Path, args: list[str], message: str) -> None:
    result = run(args, work, input="1\n")
    assert result.code == 2, result
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_module_that_fails_to_import(work: Path) -> None:
    (work / "broken.py").write_text("raise RuntimeError('no config here')\n")
    result = run(["run", "broken:f"], work, input="1\n")
    assert result.code == 2
    assert result.stderr == ("conveyor: importing 'broken' failed: RuntimeError: no config here\n")


def test_a_module_that_imports_a_missing_module(work: Path) -> None:
    (work / "needs.py").write_text("import not_installed_anywhere\n")
    result = run(["run", "needs:f"], work, input="1\n")
    assert result.code == 2
    assert "importing 'needs' failed: ModuleNotFoundError" in result.stderr


def test_malformed_json_names_its_line_and_runs_the_lines_before(work: Path) -> None:
    (work / "in.jsonl").write_text("[1]\n[2]\n{oops\n[4]\n")
    result = run(["run", "work:show", "--json", "in.jsonl"], work)
    assert result.code == 2, result
    assert inputs_of(result.lines) == [[1], [2]]
    assert result.stderr.startswith("conveyor: in.jsonl line 3: not valid JSON (")
    assert len(result.stderr.splitlines()) == 1


def test_help_lists_the_options_and_the_rules(work: Path) -> None:
    result = run(["run", "--help"], work)
    assert result.code == 0
    for text in (
        "--backend",
        "--workers",
        "--timeout",
        "--retries",
        "--unordered",
        "--progress",
        "--json",
        "--journal",
        "--resume",
        "repr()",
        "exit status",
    ):
        assert text in result.stdout


def test_the_console_script(work: Path) -> None:
    script = Path(sys.executable).with_name("conveyor")
    if not script.exists():
        pytest.skip("the package is not installed with its console script")
    proc = subprocess.run(
        [str(script), "run", "conveyor.examples:fib"],
        input=b"10\n",
        capture_output=True,
        cwd=work,
        timeout=WAIT,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b'{"input": "10", "output": 55}\n'
