"""The Dask backend: batches of calls run as tasks on a ``distributed`` cluster.

Data flow::

    Pool --submit(batch)--> client.submit(_run_calls, ...)    one Dask task per batch, pure=False
                              |                                (only fn and args travel)
            scheduler ---> a worker thread runs _run_calls:
                              log_event(topic, [token, worker])  --scheduler--> client's loop
                              each call in turn; values, errors by index, elapsed   |
                              |                                                   "start"
            Dask future done (Dask's callback thread) --"done"--> inbox <-----------+
                                                                    ^
            shutdown() -----------------------------------------"wake"-+
                              |
            the collector thread (this backend's only thread) reads the inbox in order:
              start:    batch.begin() (QUEUED -> RUNNING), deadline armed
              done:     results gathered; batch.begin() if the start report was lost;
                        batch.finish() --> Pool
              deadline: TaskTimeout; the Dask task is cancelled and its running call abandoned

Why a start report: ``batch.begin()`` must wait until a worker really runs the batch (see
``_base``), and a Dask future says only pending or done. The task reports its start through
Dask's event log before running the calls. That report travels apart from the result and can
be lost (a worker that dies within milliseconds of starting), so a batch whose outcome comes
first is begun then.

A worker that dies: the pool's own cluster runs with ``allowed_failures=0`` (the task erred
with ``KilledWorker``, never rerun by Dask) and ``worker-saturation=1.0`` (a worker holds only
the tasks it runs), so the calls of the batch it ran fail with ``WorkerCrashed``; the pool
reruns them only under ``retries``. On a cluster of the user's, a batch killed before its
start report came is rerun once as never started (``NotRun``); a second start report from
another worker (Dask ran a lost task again) fails the batch with ``WorkerCrashed`` and the
rerun is abandoned.

Threads and state: ``_tasks`` (token -> ``_Task``), ``_stopping`` and each task's ``started``
flag are guarded by ``_lock``; submit, drain and forget run on any thread, everything else
on the collector. Nothing runs on Dask's event loop but putting a message in the inbox.
``future.cancel()``, ``drain()`` and ``forget()`` cancel the Dask tasks of the batches they
take on the calling thread, before they return. A batch that started on a worker just before
(its start report on the way) is cancelled all the same, and its call abandoned.
"""

from __future__ import annotations

import atexit
import collections
import heapq
import itertools
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

try:
    import dask
    import distributed
    from distributed.scheduler import KilledWorker
except ImportError as exc:  # pragma: no cover - checked by a test in a bare environment
    raise ImportError(
        "backend='dask' needs Dask's distributed package: pip install 'conveyor[dask]'"
    ) from exc

from .._errors import PicklingFailed, TaskTimeout, UnpicklingFailed, WorkerCrashed
from ._base import Backend, Batch, NotRun, RunAlone, log_initializer_failure

__all__ = ["DaskBackend"]

_live: weakref.WeakSet[DaskBackend] = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    for backend in list(_live):
        backend.shutdown(wait=True)


atexit.register(_stop_all_at_exit)


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# -- what runs on the workers ----------------------------------------------------------------


def _run_calls(
    topic: str,
    token: int,
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any] | None,
    star: bool,
) -> tuple[list[Any], dict[int, BaseException] | None, float]:
    """Report the start, then run every call: (values, errors by index, seconds)."""
    # Through the worker's client, which waits for the scheduler's answer: once a call
    # runs, its start is on record, and reaches the pool before news of the worker's death.
    worker = distributed.get_worker()
    distributed.get_client().log_event(topic, [token, worker.address])
    values: list[Any] = [None] * len(args)
    errors: dict[int, BaseException] = {}
    kw = kwargs or {}
    start = time.perf_counter()
    for index, arg in enumerate(args):
        try:
            values[index] = fn(*arg, **kw) if star else fn(arg, **kw)
        except BaseException as exc:
            errors[index] = exc
    return values, errors or None, time.perf_counter() - start


