"""The input and output of ``conveyor run``: input files and stdin read into lines, and the
JSON lines written to stdout or the ``--output`` file.

Who owns what: the input file descriptors are read by the reader thread alone, once
``_read_lines`` runs there (``_count_lines`` reads them before, on the main thread, with
``pread``, which leaves their positions alone). The ``_Output`` and the encoding of outcomes
into lines (``encode_error``, ``output_line``) belong to the main thread. A result's value is
encoded where the call ran (``_cli_call.encode_value``).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

from ._cli import UsageError
from ._journal import Journal
from ._journal_resume import resume_output

__all__ = ["encode_error", "output_line"]

#: Bytes read from an input at a time.
CHUNK = 1 << 16
#: Inputs of at most this many bytes in all are counted up front, for the progress total.
COUNT_LIMIT = 256 << 20


# -- input -----------------------------------------------------------------------------------


@dataclass
class _Source:
    name: str  # for messages: the path as given, or "<stdin>"
    fd: int


@dataclass
class _Line:
    index: int  # position across all inputs, from 0
    raw: bytes  # without its line ending
    source: str
    number: int  # line number in its source, from 1

    def where(self) -> str:
        return f"{self.source} line {self.number}"


def _open_sources(paths: list[str]) -> list[_Source]:
    sources = []
    for path in paths or ["-"]:
        if path == "-":
            sources.append(_Source("<stdin>", 0))
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            for source in sources:
                if source.fd != 0:
                    os.close(source.fd)
            raise UsageError(f"cannot read {path!r}: {exc.strerror}") from None
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise UsageError(f"cannot read {path!r}: it is a directory")
        sources.append(_Source(path, fd))
    return sources


def _read_lines(sources: list[_Source]) -> Iterator[_Line]:
    """Every line of every source, read in chunks as they arrive (a pipe's lines are yielded
    as soon as they are complete). Reads go straight to the file descriptors: no buffered
    file object is shared with the interpreter, so a reader blocked on a silent stdin can be
    abandoned at exit."""
    index = 0
    for source in sources:
        number = 0
        rest: list[bytes] = []
        while True:
            try:
                chunk = os.read(source.fd, CHUNK)
            except OSError as exc:
                raise UsageError(f"cannot read {source.name!r}: {exc.strerror}") from None
            if not chunk:
                break
            parts = chunk.split(b"\n")
            if len(parts) == 1:
                rest.append(chunk)
                continue
            if rest:
                rest.append(parts[0])
                parts[0] = b"".join(rest)
                rest = []
            last = parts.pop()
            if last:
                rest.append(last)
            for raw in parts:
                number += 1
                yield _Line(index, raw[:-1] if raw.endswith(b"\r") else raw, source.name, number)
                index += 1
        if rest:
            raw = b"".join(rest)
            number += 1
            yield _Line(index, raw[:-1] if raw.endswith(b"\r") else raw, source.name, number)
            index += 1


def _count_lines(sources: list[_Source]) -> int | None:
    """How many lines the sources hold, if all are regular files small enough to count now."""
    sizes = []
    for source in sources:
        info = os.fstat(source.fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        start = os.lseek(source.fd, 0, os.SEEK_CUR)
        sizes.append((source.fd, start, info.st_size))
    if sum(size - start for _, start, size in sizes) > COUNT_LIMIT:
        return None
    total = 0
    for fd, start, size in sizes:
        offset, last = start, b"\n"
        while offset < size:
            chunk = os.pread(fd, CHUNK * 16, offset)
            if not chunk:
                break
            total += chunk.count(b"\n")
            offset += len(chunk)
            last = chunk[-1:]
        if last != b"\n":
            total += 1  # a last line without a line ending
    return total


# -- output ------------------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _Output:
    """Where the JSON lines go: a private copy of stdout, or the ``--output`` file.

    ``offset`` is the file position of the next line (files only), recorded in the journal.
    """

    def __init__(self, fd: int, path: str, offset: int) -> None:
        self.fd = fd
        self.path = path  # absolute path of the file; "" for standard output
        self.offset = offset
        self.tty = os.isatty(fd)
        self.saved_stdout: int | None = None

    @classmethod
    def stdout(cls) -> _Output:
        # Lines go to a copy of fd 1, and fd 1 itself now points at stderr: whatever else
        # prints to stdout (the function, a library, a worker process) cannot mix with them.
        sys.stdout.flush()
        try:
            fd = os.dup(1)
        except OSError as exc:
            raise UsageError(f"cannot write to standard output: {exc.strerror}") from None
        output = cls(fd, "", 0)
        os.dup2(2, 1)
        output.saved_stdout = fd
        return output

    @classmethod
    def file(cls, path: str, journal: Journal | None) -> _Output:
        absolute = os.path.abspath(path)
        flags = os.O_RDWR | os.O_CREAT  # read too: a resumed run checks what it holds
        resuming = journal is not None and not journal.created
        try:
            fd = os.open(path, flags if resuming else flags | os.O_TRUNC, 0o666)
        except OSError as exc:
            raise UsageError(f"cannot write {path!r}: {exc.strerror}") from None
        output = cls(fd, absolute, 0)
        if journal is None:
            return output
        try:
            if not resuming:
                return output
            output.offset = resume_output(fd, absolute, journal)
        except BaseException:
            os.close(fd)
            raise
        return output

    def write(self, data: bytes) -> None:
        if self.path:
            # Positions are ours to choose: pwrite needs no seek and cannot race anything.
            view = memoryview(data)
            while view:
                written = os.pwrite(self.fd, view, self.offset)
                self.offset += written
                view = view[written:]
        else:
            _write_all(self.fd, data)

    def close(self) -> None:
        if self.saved_stdout is not None:
            sys.stdout.flush()
            os.dup2(self.saved_stdout, 1)
            self.saved_stdout = None
        os.close(self.fd)


# -- outcomes as lines -----------------------------------------------------------------------------


def encode_error(error: BaseException) -> str:
    """The JSON text of the ``"error"`` field for ``error``.

    Example:
        >>> import json
        >>> from conveyor._cli_io import encode_error
        >>> json.loads(encode_error(ValueError("bad")))["type"]
        'ValueError'
    """
    text = getattr(error, "_conveyor_traceback", None)
    if not isinstance(text, str):
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    cls = type(error)
    module = cls.__module__
    if module == "builtins":
        name = cls.__qualname__
    elif module.startswith("conveyor._"):
        name = f"conveyor.{cls.__qualname__}"  # the public name of conveyor's own errors
    else:
        name = f"{module}.{cls.__qualname__}"
    try:
        message = str(error)
    except Exception:
        message = f"<unprintable {cls.__qualname__}>"
    return json.dumps({"type": name, "message": message, "traceback": text}, ensure_ascii=False)


def output_line(input_json: str, ok: bool, payload: str) -> bytes:
    """One output line, newline included.

    Example:
        >>> from conveyor._cli_io import output_line
        >>> output_line('"7"', True, "13")
        b'{"input": "7", "output": 13}\\n'
    """
    key = "output" if ok else "error"
    text = f'{{"input": {input_json}, "{key}": {payload}}}\n'
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Bytes that were not UTF-8 in the input (kept as lone surrogates) cannot be
        # written as UTF-8: escape them, which is still valid JSON.
        return (json.dumps(json.loads(text), ensure_ascii=True) + "\n").encode("ascii")
