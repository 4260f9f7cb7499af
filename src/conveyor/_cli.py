"""The command line: ``conveyor run MODULE:FUNCTION [INPUT ...]`` and ``conveyor bench``.

How ``run`` moves one input line::

    reader thread: input files/stdin --lines--> (waits for room in the window) --> events
    main thread:   events --> Pool.submit(_Call(fn), value) --done callback--> events
                   events --> settled outcomes, in input or completion order
                          --> journal commit --> one write of their lines --> room released

The main thread alone owns the journal, the output and the progress line; the reader thread
only reads, and the pool's threads only put finished calls on the event queue. The window (a
semaphore) bounds the inputs read but not yet written, so memory stays bounded on endless
input, and a reader blocked on a silent stdin never delays the output of finished calls.

One call is submitted per input, rather than a batched map, so that each input's outcome is
its own, whatever happens to the others: a timeout or a crashed worker fails that input
alone, and Ctrl-C can cancel the calls not started while the running ones finish.

With a journal, a group of outcomes is committed *before* its lines are written (see
``_journal``): a crash can lose a write, never repeat one, and a lost write to an ``--output``
file is redone from the journal when the run resumes.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import itertools
import json
import os
import queue
import signal
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

from . import __version__
from ._cli_call import _Call
from ._journal import Journal, JournalError, Outcome, digest
from ._pool import Pool
from ._progress import Progress

__all__ = ["main"]

#: Bytes read from an input at a time.
CHUNK = 1 << 16
#: Inputs of at most this many bytes in all are counted up front, for the progress total.
COUNT_LIMIT = 256 << 20
#: Most events handled before the settled outcomes are committed and written.
GROUP = 1024
#: Under a journal, seconds between two commits (unless half the window waits to be
#: written). Each commit is followed by a write that a kill could separate from it; fewer
#: commits make that rarer, and cost less.
COMMIT_INTERVAL = 0.05

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2."""


# -- the command line ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, as every other conveyor error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


RUN_DESCRIPTION = """\
Call FUNCTION on every line of the INPUT files (standard input when none, or "-") through a
conveyor Pool, and write one JSON line per input on standard output:

  {"input": "7", "output": 13}
  {"input": "x", "error": {"type": "ValueError", "message": "...", "traceback": "..."}}

FUNCTION receives the line as a str, without its line ending (\\n or \\r\\n). Outputs that
are not JSON-serialisable are written as their repr(), as a JSON string. MODULE is imported
as `python -m` would, with the current directory first on the path. Input is read lazily,
so endless input works in bounded memory."""

RUN_EPILOG = """\
journal and resume:
  --journal FILE records each input's outcome in FILE (SQLite) before its output line is
  written. After a crash, kill -9 or Ctrl-C, run the same command with --resume: inputs that
  succeeded are skipped, the others run, and only their lines are written. With --output
  FILE every input ends up with exactly one line in FILE, even after kill -9; on standard
  output, a kill landing between a commit and the write that follows it loses those lines.
  Under --journal a failure is not final: it gets no output line, is reported on stderr
  and runs again on --resume, so that each input's one line is written once it succeeds.
  A journal refuses (exit 2) another FUNCTION, other input, or a change of --json.

interrupts:
  The first Ctrl-C stops reading input, cancels the calls not started, lets the running
  ones finish (each within --timeout, if given), writes and commits their outcomes and
  exits 130. A second Ctrl-C exits at once; the journal stays consistent.

exit status:
  0 every input succeeded, 1 some failed, 2 bad usage or input, 130 interrupted.

examples:
  seq 25 34 | conveyor run conveyor.examples:fib -b process
  conveyor run mymodule:fetch urls.txt -j 32 --timeout 10 --retries 2 -o pages.jsonl
  conveyor run mymodule:fetch urls.txt -o pages.jsonl --journal pages.journal --resume"""


