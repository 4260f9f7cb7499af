"""The code that runs inside a worker process of the process backend.

A worker reads jobs from its pipe, runs each call and sends outcomes back. Before each call it
writes the call's index into ``mark``, a word of memory shared with the pool, so that if the
process dies the pool knows which call killed it (-1: while unpickling the job).

A job's outcomes are sent when it ends, and earlier whenever ``JOB_FLUSH_SECONDS`` of its
calls have run (the pool reads them only once the job's batch has ended, so this only bounds
what a crash loses: those calls run again elsewhere). Sending costs a worker that has just
woken from a sleeping call 50-100 µs on a virtual machine, so not after every call. Jobs the
pool sent together in one message (``RUN_MANY``: short jobs queued for this worker, each maybe
a future someone waits for, such as many single submits) send their outcomes back together
(``MANY``), within ``FLUSH_SECONDS``.

The worker exits when the pool closes its pipe, when told to stop, or when the pool's process
dies: a thread watches ``lifeline``, a pipe whose other end only the pool holds (a worker
forked by ``_forker`` needs no thread: the kernel kills it when its forker dies).
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from . import _wire

# Messages, pool -> worker: one byte of kind, then the pickle. Jobs run in arrival order.
RUN = 0  # RUN + (fn_id, fn_blob | None, star, kwargs | None, fast, args)
STOP = 1  # STOP
FORGET = 2  # FORGET: drop cached functions
RUN_MANY = 3  # RUN_MANY + several RUN bodies (see ``bundle``): jobs the pool sent together
# Messages, worker -> pool; each is about the oldest job not finished yet. Each is a pickle
# (a ``_wire`` message, whose first byte is below 10) of a tuple whose first item is its kind,
# except RESULTS and MANY, which start with their own byte (see ``RESULTS_HEADER``, ``bundle``).
READY = 10  # (READY, pid)
RESULTS = 11  # RESULTS_HEADER, then the _wire message of (errors, values)
UNREADABLE = 12  # (UNREADABLE, error): the job could not be unpickled
INIT_FAILED = 13  # (INIT_FAILED, error)
MANY = 15  # MANY + several of the messages above (see ``bundle``), in the order they were made

#: A pool's initializer, pickled as a function (by value if need be), and its arguments as
#: they are: they travel as a new process's arguments (or are inherited), where objects that
#: may only be inherited, such as a ``multiprocessing.Queue``, may travel.
Init = tuple[bytes, tuple[Any, ...]]
KEPT = 14  # (KEPT, names): the job's segments still in use here (see _wire.Segments)

#: The head of a RESULTS message: its kind (RESULTS), the job index of its first value, how
#: many values it holds, whether the job has finished, and the seconds since the job started.
#: The pool reads it without unpickling anything, so that the thread that owns the workers
#: never runs user code (a result's ``__setstate__`` or ``__reduce__``): the pickle that
#: follows, of ``(errors, values)``, is read outside (see ``process``). ``errors`` maps a
#: value's position in the message to its exception, pickled on its own (``pack_error``).
RESULTS_HEADER = struct.Struct("<BqI?d")
_COUNT = struct.Struct("<I")

FLUSH_SECONDS = 0.001
JOB_FLUSH_SECONDS = 0.1
#: A worker whose last job came within this many seconds of the one before waits for the next
#: awake (asking its pipe without sleeping) for as long, when the pool lets it (no more
#: workers than CPUs). Waking a sleeping process costs tens of microseconds on a virtual
#: machine; a pool used call by call (submit, result, submit) pays it on every call. The
#: window must cover the pool's own turnaround between two such calls (four thread and process
#: wake-ups): 150 µs did not on a slower machine, so the worker slept after every call.
SPIN_SECONDS = 300e-6


def _tolerate_a_main_that_is_not_a_file() -> None:
    """Let a worker start when the parent's ``__main__`` was read from standard input.

    Such a ``__main__`` has ``__file__ = "<stdin>"``; ``multiprocessing`` makes every
    ``forkserver`` child run that path again before our code starts, and the child dies of
    ``FileNotFoundError``. Its functions travel by value anyway (see ``_wire``), so a path that
    is not a file is skipped. This module is preloaded by the fork server, so the change lives
    in the server and its children only, never in the user's process.
    """
    from multiprocessing import spawn

    original = getattr(spawn, "_fixup_main_from_path", None)
    if original is None or getattr(original, "_conveyor", False):
        return

    def fixup(main_path: str) -> None:
        if os.path.isfile(main_path):
            original(main_path)

    fixup._conveyor = True  # type: ignore[attr-defined]
    spawn._fixup_main_from_path = fixup  # type: ignore[attr-defined]


#: Set by the pool, only while it starts a fork server: how to import the pool's ``__main__``.
MAIN_ENV = "CONVEYOR_FORK_SERVER_MAIN"


def _preload_parent_main(spec: str) -> None:
    """Run the parent's ``__main__`` once in the fork server, so that its workers need not.

    ``multiprocessing`` means to do this when ``"__main__"`` is preloaded, but before Python
    3.13.8 it never passes the main module's path to the server (CPython issue 126631), so
    each worker ran the main script again: every import of it (NumPy alone takes 50 ms here)
    paid once per worker. A failure here is left for each worker to meet and report.
    """
    from multiprocessing import process, spawn

    try:
        kind, target, argv, path = json.loads(spec)
    except ValueError:
        return
    main = sys.modules.get("__main__")
    if kind == "path" and getattr(main, "__file__", None) == target:
        return  # this Python preloaded it already
    if kind == "name" and getattr(getattr(main, "__spec__", None), "name", None) == target:
        return
    # Python 3.11 and older never give the server the parent's sys.path either: without it,
    # a script importing a module beside it fails here, and then runs in every child.
    for entry in reversed(path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    saved_argv = sys.argv
    sys.argv = list(argv)
    current: Any = process.current_process()
    current._inheriting = True  # a Pool made at import time then fails, as in a worker
    try:
        if kind == "path":
            spawn.import_main_path(target)
        elif kind == "name":
            spawn._fixup_main_from_name(target)  # type: ignore[attr-defined]
    except BaseException:
        pass
    finally:
        del current._inheriting
        sys.argv = saved_argv


if __name__ != "__main__" and "multiprocessing.forkserver" in sys.modules:
    # Imported in a fork server (the user's process imports it too, and is left alone there:
    # it imported conveyor before any fork server existed, which is where the preload runs).
    _tolerate_a_main_that_is_not_a_file()
    _spec = os.environ.pop(MAIN_ENV, None)
    if _spec is not None:
        _preload_parent_main(_spec)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process, as text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def pack_error(error: BaseException) -> tuple[bytes, str]:
    """An exception, pickled on its own (so that if the pool cannot unpickle it, only its
    call fails), and its formatted traceback."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    error.__traceback__ = None
    try:
        return _wire.dumps(error), text
    except BaseException as problem:
        from .._errors import PicklingFailed

        substitute = PicklingFailed(
            f"the call raised {type(error).__qualname__}: {error!r}, which cannot be "
            f"pickled back to the pool ({type(problem).__name__}: {problem})"
        )
        return _wire.dumps(substitute), text


