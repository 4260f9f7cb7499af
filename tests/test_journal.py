"""The journal on its own: what it keeps, what it refuses, how it finds the end of the output."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from conveyor._journal import Journal, JournalError, digest


def _open(path: Path, **changes: object) -> Journal:
    options: dict[str, object] = {"target": "m:f", "json_input": False, "resume": True}
    options.update(changes)
    return Journal.open(str(path), **options)  # type: ignore[arg-type]


def _line(n: int) -> bytes:
    return f'{{"input": "{n}", "output": {n}}}\n'.encode()


def test_outcomes_survive_closing(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j", resume=False)
    assert journal.created
    journal.record([(1, digest(b"b"), False, b"err\n", None), (0, digest(b"a"), True, _line(0), 0)])
    journal.close()
    again = _open(tmp_path / "j")
    assert not again.created
    assert list(again.outcomes()) == [(0, digest(b"a"), True), (1, digest(b"b"), False)]
    assert again.last_line() == 1
    assert again.counts() == (1, 1)
    # A re-run input replaces its earlier outcome.
    again.record([(1, digest(b"b"), True, _line(1), 10)])
    assert again.counts() == (2, 0)
    again.close()


def test_wal_mode(tmp_path: Path) -> None:
    _open(tmp_path / "j").close()
    db = sqlite3.connect(tmp_path / "j")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()


def test_an_empty_journal(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    assert journal.last_line() is None
    assert journal.counts() == (0, 0)
    assert list(journal.outcomes()) == []
    journal.close()


def test_refusals(tmp_path: Path) -> None:
    _open(tmp_path / "j").close()
    with pytest.raises(JournalError, match="already exists: add --resume"):
        _open(tmp_path / "j", resume=False)
    with pytest.raises(JournalError, match="it records 'm:f', not 'm:g'"):
        _open(tmp_path / "j", target="m:g")
    with pytest.raises(JournalError, match="made without --json"):
        _open(tmp_path / "j", json_input=True)
    (tmp_path / "text").write_text("x" * 4096)
    with pytest.raises(JournalError, match="is not a conveyor journal"):
        _open(tmp_path / "text")
    with pytest.raises(JournalError, match="cannot open journal"):
        _open(tmp_path / "no" / "such" / "dir")


def test_one_run_at_a_time(tmp_path: Path) -> None:
    first = _open(tmp_path / "j")
    try:
        with pytest.raises(JournalError, match="in use by another run"):
            _open(tmp_path / "j")
    finally:
        first.close()
    _open(tmp_path / "j").close()


def test_output_end_finds_the_last_complete_line(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j", output="/out")
    lines = [_line(n) for n in range(3)]
    positions = [0, len(lines[0]), len(lines[0]) + len(lines[1])]
    journal.record(
        [(n, digest(b"%d" % n), True, lines[n], positions[n]) for n in range(3)]
        + [(3, digest(b"3"), False, b"not written\n", None)]
    )
    full = sum(map(len, lines))
    assert journal.output_end(full) == (full, (positions[2], lines[2]))
    assert journal.output_end(full - 1) == (positions[2], (positions[1], lines[1]))
    assert journal.output_end(0) == (0, None)
    assert list(journal.lines_from(positions[1])) == lines[1:]
    journal.close()


def test_set_output_forgets_positions_in_another_file(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j", output="/a")
    journal.record([(0, digest(b"0"), True, _line(0), 0)])
    journal.set_output("/a", 0)
    assert journal.output_end(100)[1] is not None  # same file: kept
    journal.set_output("/b", 7)
    assert (journal.output, journal.output_base) == ("/b", 7)
    assert journal.output_end(100) == (7, None)
    journal.close()