def _parser() -> tuple[_Parser, dict[str, _Parser]]:
    """The ``conveyor`` parser and the parser of each command."""
    parser = _Parser(
        prog="conveyor",
        description="Pools, futures and pipelines that never hang, from the command line.",
    )
    parser.add_argument("--version", action="version", version=f"conveyor {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser(
        "run",
        help="call MODULE:FUNCTION on every input line, one JSON line out per input",
        description=RUN_DESCRIPTION,
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("target", metavar="MODULE:FUNCTION", help="e.g. conveyor.examples:fib")
    run.add_argument(
        "inputs", metavar="INPUT", nargs="*", help='files of input lines; "-" is stdin'
    )
    run.add_argument(
        "-b",
        "--backend",
        choices=["thread", "process"],
        default="thread",
        help="threads for waiting (I/O), processes for computing (default: thread)",
    )
    run.add_argument(
        "-j", "--workers", type=_positive_int, metavar="N", help="calls at once (default: pool's)"
    )
    run.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="fail a call that runs longer (process workers are stopped; threads abandoned)",
    )
    run.add_argument(
        "--retries",
        type=_count,
        default=0,
        metavar="N",
        help="run a failed call up to N more times (default: 0)",
    )
    order = run.add_mutually_exclusive_group()
    order.add_argument(
        "--ordered",
        dest="ordered",
        action="store_true",
        default=True,
        help="write outputs in input order (default)",
    )
    order.add_argument(
        "--unordered",
        dest="ordered",
        action="store_false",
        help="write each output as soon as it is ready",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="parse each line as JSON first: an array gives positional arguments, an "
        "object keyword arguments, anything else the single argument",
    )
    run.add_argument(
        "-o", "--output", metavar="FILE", help="write the JSON lines to FILE, not stdout"
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a live line on stderr: done/total, rate, ETA, failures (default: on when "
        "stderr is a terminal)",
    )
    run.add_argument("--journal", metavar="FILE", help="record outcomes in FILE, to resume")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run recorded in --journal: skip inputs that succeeded",
    )

    bench = commands.add_parser(
        "bench",
        help="measure threads vs processes vs the stdlib pools on this machine (under 30 s)",
        description="Run the classic experiments on this machine and print what fits where: "
        "recursive fib and time.sleep on threads and on processes, and conveyor against the "
        "standard library's pools.",
    )
    return parser, {"run": run, "bench": bench}


def _whole_number(minimum: int, wording: str) -> Callable[[str], int]:
    """An argparse ``type`` for whole numbers of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {wording}, got {value}")
        return value

    return parse


_positive_int = _whole_number(1, "at least 1")
_count = _whole_number(0, "0 or more")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``conveyor`` command with ``argv`` (default: ``sys.argv[1:]``); return the
    exit status.

    Example:
        >>> from conveyor._cli import main
        >>> main(["run", "conveyor.examples:fib", "/nonexistent/input"])  # says why on stderr
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = _parser()
    if argv and argv[0] in commands:
        # Intermixed: options may come after the input files (`run m:f a.txt --json`).
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = parser.parse_args(argv)
    if args.command == "run":
        try:
            return _run(args)
        except UsageError as exc:
            _say(str(exc))
            return EXIT_USAGE
        except KeyboardInterrupt:
            # Ctrl-C before the run started (the handler that makes it graceful is not in
            # place yet): nothing was written.
            _say("interrupted")
            return EXIT_INTERRUPTED
    if args.command == "bench":
        from ._bench import run_bench

        return run_bench()
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"conveyor: {message}\n")
        sys.stderr.flush()
    except Exception:
        # OSError (stderr closed), or a RuntimeError when a signal handler interrupts the
        # main thread's own write to stderr: a message is not worth a crash.
        pass


# -- the function --------------------------------------------------------------------------


def resolve(target: str) -> Callable[..., Any]:
    """The callable named by ``MODULE:FUNCTION``, or ``UsageError`` saying what is wrong.

    Example:
        >>> from conveyor._cli import resolve
        >>> resolve("conveyor.examples:fib")(10)
        55
    """
    module_name, colon, name = target.partition(":")
    if not colon:
        raise UsageError(
            f"{target!r} names no function: write MODULE:FUNCTION, e.g. conveyor.examples:fib"
        )
    if not module_name or not name:
        raise UsageError(f"{target!r}: both MODULE and FUNCTION are needed in MODULE:FUNCTION")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise UsageError(
                f"no module named {missing!r} (looked in {os.getcwd()!r} and the installed "
                "packages)"
            ) from None
        raise UsageError(f"importing {module_name!r} failed: {_describe(exc)}") from None
    except (Exception, SystemExit) as exc:
        raise UsageError(f"importing {module_name!r} failed: {_describe(exc)}") from None
    found: object = module
    for part in name.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no function {name!r}") from None
    if not callable(found):
        raise UsageError(f"{target} is a {type(found).__name__}, not a function")
    return found


def _describe(exc: BaseException) -> str:
    try:
        message = str(exc)
    except Exception:
        message = "(unprintable)"
    first = message.strip().splitlines()[0] if message.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def encode_error(error: BaseException) -> str:
    """The JSON text of the ``"error"`` field for ``error``.

    Example:
        >>> import json
        >>> from conveyor._cli import encode_error
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
        >>> from conveyor._cli import output_line
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
            if journal.output == absolute:
                output._repair(journal)
            else:
                # Another file than the journal wrote to: it gets the missing lines only,
                # after what it holds.
                output.offset = os.fstat(fd).st_size
                journal.set_output(absolute, output.offset)
        except BaseException:
            os.close(fd)
            raise
        return output

    def _repair(self, journal: Journal) -> None:
        """Make the file hold exactly the lines the journal says were written: cut what a
        crash left half-written (or what follows it) and write again, from the journal, the
        committed lines whose write did not happen."""
        size = os.fstat(self.fd).st_size
        end, last = journal.output_end(size)
        if last is not None:
            pos, text = last
            if os.pread(self.fd, len(text), pos) != text:
                raise UsageError(
                    f"output {self.path!r} does not hold the lines that journal "
                    f"{journal.path!r} wrote to it; give another --output"
                )
        elif size < end:
            raise UsageError(
                f"output {self.path!r} is shorter than when journal {journal.path!r} began "
                "writing to it; give another --output"
            )
        os.ftruncate(self.fd, end)
        self.offset = end
        for text in journal.lines_from(end):
            os.pwrite(self.fd, text, self.offset)
            self.offset += len(text)

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


