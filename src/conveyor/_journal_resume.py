"""``conveyor run --resume``: the input and the output file checked against the journal.

Before a resumed run starts, the main thread merges the input with the journal to skip the
inputs that succeeded (``_skip_done``), and makes the ``--output`` file hold exactly the lines
the journal says were written (``resume_output``). Both run on the main thread, which owns the
journal, before the reader thread and the pool exist; neither keeps any state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ._cli import UsageError
from ._journal import Journal, digest

if TYPE_CHECKING:
    from ._cli_io import _Line

__all__ = ["resume_output"]


def _skip_done(journal: Journal, lines: Iterator[_Line]) -> tuple[list[_Line], int]:
    """Check the input against the journal, up to the last input it records: returns the
    lines among them that must run (not recorded, or failed) and how many are skipped.

    Lines are checked as a merge of the input with the journal (both in input order), so the
    journal is not loaded whole; the lines to run are kept in memory until the run starts.
    """
    redo: list[_Line] = []
    skipped = 0
    seen = 0
    for index, fingerprint, ok in journal.outcomes():
        for line in lines:
            seen += 1
            if line.index == index:
                break
            redo.append(line)
        else:
            raise UsageError(
                f"journal {journal.path!r} belongs to another run: it records input line "
                f"{(journal.last_line() or 0) + 1}, but the input has only {seen} lines"
            )
        if digest(line.raw) != fingerprint:
            raise UsageError(
                f"journal {journal.path!r} belongs to another run: its input differs at "
                f"{line.where()}"
            )
        if ok:
            skipped += 1
        else:
            redo.append(line)
    return redo, skipped


def resume_output(fd: int, path: str, journal: Journal) -> int:
    """Ready the ``--output`` file open at ``fd`` (absolute ``path``) to go on with the run
    that ``journal`` records; returns the file position of its next line."""
    if journal.output == path:
        return _repair_output(fd, path, journal)
    # Another file than the journal wrote to: it gets the missing lines only, after what it
    # holds.
    offset = os.fstat(fd).st_size
    journal.set_output(path, offset)
    return offset


def _repair_output(fd: int, path: str, journal: Journal) -> int:
    """Make the file hold exactly the lines the journal says were written: cut what a crash
    left half-written (or what follows it) and write again, from the journal, the committed
    lines whose write did not happen."""
    size = os.fstat(fd).st_size
    end, last = journal.output_end(size)
    if last is not None:
        pos, text = last
        if os.pread(fd, len(text), pos) != text:
            raise UsageError(
                f"output {path!r} does not hold the lines that journal "
                f"{journal.path!r} wrote to it; give another --output"
            )
    elif size < end:
        raise UsageError(
            f"output {path!r} is shorter than when journal {journal.path!r} began "
            "writing to it; give another --output"
        )
    os.ftruncate(fd, end)
    offset = end
    for text in journal.lines_from(end):
        os.pwrite(fd, text, offset)
        offset += len(text)
    return offset