def unpack_error(packed: tuple[bytes, str]) -> BaseException:
    """The exception sent by a worker, with the remote traceback as its cause; if it cannot
    be unpickled here, an ``UnpicklingFailed`` caused by the reason."""
    blob, text = packed
    try:
        error: BaseException = _wire.loads(blob)
    except BaseException as problem:
        from .._errors import UnpicklingFailed

        lines = text.strip().splitlines()
        failure = UnpicklingFailed(
            f"the exception raised in the worker ({lines[-1] if lines else 'unknown'}) "
            f"could not be unpickled in the pool: {type(problem).__name__}: {problem}"
        )
        failure.__cause__ = problem
        return failure
    error.__cause__ = RemoteTraceback(f'\n"""\n{text}"""')
    return error


def _watch_lifeline(lifeline: Connection) -> None:
    try:
        lifeline.recv_bytes()
    except BaseException:
        pass
    # The pool's process is gone: nobody wants our results, nor its shared memory.
    clean_up_after_pool()
    os._exit(70)


def clean_up_after_pool() -> None:
    """Unlink the shared-memory files of the pool's process, which died without doing so."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        _wire.forget_files_of(parent.pid)


def main(
    conn: Connection,
    lifeline: Connection | None,
    mark: Any,
    init: Init | None,
    close_fds: tuple[int, ...],
    spin: bool = False,
) -> None:
    """Entry point of a worker process."""
    # Ctrl-C in a terminal reaches the whole process group; the pool decides what a
    # keyboard interrupt means, not each worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in close_fds:  # ends of other pipes inherited through fork
        try:
            os.close(fd)
        except OSError:
            pass
    watcher = None
    if lifeline is not None:  # None: the kernel kills us with our parent (see _forker)
        watcher = threading.Thread(target=_watch_lifeline, args=(lifeline,), daemon=True)
        watcher.start()
    mark = memoryview(mark).cast("B").cast("q")  # faster to write than the ctypes array
    send = conn.send_bytes
    if init is not None:
        try:
            initializer_blob, initargs = init
            initializer = _wire.loads(initializer_blob)
            initializer(*initargs)
        except BaseException as exc:
            from ._base import log_initializer_failure

            log_initializer_failure()
            # What the initializer queued for other processes (a QueueHandler's records in a
            # multiprocessing.Queue) is flushed now, as at exit: once told, the pool may stop
            # this worker before it exits by itself.
            from multiprocessing import util

            util._exit_function()  # type: ignore[attr-defined]
            send(_wire.dumps((INIT_FAILED, pack_error(exc))))
            return
    send(_wire.dumps((READY, os.getpid())))
    functions: dict[int, Callable[..., Any]] = {}
    incoming = select.poll()
    incoming.register(conn.fileno(), select.POLLIN)
    clock = time.perf_counter
    awake = False  # wait for the next job without sleeping
    idle_since = clock()
    while True:
        if awake:
            until = clock() + SPIN_SECONDS
            while not incoming.poll(0) and clock() < until:
                pass
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            # The pool closes our pipe only after telling us to stop: its process is gone.
            # Let the watcher clean up after it (which ends this process) rather than exit
            # first; if the pool is alive after all, go after a moment.
            if watcher is not None:
                watcher.join(timeout=1.0)
            return
        awake = spin and clock() - idle_since < SPIN_SECONDS
        kind = data[0]  # the pool puts the kind of message in front of its pickle
        if kind == RUN:
            _run(memoryview(data)[1:], functions, mark, send)
            idle_since = clock()
        elif kind == RUN_MANY:
            _run_many(memoryview(data)[1:], functions, mark, send)
            idle_since = clock()
        elif kind == FORGET:
            functions.clear()
        else:
            return


def process_main(*args: Any) -> None:
    """Entry point of a worker started by ``multiprocessing`` (rather than by ``_forker``):
    ``main``, then exit at once, as a forked worker does. ``multiprocessing`` would wait first
    for every thread that a call left running, and the pool would have to kill the worker."""

    def run() -> int:
        from multiprocessing import util

        try:
            main(*args)
        finally:
            util._exit_function()  # type: ignore[attr-defined]
        return 0

    exit_after(run)


def exit_after(body: Callable[[], int]) -> NoReturn:
    """Run ``body``, then end the process at once with the exit code it returns (1 if it
    raises), without waiting for other threads or running ``atexit`` handlers."""
    code = 1
    try:
        code = body()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run(
    data: memoryview,
    functions: dict[int, Callable[..., Any]],
    mark: Any,
    send: Callable[[bytes], None],
) -> None:
    # mark = [job ordinal, where]; where is -1 while the job is unpickled, the index of the
    # running call in a careful job, and -(first index of the running chunk) - 2 in a fast one.
    mark[1] = -1
    mark[0] += 1
    job = _prepare(data, functions, mark, send)
    if job is not None:
        job.run()


def _run_many(
    data: memoryview,
    functions: dict[int, Callable[..., Any]],
    mark: Any,
    send: Callable[[bytes], None],
) -> None:
    """Run jobs the pool sent in one message (short ones: see ``_schedule``), and send their
    messages back together: when all have run, or once ``FLUSH_SECONDS`` have passed since
    the oldest message held, so that no outcome waits long behind the others."""
    held: list[bytes] = []
    clock = time.perf_counter
    since = clock()
    for part in unbundle(data):
        if not held:
            since = clock()
        _run(part, functions, mark, held.append)
        if held and clock() - since >= FLUSH_SECONDS:
            send(bundle(held))
            held = []
    if held:
        send(bundle(held))


def bundle(messages: Sequence[bytes | memoryview], kind: int = MANY) -> bytes:
    """One message of ``kind`` holding ``messages`` (a lone message goes as itself, unless it
    is a job): their count, each one's length, then each one."""
    if len(messages) == 1 and kind == MANY:
        return bytes(messages[0])
    head = struct.pack(f"<BI{len(messages)}I", kind, len(messages), *map(len, messages))
    return b"".join([head, *messages])