# -- the run ---------------------------------------------------------------------------------

# Slot states.
_RUNNING, _DONE, _CANCELLED = 0, 1, 2


class _Slot:
    """One input on its way: submitted, then settled with its output line."""

    __slots__ = ("digest", "future", "input_json", "line", "ok", "source", "state")

    def __init__(self, line: _Line, input_json: str, fingerprint: bytes) -> None:
        self.source = line
        self.input_json = input_json
        self.digest = fingerprint
        self.future: Future[str] | None = None
        self.state = _RUNNING
        self.ok = False
        self.line = b""


@dataclass
class _Stop:
    """The reader's news that input cannot go on (a malformed line, an unreadable file)."""

    message: str


_EOF = object()
_INTERRUPT = object()


class _Run:
    """One ``conveyor run``: the event loop of the main thread."""

    def __init__(
        self,
        pool: Pool,
        call: _Call,
        output: _Output,
        journal: Journal | None,
        progress: Progress | None,
        ordered: bool,
        json_input: bool,
    ) -> None:
        self.pool = pool
        self.call = call
        self.output = output
        self.journal = journal
        self.progress = progress
        self.ordered = ordered
        self.json_input = json_input
        self.events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.window = max(256, 8 * pool.workers)
        self.room = threading.Semaphore(self.window)
        self.halt = threading.Event()  # tells the reader to stop
        self.queue: collections.deque[_Slot] = collections.deque()  # ordered: input order
        self.settled: list[_Slot] = []  # unordered: settled, not yet written
        self.running: dict[int, _Slot] = {}
        self.inflight = 0  # slots not yet written (or dropped)
        self.input_over = False
        self.stopping: str | None = None  # why no more input is taken
        self.usage_error: str | None = None
        self.interrupts = 0
        self.succeeded = 0
        self.failed = 0
        # Between a commit and the write of its lines, a second Ctrl-C waits for the write.
        self.critical = False
        self.exit_after_write = False

    # -- reader thread --------------------------------------------------------------------

    def read(self, lines: Iterator[_Line]) -> None:
        """Body of the reader thread: parse lines and hand them over while there is room."""
        events, room, halt = self.events, self.room, self.halt
        try:
            for line in lines:
                room.acquire()
                if halt.is_set():
                    return
                text = line.raw.decode("utf-8", "surrogateescape")
                if self.json_input:
                    try:
                        value = json.loads(text)
                    except ValueError as exc:
                        events.put(_Stop(f"{line.where()}: not valid JSON ({exc})"))
                        return
                    input_json = text.strip()
                else:
                    value = text
                    input_json = json.dumps(text, ensure_ascii=False)
                events.put((line, value, input_json, digest(line.raw)))
            events.put(_EOF)
        except UsageError as exc:
            events.put(_Stop(str(exc)))
        except BaseException as exc:  # pragma: no cover - a bug; say it rather than hang
            events.put(_Stop(f"reading input failed: {_describe(exc)}"))

    # -- signals --------------------------------------------------------------------------

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.events.put(_INTERRUPT)  # SimpleQueue.put may be called from a handler
        elif self.critical:
            self.exit_after_write = True
        else:
            self._exit_at_once()

    def _exit_at_once(self) -> NoReturn:
        # Everything committed is safe in the journal, and nothing is half-committed: the
        # handler runs between two bytecodes of the main thread, never inside a commit.
        if self.progress is not None:
            self.progress.close()
        _say("stopped at once")
        os._exit(EXIT_INTERRUPTED)

    # -- main loop -----------------------------------------------------------------------

    def loop(self) -> None:
        events = self.events
        tick = 0.1 if self.progress is not None else None
        next_flush = 0.0
        while not (self.input_over and self.inflight == 0):
            timeout = tick
            waiting = self.inflight - len(self.running)  # settled, not yet written
            if waiting and self.journal is not None:
                timeout = max(0.0, min(tick or COMMIT_INTERVAL, next_flush - time.monotonic()))
            try:
                event: object = events.get(timeout=timeout)
            except queue.Empty:
                event = None
            handled = 0
            while event is not None:
                self.handle(event)
                handled += 1
                if handled >= GROUP:
                    break
                try:
                    event = events.get_nowait()
                except queue.Empty:
                    event = None
            now = time.monotonic()
            if (
                self.journal is None
                or now >= next_flush
                or self.input_over
                or self.inflight - len(self.running) >= self.window // 2
            ):
                self.flush()
                next_flush = now + COMMIT_INTERVAL
            if self.progress is not None and event is None:
                self.progress.advance(0)

    def handle(self, event: object) -> None:
        if isinstance(event, _Slot):
            self.settle(event)
        elif isinstance(event, tuple):
            if self.stopping is None:
                self.submit(*event)
        elif event is _EOF:
            self.input_over = True
        elif event is _INTERRUPT:
            if self.stopping is None:
                running = len(self.running)
                if self.progress is not None:
                    self.progress.clear()
                _say(
                    f"interrupted: finishing {running} running call"
                    f"{'' if running == 1 else 's'}; press Ctrl-C again to stop at once"
                )
                self.stop("interrupted", cancel=True)
        elif isinstance(event, _Stop) and self.stopping is None:
            # The lines before the bad one were good: they are all run and written.
            self.usage_error = event.message
            self.stop("bad input", cancel=False)

    def submit(self, line: _Line, value: Any, input_json: str, fingerprint: bytes) -> None:
        slot = _Slot(line, input_json, fingerprint)
        self.inflight += 1
        if self.ordered:
            self.queue.append(slot)
        try:
            future = self.pool.submit(self.call, value)
        except Exception as exc:  # the pool refuses work (broken): this input fails
            future = Future()
            future.set_exception(exc)
        slot.future = future
        self.running[line.index] = slot
        events = self.events
        future.add_done_callback(lambda _: events.put(slot))

    def settle(self, slot: _Slot) -> None:
        future = slot.future
        assert future is not None
        del self.running[slot.source.index]
        if future.cancelled():
            slot.state = _CANCELLED
        else:
            error = future.exception()
            if error is None:
                slot.ok, payload = True, future.result()
            else:
                slot.ok, payload = False, encode_error(error)
            slot.line = output_line(slot.input_json, slot.ok, payload)
            slot.state = _DONE
        if not self.ordered:
            self.settled.append(slot)

    def stop(self, why: str, *, cancel: bool) -> None:
        """Take no more input; with ``cancel``, cancel the calls not started. The others
        finish and are written."""
        self.stopping = why
        self.input_over = True
        self.halt.set()
        self.room.release()  # wakes the reader if it waits for room; it then sees halt
        if not cancel:
            return
        for slot in list(self.running.values()):
            assert slot.future is not None
            slot.future.cancel()  # False for a running call, which is left to finish

    def flush(self) -> None:
        """Commit the settled outcomes, then write their lines."""
        if self.ordered:
            ready = []
            queue_ = self.queue
            while queue_ and queue_[0].state != _RUNNING:
                ready.append(queue_.popleft())
        else:
            ready, self.settled = self.settled, []
        if not ready:
            return
        journal = self.journal
        output = self.output
        rows: list[Outcome] = []
        lines: list[bytes] = []
        offset = output.offset
        succeeded = failed = 0
        for slot in ready:
            if slot.state == _CANCELLED:
                continue
            if slot.ok:
                succeeded += 1
            else:
                failed += 1
            # Under a journal a failure is not final (--resume runs it again), so it gets no
            # line: an input's one line is written once, when it succeeds.
            written = slot.ok or journal is None
            pos = None
            if written:
                if output.path:
                    pos = offset
                    offset += len(slot.line)
                lines.append(slot.line)
            if journal is not None:
                rows.append((slot.source.index, slot.digest, slot.ok, slot.line, pos))
        data = b"".join(lines)
        if self.progress is not None and output.tty and data:
            self.progress.clear()
        self.critical = True
        # A kill between the commit and the write loses these lines from stdout (a file given
        # with --output is repaired on resume). The commit releases the GIL, and taking it
        # back from busy worker threads can take a whole switch interval (5 ms): shortened
        # here, the gap is tens of microseconds.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        try:
            if journal is not None:
                journal.record(rows)
            if data:
                output.write(data)
        except BrokenPipeError:
            self._pipe_closed()
        finally:
            sys.setswitchinterval(switch_interval)
            self.critical = False
        if self.exit_after_write:
            self._exit_at_once()
        self.inflight -= len(ready)
        self.room.release(len(ready))
        self.succeeded += succeeded
        self.failed += failed
        if journal is not None and failed:
            for slot in ready:
                if slot.state == _DONE and not slot.ok:
                    self._report_failure(slot)
        if self.progress is not None:
            self.progress.advance(succeeded + failed, failed=failed)

    def _report_failure(self, slot: _Slot) -> None:
        error = json.loads(slot.line)["error"]
        if self.progress is not None:
            self.progress.clear()
        _say(
            f"{slot.source.where()} failed ({error['type']}: "
            f"{error['message'].strip().splitlines()[0] if error['message'].strip() else ''})"
            "; --resume runs it again"
        )

    def _pipe_closed(self) -> NoReturn:
        # The reader of stdout went away (`| head`): end as the Unix tools do, by SIGPIPE.
        # What was committed stays committed; the worker processes end with us.
        if self.progress is not None:
            self.progress.close()
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
        os._exit(128 + signal.SIGPIPE)  # pragma: no cover - SIGPIPE ended the process


