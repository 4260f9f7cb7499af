"""What a fault means for which call, on the process backend.

Faults stay local:

* A worker that dies fails only the call it was running (known from its shared ``mark``) with
  ``WorkerCrashed``; calls of its job that it had not started, or whose results were lost with
  it, run on another worker; the worker is replaced (``Blame._bury``, ``Blame._crashed``).
* A call past its deadline: its worker gets SIGTERM, then SIGKILL after ``KILL_GRACE``; the call
  fails with ``TaskTimeout`` at once; the worker is replaced (``Blame._enforce_deadlines``).
* Arguments that cannot be pickled fail their own call with ``PicklingFailed``
  (``Blame._split_unpicklable``); arguments that cannot be unpickled in the worker are retried
  one call per job to find the culprit, which fails with ``UnpicklingFailed``
  (``Blame._unreadable_job``). A result or exception that cannot be unpickled in the pool
  fails its own call with ``UnpicklingFailed``: the calls whose outcomes came in the same
  message run again, each in a batch of its own (``_base.RunAlone``), and only the one whose
  outcome still cannot be read fails (``_outcomes.BatchRun.end``, outside the dispatcher
  role). A message of the
  worker's own that cannot be read fails the job's open calls and replaces the worker
  (``Blame._unreadable_results``).
* Workers that die before they are ready, ``FAILED_STARTS`` times in a row, break the pool.

Threads: like ``_schedule``, whose second layer this is, all of it runs on the holder of the
dispatcher role, and touches only state that the role owns.
"""

from __future__ import annotations

import signal
import time

from .._errors import BrokenPool, TaskTimeout, WorkerCrashed
from . import _wire
from ._base import NotRun
from ._forker import ForkedProcess
from ._outcomes import pickling_failed, unreadable_result
from ._schedule import Job, Scheduling
from ._workers import KILL_GRACE, STOP_GRACE, Proc, describe_exit

__all__ = ["Blame"]

#: Workers dying before they are ready, in a row, that break the pool.
FAILED_STARTS = 3


