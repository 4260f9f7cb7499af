"""The Dask backend: batches of calls run as tasks on a ``distributed`` cluster.

Data flow::

    Pool --submit(batch)--> waiting (deque) --_pump: while fewer than ``workers`` tasks are
                              |                 in Dask's hands-->  client.submit(run_calls)
                              |                 one Dask task per batch, pure=False; only
                              v                 fn, args, kwargs travel (never the Batch)
            scheduler ---> a worker thread runs run_calls:
                              client.log_event(topic, [token, worker])  (awaited)
                              each call in turn: values, errors by index, elapsed
                                 |                                    |
            start report (Dask's event loop)       Dask future done (Dask's callback thread)
                                 +----------> inbox <-----------------+     ("start"/"done")
                                                |
            the collector thread (this backend's only thread) reads the inbox in order:
              start:    batch.begin() (QUEUED -> RUNNING), deadline armed
              done:     results gathered; batch.begin() if no start report came;
                        batch.finish() on a completer thread (_completer) --> Pool;
                        the next waiting batch handed to Dask
              deadline: TaskTimeout; the Dask task is cancelled; on the pool's own cluster
                        the worker process is stopped, elsewhere the call is abandoned

Why batches wait on this side: Dask sends a task to a worker as soon as it is submitted, where
it waits for a thread; a cancel travels after it, and the task may start first. Holding each
batch here until a thread is free for it (``workers`` tasks at most in Dask's hands) makes
``cancel()``, ``shutdown(cancel_futures=True)`` and a map left early certain: what waits here
never reaches Dask. It also bounds what a map puts on the scheduler, whatever its window.

Why a start report: ``batch.begin()`` must wait until a worker really runs the batch (see
``_base``), and a Dask future says only pending or done. The task reports its start through
the worker's client, and waits for the scheduler's answer before it runs a call: a batch that
runs is on record, and its report reaches this side before news of its worker's death does.

A worker that dies: Dask fails its tasks with ``KilledWorker`` once ``allowed_failures`` is
used up. The pool's own cluster runs with ``allowed_failures=0``, so Dask never runs a lost
task again by itself: a batch that reported its start fails with ``WorkerCrashed`` (the pool
runs it again only under ``retries``), one that did not never ran (``NotRun``) and runs
elsewhere. On a cluster of the user's (``client=``, ``address=``) the scheduler's setting
holds (start it with ``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0``); a second start
report from another worker (Dask ran a lost task again) fails the batch with
``WorkerCrashed`` at once and abandons the rerun.

Threads and state: ``_tasks`` (token -> ``Task``), ``_waiting``, ``_handed``, ``_stopping``
and each task's ``started`` flag are guarded by ``_lock``; submit, drain, forget and a
future's cancel run on any thread and cancel the Dask tasks they take before they return;
everything else runs on the collector. Nothing runs on Dask's event loop but putting a
message in the inbox, and the collector runs no user code: batches end on the completer's
threads (as the process backend's do), so a done callback may wait for the same pool.
"""

from __future__ import annotations

import atexit
import collections
import heapq
import itertools
import os
import pickle
import queue
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

try:
    import dask
    import distributed
    from distributed.scheduler import KilledWorker
except ImportError as exc:  # pragma: no cover - checked by a test in a bare environment
    raise ImportError(
        "backend='dask' needs Dask's distributed package: pip install 'conveyor[dask]'"
    ) from exc

from .._errors import TaskTimeout
from ._base import Backend, Batch, NotRun, RunAlone
from ._completer import Completer
from ._dask_cluster import (
    Initializer,
    OnCancel,
    OnStart,
    PutDone,
    Task,
    cannot_cross,
    crashed,
    drop_topic,
    local_cluster,
    run_calls,
)

__all__ = ["DaskBackend"]

_live: weakref.WeakSet[DaskBackend] = weakref.WeakSet()

#: Messages that Dask keeps per connection, on the connections a pool opens (see __init__).
KEEP_MESSAGES = 16


def _stop_all_at_exit() -> None:
    for backend in list(_live):
        backend.shutdown(wait=True)