def unbundle(data: memoryview) -> list[memoryview]:
    """The messages in the body of a ``bundle`` (without its first byte, the kind)."""
    (count,) = _COUNT.unpack_from(data)
    offset = _COUNT.size * (count + 1)
    parts = []
    for (length,) in _COUNT.iter_unpack(data[_COUNT.size : offset]):
        parts.append(data[offset : offset + length])
        offset += length
    return parts


def _prepare(
    data: memoryview,
    functions: dict[int, Callable[..., Any]],
    mark: Any,
    send: Callable[[bytes], None],
) -> _Job | None:
    """The job in ``data``, or None if it cannot be unpickled (the pool is told why). Its
    arguments are referenced by the job alone once this returns (see ``_Job.let_go``)."""
    mapped: list[tuple[str, Any]] = []
    try:
        fn_id, fn_blob, star, kwargs, fast, args = _wire.loads(data, mapped)
        if fn_blob is not None:
            functions[fn_id] = _wire.loads(fn_blob)
        fn = functions[fn_id]
    except BaseException as exc:
        error = pack_error(exc)
        del exc
        _let_go(mapped, send)
        send(_wire.dumps((UNREADABLE, error)))
        return None
    if kwargs:
        fn = functools.partial(fn, **kwargs)
    call = _unpacking(fn) if star else fn
    return _Job(args, call, mark, send, fast, mapped)


