"""The command line: ``conveyor run MODULE:FUNCTION [INPUT ...]`` and ``conveyor bench``.

This module parses the command line and hands it to the command: ``main`` runs on the main
thread and holds no state of its own. The rooms of ``run``, each with its own opening note
on which thread owns what:

    _cli             the parser, its argument types, MODULE:FUNCTION, UsageError, main()
    _cli_io          input files and stdin read into lines; the output; outcomes as lines
    _cli_loop        the run loop: reader thread, Pool, events, commits and writes, Ctrl-C
    _cli_call        what a worker runs for each input (imports nothing of the others)
    _journal_resume  --resume: the input and the output file checked against the journal

The other rooms import ``UsageError``, the exit statuses and ``_say`` from here, so this
module imports none of them at its top: ``main`` imports the run loop when ``run`` starts, as
it imports ``_bench`` for ``bench``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import __version__

__all__ = ["main"]

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
  conveyor run mymodule:fetch urls.txt -o pages.jsonl --journal pages.journal --resume
  conveyor run mymodule:work inputs.txt -b dask --scheduler tcp://10.0.0.5:8786"""


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
        choices=["auto", "thread", "process", "dask", "asyncio"],
        default="auto",
        help="auto: start on threads, measure, move to processes if the function computes "
        "holding the GIL; thread for waiting (I/O), process for computing, dask for a "
        "cluster, asyncio for coroutine functions (default: auto; asyncio for an async def)",
    )
    run.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="with -b dask: the address of a running Dask scheduler, e.g. tcp://host:8786 "
        "(default: start a local cluster of -j worker processes)",
    )
    run.add_argument(
        "-j",
        "--workers",
        type=_positive_int,
        metavar="N",
        help="calls at once, in flight on asyncio (default: pool's)",
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
    run.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="say on stderr where the function runs once -b auto has measured it, and why "
        "(also said with --progress)",
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
            from ._cli_loop import _run

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