atexit.register(_stop_all_at_exit)


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class DaskBackend(Backend):
    """Batches of calls as tasks on a Dask cluster (see the module's doc)."""

    name = "dask"
    # A task costs about a millisecond of scheduler and network time: batches run longer.
    batch_seconds = 0.05
    options = frozenset({"client", "address"})

    def __init__(
        self,
        workers: int | None,
        on_broken: Callable[[BaseException], None],
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        client: distributed.Client | None = None,
        address: str | None = None,
    ) -> None:
        if client is not None and address is not None:
            raise TypeError(
                "give Pool(backend='dask') client= (a distributed.Client of yours) or "
                "address= (a scheduler's address, such as 'tcp://host:8786'), not both"
            )
        if client is not None and not isinstance(client, distributed.Client):
            raise TypeError(f"client must be a distributed.Client, got {client!r}")
        if address is not None and not (isinstance(address, str) and address):
            raise TypeError(
                f"address must be a scheduler's address such as 'tcp://host:8786', got {address!r}"
            )
        self._cluster: distributed.LocalCluster | None = None
        self._own_client = client is None
        if client is not None:
            self._client = client
        else:
            # Dask keeps the last messages of each connection for debugging (1000 by
            # default), and a batch's message holds its arguments: a map's client memory
            # would grow by 1000 batches. The connections this pool opens keep a few.
            with dask.config.set({"distributed.admin.low-level-log-length": KEEP_MESSAGES}):
                if address is not None:
                    self._client = distributed.Client(address, set_as_default=False)
                else:
                    self._cluster = local_cluster(workers or _cpu_count())
                    try:
                        self._client = distributed.Client(self._cluster, set_as_default=False)
                    except BaseException:
                        self._cluster.close()
                        raise
        self._uid = uuid.uuid4().hex[:12]
        self._topic = f"conveyor-start-{self._uid}"
        self._plugin = ""
        try:
            super().__init__(workers, on_broken)
            self._init_error: BaseException | None = None
            if initializer is not None:
                self._plugin = f"conveyor-init-{self._uid}"
                try:
                    self._client.register_plugin(
                        Initializer(initializer, initargs), name=self._plugin
                    )
                except Exception as exc:
                    self._init_error = exc
        except BaseException:
            self._close()
            raise
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._client.subscribe_topic(self._topic, OnStart(self._inbox))
        self._lock = threading.Lock()
        self._tasks: dict[int, Task] = {}
        self._by_batch: dict[int, int] = {}  # id(batch) -> token, for forget()
        # Batches wait here until a worker thread is free for them (see the module's doc).
        self._waiting: collections.deque[Task] = collections.deque()
        self._handed = 0  # tasks in Dask's hands (not yet done or dropped)
        self._tokens = itertools.count()
        self._stopping = False
        self._killing = False
        self._busy = 0
        self._deadlines: list[tuple[float, int]] = []  # (monotonic deadline, token)
        self._cancels: list[distributed.Future] = []  # Dask tasks to cancel, collector's
        # Where batches end (done callbacks, map sinks): never on the collector, so that a
        # slow callback delays only its own call, and a callback may wait for this pool.
        self._completer = Completer(f"conveyor-dask-completer-{self._uid}")
        self._thread = threading.Thread(
            target=self._collect, name=f"conveyor-dask-{self._uid}", daemon=True
        )
        self._thread.start()
        _live.add(self)

    def default_workers(self) -> int:
        """Threads of the cluster, counted at the start (at least 1)."""
        try:
            return max(1, int(sum(self._client.nthreads().values())))
        except Exception:
            return 1

    # -- called by Pool, from any thread ------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        with self._lock:
            refused = self._stopping
            if not refused:
                token = next(self._tokens)
                task = Task(batch, token)
                self._tasks[token] = task
                self._by_batch[id(batch)] = token
                self._waiting.append(task)
        if refused:
            batch.reject()
            return
        if self._init_error is not None:
            error, self._init_error = self._init_error, None
            self._on_broken(error)
        if batch.future is not None:
            batch.future.add_done_callback(OnCancel(weakref.ref(self), token))
        self._pump()

    def _pump(self) -> None:
        """Hand waiting batches to Dask while fewer than ``workers`` are there."""
        while True:
            with self._lock:
                if self._handed >= self.workers or not self._waiting or self._killing:
                    return
                task = self._waiting.popleft()
                if task.token not in self._tasks:
                    continue  # dropped while it waited
                task.handed = True
                self._handed += 1
            self._send(task)

    def _send(self, task: Task) -> None:
        batch, token = task.batch, task.token
        try:
            future = self._client.submit(
                run_calls,
                self._topic,
                token,
                batch.fn,
                batch.args,
                batch.kwargs,
                batch.star,
                key=f"conveyor-{getattr(batch.fn, '__name__', 'call')}-{self._uid}-{token}",
                pure=False,
            )
        except Exception as exc:
            self._unsendable(task, exc)
            return
        with self._lock:
            task.future = future
            dropped = token not in self._tasks  # drained or forgotten meanwhile
        if dropped:
            self._cancel_now([future])
            return
        future.add_done_callback(PutDone(self._inbox, token))

    def _unsendable(self, task: Task, error: Exception) -> None:
        """The batch could not even be handed to Dask (its function or arguments do not
        pickle): its calls fail with ``PicklingFailed``, one by one if there are several."""
        with self._lock:
            if self._pop(task.token) is None:
                return
        batch = task.batch
        if batch.begin():
            failure: BaseException = error  # the client is closed, say
            if isinstance(error, (TypeError, pickle.PicklingError)):
                failure = cannot_cross(error, unpickling=False)
            # Several calls: each is sent again alone, so that only those at fault fail.
            outcome = RunAlone(failure) if len(batch) > 1 else failure
            for index in range(len(batch)):
                batch.fail(index, outcome)
            self._completer.run(batch.finish)  # (_pump runs on the collector too)

    def drain(self) -> list[Batch]:
        with self._lock:
            taken = [task for task in self._tasks.values() if not task.started]
            for task in taken:
                self._pop(task.token)
            self._waiting.clear()
        self._cancel_now([t.future for t in taken if t.future is not None])
        self._pump()
        return [task.batch for task in taken]

    def forget(self, batches: list[Batch]) -> None:
        with self._lock:
            gone = []
            for batch in batches:
                token = self._by_batch.pop(id(batch), None)
                task = None if token is None else self._tasks.get(token)
                if task is not None and not task.started:
                    self._pop(task.token)
                    gone.append(task)
        self._cancel_now([t.future for t in gone if t.future is not None])
        self._pump()

    def shutdown(self, wait: bool, kill: bool = False) -> None:
        with self._lock:
            self._stopping = True
            self._killing = self._killing or kill
        self._inbox.put(("wake",))
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()
            self._completer.join()  # (stopped by the collector as it exited)
        _live.discard(self)

    def busy(self) -> int:
        return self._busy

    def _cancelled(self, token: int) -> None:
        """The future of a submitted call was cancelled (so its batch had not begun)."""
        with self._lock:
            task = self._tasks.get(token)
            if task is None or task.started:
                return  # ended, drained, or starting: begin() will see the cancel
            self._pop(token)
        if task.future is not None:
            self._cancel_now([task.future])
        self._pump()
        task.batch.begin()  # False: the ledger counts the call cancelled

    def _cancel_now(self, futures: list[distributed.Future]) -> None:
        if futures:
            try:
                self._client.cancel(futures)
            except Exception:
                pass  # the client is closing: its tasks go with it
            # The cancel may reach the scheduler before the task itself (they travel apart);
            # the release follows the task on the same stream, and drops it wherever it is.
            for future in futures:
                future.release()

    # -- the collector thread ----------------------------------------------------------------

    def _collect(self) -> None:
        inbox = self._inbox
        try:
            while True:
                message: tuple[Any, ...] | None
                try:
                    message = inbox.get(timeout=self._until_deadline())
                except queue.Empty:
                    message = None
                finished: list[Task] = []
                while message is not None:
                    self._handle(message, finished)
                    try:
                        message = inbox.get_nowait()
                    except queue.Empty:
                        message = None
                if finished:
                    self._gather(finished)
                self._expire()
                if self._cancels:
                    cancels, self._cancels = self._cancels, []
                    self._cancel_now(cancels)
                self._pump()
                if self._killing:
                    self._kill_all()
                with self._lock:
                    if self._stopping and not self._tasks:
                        break
        finally:
            self._completer.stop()
            self._close()

    def _until_deadline(self) -> float | None:
        if not self._deadlines:
            return None
        return max(0.0, self._deadlines[0][0] - time.monotonic())

    def _handle(self, message: tuple[Any, ...], finished: list[Task]) -> None:
        kind = message[0]
        if kind == "start":
            self._started(message[1], message[2], message[3])
        elif kind == "done":
            with self._lock:
                task = self._pop(message[1])
            if task is not None:
                self._ended(task, finished)

    def _pop(self, token: int) -> Task | None:
        """Forget a task (lock held); one still waiting is skipped by ``_pump``."""
        task = self._tasks.pop(token, None)
        if task is not None:
            self._by_batch.pop(id(task.batch), None)
            if task.handed:
                self._handed -= 1
        return task

    def _started(self, token: int, worker: str, pid: int) -> None:
        with self._lock:
            task = self._tasks.get(token)
            if task is None:
                return
            rerun = task.started and worker != task.worker
            if rerun:
                self._pop(token)
            elif task.started:
                return
            else:
                task.started = True
                task.worker = worker
                task.pid = pid
        if rerun:
            # Dask lost the task with its worker and ran it again: no second run unasked.
            assert task.future is not None
            self._cancels.append(task.future)
            self._end_all(task, crashed(task.worker))
            return
        batch = task.batch
        if batch.begin():
            task.running = True
            self._busy += 1
            if batch.timeout is not None:
                heapq.heappush(self._deadlines, (time.monotonic() + batch.timeout, token))
        else:
            with self._lock:
                self._pop(token)
            assert task.future is not None
            self._cancels.append(task.future)

    def _ended(self, task: Task, finished: list[Task]) -> None:
        """The Dask task of ``task`` (already forgotten) is done, erred or cancelled."""
        future = task.future
        assert future is not None
        status = future.status
        if status == "finished":
            finished.append(task)
            return
        error: BaseException
        if status == "error":
            error = future.exception() or RuntimeError("the Dask task failed")
        else:
            error = RuntimeError(
                "the Dask task was cancelled outside the pool (its client was closed, or "
                "the cluster restarted)"
            )
        self._task_failed(task, error)

    def _task_failed(self, task: Task, error: BaseException) -> None:
        batch = task.batch
        if isinstance(error, KilledWorker):
            # A worker holds tasks it has not started yet: those never ran, and run elsewhere.
            self._end_all(task, crashed(task.worker) if task.started else NotRun())
        elif len(batch) > 1:
            # Its result could not be read whole (or its arguments on the worker): each call
            # runs again alone, so that only the one at fault fails.
            self._end_all(task, RunAlone(cannot_cross(error, unpickling=True)))
        else:
            self._end_all(task, cannot_cross(error, unpickling=True))

    def _end_all(self, task: Task, error: BaseException) -> None:
        """End every call of ``task``'s batch with ``error``."""
        batch = task.batch
        if not self._begin_late(task):
            return
        for index in range(len(batch)):
            batch.fail(index, error)
        self._completer.run(batch.finish)

    def _begin_late(self, task: Task) -> bool:
        """Begin a batch whose start report never came; count it out of ``busy``."""
        if task.running:
            task.running = False
            self._busy -= 1
            return True
        return task.batch.begin()

    def _gather(self, tasks: list[Task]) -> None:
        futures = [task.future for task in tasks]
        try:
            outcomes: list[Any] | None = self._client.gather(futures)
        except Exception:
            outcomes = None  # one result at fault: read them one by one
        for index, task in enumerate(tasks):
            if outcomes is not None:
                outcome = outcomes[index]
            else:
                assert task.future is not None
                try:
                    outcome = task.future.result()
                except Exception as exc:
                    self._task_failed(task, exc)
                    continue
            task.future = None  # the result leaves the worker's memory
            if not self._begin_late(task):
                continue
            batch = task.batch
            values, errors, batch.elapsed = outcome
            batch.values = values
            if errors:
                for place, error in errors.items():
                    batch.fail(place, error)
            self._completer.run(batch.finish)

    def _expire(self) -> None:
        """Fail the calls whose deadline has passed; their Dask tasks are cancelled."""
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, token = heapq.heappop(self._deadlines)
            with self._lock:
                task = self._pop(token)
            if task is None:
                continue
            batch = task.batch
            assert task.future is not None and batch.timeout is not None
            self._cancels.append(task.future)
            self._begin_late(task)
            if self._cluster is not None and task.pid:
                # The pool's own worker processes run one call each: stopping the process
                # stops only this call (its nanny starts another). Elsewhere it runs on.
                how = "its worker process was stopped"
                try:
                    os.kill(task.pid, signal.SIGKILL)
                except OSError:
                    how = "its worker could not be stopped; the call is abandoned"
            else:
                how = "Dask cannot stop a running call: it is abandoned"
            batch.fail(
                0,
                TaskTimeout(f"the call ran longer than its timeout of {batch.timeout:g} s ({how})"),
            )
            for later in range(1, len(batch)):
                batch.fail(later, NotRun())
            self._completer.run(batch.finish)

    def _kill_all(self) -> None:
        """``terminate()``: end every task now, as calls that never ran (the running ones
        are abandoned: Dask cannot stop them)."""
        with self._lock:
            tasks = list(self._tasks.values())
            self._tasks.clear()
            self._by_batch.clear()
            self._waiting.clear()
            self._handed = 0
        self._cancel_now([t.future for t in tasks if t.future is not None])
        for task in tasks:
            self._end_all(task, NotRun())

    def _close(self) -> None:
        """Let go of the cluster: unsubscribe, and close what this pool opened."""
        client = self._client
        try:
            if self._plugin:
                client.unregister_worker_plugin(self._plugin)
        except Exception:
            pass
        try:
            client.unsubscribe_topic(self._topic)
        except Exception:
            pass
        if self._own_client:
            client.close()
            if self._cluster is not None:
                self._cluster.close()
        else:
            try:  # the scheduler keeps every topic's last events: drop ours
                client.run_on_scheduler(drop_topic, topic=self._topic)
            except Exception:
                pass