def _let_go(mapped: list[tuple[str, Any]], send: Callable[[bytes], None]) -> None:
    """Unmap a job's segments, telling the pool which are still in use."""
    if mapped:
        kept = _wire.let_go(mapped)
        if kept:
            send(_wire.dumps((KEPT, kept)))


class _Job:
    """Runs the calls of one job, sending outcomes at the end and every JOB_FLUSH_SECONDS."""

    def __init__(
        self,
        args: Sequence[Any],
        call: Callable[[Any], Any],
        mark: Any,
        send: Callable[[bytes], None],
        fast: bool,
        mapped: list[tuple[str, Any]],
    ) -> None:
        self.args = args
        self.call = call
        self.mapped = mapped
        self.mark = mark
        self.send = send
        self.fast = fast
        self.values: list[Any] = []
        self.errors: dict[int, tuple[bytes, str]] = {}
        self.first = 0  # job index of values[0]

    def run(self) -> None:
        count = len(self.args)
        clock = time.perf_counter
        started = last = clock()
        if not self.fast and count <= 64:
            self._run_each(count, started)
        else:
            # Reading the clock after every call would cost as much as a trivial call: with
            # many calls (so each is fast) look at it once per chunk.
            step = 256 if self.fast else 64
            for low in range(0, count, step):
                high = min(low + step, count)
                if self.fast:
                    self._run_fast(low, high)
                else:
                    self._run_careful(low, high)
                now = clock()
                if now - last >= JOB_FLUSH_SECONDS and high < count:
                    self._flush(False, now - started)
                    self.first = high
                    last = now
        # (The last outcomes are sent here, once the loops have returned: their locals hold
        # the arguments, and a segment they are made from could not be let go while they live.)
        self.mark[1] = count
        self._flush(True, clock() - started)

    def _run_each(self, count: int, started: float) -> None:
        """A few calls, each marked, the clock read after each (each may be long): in one
        loop, since the step from a call's end to the next one's start is what a worker
        waking from a sleeping call pays most for (tens of microseconds on a VM)."""
        args, call, mark = self.args, self.call, self.mark
        values, errors = self.values, self.errors
        clock = time.perf_counter
        last = started
        for index in range(count):
            mark[1] = index
            try:
                values.append(call(args[index]))
            except BaseException as exc:
                values.append(None)
                errors[index - self.first] = pack_error(exc)
            now = clock()
            if now - last >= JOB_FLUSH_SECONDS and index + 1 < count:
                self._flush(False, now - started)
                self.first = index + 1
                values, errors = self.values, self.errors  # (new ones after a flush)
                last = now

    def _run_careful(self, low: int, high: int) -> None:
        """Each call marked before it runs: if one kills the process, the pool knows which."""
        args, call, mark, errors = self.args, self.call, self.mark, self.errors
        append = self.values.append
        for index in range(low, high):
            mark[1] = index
            try:
                append(call(args[index]))
            except BaseException as exc:
                append(None)
                errors[index - self.first] = pack_error(exc)

    def _run_fast(self, low: int, high: int) -> None:
        """The calls at C speed, for functions the pool measured to take microseconds. If one
        kills the process, the pool only knows the chunk, and runs it again carefully."""
        self.mark[1] = -low - 2
        chunk = self.args[low:high]
        values = self.values
        done = 0
        while done < len(chunk):
            before = len(values)
            try:
                # extend() keeps what map() produced before an exception.
                values.extend(map(self.call, chunk[done:] if done else chunk))
                return
            except BaseException as exc:
                failed = len(values)
                values.append(None)
                self.errors[failed] = pack_error(exc)
                done += failed - before + 1

    def _flush(self, finished: bool, elapsed: float) -> None:
        data = _pack_results(self.first, self.values, self.errors, finished, elapsed)
        self.values = []
        self.errors = {}
        if finished and self.mapped:
            # Drop our references to the arguments first: only the call's own can remain.
            self.args = ()
            self.call = _ended
            _let_go(self.mapped, self.send)
        self.send(data)


