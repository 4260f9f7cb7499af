"""What the Dask backend puts on the cluster, what it hears from it, and what it makes of
the cluster's faults.

``_run_calls`` is the task of one batch and ``_Initializer`` the plugin that runs a pool's
initializer on each worker; workers import this module by name (conveyor must be installed
where they run, as for any function a Dask task calls). ``local_cluster`` starts a pool's own
cluster; ``crashed`` and ``cannot_cross`` turn Dask's errors into conveyor's. ``Task`` is the
pool's record of one batch handed to Dask, and ``PutDone``, ``OnStart`` and ``OnCancel`` the
callbacks that bring Dask's news to the backend (see ``dask``).
"""

from __future__ import annotations

import os
import queue
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import distributed

from .._errors import PicklingFailed, UnpicklingFailed, WorkerCrashed
from ._base import Batch, log_initializer_failure

__all__ = [
    "Initializer",
    "OnCancel",
    "OnStart",
    "PutDone",
    "Task",
    "cannot_cross",
    "crashed",
    "drop_topic",
    "local_cluster",
    "run_calls",
]


def run_calls(
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
    distributed.get_client().log_event(topic, [token, worker.address, os.getpid()])
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


class Initializer(distributed.WorkerPlugin):  # type: ignore[misc]
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


def drop_topic(dask_scheduler: Any, topic: str) -> None:
    """(On the scheduler.) Forget the events of ``topic``, once its pool is closed."""
    topics = getattr(getattr(dask_scheduler, "_broker", None), "_topics", None)
    if isinstance(topics, dict):
        topics.pop(topic, None)


def local_cluster(workers: int) -> distributed.LocalCluster:
    """The pool's own cluster: ``workers`` processes of one thread, no dashboard, and Dask
    never runs a task again by itself after its worker died."""
    return distributed.LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        # No dashboard; its HTTP server (always started) on a free port of this host.
        scheduler_kwargs={"allowed_failures": 0, "dashboard_address": "127.0.0.1:0"},
    )


def crashed(worker: str) -> WorkerCrashed:
    where = f"the Dask worker {worker}" if worker else "a Dask worker"
    return WorkerCrashed(
        f"{where} running this call died (its process exited, was killed or ran out of memory)"
    )


def cannot_cross(error: BaseException, *, unpickling: bool) -> BaseException:
    what = "function, arguments or result" if unpickling else "function or arguments"
    cls = UnpicklingFailed if unpickling and "deserializ" in str(error) else PicklingFailed
    failure = cls(f"the call's {what} could not cross to or from the Dask worker: {error}")
    failure.__cause__ = error
    return failure


class Task:
    """One batch handed to Dask."""

    __slots__ = ("batch", "future", "handed", "pid", "running", "started", "token", "worker")

    def __init__(self, batch: Batch, token: int) -> None:
        self.batch = batch
        self.token = token
        self.future: distributed.Future | None = None  # once handed to Dask
        self.handed = False  # counted in the backend's ``_handed`` (lock held)
        self.started = False  # a start report came (guarded by the backend's lock)
        self.running = False  # begun in the ledger (the collector's own)
        self.worker = ""  # the address of the worker that reported the start
        self.pid = 0  # and its process (on the pool's own cluster: a child of ours)


class PutDone:
    """A Dask future's done callback: puts ``("done", token)`` in the inbox."""

    __slots__ = ("inbox", "token")

    def __init__(self, inbox: queue.SimpleQueue[tuple[Any, ...]], token: int) -> None:
        self.inbox = inbox
        self.token = token

    def __call__(self, future: Any) -> None:
        self.inbox.put(("done", self.token))


class OnCancel:
    """A pool future's done callback: once ``future.cancel()`` succeeded, the Dask task is
    cancelled before ``cancel()`` returns (on the caller's thread), so that it cannot start
    after the caller was told it would not."""

    __slots__ = ("backend", "token")

    def __init__(self, backend: weakref.ref[Any], token: int) -> None:
        self.backend = backend
        self.token = token

    def __call__(self, future: Any) -> None:
        backend = self.backend()
        if backend is not None and future.cancelled():
            backend._cancelled(self.token)


class OnStart:
    """The handler of the pool's event topic (run on Dask's event loop: it only queues)."""

    __slots__ = ("inbox",)

    def __init__(self, inbox: queue.SimpleQueue[tuple[Any, ...]]) -> None:
        self.inbox = inbox

    def __call__(self, event: tuple[float, Any]) -> None:
        token, worker, pid = event[1]
        self.inbox.put(("start", token, worker, pid))