class Blame(Scheduling):
    """Ending the right calls after a fault, and running the others elsewhere."""

    def _split_unpicklable(self, job: Job) -> None:
        """Fail the calls whose arguments cannot be pickled; queue the others."""
        batch = job.run.batch
        good: list[int] = []
        for index in job.indexes:
            try:
                for part in (batch.args[index], batch.kwargs):
                    _wire.forget_files(_wire.files_of(_wire.dumps(part)))
            except Exception as exc:
                batch.fail(index, pickling_failed("arguments", exc))
            else:
                good.append(index)
        if good:
            self._jobs.appendleft(Job(job.run, good))
        self._close_job(job)

    def _unreadable_job(self, job: Job, error: tuple[bytes, str]) -> None:
        """The worker could not unpickle the job (``error``, as it packed it): find which
        call's arguments are to blame."""
        open_indexes = job.indexes[job.received :]
        if len(open_indexes) > 1:
            for index in reversed(open_indexes):
                self._jobs.appendleft(Job(job.run, [index]))
        else:
            # It fails with the worker's error, unpickled with the batch's outcomes.
            job.run.unread += [(index, error) for index in open_indexes]
        self._close_job(job)

    def _unreadable_results(self, proc: Proc, error: BaseException) -> None:
        """We could not unpickle a message of the worker's own (not a result): its job's
        open calls fail."""
        if not proc.jobs:
            return
        job = proc.jobs.popleft()
        self._hold(proc, job)
        for later in reversed(proc.jobs):
            self._requeue(later)
        proc.jobs.clear()
        # The worker goes on with a job we forgot: replace it so nothing arrives late.
        self._crew.retire(proc, kill=True)
        self._fail_job(job, lambda: unreadable_result(error))

    def _bury(self, proc: Proc) -> None:
        """``proc`` has exited: account for its jobs and replace it."""
        crew = self._crew
        blame = True  # whether its death, before it was ready, counts as a failed start
        if isinstance(proc.process, ForkedProcess) and proc.process.lost:
            # Its forker died, and with it the news of this worker: it may still run.
            crew.signal(proc, signal.SIGKILL)
            assert crew.forker is not None
            blame = crew.forker.died(proc.process)
        # Outcomes it sent before dying are still in the pipe.
        try:
            while proc.jobs and proc.pending.poll(0):
                if not self._receive(proc):
                    break
        except (EOFError, OSError):
            pass
        crew.reap(proc, STOP_GRACE)
        code = proc.process.exitcode
        crew.forget(proc)
        _wire.forget_files_of(proc.process.pid or 0)
        self._segments.release(proc.held)
        if not proc.ready and not proc.leaving:
            # It died before it could take work: no call is to blame.
            for job in reversed(proc.jobs):
                self._requeue(job)
            proc.jobs.clear()
            crew.failed_starts += blame
            if crew.failed_starts >= FAILED_STARTS:
                self._fail_pool(
                    BrokenPool(
                        f"worker processes exit while starting ({describe_exit(code)}, "
                        f"{crew.failed_starts} times in a row); see their error output. A "
                        "script that creates a pool at import time needs an "
                        "`if __name__ == '__main__':` guard"
                    )
                )
        elif proc.jobs:
            # The job it died in is the one its mark names: those before it in the same
            # message had run, but their outcomes were held back with it (see
            # _worker._run_many); they run again, as do those it never began.
            jobs = list(proc.jobs)
            proc.jobs.clear()
            ordinal = int(proc.mark[0])
            culprit = next((job for job in jobs if job.ordinal == ordinal), jobs[0])
            for job in reversed(jobs):
                if job is not culprit:
                    self._requeue(job)
            self._crashed(culprit, proc, code)
        if proc.spare:
            crew.keep_spares()
        elif not proc.leaving:
            crew.replace()
        try:
            proc.process.close()
        except ValueError:
            pass

    def _crashed(self, job: Job, proc: Proc, code: int | None) -> None:
        """The worker running ``job`` died: blame the call it was in, rerun the others."""
        batch = job.run.batch
        if self._life.killing or self._life.broken:
            self._fail_job(job, NotRun)
            return
        ordinal, where = int(proc.mark[0]), int(proc.mark[1])
        if ordinal != job.ordinal:
            self._requeue(job)  # it died before it began this job: nothing to blame
            return
        open_indexes = job.indexes[job.received :]
        if where <= -2:
            # It died in the fast loop, in the chunk that starts at -where - 2: calls before
            # the chunk run again as they were, the chunk carefully, to find the culprit.
            chunk = max(0, -where - 2 - job.received)
            if open_indexes[chunk:]:
                self._jobs.appendleft(Job(job.run, open_indexes[chunk:], careful=True))
            if open_indexes[:chunk]:
                self._jobs.appendleft(Job(job.run, open_indexes[:chunk]))
            self._close_job(job)
            return
        position = where - job.received  # within open_indexes
        if not 0 <= position < len(open_indexes):
            # It died while unpickling the job, or after its last call: the culprit is
            # unknown. A lone call is it; else each call runs alone to find it.
            if len(open_indexes) == 1:
                position = 0
            else:
                for index in reversed(open_indexes):
                    self._jobs.appendleft(Job(job.run, [index]))
                self._close_job(job)
                return
        error = WorkerCrashed(
            f"the worker process (pid {proc.process.pid}) running this call died "
            f"{describe_exit(code)}",
            exitcode=code,
        )
        batch.fail(open_indexes[position], error)
        rest = list(open_indexes[:position]) + list(open_indexes[position + 1 :])
        if rest:
            self._jobs.appendleft(Job(job.run, rest))
        self._close_job(job)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        crew = self._crew
        for proc in list(crew.procs):
            if proc.kill_at is not None and now >= proc.kill_at:
                proc.kill_at = None
                crew.signal(proc, signal.SIGKILL)
            if not proc.jobs:
                continue
            job = proc.jobs[0]
            if job.deadline is None or now < job.deadline:
                continue
            batch = job.run.batch
            assert batch.timeout is not None
            proc.jobs.popleft()
            self._hold(proc, job)
            for later in reversed(proc.jobs):
                self._requeue(later)
            proc.jobs.clear()
            proc.leaving = True
            proc.kill_at = now + KILL_GRACE
            crew.signal(proc, signal.SIGTERM)
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
            crew.replace()
