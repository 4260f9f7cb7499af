"""The process backend: calls run in worker processes that survive each other's faults.

Data flow::

    Pool --submit(batch)--> inbox (deque) + wakeup pipe
                              |
                      dispatcher thread  (owns every worker pipe and process handle)
                      waits at once on: the wakeup pipe, each worker's pipe, each worker's
                      sentinel, and the nearest deadline
                              |
          job = calls of one batch --pipe--> worker process (_worker.main)
          outcomes <--pipe-- (per job, or per FLUSH_SECONDS of work)
                              |
                      batch.finish() --> Pool

Only the dispatcher touches workers. Other threads reach it through ``inbox`` and the wakeup
pipe, so no lock guards a worker's state.

Faults stay local:

* A worker that dies fails only the call it was running (known from its shared ``mark``) with
  ``WorkerCrashed``; calls of its job that it had not started, or whose results were lost with
  it, run on another worker; the worker is replaced.
* A call past its deadline: its worker gets SIGTERM, then SIGKILL after ``KILL_GRACE``; the call
  fails with ``TaskTimeout`` at once; the worker is replaced.
* Arguments that cannot be pickled fail their own call with ``PicklingFailed``; arguments that
  cannot be unpickled in the worker are retried one call per job to find the culprit, which
  fails with ``UnpicklingFailed``.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from .._errors import PicklingFailed, TaskTimeout, UnpicklingFailed, WorkerCrashed
from . import _wire, _worker
from ._base import Backend, Batch, NotRun

__all__ = ["ProcessBackend", "default_context"]

#: Seconds between SIGTERM and SIGKILL for a worker stopped at a deadline.
KILL_GRACE = 0.5
#: Seconds a worker gets to exit after being told to stop at shutdown.
STOP_GRACE = 5.0
#: Functions cached per pool (and per worker) before the caches are reset.
FUNCTION_CACHE = 256

_live: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    for backend in list(_live):
        backend.shutdown(wait=True)


atexit.register(_stop_all_at_exit)


def default_context() -> BaseContext:
    """The start method used when the caller names none.

    ``forkserver`` where the platform has it, else ``spawn``. ``fork`` is fast but unsafe in a
    process that has threads (the pool's own dispatcher is one; Python 3.12 warns about it);
    measured here, a forkserver child starts in a few milliseconds once the server runs, while
    ``spawn`` pays a whole interpreter start and the imports of ``__main__`` for every worker.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", __name__.rsplit(".", 1)[0] + "._worker"])
        return context
    return multiprocessing.get_context("spawn")


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "with an unknown status"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"with exit code {code}"


class _Run:
    """A batch being run, possibly as several jobs (after a crash or a split)."""

    __slots__ = ("batch", "open_jobs")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.open_jobs = 0


class _Job:
    """Some calls of one batch, sent to one worker as one message."""

    __slots__ = ("deadline", "files", "id", "indexes", "received", "run")

    def __init__(self, run: _Run, indexes: list[int]) -> None:
        self.run = run
        self.indexes = indexes  # batch positions of this job's calls, in order
        self.received = 0  # how many of them have an outcome
        self.deadline: float | None = None
        self.files: list[str] = []  # shared-memory files of the sent message
        self.id = 0
        run.open_jobs += 1


class _Proc:
    """A worker process, as the dispatcher sees it."""

    __slots__ = ("conn", "done", "job", "kill_at", "known", "leaving", "mark", "process")

    def __init__(self, process: BaseProcess, conn: Connection, mark: Any) -> None:
        self.process = process
        self.conn = conn
        self.mark = mark
        self.job: _Job | None = None
        self.known: set[int] = set()  # function ids this worker has cached
        self.done = 0  # calls run, for max_tasks_per_worker
        self.leaving = False  # told to stop, or being killed: its exit is no crash
        self.kill_at: float | None = None  # SIGKILL deadline after a SIGTERM


class ProcessBackend(Backend):
    name = "process"
    can_kill = True
    needs_pickle = True
    batch_seconds = 0.005

    def __init__(
        self,
        workers: int,
        on_broken: Callable[[BaseException], None],
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        mp_context: BaseContext | None = None,
        max_tasks_per_worker: int | None = None,
    ) -> None:
        super().__init__(workers, on_broken)
        if max_tasks_per_worker is not None and (
            isinstance(max_tasks_per_worker, bool)
            or not isinstance(max_tasks_per_worker, int)
            or max_tasks_per_worker < 1
        ):
            raise ValueError(
                f"max_tasks_per_worker must be an int >= 1 or None, got {max_tasks_per_worker!r}"
            )
        if mp_context is not None and not isinstance(mp_context, BaseContext):
            raise TypeError(
                "mp_context must be a multiprocessing context such as "
                f"multiprocessing.get_context('spawn'), got {mp_context!r}"
            )
        self._context = mp_context if mp_context is not None else default_context()
        self._max_tasks = max_tasks_per_worker
        self._init_blob: bytes | None = None
        if initializer is not None:
            try:
                self._init_blob = _wire.dumps((initializer, initargs))
            except Exception as exc:
                raise PicklingFailed(
                    f"initializer and initargs must be picklable for the process backend: {exc}"
                ) from exc
        # Shared with other threads: the inbox (deque operations are atomic) and the flags.
        self._inbox: collections.deque[Batch] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_sent = False
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._killing = False
        self._closed = False
        # Owned by the dispatcher thread alone.
        self._procs: list[_Proc] = []
        self._jobs: collections.deque[_Job] = collections.deque()  # reruns, ahead of inbox
        self._functions: collections.OrderedDict[int, tuple[Any, int, bytes]] = (
            collections.OrderedDict()
        )
        self._fn_ids = itertools.count()
        self._job_ids = itertools.count()
        self._broken = False
        self._lifeline_r: Connection | None = None
        self._lifeline_w: Connection | None = None
        self._names = itertools.count()
        _live.add(self)

    @staticmethod
    def default_workers() -> int:
        if hasattr(os, "sched_getaffinity"):
            return max(1, len(os.sched_getaffinity(0)))
        return max(1, os.cpu_count() or 1)

    # -- called from any thread -------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        self._inbox.append(batch)
        if self._thread is None:
            self._start()
        self._wake()

    def drain(self) -> list[Batch]:
        taken: list[Batch] = []
        while True:
            try:
                taken.append(self._inbox.popleft())
            except IndexError:
                return taken

    def shutdown(self, wait: bool, kill: bool = False) -> None:
        with self._start_lock:
            self._stopping = True
            self._killing = self._killing or kill
            thread = self._thread
            if thread is None and not self._closed:
                self._closed = True
                self._close_pipes()
        if thread is not None:
            self._wake()
            if wait and thread is not threading.current_thread():
                thread.join()
        _live.discard(self)

    def busy(self) -> int:
        return sum(1 for proc in list(self._procs) if proc.job is not None)

    def live_workers(self) -> int:
        return sum(1 for proc in list(self._procs) if not proc.leaving)

    # -- internals: starting and waking -------------------------------------------------------

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(
                target=self._dispatch, name="conveyor-process-dispatcher", daemon=True
            )
            self._thread.start()

    def _wake(self) -> None:
        if self._wake_sent:
            return
        self._wake_sent = True
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def _close_pipes(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- the dispatcher thread ----------------------------------------------------------------

    def _dispatch(self) -> None:
        try:
            self._lifeline_r, self._lifeline_w = self._context.Pipe(duplex=False)
            for _ in range(self.workers):
                self._spawn()
            while not self._serve_once():
                pass
        finally:
            self._finish_all()

    def _serve_once(self) -> bool:
        """One round of the dispatcher; True when it is time to exit."""
        self._assign()
        if self._stopping and self._quiet():
            return True
        now = time.monotonic()
        nearest = self._nearest_deadline()
        timeout = None if nearest is None else max(0.0, nearest - now)
        handles: list[Any] = [self._wake_r]
        by_handle: dict[Any, _Proc] = {}
        for proc in self._procs:
            handles.append(proc.conn)
            handles.append(proc.process.sentinel)
            by_handle[proc.conn] = proc
            by_handle[proc.process.sentinel] = proc
        ready = wait(handles, timeout)
        dead: list[_Proc] = []
        for handle in ready:
            if handle == self._wake_r:
                # Empty the pipe first, then accept new wakeups: the other order could
                # swallow a wakeup whose batch arrives after the next _assign().
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                self._wake_sent = False
                continue
            proc = by_handle[handle]
            if handle is proc.conn:
                if not self._receive(proc):
                    dead.append(proc)
            elif proc not in dead:
                dead.append(proc)
        for proc in dead:
            self._bury(proc)
        if self._killing:
            self._kill_all()
        self._enforce_deadlines()
        return False

    def _quiet(self) -> bool:
        """No work queued or running."""
        return not self._inbox and not self._jobs and all(p.job is None for p in self._procs)

    def _nearest_deadline(self) -> float | None:
        nearest: float | None = None
        for proc in self._procs:
            for moment in (proc.job.deadline if proc.job else None, proc.kill_at):
                if moment is not None and (nearest is None or moment < nearest):
                    nearest = moment
        return nearest

    def _spawn(self) -> None:
        if self._broken or self._stopping:
            return
        parent_end, child_end = self._context.Pipe(duplex=True)
        mark = self._context.RawArray("q", 1)
        mark[0] = -1
        assert self._lifeline_r is not None and self._lifeline_w is not None
        close_fds: tuple[int, ...] = ()
        if self._context.get_start_method() == "fork":
            # A forked child inherits our ends of every pipe; it must not keep the lifeline
            # open, or the lifeline could not tell it that we died.
            close_fds = (self._lifeline_w.fileno(), self._wake_r, self._wake_w)
        process = self._context.Process(
            target=_worker.main,
            args=(child_end, self._lifeline_r, mark, self._init_blob, close_fds),
            name=f"conveyor-worker-{next(self._names)}",
            daemon=False,
        )
        process.start()
        child_end.close()
        self._procs.append(_Proc(process, parent_end, mark))

    def _assign(self) -> None:
        """Give work to every idle worker."""
        for proc in self._procs:
            if proc.job is not None or proc.leaving:
                continue
            job = self._next_job()
            if job is None:
                return
            self._send(proc, job)

    def _next_job(self) -> _Job | None:
        if self._jobs:
            return self._jobs.popleft()
        while not self._killing:
            try:
                batch = self._inbox.popleft()
            except IndexError:
                return None
            if batch.begin():
                return _Job(_Run(batch), list(range(len(batch))))
        return None

    def _function_blob(self, proc: _Proc, fn: Any) -> tuple[int, bytes | None]:
        """The id under which ``proc`` knows ``fn``, and its pickle if it does not yet."""
        entry = self._functions.get(id(fn))
        if entry is None or entry[0] is not fn:
            entry = (fn, next(self._fn_ids), _wire.dumps_function(fn))
            self._functions[id(fn)] = entry
            if len(self._functions) > FUNCTION_CACHE:
                self._functions.popitem(last=False)
        else:
            self._functions.move_to_end(id(fn))
        fn_id = entry[1]
        if fn_id in proc.known:
            return fn_id, None
        if len(proc.known) >= FUNCTION_CACHE:
            proc.conn.send_bytes(_wire.dumps((_worker.FORGET,)))
            proc.known.clear()
        proc.known.add(fn_id)
        return fn_id, entry[2]

    def _send(self, proc: _Proc, job: _Job) -> None:
        batch = job.run.batch
        if self._max_tasks is not None:
            room = self._max_tasks - proc.done
            if len(job.indexes) > room:
                rest = _Job(job.run, job.indexes[room:])
                job.indexes = job.indexes[:room]
                self._jobs.appendleft(rest)
        try:
            fn_id, fn_blob = self._function_blob(proc, batch.fn)
        except Exception as exc:
            self._fail_job(job, lambda: _pickling_failed("function", exc))
            return
        args = (
            batch.args
            if len(job.indexes) == len(batch)
            else [batch.args[i] for i in job.indexes]
        )
        try:
            kwargs_blob = None if not batch.kwargs else _wire.dumps(batch.kwargs)
            args_blob = _wire.dumps(args)
        except Exception:
            self._split_unpicklable(job)
            if fn_blob is not None:
                proc.known.discard(fn_id)
            return
        job.id = next(self._job_ids)
        message = _wire.dumps(
            (_worker.RUN, job.id, fn_id, fn_blob, batch.star, kwargs_blob, args_blob)
        )
        job.files = _wire.files_of(args_blob)
        if batch.timeout is not None:
            job.deadline = time.monotonic() + batch.timeout
        proc.job = job
        try:
            proc.conn.send_bytes(message)
        except OSError:
            pass  # the worker is dead; its sentinel reports it and the job runs elsewhere

    def _split_unpicklable(self, job: _Job) -> None:
        """Fail the calls whose arguments cannot be pickled; queue the others."""
        batch = job.run.batch
        good: list[int] = []
        for index in job.indexes:
            try:
                _wire.dumps(batch.args[index])
                if batch.kwargs:
                    _wire.dumps(batch.kwargs)
            except Exception as exc:
                batch.fail(index, _pickling_failed("arguments", exc))
            else:
                good.append(index)
        if good:
            self._jobs.appendleft(_Job(job.run, good))
        self._close_job(job)

    def _receive(self, proc: _Proc) -> bool:
        """Read what ``proc`` sent; False if its pipe is closed."""
        conn = proc.conn
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return False
            try:
                message = _wire.loads(data)
            except BaseException as exc:
                self._unreadable_results(proc, exc)
            else:
                self._handle(proc, message)
            try:
                if not conn.poll():
                    return True
            except (EOFError, OSError):
                return False

    def _handle(self, proc: _Proc, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == _worker.RESULTS:
            _, job_id, first, values, errors, finished, elapsed = message
            job = proc.job
            if job is None or job.id != job_id:
                return  # a job abandoned at its deadline
            batch = job.run.batch
            indexes = job.indexes
            for offset, value in enumerate(values):
                batch.values[indexes[first + offset]] = value
            for offset, packed in errors.items():
                batch.fail(indexes[first + offset], _worker.unpack_error(packed))
            job.received = first + len(values)
            batch.elapsed += elapsed
            if finished:
                proc.job = None
                proc.done += len(indexes)
                self._close_job(job)
                if self._max_tasks is not None and proc.done >= self._max_tasks:
                    self._retire(proc)
        elif kind == _worker.UNREADABLE:
            _, job_id, packed = message
            job = proc.job
            if job is None or job.id != job_id:
                return
            proc.job = None
            self._unreadable_job(job, _worker.unpack_error(packed))
        elif kind == _worker.INIT_FAILED:
            error = _worker.unpack_error(message[1])
            self._broken = True
            proc.leaving = True
            self._on_broken(error)
            job, proc.job = proc.job, None
            if job is not None:
                self._fail_job(job, NotRun)
        # READY needs no action: jobs are sent before it arrives and wait in the pipe.

    def _unreadable_job(self, job: _Job, error: BaseException) -> None:
        """The worker could not unpickle the job: find which call's arguments are to blame."""
        if len(job.indexes) - job.received > 1:
            for index in reversed(job.indexes[job.received :]):
                self._jobs.appendleft(_Job(job.run, [index]))
            self._close_job(job)
            return

        def failure() -> BaseException:
            problem = UnpicklingFailed(
                f"the worker could not unpickle the call's function or arguments: "
                f"{type(error).__name__}: {error}"
            )
            problem.__cause__ = error
            return problem

        self._fail_job(job, failure)

    def _unreadable_results(self, proc: _Proc, error: BaseException) -> None:
        """We could not unpickle what the worker sent: its job's open calls fail."""
        job, proc.job = proc.job, None
        if job is None:
            return

        def failure() -> BaseException:
            problem = UnpicklingFailed(
                f"the call's result could not be unpickled in the pool: "
                f"{type(error).__name__}: {error}"
            )
            problem.__cause__ = error
            return problem

        # The worker goes on with a job we forgot: replace it so nothing arrives late.
        self._retire(proc, kill=True)
        self._fail_job(job, failure)

    def _fail_job(self, job: _Job, error: Callable[[], BaseException]) -> None:
        batch = job.run.batch
        for index in job.indexes[job.received :]:
            batch.fail(index, error())
        self._close_job(job)

    def _close_job(self, job: _Job) -> None:
        _wire.forget_files(job.files)
        run = job.run
        run.open_jobs -= 1
        if run.open_jobs == 0:
            run.batch.finish()

    def _retire(self, proc: _Proc, kill: bool = False) -> None:
        """Stop ``proc`` (it has done its share, or cannot be trusted) and start another."""
        if proc.leaving:
            return
        proc.leaving = True
        if kill:
            self._signal(proc, signal.SIGKILL)
        else:
            try:
                proc.conn.send_bytes(_wire.dumps((_worker.STOP,)))
            except OSError:
                pass
        self._spawn()

    def _bury(self, proc: _Proc) -> None:
        """``proc`` has exited: account for its job and replace it."""
        proc.process.join(timeout=STOP_GRACE)
        code = proc.process.exitcode
        self._procs.remove(proc)
        proc.conn.close()
        _wire.forget_files_of(proc.process.pid or 0)
        job, proc.job = proc.job, None
        if job is not None:
            self._crashed(job, proc, code)
        if not proc.leaving:
            self._spawn()
        try:
            proc.process.close()
        except ValueError:
            pass

    def _crashed(self, job: _Job, proc: _Proc, code: int | None) -> None:
        """The worker running ``job`` died: blame the call it was in, rerun the others."""
        batch = job.run.batch
        if self._killing or self._broken:
            self._fail_job(job, NotRun)
            return
        where = int(proc.mark[0])
        open_indexes = job.indexes[job.received :]
        position = where - job.received  # within open_indexes
        if where < 0 or not 0 <= position < len(open_indexes):
            # It died while unpickling the job, or between calls: the culprit is unknown.
            if len(open_indexes) == 1:
                position = 0
            else:
                for index in reversed(open_indexes):
                    self._jobs.appendleft(_Job(job.run, [index]))
                self._close_job(job)
                return
        blamed = open_indexes[position]
        attempts = 1
        error = WorkerCrashed(
            f"the worker process (pid {proc.process.pid}) running this call died "
            f"{_describe_exit(code)}",
            exitcode=code,
            attempts=attempts,
        )
        batch.fail(blamed, error)
        rest = open_indexes[:position] + open_indexes[position + 1 :]
        if rest:
            self._jobs.appendleft(_Job(job.run, rest))
        self._close_job(job)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for proc in list(self._procs):
            if proc.kill_at is not None and now >= proc.kill_at:
                proc.kill_at = None
                self._signal(proc, signal.SIGKILL)
            job = proc.job
            if job is None or job.deadline is None or now < job.deadline:
                continue
            batch = job.run.batch
            assert batch.timeout is not None
            proc.job = None
            proc.leaving = True
            proc.kill_at = now + KILL_GRACE
            self._signal(proc, signal.SIGTERM)
            open_indexes = job.indexes[job.received :]
            batch.fail(
                open_indexes[0],
                TaskTimeout(
                    f"the call ran longer than its timeout of {batch.timeout:g} s; "
                    "its worker process was stopped"
                ),
            )
            for index in open_indexes[1:]:
                batch.fail(index, NotRun())
            self._close_job(job)
            self._spawn()

    @staticmethod
    def _signal(proc: _Proc, signum: int) -> None:
        pid = proc.process.pid
        if pid is None:
            return
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_all(self) -> None:
        for proc in self._procs:
            if not proc.leaving:
                proc.leaving = True
                self._signal(proc, signal.SIGKILL)

    def _finish_all(self) -> None:
        """Stop every worker and release every resource; runs as the dispatcher exits."""
        for job in list(self._jobs):
            self._fail_job(job, NotRun)
        self._jobs.clear()
        for proc in self._procs:
            if proc.job is not None:
                job, proc.job = proc.job, None
                self._fail_job(job, NotRun)
            if not proc.leaving:
                proc.leaving = True
                try:
                    proc.conn.send_bytes(_wire.dumps((_worker.STOP,)))
                except OSError:
                    pass
        deadline = time.monotonic() + STOP_GRACE
        for proc in self._procs:
            proc.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.process.exitcode is None:
                self._signal(proc, signal.SIGKILL)
                proc.process.join()
            proc.conn.close()
            _wire.forget_files_of(proc.process.pid or 0)
            proc.process.close()
        self._procs.clear()
        for end in (self._lifeline_r, self._lifeline_w):
            if end is not None:
                end.close()
        with self._start_lock:
            self._closed = True
            self._close_pipes()


def _pickling_failed(what: str, error: BaseException) -> PicklingFailed:
    problem = PicklingFailed(
        f"the call's {what} cannot be pickled for a worker process: "
        f"{type(error).__name__}: {error}"
    )
    problem.__cause__ = error
    return problem
