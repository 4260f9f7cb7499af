"""The run loop of ``conveyor run``: inputs submitted to a Pool, outcomes committed and written.

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
file is redone from the journal when the run resumes (``_journal_resume``).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

from ._cli import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    _describe,
    _say,
    resolve,
)
from ._cli_call import call_for
from ._cli_io import (
    _count_lines,
    _Line,
    _open_sources,
    _Output,
    _read_lines,
    encode_error,
    output_line,
)
from ._journal import Journal, JournalError, Outcome, digest
from ._journal_resume import _skip_done
from ._pool import Pool
from ._progress import Progress

__all__ = ["_RunLoop", "_run"]

#: Most events handled before the settled outcomes are committed and written.
GROUP = 1024
#: Under a journal, seconds between two commits (unless half the window waits to be
#: written). Each commit is followed by a write that a kill could separate from it; fewer
#: commits make that rarer, and cost less.
COMMIT_INTERVAL = 0.05

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


class _RunLoop:
    """One ``conveyor run``: the event loop of the main thread, and the reader thread's body."""

    def __init__(
        self,
        pool: Pool,
        call: Callable[[Any], Any],
        output: _Output,
        journal: Journal | None,
        progress: Progress | None,
        ordered: bool,
        json_input: bool,
        tell: str | None = None,
    ) -> None:
        self.pool = pool
        # The target's name, to say where it runs once measured (-v, --progress), and what
        # was said last.
        self.tell = tell
        self.told = ""
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
        if self.tell is not None:
            self._tell_decision(self.tell)

    def _tell_decision(self, target: str) -> None:
        """Say where ``target`` runs, once ``-b auto`` has decided, and again if it changes."""
        decided = [d for d in self.pool.decisions().values() if not d.startswith("thread for now")]
        if decided and decided[0] != self.told:
            self.told = decided[0]
            if self.progress is not None:
                self.progress.clear()
            _say(f"{target} runs on {decided[0]}")

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
    if args.scheduler is not None and args.backend != "dask":
        raise UsageError("--scheduler ADDRESS is the address of a Dask scheduler: add -b dask")
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
        options = {} if args.scheduler is None else {"address": args.scheduler}
        try:
            backend, call = call_for(fn, args.backend, args.json)
            pool = Pool(
                backend, args.workers, timeout=args.timeout, retries=args.retries, **options
            )
        except (TypeError, ValueError, ImportError, OSError) as exc:
            raise UsageError(str(exc)) from None
        progress = Progress(total) if show_progress else None
        tell = args.target if args.verbose or show_progress else None
        run = _RunLoop(pool, call, output, journal, progress, args.ordered, args.json, tell)
        return _drive(run, pool, lines, skipped)
    finally:
        if output is not None:
            output.close()
        if journal is not None:
            journal.close()
        for source in sources:
            if source.fd != 0:
                os.close(source.fd)


def _drive(run: _RunLoop, pool: Pool, lines: Iterator[_Line], skipped: int) -> int:
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
