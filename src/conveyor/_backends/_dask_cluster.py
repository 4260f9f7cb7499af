"""What the Dask backend puts on the cluster, and what it makes of the cluster's faults.

``_run_calls`` is the task of one batch and ``_Initializer`` the plugin that runs a pool's
initializer on each worker; workers import this module by name (conveyor must be installed
where they run, as for any function a Dask task calls). ``local_cluster`` starts a pool's own
cluster; ``crashed`` and ``cannot_cross`` turn Dask's errors into conveyor's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import distributed

from .._errors import PicklingFailed, UnpicklingFailed, WorkerCrashed
from ._base import log_initializer_failure

__all__ = ["Initializer", "cannot_cross", "crashed", "drop_topic", "local_cluster", "run_calls"]


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
