"""Scheduling on the process backend: which job goes to which worker, and the wire between
them (sending a job, reading and acting on what a worker sends back). The function cache is
``_functions``; what is kept of a batch's outcomes until it ends, ``_outcomes``.

A batch from ``Pool`` becomes a ``BatchRun``; it is sent as one ``Job`` or, after a crash or
a split, as several. What workers send back is read in two steps: here, under the dispatcher
role, only the head of each RESULTS message (which calls it is about, whether the job is
finished, how long it ran: see ``_worker.RESULTS_HEADER``), and the rest is kept on the run;
once the run has ended, it goes to the role's ``_ended`` list, and ``BatchRun.end`` unpickles
the outcomes and finishes the batch outside the role (see ``process``), since unpickling a
result runs its code. Every worker runs one job and, when jobs are measured to be short, has one
more message waiting in its pipe (pipelining). Short jobs queued together travel to a worker in
one message, and their outcomes come back in one (see ``_send``). Calls measured to take
microseconds run in the worker's fast loop, unmarked (see ``_worker``).

Threads: everything here is owned by whoever holds the dispatcher role (see ``process``). The
only state shared with other threads is the inbox (a deque, whose operations are atomic) and
the pool's ``Lifecycle`` flags (see ``_lifecycle``). Nothing here runs user code: no result
is unpickled, no batch finished (``BatchRun.end`` and ``Broken.end`` run outside the role).

``Scheduling`` is the first layer of ``ProcessBackend``'s dispatcher code: ``_blame.Blame``
builds on it (what a fault means for which call), and ``process.ProcessBackend`` on that (the
dispatcher role). They are one object; the layers only sort its code into rooms.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from .._errors import BrokenPool
from . import _wire, _worker
from ._base import Batch, NotRun
from ._functions import FunctionCache
from ._lifecycle import Lifecycle
from ._outcomes import BatchRun, Broken, Ended, pickling_failed
from ._workers import Proc, WorkerSet

__all__ = ["Job", "Scheduling"]

#: A job expected to run less than this may wait in a worker's pipe behind another...
PIPELINE_SECONDS = 0.002
#: ... if its message is no longer than this: it must fit in the pipe's buffer. A worker that
#: runs a job does not read its pipe, and may be blocked sending us a large result: had we
#: blocked sending it a large job meanwhile, each would wait for the other for ever. Nor is a
#: worker still starting sent more than this: its initializer may take its time, and we would
#: wait for it, deaf to everything else.
PIPELINE_BYTES = 32 << 10
#: A job of a function whose calls take steady times (see ``FunctionCache.steady``) gets
#: the next job queued behind it this many seconds before it is expected to end, whatever
#: its length: the worker then starts the next call at once instead of waiting for the pool
#: to hear of its result and answer (hundreds of microseconds on a virtual machine, which
#: is 3-8% of a 10 ms call). A call that runs late holds the queued one back by as much.
PREFETCH_SECONDS = 0.003
#: A job measured to end within this many seconds is waited for without sleeping: waking a
#: sleeping thread costs tens of microseconds on a virtual machine, as much as such a job.
SPIN_SECONDS = 100e-6
#: Most jobs sent to a worker in one message (see ``Scheduling._send``).
BUNDLE_JOBS = 64
#: Calls measured to take less than this run in the worker's fast loop (see _worker).
TRIVIAL_CALL_SECONDS = 2e-6

_RUN = bytes([_worker.RUN])
_HEADER = _worker.RESULTS_HEADER


class Job:
    """Some calls of one batch, sent to one worker as one message."""

    __slots__ = (
        "careful",
        "closing",
        "deadline",
        "expected_end",
        "files",
        "fn_id",
        "indexes",
        "large",
        "ordinal",
        "packed",
        "received",
        "run",
        "segments",
    )

    def __init__(self, run: BatchRun, indexes: range | list[int], careful: bool = False) -> None:
        self.run = run
        self.careful = careful  # never in the fast loop: it holds a call that crashed one
        # Batch positions of this job's calls, in order: a range while they are contiguous,
        # so that results land in the batch with one slice assignment.
        self.indexes = indexes
        self.received = 0  # how many of them have an outcome
        self.deadline: float | None = None
        self.files: list[str] = []  # shared-memory files of the sent message
        self.segments: list[str] = []  # the pool's segments it was sent in (see _wire)
        self.ordinal = 0  # this job's number among those sent to its worker
        self.closing = 0  # the ordinal of the last job sent in the same message
        self.expected_end: float | None = None  # when it should end, from measured calls
        self.large = False  # its message is too large to wait in a pipe (PIPELINE_BYTES)
        # Its message body as last packed, kept for a rerun (see Scheduling._repack): its
        # function's wire id, ``fast`` and the body (one without the function, short).
        self.packed: tuple[int, bool, bytes] | None = None
        self.fn_id = 0  # its function's wire id, once packed
        run.open_jobs += 1


class Scheduling:
    """Assigning jobs to workers, sending them and reading their outcomes."""

    # The state it works on, set up by ProcessBackend.__init__:
    workers: int
    _life: Lifecycle
    _inbox: collections.deque[Batch]
    _jobs: collections.deque[Job]  # reruns, ahead of the inbox
    _ended: list[Ended]  # to end once the role is let go of, in this order
    _crew: WorkerSet
    _functions: FunctionCache
    _segments: _wire.Segments  # where jobs' large buffers travel
    _max_tasks: int | None
    _cpus: int
    _on_broken: Callable[[BaseException], None]

    # Provided by the layers above (_blame.Blame, process.ProcessBackend):
    def _split_unpicklable(self, job: Job) -> None:
        raise NotImplementedError

    def _unreadable_job(self, job: Job, error: tuple[bytes, str]) -> None:
        raise NotImplementedError

    def _unreadable_results(self, proc: Proc, error: BaseException) -> None:
        raise NotImplementedError

    def _fail_pool(self, error: BrokenPool) -> None:
        raise NotImplementedError

    # -- choosing work ------------------------------------------------------------------------

    def _assign(self) -> None:
        """Keep every worker busy: one job running and, when it is short, one more queued in
        its pipe so that the worker never waits for us between jobs.

        Only a job measured to be short waits behind another: a long one queued behind a
        running job could sit there while another worker is idle.
        """
        self._grow()
        # Every idle worker gets a job before any busy one gets a second: a call measured to
        # be short may block this time, and nothing should wait behind it while a worker idles.
        for depth in (1, 2):
            for proc in self._crew.procs:
                if proc.spare:
                    continue
                while not proc.leaving and self._in_flight(proc) < depth and self._has_room(proc):
                    # Look before taking: a batch taken has begun (its future runs, its
                    # place under max_pending is freed), so take only what is sent now.
                    if proc.jobs and not (
                        (
                            self._short_work(proc.jobs[0]) is not None
                            and self._next_work() is not None
                        )
                        or self._prefetch_now(proc)
                    ):
                        break
                    if not proc.ready and self._jobs and self._jobs[0].large:
                        break  # it waits for a ready worker (see _send)
                    job = self._next_job()
                    if job is None:
                        return
                    if not self._send(proc, job):
                        break

    def _grow(self) -> None:
        """Start workers as work comes, up to ``workers``: one for each job waiting beyond the
        idle workers. A pool that runs one call starts one worker, and its shutdown does not
        wait for others to finish starting (the stdlib's executor does the same)."""
        live = self._crew.live()
        missing = self.workers - len(live)
        if missing <= 0 or self._life.killing:
            return
        # (Stopping, too: the work accepted before shutdown runs, even on a pool whose workers
        # had not started yet, as when the interpreter exits right after a submit.)
        waiting = len(self._jobs) + len(self._inbox) - sum(1 for p in live if not p.jobs)
        for _ in range(min(missing, waiting)):
            self._crew.spawn(for_work=True)

    def _is_trivial(self, job: Job, fn_id: int) -> bool:
        """Whether ``job`` may run in the worker's fast loop: many calls, each measured to
        take a few microseconds, so none is worth the cost of marking it."""
        if job.careful or len(job.indexes) <= 64:
            return False
        seconds = self._functions.seconds_by_id(fn_id)
        return seconds is not None and seconds < TRIVIAL_CALL_SECONDS

    def _short_work(self, job: Job) -> float | None:
        """The seconds ``job`` is expected to run, if under ``PIPELINE_SECONDS`` and it may
        wait in a pipe (it is not large and has no deadline, which is counted from the moment
        it is sent); else None."""
        return None if job.large else self._work_of(job.run.batch, len(job.indexes))

    def _next_work(self) -> float | None:
        """``_short_work`` of the job ``_next_job`` would return (None if there is none)."""
        head = self._peek()
        return None if head is None or head[2] else self._work_of(head[0], head[1])

    def _peek(self) -> tuple[Batch, int, bool] | None:
        """The batch of the job ``_next_job`` would return, its number of calls, and whether
        it is large (too large to wait in a pipe); None if there is none."""
        if self._jobs:
            job = self._jobs[0]
            return job.run.batch, len(job.indexes), job.large
        try:
            batch = self._inbox[0]
        except IndexError:  # (or another thread drained it: shutdown(cancel_futures=True))
            return None
        return batch, min(len(batch.args), batch.chunk or len(batch.args)), False

    def _work_of(self, batch: Batch, calls: int) -> float | None:
        if batch.timeout is not None:
            return None
        seconds = self._functions.call_seconds(batch.fn)
        if seconds is None:
            return None
        work = seconds * calls
        return work if work < PIPELINE_SECONDS else None

    def _prefetch_at(self, proc: Proc) -> float | None:
        """When the next job is to be queued behind ``proc``'s running one, which is
        expected to end ``PREFETCH_SECONDS`` later; None if it is not to be: its function's
        calls are not steady, another message is queued already, or the next job may not
        wait in a pipe (it is large, or has a deadline, which counts from its start)."""
        jobs = proc.jobs
        if not jobs or proc.leaving or not proc.ready or not self._has_room(proc):
            return None
        head = jobs[0]
        if head.expected_end is None or head.closing != jobs[-1].closing:
            return None
        following = self._peek()
        if following is None or following[2] or following[0].timeout is not None:
            return None
        if not self._functions.steady(head.run.batch.fn):
            return None
        return head.expected_end - PREFETCH_SECONDS

    def _prefetch_now(self, proc: Proc) -> bool:
        moment = self._prefetch_at(proc)
        return moment is not None and time.monotonic() >= moment

    def _expects_soon(self) -> bool:
        """Whether a running job is measured to end within ``SPIN_SECONDS``, and a CPU is
        free to wait for it on (each busy worker takes one; waiting awake takes another)."""
        soon = False
        busy = 0
        for proc in self._crew.procs:
            if proc.jobs:
                busy += 1
                job = proc.jobs[0]
                seconds = self._functions.seconds_by_id(job.fn_id)
                if seconds is not None and seconds * len(job.indexes) < SPIN_SECONDS:
                    soon = True
        return soon and busy < self._cpus

    def _has_room(self, proc: Proc) -> bool:
        return self._max_tasks is None or proc.done < self._max_tasks

    def _next_job(self) -> Job | None:
        if self._jobs:
            return self._jobs.popleft()
        while not self._life.killing:
            try:
                batch = self._inbox.popleft()
            except IndexError:
                return None
            if batch.begin():
                run = BatchRun(batch)
                calls = len(batch.args)
                chunk = batch.chunk
                if not chunk or chunk >= calls:
                    return Job(run, range(calls))
                # A map's batch of many chunks (see Batch.chunk): each goes on its own.
                jobs = [Job(run, range(i, min(i + chunk, calls))) for i in range(0, calls, chunk)]
                self._jobs.extendleft(reversed(jobs[1:]))
                return jobs[0]
        return None

    def _quiet(self) -> bool:
        """No work queued or running."""
        return not self._inbox and not self._jobs and not any(p.jobs for p in self._crew.procs)

    def _nearest_deadline(self) -> float | None:
        """The next moment something is due: a call's deadline, a kill, or a job to queue
        behind a running one (``_prefetch_at``)."""
        nearest: float | None = None
        for proc in self._crew.procs:
            head = proc.jobs[0].deadline if proc.jobs else None
            for moment in (head, proc.kill_at, self._prefetch_at(proc)):
                if moment is not None and (nearest is None or moment < nearest):
                    nearest = moment
        return nearest

    # -- the wire -----------------------------------------------------------------------------

    def _send(self, proc: Proc, job: Job) -> bool:
        """Send ``job`` to ``proc`` (or end it, if it cannot be pickled); False if it is too
        large to wait in ``proc``'s pipe (``PIPELINE_BYTES``), and is queued again for a ready,
        idle worker.

        A short job takes the short jobs queued behind it along, in the same message, up to
        ``proc``'s share of the queue (``_bundle_share``): many submits of quick calls cost
        one write and one read each way instead of one per call. A job not measured to be
        short always travels alone, so a lone call is never held back."""
        payload = self._pack(proc, job, queued=bool(proc.jobs) or not proc.ready)
        if payload is None:
            return True
        if payload is False:
            return False
        parts = [payload]
        sent = [job]
        work = self._short_work(job)
        if work is not None:
            share = self._bundle_share(proc)
            size = len(payload)
            while len(parts) < share and size < PIPELINE_BYTES and self._has_room(proc):
                # No more than PIPELINE_SECONDS of work in all: bundles are for many tiny
                # jobs; jobs of milliseconds each go one per message, to whichever worker
                # is free first.
                more_work = self._next_work()
                if more_work is None:
                    break
                work += more_work
                if work > PIPELINE_SECONDS:
                    break
                more = self._next_job()
                if more is None:
                    break
                packed = self._pack(proc, more, queued=True)
                if packed is False:
                    break  # too large to wait: it goes alone to an idle worker
                if packed is not None:
                    parts.append(packed)
                    sent.append(more)
                    size += len(packed)
        for each in sent:
            each.closing = proc.sent
        message = _RUN + parts[0] if len(parts) == 1 else _worker.bundle(parts, _worker.RUN_MANY)
        try:
            proc.conn.send_bytes(message)
        except OSError:
            pass  # the worker is dead; its sentinel reports it and the job runs elsewhere
        return True

    def _bundle_share(self, proc: Proc) -> int:
        """How many queued jobs may go to ``proc`` in one message: its share of the queue
        among the workers that could take work now, so that no worker idles while another
        holds a bundle."""
        takers = 1
        for other in self._crew.procs:
            if other is not proc and not other.spare and not other.leaving:
                takers += self._in_flight(other) < 2
        queued = len(self._jobs) + len(self._inbox) + 1
        return min(BUNDLE_JOBS, -(-queued // takers))

    @staticmethod
    def _in_flight(proc: Proc) -> int:
        """Messages of jobs ``proc`` has not finished: 0, 1, or 2 (two or more)."""
        jobs = proc.jobs
        if not jobs:
            return 0
        return 1 if jobs[0].closing == jobs[-1].closing else 2

    def _pack(self, proc: Proc, job: Job, queued: bool) -> bytes | Literal[False] | None:
        """The body of ``job``'s message to ``proc``, and ``job`` on ``proc``'s list; None if
        it ended or was split instead (it cannot be pickled); False if it is too large to
        wait in the pipe (``queued``: behind another job, or for a worker still starting),
        and is queued again."""
        batch = job.run.batch
        if self._max_tasks is not None:
            room = self._max_tasks - proc.done
            if len(job.indexes) > room:
                self._jobs.appendleft(Job(job.run, job.indexes[room:]))
                job.indexes = job.indexes[:room]
                job.packed = None
        packed = self._repack(proc, job)
        fn_blob = None
        if packed is not None:
            fn_id, fast, payload = packed
            self._segments.last = []
        else:
            try:
                fn_id, fn_blob = self._functions.blob_for(proc, batch.fn)
            except Exception as exc:
                problem = exc
                self._fail_job(job, lambda: pickling_failed("function", problem))
                return None
            indexes = job.indexes
            args: Sequence[Any]
            if isinstance(indexes, range) and len(indexes) == len(batch.args):
                args = batch.args
            elif isinstance(indexes, range) and indexes.step == 1:
                args = batch.args[indexes.start : indexes.stop]
            else:
                args = [batch.args[i] for i in indexes]
            try:
                args = _wire.wrap_big_bytes(args)
                fast = self._is_trivial(job, fn_id)
                self._segments.last = []
                payload = _wire.dumps(
                    (fn_id, fn_blob, batch.star, batch.kwargs, fast, args), self._segments
                )
            except Exception:
                if fn_blob is not None:
                    proc.known.discard(fn_id)
                self._split_unpicklable(job)
                return None
        files = _wire.files_of(payload)
        indexes = job.indexes
        if queued and len(payload) > PIPELINE_BYTES:
            _wire.forget_files(files)
            self._segments.release(self._segments.last)
            if fn_blob is not None:
                proc.known.discard(fn_id)
            job.large = True
            self._jobs.appendleft(job)
            return False
        job.files = files
        job.fn_id = fn_id
        job.segments = self._segments.last
        if fn_blob is None and not files and len(payload) <= PIPELINE_BYTES:
            job.packed = (fn_id, fast, payload)
        proc.sent += 1
        job.ordinal = proc.sent
        proc.done += len(indexes)
        if batch.timeout is not None and not proc.jobs and proc.ready:
            # A worker still starting sets the clock going when it is ready (see _handle).
            job.deadline = time.monotonic() + batch.timeout
        seconds = self._functions.seconds_by_id(fn_id)
        if seconds is not None and proc.ready:
            start = proc.jobs[-1].expected_end if proc.jobs else time.monotonic()
            if start is not None:
                job.expected_end = start + seconds * len(indexes)
        proc.jobs.append(job)
        return payload

    def _repack(self, proc: Proc, job: Job) -> tuple[int, bool, bytes] | None:
        """``job``'s body as packed for an earlier worker, if it fits ``proc`` as it is: a
        worker that died with many short jobs queued (a message holds up to BUNDLE_JOBS)
        hands them all back, and each would otherwise be pickled again."""
        packed = job.packed
        if packed is None:
            return None
        fn_id, fast, _ = packed
        if fn_id not in proc.known or fast != self._is_trivial(job, fn_id):
            return None
        return packed

    def _receive(self, proc: Proc) -> bool:
        """Read what ``proc`` sent; False if its pipe is closed."""
        conn = proc.conn
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return False
            self._handle(proc, data)
            if not proc.pending.poll(0):
                return True

    def _handle(self, proc: Proc, data: bytes | memoryview) -> None:
        """Act on a message. Only a RESULTS message holds user objects: its head is read
        here, the rest once its batch has ended (see the module's doc)."""
        if data[0] == _worker.RESULTS:
            self._results(proc, data)
            return
        if data[0] == _worker.MANY:
            for part in _worker.unbundle(memoryview(data)[1:]):
                self._handle(proc, part)
            return
        try:
            # The other messages hold the pool's own objects: kinds, names and exceptions
            # pickled on their own (see _worker.pack_error), which stay pickled here.
            message = _wire.loads(data)
        except Exception as exc:
            self._unreadable_results(proc, exc)
            return
        kind = message[0]
        if kind == _worker.UNREADABLE:
            # The worker may have lost a function it was sent with that job: send again.
            proc.known.clear()
            if proc.jobs:
                self._unreadable_job(proc.jobs.popleft(), message[1])
        elif kind == _worker.KEPT:
            # A call kept a reference to its argument: its segment is its own from now on.
            self._segments.discard(message[1])
        elif kind == _worker.INIT_FAILED:
            with self._life.lock:
                self._life.broken = True
            proc.leaving = True
            self._ended.append(Broken(self._on_broken, message[1]))
            while proc.jobs:
                self._fail_job(proc.jobs.popleft(), NotRun)
        elif kind == _worker.READY:
            proc.ready = True  # jobs were sent before this arrived; they wait in the pipe
            self._crew.failed_starts = 0
            head = proc.jobs[0] if proc.jobs else None
            if head is not None and head.run.batch.timeout is not None and head.deadline is None:
                head.deadline = time.monotonic() + head.run.batch.timeout

    def _results(self, proc: Proc, data: bytes | memoryview) -> None:
        """Outcomes of ``proc``'s oldest job: its bookkeeping moves on, and the outcomes are
        kept, still pickled, for ``BatchRun.end``."""
        _, first, count, finished, elapsed = _HEADER.unpack_from(data)
        blob = memoryview(data)[_HEADER.size :]
        if not proc.jobs:
            # The job was given up at its deadline: nobody reads these.
            _wire.forget_files(_wire.files_of(blob))
            return
        job = proc.jobs[0]
        if count:
            job.run.results.append((job.indexes[first : first + count], blob))
        job.received = first + count
        if finished:
            # ``elapsed`` counts from the job's start: only the last report is its total.
            batch = job.run.batch
            batch.elapsed += elapsed
            self._functions.measure(batch, len(job.indexes), elapsed)
            proc.jobs.popleft()
            self._close_job(job)
            if proc.jobs:
                head = proc.jobs[0]
                if head.run.batch.timeout is not None:
                    head.deadline = time.monotonic() + head.run.batch.timeout
                if head.expected_end is not None:
                    seconds = self._functions.seconds_by_id(head.fn_id)
                    if seconds is not None:
                        head.expected_end = time.monotonic() + seconds * len(head.indexes)
            if self._max_tasks is not None and proc.done >= self._max_tasks and not proc.jobs:
                self._crew.retire(proc)

    # -- ending jobs --------------------------------------------------------------------------

    def _fail_job(self, job: Job, error: Callable[[], BaseException]) -> None:
        batch = job.run.batch
        for index in job.indexes[job.received :]:
            batch.fail(index, error())
        self._close_job(job)

    def _close_job(self, job: Job) -> None:
        if job.files:
            _wire.forget_files(job.files)
        if job.segments:
            self._segments.release(job.segments)
        run = job.run
        run.open_jobs -= 1
        if run.open_jobs == 0:
            self._ended.append(run)

    def _reject(self, batch: Batch) -> None:
        """``batch.reject()``, ended outside the role like any other batch."""
        if batch.begin():
            for index in range(len(batch)):
                batch.fail(index, NotRun(final=True))
            self._ended.append(BatchRun(batch))

    def _requeue(self, job: Job) -> None:
        """Run the open calls of ``job`` elsewhere, ahead of new work (as packed before, when
        none of them has an outcome yet)."""
        rest = job.indexes[job.received :]
        if rest:
            again = Job(job.run, rest)
            if not job.received:
                again.packed = job.packed
            self._jobs.appendleft(again)
        self._close_job(job)

    @staticmethod
    def _hold(proc: Proc, job: Job) -> None:
        """``proc`` runs on, for now, without ``job`` and the jobs queued behind it: the
        segments they were sent in are not written again before it is gone."""
        for sent in (job, *proc.jobs):
            proc.held += sent.segments
            sent.segments = []