def _run(args: argparse.Namespace) -> int:
    if args.resume and not args.journal:
        raise UsageError("--resume needs --journal FILE (the journal of the run to resume)")
    # As `python -m` does: modules in the current directory can be imported.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    fn = resolve(args.target)
    sources = _open_sources(args.inputs)
    journal: Journal | None = None
    output: _Output | None = None
    try:
        if args.journal:
            try:
                journal = Journal.open(
                    args.journal,
                    target=args.target,
                    json_input=args.json,
                    resume=args.resume,
                    output=os.path.abspath(args.output) if args.output else "",
                )
            except JournalError as exc:
                raise UsageError(str(exc)) from None
        show_progress = args.progress if args.progress is not None else sys.stderr.isatty()
        total = _count_lines(sources) if show_progress else None
        lines = _read_lines(sources)
        skipped = 0
        if journal is not None and not journal.created:
            redo, skipped = _skip_done(journal, lines)
            lines = itertools.chain(redo, lines)
        if total is not None:
            total -= skipped
        if args.output:
            output = _Output.file(args.output, journal)
        else:
            output = _Output.stdout()
            if journal is not None:
                journal.set_output("", 0)
        try:
            pool = Pool(args.backend, args.workers, timeout=args.timeout, retries=args.retries)
        except (TypeError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        progress = Progress(total) if show_progress else None
        run = _Run(pool, _Call(fn, args.json), output, journal, progress, args.ordered, args.json)
        return _drive(run, pool, lines, skipped)
    finally:
        if output is not None:
            output.close()
        if journal is not None:
            journal.close()
        for source in sources:
            if source.fd != 0:
                os.close(source.fd)


def _drive(run: _Run, pool: Pool, lines: Iterator[_Line], skipped: int) -> int:
    """Run the loop with the graceful Ctrl-C in place; returns the exit status."""
    started = time.monotonic()
    reader = threading.Thread(target=run.read, args=(lines,), name="conveyor-reader", daemon=True)
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, run.on_sigint)
    try:
        reader.start()
        run.loop()
    finally:
        # Pool.shutdown waits for running calls; none is left unless the loop failed.
        pool.shutdown(wait=True, cancel_futures=True)
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        if run.progress is not None:
            run.progress.close()
    if run.stopping is None:
        # The reader has put its end of input; without halt it needs no more room.
        reader.join()
    elapsed = time.monotonic() - started
    journal = run.journal
    if run.usage_error is not None:
        _say(run.usage_error)
        return EXIT_USAGE
    done = run.succeeded + run.failed
    if run.stopping == "interrupted":
        resume = "; run again with --resume to go on" if journal is not None else ""
        _say(f"interrupted after {done} input{'' if done == 1 else 's'}{resume}")
        return EXIT_INTERRUPTED
    if run.progress is not None:
        skipped_note = f" ({skipped} skipped: done before)" if skipped else ""
        _say(f"{done} inputs in {elapsed:.1f} s, {run.failed} failed{skipped_note}")
    if journal is not None and run.failed:
        _say(
            f"{run.failed} of {done} inputs failed and have no output line yet; "
            "run again with --resume to retry them"
        )
    return EXIT_FAILED if run.failed else EXIT_OK