def _ended(arg: Any) -> Any:
    raise RuntimeError("this job has ended")


def _unpacking(fn: Callable[..., Any]) -> Callable[[tuple[Any, ...]], Any]:
    def call(arg: tuple[Any, ...]) -> Any:
        return fn(*arg)

    return call


def _pack_results(
    first: int,
    values: list[Any],
    errors: dict[int, tuple[bytes, str]],
    finished: bool,
    elapsed: float,
) -> bytes:
    header = RESULTS_HEADER.pack(RESULTS, first, len(values), finished, elapsed)
    try:
        return _wire.dumps((errors, _wire.wrap_big_bytes(values)), header=header)
    except BaseException:
        pass
    # Find the results that cannot travel and fail their calls instead.
    from .._errors import PicklingFailed

    for index, value in enumerate(values):
        if index in errors:
            continue
        try:
            _wire.dumps(value)
        except BaseException as problem:
            values[index] = None
            failure = PicklingFailed(
                f"the call's result {type(value).__qualname__} cannot be pickled back "
                f"to the pool: {type(problem).__name__}: {problem}"
            )
            # Its remote traceback is that of the pickling error, in this worker.
            text = "".join(
                traceback.format_exception(type(problem), problem, problem.__traceback__)
            )
            errors[index] = (_wire.dumps(failure), text)
    return _wire.dumps((errors, values), header=header)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("this module is started by conveyor's process backend")
