"""conveyor: one API over threads, processes and clusters, with pools, futures and pipelines.

Example:
    >>> import conveyor
    >>> with conveyor.Pool(workers=4) as pool:
    ...     sum(pool.map(abs, range(-3, 3)))
    9
"""

from ._errors import (
    BrokenPool,
    InitializerFailed,
    PicklingFailed,
    PoolFull,
    TaskTimeout,
    UnpicklingFailed,
    WorkerCrashed,
)
from ._executors import ProcessPoolExecutor, ThreadPoolExecutor
from ._pipeline import Failed, Pipeline, PipelineSummary
from ._pipeline_stage import StageStatistics
from ._pool import Pool, PoolStatistics
from ._results import AsyncResult

__all__ = [
    "AsyncResult",
    "BrokenPool",
    "Failed",
    "InitializerFailed",
    "PicklingFailed",
    "Pipeline",
    "PipelineSummary",
    "Pool",
    "PoolFull",
    "PoolStatistics",
    "ProcessPoolExecutor",
    "StageStatistics",
    "TaskTimeout",
    "ThreadPoolExecutor",
    "UnpicklingFailed",
    "WorkerCrashed",
]

__version__ = "0.1.0"
