"""The journal of ``conveyor run --journal``: what each input gave, kept in SQLite.

A journal is the write-ahead log of a run's output. Each input's outcome is committed, with
the exact bytes of its output line, *before* that line is written: so a line is never written
twice, and a line whose write a crash interrupted can be written again from the journal.

Tables::

    meta(key, value)   format, target ("module:function"), json ("0"/"1"), output (the
                       absolute path of the --output file the positions refer to; "" for
                       standard output), output_base (the size that file had before this
                       journal wrote to it)
    outcomes(line, digest, ok, text, pos)
                       line: the input's position (0-based, across all input files);
                       digest: a hash of the input line, to refuse a journal of other input;
                       ok: 1 if the call returned; text: the output line, newline included
                       (for a failure: its error line, which is not written); pos: where
                       text starts in the output file, NULL when not written there.

The database runs in WAL mode with ``synchronous=NORMAL``: a commit survives the process
being killed at any moment (not a power cut). It is opened in exclusive locking mode, so a
second run cannot use a journal while the first one holds it.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator, Sequence

__all__ = ["Journal", "JournalError", "Outcome", "digest"]

FORMAT = "1"

#: (line, digest, ok, text, pos): one row of ``outcomes``.
Outcome = tuple[int, bytes, bool, bytes, "int | None"]


class JournalError(Exception):
    """The journal cannot serve this run; the message says why, in one line."""


def digest(line: bytes) -> bytes:
    """The fingerprint of one input line stored in the journal.

    Example:
        >>> from conveyor._journal import digest
        >>> len(digest(b"hello"))
        16
    """
    return hashlib.blake2b(line, digest_size=16).digest()


class Journal:
    """An open journal. Use ``Journal.open``; call from one thread only.

    Example:
        >>> import os, tempfile
        >>> from conveyor._journal import Journal, digest
        >>> path = os.path.join(tempfile.mkdtemp(), "run.journal")
        >>> journal = Journal.open(path, target="m:f", json_input=False, resume=False)
        >>> journal.record([(0, digest(b"a"), True, b'{"input": "a", "output": 1}\\n', None)])
        >>> [line for line, _, ok in journal.outcomes() if ok]
        [0]
        >>> journal.close()
    """

    def __init__(self, path: str, connection: sqlite3.Connection) -> None:
        self.path = path
        self.created = False
        self._db = connection

    @classmethod
    def open(
        cls, path: str, *, target: str, json_input: bool, resume: bool, output: str = ""
    ) -> Journal:
        """Open the journal at ``path`` for a run of ``target``.

        A new journal is created when ``path`` does not exist, with positions referring to
        ``output`` (see ``set_output``). An existing one is reused only with ``resume`` and
        only if it records the same target and input mode; otherwise ``JournalError`` says
        why. ``created`` tells which happened.
        """
        existed = os.path.exists(path)
        if existed and not resume:
            raise JournalError(
                f"journal {path!r} already exists: add --resume to continue its run, or "
                "remove it to start again"
            )
        try:
            db = sqlite3.connect(path, timeout=0, isolation_level=None)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {path!r}: {exc}") from None
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # Taking the write lock now makes a second run on the same journal fail here,
            # before it does any work.
            db.execute("BEGIN IMMEDIATE")
            tables = {
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            created = not tables
            if created:
                cls._create(db, target, json_input, output)
            elif tables != {"meta", "outcomes"}:
                raise JournalError(f"{path!r} is not a conveyor journal")
            else:
                cls._check(db, path, target, json_input)
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" in str(exc):
                raise JournalError(f"journal {path!r} is in use by another run") from None
            raise JournalError(f"cannot use journal {path!r}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            db.close()
            raise JournalError(f"{path!r} is not a conveyor journal ({exc})") from None
        except BaseException:
            db.close()
            raise
        journal = cls(path, db)
        journal.created = created
        return journal

    @staticmethod
    def _create(db: sqlite3.Connection, target: str, json_input: bool, output: str) -> None:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute(
            "CREATE TABLE outcomes (line INTEGER PRIMARY KEY, digest BLOB NOT NULL, "
            "ok INTEGER NOT NULL, text BLOB NOT NULL, pos INTEGER)"
        )
        db.execute("CREATE INDEX outcomes_pos ON outcomes (pos) WHERE pos IS NOT NULL")
        db.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [
                ("format", FORMAT),
                ("target", target),
                ("json", "1" if json_input else "0"),
                ("output", output),
                ("output_base", "0"),
            ],
        )

    @staticmethod
    def _check(db: sqlite3.Connection, path: str, target: str, json_input: bool) -> None:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if meta.get("format") != FORMAT:
            raise JournalError(
                f"journal {path!r} has format {meta.get('format')!r}; this conveyor "
                f"reads format {FORMAT!r}"
            )
        if meta.get("target") != target:
            raise JournalError(
                f"journal {path!r} belongs to another run: it records "
                f"{meta.get('target')!r}, not {target!r}"
            )
        if meta.get("json") != ("1" if json_input else "0"):
            was = "with" if meta.get("json") == "1" else "without"
            raise JournalError(f"journal {path!r} belongs to another run: it was made {was} --json")

    # -- reading ----------------------------------------------------------------------------

    def outcomes(self) -> Iterator[tuple[int, bytes, bool]]:
        """(line, digest, ok) of every recorded input, in input order, read lazily."""
        for line, fingerprint, ok in self._db.execute(
            "SELECT line, digest, ok FROM outcomes ORDER BY line"
        ):
            yield line, fingerprint, bool(ok)

    def last_line(self) -> int | None:
        """The highest input position recorded, if any."""
        row = self._db.execute("SELECT max(line) FROM outcomes").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def counts(self) -> tuple[int, int]:
        """(succeeded, failed) inputs recorded."""
        row = self._db.execute(
            "SELECT coalesce(sum(ok), 0), count(*) - coalesce(sum(ok), 0) FROM outcomes"
        ).fetchone()
        return int(row[0]), int(row[1])

    def _meta(self, key: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else ""

    @property
    def output(self) -> str:
        """The output file that recorded positions refer to ("" for none)."""
        return self._meta("output")

    @property
    def output_base(self) -> int:
        """The size the output file had when this journal started writing to it."""
        return int(self._meta("output_base") or 0)

    def output_end(self, size: int) -> tuple[int, tuple[int, bytes] | None]:
        """Where the output file should be cut, given that it holds ``size`` bytes: after its
        last complete recorded line (returned too, to check it), or at ``output_base``.

        Lines are committed before they are written, and written in the order of their
        positions, so a crash can only leave the last lines missing or cut short: reading
        backwards from the end stops at the first line that the file holds in full.
        """
        for pos, length in self._db.execute(
            "SELECT pos, length(text) FROM outcomes WHERE pos IS NOT NULL ORDER BY pos DESC"
        ):
            if pos + length <= size:
                text = self._db.execute(
                    "SELECT text FROM outcomes WHERE pos = ?", (pos,)
                ).fetchone()[0]
                return pos + length, (int(pos), bytes(text))
        return self.output_base, None

    def lines_from(self, pos: int) -> Iterator[bytes]:
        """The recorded output lines at position ``pos`` and after, in file order."""
        for (text,) in self._db.execute(
            "SELECT text FROM outcomes WHERE pos >= ? ORDER BY pos", (pos,)
        ):
            yield bytes(text)

    # -- writing ----------------------------------------------------------------------------

    def set_output(self, output: str, base: int) -> None:
        """Make positions refer to ``output``, which holds ``base`` bytes not written by this
        journal; positions in another file are forgotten."""
        db = self._db
        db.execute("BEGIN")
        try:
            if output != self.output:
                db.execute("UPDATE outcomes SET pos = NULL WHERE pos IS NOT NULL")
            db.executemany(
                "UPDATE meta SET value = ? WHERE key = ?",
                [(output, "output"), (str(base), "output_base")],
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def record(self, outcomes: Sequence[Outcome]) -> None:
        """Commit ``outcomes`` (a re-run input replaces its earlier outcome).

        When this returns, the outcomes survive the process being killed.
        """
        if not outcomes:
            return
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany("INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?)", outcomes)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close the database (idempotent)."""
        self._db.close()