class _Initializer(distributed.WorkerPlugin):  # type: ignore[misc]
    """Runs the pool's ``initializer(*initargs)`` once in each worker, as it joins."""

    def __init__(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args

    def setup(self, worker: distributed.Worker) -> None:
        try:
            self.fn(*self.args)
        except BaseException:
            log_initializer_failure()
            raise


# -- what the client side keeps ----------------------------------------------------------------


class _Task:
    """One batch handed to Dask."""

    __slots__ = ("batch", "future", "handed", "running", "started", "token", "worker")

    def __init__(self, batch: Batch, token: int) -> None:
        self.batch = batch
        self.token = token
        self.future: distributed.Future | None = None  # once handed to Dask
        self.handed = False  # counted in the backend's ``_handed`` (lock held)
        self.started = False  # a start report came (guarded by the backend's lock)
        self.running = False  # begun in the ledger (the collector's own)
        self.worker = ""


class _Put:
    """A Dask future's done callback: puts ``("done", token)`` in the inbox."""

    __slots__ = ("inbox", "token")

    def __init__(self, inbox: queue.SimpleQueue[tuple[Any, ...]], token: int) -> None:
        self.inbox = inbox
        self.token = token

    def __call__(self, future: Any) -> None:
        self.inbox.put(("done", self.token))


class _OnCancel:
    """A pool future's done callback: once ``future.cancel()`` succeeded, the Dask task is
    cancelled before ``cancel()`` returns (on the caller's thread), so that it cannot start
    after the caller was told it would not."""

    __slots__ = ("backend", "token")

    def __init__(self, backend: weakref.ref[DaskBackend], token: int) -> None:
        self.backend = backend
        self.token = token

    def __call__(self, future: Any) -> None:
        backend = self.backend()
        if backend is not None and future.cancelled():
            backend._cancelled(self.token)


class _OnStart:
    """The handler of the pool's event topic (run on Dask's event loop: it only queues)."""

    __slots__ = ("inbox",)

    def __init__(self, inbox: queue.SimpleQueue[tuple[Any, ...]]) -> None:
        self.inbox = inbox

    def __call__(self, event: tuple[float, Any]) -> None:
        token, worker = event[1]
        self.inbox.put(("start", token, worker))


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
        elif address is not None:
            self._client = distributed.Client(address, set_as_default=False)
        else:
            self._cluster = _local_cluster(workers or _cpu_count())
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
                        _Initializer(initializer, initargs), name=self._plugin
                    )
                except Exception as exc:
                    self._init_error = exc
        except BaseException:
            self._close()
            raise
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._client.subscribe_topic(self._topic, _OnStart(self._inbox))
        self._lock = threading.Lock()
        self._tasks: dict[int, _Task] = {}
        self._by_batch: dict[int, int] = {}  # id(batch) -> token, for forget()
        # Batches wait here until a worker thread is free for them (see the module's doc).
        self._waiting: collections.deque[_Task] = collections.deque()
        self._handed = 0  # tasks in Dask's hands (not yet done or dropped)
        self._tokens = itertools.count()
        self._stopping = False
        self._killing = False
        self._busy = 0
        self._deadlines: list[tuple[float, int]] = []  # (monotonic deadline, token)
        self._cancels: list[distributed.Future] = []  # Dask tasks to cancel, collector's
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
                task = _Task(batch, token)
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
            batch.future.add_done_callback(_OnCancel(weakref.ref(self), token))
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

    def _send(self, task: _Task) -> None:
        batch, token = task.batch, task.token
        try:
            future = self._client.submit(
                _run_calls,
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
        future.add_done_callback(_Put(self._inbox, token))

    def _unsendable(self, task: _Task, error: Exception) -> None:
        """The batch could not even be handed to Dask (its function or arguments do not
        pickle): its calls fail with ``PicklingFailed``, one by one if there are several."""
        with self._lock:
            if self._pop(task.token) is None:
                return
        batch = task.batch
        if batch.begin():
            failure = _cannot_cross(error, unpickling=False)
            # Several calls: each is sent again alone, so that only those at fault fail.
            outcome = RunAlone(failure) if len(batch) > 1 else failure
            for index in range(len(batch)):
                batch.fail(index, outcome)
            batch.finish()

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
                finished: list[_Task] = []
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
            self._close()

    def _until_deadline(self) -> float | None:
        if not self._deadlines:
            return None
        return max(0.0, self._deadlines[0][0] - time.monotonic())

    def _handle(self, message: tuple[Any, ...], finished: list[_Task]) -> None:
        kind = message[0]
        if kind == "start":
            self._started(message[1], message[2])
        elif kind == "done":
            with self._lock:
                task = self._pop(message[1])
            if task is not None:
                self._ended(task, finished)

    def _pop(self, token: int) -> _Task | None:
        """Forget a task (lock held); one still waiting is skipped by ``_pump``."""
        task = self._tasks.pop(token, None)
        if task is not None:
            self._by_batch.pop(id(task.batch), None)
            if task.handed:
                self._handed -= 1
        return task

    def _started(self, token: int, worker: str) -> None:
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
        if rerun:
            # Dask lost the task with its worker and ran it again: no second run unasked.
            assert task.future is not None
            self._cancels.append(task.future)
            self._end_all(task, _crashed(task.worker))
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

    def _ended(self, task: _Task, finished: list[_Task]) -> None:
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

    def _task_failed(self, task: _Task, error: BaseException) -> None:
        batch = task.batch
        if isinstance(error, KilledWorker):
            # A worker holds tasks it has not started yet: those never ran, and run elsewhere.
            self._end_all(task, _crashed(task.worker) if task.started else NotRun())
        elif len(batch) > 1:
            # Its result could not be read whole (or its arguments on the worker): each call
            # runs again alone, so that only the one at fault fails.
            self._end_all(task, RunAlone(_cannot_cross(error, unpickling=True)))
        else:
            self._end_all(task, _cannot_cross(error, unpickling=True))

    def _end_all(self, task: _Task, error: BaseException) -> None:
        """End every call of ``task``'s batch with ``error``."""
        batch = task.batch
        if not self._begin_late(task):
            return
        for index in range(len(batch)):
            batch.fail(index, error)
        batch.finish()

    def _begin_late(self, task: _Task) -> bool:
        """Begin a batch whose start report never came; count it out of ``busy``."""
        if task.running:
            task.running = False
            self._busy -= 1
            return True
        return task.batch.begin()

    def _gather(self, tasks: list[_Task]) -> None:
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
            batch.finish()

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
            batch.fail(
                0,
                TaskTimeout(
                    f"the call ran longer than its timeout of {batch.timeout:g} s (its Dask "
                    "task was cancelled; a running call cannot be stopped, and is abandoned)"
                ),
            )
            for later in range(1, len(batch)):
                batch.fail(later, NotRun())
            batch.finish()

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
                client.run_on_scheduler(_drop_topic, topic=self._topic)
            except Exception:
                pass


def _drop_topic(dask_scheduler: Any, topic: str) -> None:
    """(On the scheduler.) Forget the events of ``topic``, once its pool is closed."""
    topics = getattr(getattr(dask_scheduler, "_broker", None), "_topics", None)
    if isinstance(topics, dict):
        topics.pop(topic, None)


def _local_cluster(workers: int) -> distributed.LocalCluster:
    """The pool's own cluster: ``workers`` processes of one thread, no dashboard; Dask never
    reruns a task whose worker died, and gives a worker only the tasks it can run now."""
    with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
        return distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            # No dashboard; its HTTP server (always started) on a free port of this host.
            scheduler_kwargs={"allowed_failures": 0, "dashboard_address": "127.0.0.1:0"},
        )


def _crashed(worker: str) -> WorkerCrashed:
    where = f"the Dask worker {worker}" if worker else "a Dask worker"
    return WorkerCrashed(
        f"{where} running this call died (its process exited, was killed or ran out of memory)"
    )


def _cannot_cross(error: BaseException, *, unpickling: bool) -> BaseException:
    what = "function, arguments or result" if unpickling else "function or arguments"
    cls = UnpicklingFailed if unpickling and "deserializ" in str(error) else PicklingFailed
    failure = cls(f"the call's {what} could not cross to or from the Dask worker: {error}")
    failure.__cause__ = error
    return failure
