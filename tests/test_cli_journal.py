"""``conveyor run --journal``: refusals, failures that are not final, and the repair of an
``--output`` file after a crash (crash states are made by hand here; real kills are in
test_cli_signals.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_cli_support import (
    Command,
    gate_env,
    inputs_of,
    marker_and_gate,  # noqa: F401 - the fifos fixture
    run,
    work_directory,  # noqa: F401 - the work fixture
)

NUMBERS = "".join(f"{n}\n" for n in range(1, 21))


def _expected(numbers: range) -> list[str]:
    return [f'{{"input": "{n}", "output": {2 * n}}}' for n in numbers]


def test_resume_of_a_finished_run_does_nothing(work: Path) -> None:
    (work / "in.txt").write_text(NUMBERS)
    first = run(["run", "work:double", "in.txt", "--journal", "j"], work)
    assert first.code == 0 and first.lines == _expected(range(1, 21))
    again = run(["run", "work:double", "in.txt", "--journal", "j", "--resume"], work)
    assert (again.code, again.stdout, again.stderr) == (0, "", "")


def test_resume_on_a_missing_journal_starts_one(work: Path) -> None:
    result = run(["run", "work:double", "--journal", "new", "--resume"], work, input="1\n")
    assert result.code == 0 and result.lines == _expected(range(1, 2))


def test_a_failure_under_a_journal_has_no_line_until_it_succeeds(work: Path) -> None:
    (work / "once.py").write_text(
        "import os\n"
        "def f(x):\n"
        "    if x == '3' and not os.path.exists('fixed'):\n"
        "        raise ConnectionError('down')\n"
        "    return int(x)\n"
    )
    (work / "in.txt").write_text("1\n2\n3\n4\n")
    first = run(["run", "once:f", "in.txt", "--journal", "j"], work)
    assert first.code == 1
    assert inputs_of(first.lines) == ["1", "2", "4"]
    assert "in.txt line 3 failed (ConnectionError: down); --resume runs it again" in first.stderr
    assert "1 of 4 inputs failed and have no output line yet" in first.stderr

    still = run(["run", "once:f", "in.txt", "--journal", "j", "--resume"], work)
    assert (still.code, still.stdout) == (1, "")  # failed again: still no line

    (work / "fixed").touch()
    last = run(["run", "once:f", "in.txt", "--journal", "j", "--resume"], work)
    assert last.code == 0
    assert last.lines == ['{"input": "3", "output": 3}']
    # Across the runs: one line per input.
    assert sorted(inputs_of(first.lines + still.lines + last.lines)) == ["1", "2", "3", "4"]


def _refused(result: object, text: str) -> None:
    assert result.code == 2, result  # type: ignore[attr-defined]
    assert result.stdout == ""  # type: ignore[attr-defined]
    assert len(result.stderr.splitlines()) == 1  # type: ignore[attr-defined]
    assert text in result.stderr  # type: ignore[attr-defined]


def test_an_existing_journal_needs_resume(work: Path) -> None:
    run(["run", "work:double", "--journal", "j"], work, input="1\n")
    _refused(
        run(["run", "work:double", "--journal", "j"], work, input="1\n"),
        "journal 'j' already exists: add --resume to continue its run, or remove it",
    )


@pytest.mark.parametrize(
    ("args", "stdin", "text"),
    [
        (["work:fail_odd"], NUMBERS, "belongs to another run: it records 'work:double', not "),
        (["work:double", "--json"], NUMBERS, "belongs to another run: it was made without --json"),
        (["work:double"], NUMBERS.replace("7\n", "seven\n"), "its input differs at <stdin> line 7"),
        (["work:double"], "1\n2\n", "it records input line 20, but the input has only 2 lines"),
    ],
)
def test_a_journal_of_another_run_is_refused(
    work: Path, args: list[str], stdin: str, text: str
) -> None:
    run(["run", "work:double", "--journal", "j"], work, input=NUMBERS)
    _refused(run(["run", *args, "--journal", "j", "--resume"], work, input=stdin), text)


def test_more_input_than_recorded_runs_the_new_lines(work: Path) -> None:
    run(["run", "work:double", "--journal", "j"], work, input="1\n2\n")
    result = run(["run", "work:double", "--journal", "j", "--resume"], work, input="1\n2\n3\n")
    assert result.lines == _expected(range(3, 4))


def test_a_file_that_is_not_a_journal(work: Path) -> None:
    (work / "j").write_text("not a database, clearly, and long enough to be read" * 40)
    _refused(
        run(["run", "work:double", "--journal", "j", "--resume"], work, input="1\n"),
        "'j' is not a conveyor journal",
    )


def test_a_database_that_is_not_a_journal(work: Path) -> None:
    db = sqlite3.connect(work / "j")
    db.execute("CREATE TABLE other (x)")
    db.commit()
    db.close()
    _refused(
        run(["run", "work:double", "--journal", "j", "--resume"], work, input="1\n"),
        "'j' is not a conveyor journal",
    )


def test_a_journal_in_use_is_refused(work: Path, fifos: tuple) -> None:  # type: ignore[type-arg]
    marker, gate = fifos
    (work / "in.txt").write_text(NUMBERS)
    holder = Command(
        ["run", "work:gated", "in.txt", "--journal", "j"], work, env=gate_env(fifos, "2")
    )
    try:
        assert marker.read_line() == "2"  # the first run is under way and holds the journal
        _refused(
            run(["run", "work:gated", "in.txt", "--journal", "j", "--resume"], work),
            "journal 'j' is in use by another run",
        )
        gate.release()
        result = holder.finish()
    finally:
        holder.kill()
    assert result.code == 0 and len(result.lines) == 20


# -- the --output file after a crash -----------------------------------------------------------


def _full_run(work: Path) -> str:
    (work / "in.txt").write_text(NUMBERS)
    result = run(["run", "work:double", "in.txt", "--journal", "j", "-o", "out"], work)
    assert result.code == 0, result
    text = (work / "out").read_text()
    assert text.splitlines() == _expected(range(1, 21))
    return text


def _resume(work: Path, output: str = "out") -> object:
    return run(["run", "work:double", "in.txt", "--journal", "j", "-o", output, "--resume"], work)


@pytest.mark.parametrize("cut", [0, 1, 100, 200, -1])
def test_lines_lost_after_their_commit_are_written_again(work: Path, cut: int) -> None:
    # A kill between a commit and the write of its lines leaves the file short, maybe
    # mid-line: the resumed run cuts the partial line and writes the rest from the journal.
    full = _full_run(work)
    (work / "out").write_bytes(full.encode()[:cut])
    result = _resume(work)
    assert result.code == 0, result  # type: ignore[attr-defined]
    assert (work / "out").read_text() == full


def test_an_output_file_that_was_replaced_is_refused(work: Path) -> None:
    full = _full_run(work)
    (work / "out").write_text(full.replace('"output": 40', '"output": 41'))
    _refused(_resume(work), "output '")


def test_resume_into_another_file_writes_only_the_missing_lines(work: Path) -> None:
    (work / "in.txt").write_text(NUMBERS)
    (work / "partial.txt").write_text("".join(f"{n}\n" for n in range(1, 11)))
    run(["run", "work:double", "partial.txt", "--journal", "j", "-o", "out"], work)
    # The journal now holds lines 1-10; the same first ten lines then ten more.
    (work / "rest").write_text("kept\n")
    result = run(["run", "work:double", "in.txt", "--journal", "j", "-o", "rest", "--resume"], work)
    assert result.code == 0, result
    assert (work / "rest").read_text().splitlines() == ["kept", *_expected(range(11, 21))]
