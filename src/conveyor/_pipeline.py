"""``Pipeline``: stages composed from Pools' lazy maps, with one owner for stopping them all.

Data flow::

    source --source thread--> buffer --stage 0 (a Pool's map on its own thread)--> buffer
        --> stage 1 --> ... --> buffer --> the consumer's ``for`` loop

Every buffer and every stage's window is bounded, so a slow consumer holds the whole pipeline
back and the source is pulled only as room frees. How one stage works is in
``_pipeline_stage``; this module checks arguments and owns a run: starting it, failing it on
the first error, and stopping every thread and worker.
"""

from __future__ import annotations

import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast

from ._async import AsyncPipelineMethods
from ._backends import lookup
from ._checks import check_callable, check_count, check_timeout
from ._coroutines import stage_backend
from ._pipeline_stage import Buffer, Failed, Stage, StageSpec, StageStatistics
from ._progress import Progress, length_of

__all__ = ["Failed", "Pipeline", "PipelineSummary", "StageStatistics"]

T = TypeVar("T")
U = TypeVar("U")

#: Items per worker a stage holds in its input queue, and again in its pool's window, unless
#: told otherwise (``buffer``): few, so that large items do not fill the memory. Trivial
#: functions run faster with larger buffers (measured: 1024 items move trivial thread stages
#: 6x faster than 16), which the caller asks for with ``buffer=``.
BUFFER_PER_WORKER = 4

_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*(s|min|h)\s*")
_SECONDS = {"s": 1.0, "min": 60.0, "h": 3600.0}
_ERRORS = ("raise", "collect")


def _parse_rate(rate: object) -> float | None:
    """Starts per second from a ``rate`` argument: a number, or ``"N/s"``, ``"N/min"``,
    ``"N/h"``; None stays None.

    Example:
        >>> _parse_rate("30/min")
        0.5
    """
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, (int, float, str)):
        raise TypeError(
            f"rate must be a number of starts per second or a string such as '5/s', "
            f"got {type(rate).__name__} {rate!r}"
        )
    if isinstance(rate, str):
        match = _RATE.fullmatch(rate)
        if match is None:
            raise ValueError(
                "rate must be a number of starts per second, or a string 'N/s', 'N/min' or "
                f"'N/h' (such as '5/s' or '30/min'); got {rate!r}"
            )
        per_second = float(match.group(1)) / _SECONDS[match.group(2)]
    else:
        per_second = float(rate)
    if not (per_second > 0 and math.isfinite(per_second)):
        raise ValueError(f"rate must be more than 0 starts and finite, got {rate!r}")
    return per_second


@dataclass(frozen=True)
class PipelineSummary:
    """What ``Pipeline.run()`` returns.

    Args:
        outputs: how many items came out of the last stage (``Failed`` records included).
        errors: the ``Failed`` records that came out (only with ``errors="collect"``).
        stages: one ``StageStatistics`` per stage, taken at the end.

    Example:
        >>> import conveyor
        >>> summary = conveyor.Pipeline(range(4)).filter(lambda x: x % 2).run()
        >>> summary.outputs, summary.stages[0].items_in
        (2, 4)
    """

    outputs: int
    errors: tuple[Failed, ...]
    stages: tuple[StageStatistics, ...]


class Pipeline(AsyncPipelineMethods[T]):
    """Items from ``source`` through a chain of concurrent stages, lazily and in bounded memory.

    Each stage runs its function on its own ``conveyor.Pool`` (threads or processes), so a
    stage inherits the pool's batching, ordering, timeouts and retries. Stages are added with
    ``map``, ``flat_map``, ``filter`` and ``each``, which return the pipeline; iterating it
    yields what the last stage produces. Nothing runs before that.

    Args:
        source: any iterable; it is pulled on a thread of the pipeline, only as room frees.
        errors: ``"raise"`` (default): the first exception, in the source or in any stage,
            stops every stage and is raised to the consumer as itself. ``"collect"``: an
            item whose call fails becomes a ``Failed(item, exception, stage)`` record that
            flows to the output in its place; later stages pass it on untouched. (An
            exception in the source ends the input and is raised after the items before it.)
        progress: show a live line on standard error while the pipeline is iterated: outputs
            so far (of how many, when the source has a ``len()`` and no stage filters or
            multiplies items), rate, ETA and failed items; wiped at the end.

    Stopping: leaving the loop early (``break``, an exception, ``close()``, garbage
    collection) stops every stage: queued calls are cancelled and process workers are
    killed; calls running on threads, which cannot be stopped, finish first (a ``timeout``
    bounds them). ``close()`` and leaving a ``with`` block return only once every thread and
    process has ended, the thread pulling the source included: a source whose ``next()``
    blocks holds them up as it would hold up a ``for`` loop.

    A pipeline runs once; iterating it again raises ``RuntimeError``.

    Example:
        >>> import conveyor
        >>> with conveyor.Pipeline(range(6)) as p:
        ...     list(p.map(lambda x: x * 10, workers=3).filter(lambda x: x > 20))
        [30, 40, 50]
    """

    def __init__(
        self, source: Iterable[T], *, errors: str = "raise", progress: bool = False
    ) -> None:
        if errors not in _ERRORS:
            raise ValueError(f"errors must be 'raise' or 'collect', got {errors!r}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        self._progress = progress
        self._source_length = length_of(source) if progress else None
        try:
            self._source: Iterator[Any] = iter(source)
        except TypeError:
            raise TypeError(
                f"Pipeline() needs an iterable source, got {type(source).__name__}"
            ) from None
        self._collect = errors == "collect"
        self._specs: list[StageSpec] = []
        self._started = False
        self._closed = False
        self._run: _PipelineRun | None = None

    # -- building -----------------------------------------------------------------------------

    def map(
        self,
        fn: Callable[[T], U],
        *,
        workers: int = 1,
        backend: str = "thread",
        ordered: bool = True,
        rate: float | str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        buffer: int | None = None,
        name: str | None = None,
        buffersize: int | None = None,
        **options: Any,
    ) -> Pipeline[U]:
        """Add a stage that passes on ``fn(item)`` for each item.

        Args:
            fn: the function; on ``backend="process"`` it and the items must pickle
                (lambdas and closures travel by value).
            workers: how many calls of this stage run at once.
            backend: ``"thread"``, ``"process"``, ``"dask"`` or ``"asyncio"``, as for
                ``conveyor.Pool``; a coroutine function (``async def``) runs on ``"asyncio"``
                unless another is named, with ``workers`` calls in flight.
            ordered: True: results in input order, through a reorder window no larger than
                ``buffer``; False: in the order they complete.
            rate: the most calls this stage starts per unit of time, shared by its workers:
                a number per second or ``"N/s"``, ``"N/min"``, ``"N/h"``. Items are handed to
                the workers evenly spaced (``"5/s"``: one each 0.2 s), with no burst after
                idle time; with the default ``buffer`` each starts as it is handed over.
            timeout: seconds each call may run before it fails with ``TaskTimeout``.
            retries: how many more times a failing call is run (at least once, maybe more).
            buffer: how many items the stage may hold, and so how far it reads ahead of a
                slower consumer: at most ``buffer`` items wait in its input queue, and at most
                ``buffer`` more are in its workers' hands (being run, or finished and waiting
                to be passed on in order); its batches are never larger. Default: 4 per
                worker (with ``rate``: 1 per worker, so that every item handed over starts at
                once). Trivial functions run faster with more (say 1000: fewer hand-offs
                between threads); large items (pages, images) need less memory with fewer.
                ``buffersize`` is its older name.
            name: the stage's name in statistics and ``Failed`` records (default
                ``"<index>:<function name>"``).
            options: the backend's own keywords, as for ``conveyor.Pool``: ``client=`` or
                ``address=`` for ``"dask"`` (set ``workers`` and ``buffer`` to the cluster's
                size there), ``mp_context=`` for ``"process"``.

        Example:
            >>> import conveyor
            >>> list(conveyor.Pipeline(["a", "b"]).map(str.upper, workers=2))
            ['A', 'B']
        """
        args = (workers, backend, ordered, rate, timeout, retries, buffer, name, buffersize)
        return cast("Pipeline[U]", self._add("map", fn, *args, options))

    def flat_map(
        self,
        fn: Callable[[T], Iterable[U]],
        *,
        workers: int = 1,
        backend: str = "thread",
        ordered: bool = True,
        rate: float | str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        buffer: int | None = None,
        name: str | None = None,
        buffersize: int | None = None,
        **options: Any,
    ) -> Pipeline[U]:
        """Add a stage that passes on every item of the iterable ``fn(item)`` returns.

        The iterable is consumed on the worker, into a list, so one item's outputs are
        held at once. Arguments as for ``map``.

        Example:
            >>> import conveyor
            >>> list(conveyor.Pipeline([1, 3]).flat_map(range))
            [0, 0, 1, 2]
        """
        args = (workers, backend, ordered, rate, timeout, retries, buffer, name, buffersize)
        return cast("Pipeline[U]", self._add("flat_map", fn, *args, options))

    def filter(
        self,
        fn: Callable[[T], object],
        *,
        workers: int = 1,
        backend: str = "thread",
        ordered: bool = True,
        rate: float | str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        buffer: int | None = None,
        name: str | None = None,
        buffersize: int | None = None,
        **options: Any,
    ) -> Pipeline[T]:
        """Add a stage that passes on the items for which ``fn(item)`` is true.

        Arguments as for ``map``.

        Example:
            >>> import conveyor
            >>> list(conveyor.Pipeline(range(5)).filter(lambda x: x % 2))
            [1, 3]
        """
        args = (workers, backend, ordered, rate, timeout, retries, buffer, name, buffersize)
        return self._add("filter", fn, *args, options)

    def each(
        self,
        fn: Callable[[T], object],
        *,
        workers: int = 1,
        backend: str = "thread",
        ordered: bool = True,
        rate: float | str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        buffer: int | None = None,
        name: str | None = None,
        buffersize: int | None = None,
        **options: Any,
    ) -> Pipeline[T]:
        """Add a stage that calls ``fn(item)`` for its side effects and passes the item on.

        Arguments as for ``map``.

        Example:
            >>> import conveyor
            >>> seen = []
            >>> list(conveyor.Pipeline([1, 2]).each(seen.append))
            [1, 2]
            >>> seen
            [1, 2]
        """
        args = (workers, backend, ordered, rate, timeout, retries, buffer, name, buffersize)
        return self._add("each", fn, *args, options)

    def _add(
        self,
        kind: str,
        fn: Callable[[Any], Any],
        workers: int,
        backend: str,
        ordered: bool,
        rate: float | str | None,
        timeout: float | None,
        retries: int,
        buffer: int | None,
        name: str | None,
        buffersize: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> Pipeline[T]:
        if self._started or self._closed:
            raise RuntimeError("cannot add a stage to a Pipeline that has started or closed")
        check_callable(fn)
        check_count("workers", workers, 1, allow_none=False)
        backend = stage_backend(fn, backend)  # a coroutine function runs on "asyncio"
        backend_cls = lookup(backend)
        for option in options or {}:
            if option not in backend_cls.options:
                takes = ", ".join(sorted(backend_cls.options)) or "none"
                raise TypeError(
                    f"{kind}() got an unexpected keyword argument {option!r} for backend "
                    f"{backend!r} (its own options: {takes})"
                )
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be True or False, got {ordered!r}")
        per_second = _parse_rate(rate)
        check_timeout("timeout", timeout)
        check_count("retries", retries, 0, allow_none=False)
        if buffersize is not None:
            if buffer is not None:
                raise TypeError("give buffer= or its older name buffersize=, not both")
            check_count("buffersize", buffersize, 1)
            buffer = buffersize
        check_count("buffer", buffer, 1)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string or None, got {name!r}")
        if buffer is None:
            buffer = workers if per_second is not None else BUFFER_PER_WORKER * workers
        index = len(self._specs)
        label = getattr(fn, "__name__", type(fn).__name__)
        self._specs.append(
            StageSpec(
                kind=kind,
                fn=fn,
                name=name if name is not None else f"{index}:{label}",
                workers=workers,
                backend=backend,
                ordered=ordered,
                per_second=per_second,
                timeout=timeout,
                retries=retries,
                buffer=buffer,
                options=dict(options or {}),
            )
        )
        return self

    # -- running ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[T]:
        run = self._start()
        results = _results(run)
        # A generator that never started runs no ``finally`` when it is collected; this does.
        weakref.finalize(results, run.stop, False)
        if self._progress:
            one_to_one = all(spec.kind in ("map", "each") for spec in self._specs)
            total = self._source_length if one_to_one else None
            return _with_progress(results, Progress(total, label="pipeline"))
        return results

    def _start(self) -> _PipelineRun:
        """Start the one run of this pipeline (for ``__iter__`` and ``__aiter__``)."""
        if self._closed and not self._started:
            raise RuntimeError("this Pipeline was closed before it ran")
        if self._started:
            raise RuntimeError(
                "this Pipeline has already run: a Pipeline can be iterated once; "
                "build a new one to run again"
            )
        self._started = True
        self._run = _PipelineRun(self._source, self._specs, self._collect)
        return self._run

    def run(self) -> PipelineSummary:
        """Drain the pipeline and return a summary; the pipeline is closed afterwards.

        Example:
            >>> import conveyor
            >>> conveyor.Pipeline([1, 2, 3]).map(abs).run().outputs
            3
        """
        outputs = 0
        failed: list[Failed] = []
        with self:
            for item in self:
                outputs += 1
                if isinstance(item, Failed):
                    failed.append(item)
        return PipelineSummary(outputs, tuple(failed), self.statistics())

    def statistics(self) -> tuple[StageStatistics, ...]:
        """One immutable snapshot per stage, in order.

        Example:
            >>> import conveyor
            >>> p = conveyor.Pipeline([1, 2]).map(abs, workers=2)
            >>> p.statistics()[0].workers
            2
        """
        if self._run is not None:
            return self._run.statistics()
        return tuple(StageStatistics(s.name, s.workers, 0, 0, 0, 0, 0, 0.0) for s in self._specs)

    def close(self) -> None:
        """Stop every stage and wait until all its threads and processes have ended.

        Example:
            >>> import conveyor, itertools
            >>> p = conveyor.Pipeline(itertools.count()).map(abs)
            >>> next(iter(p))
            0
            >>> p.close()
        """
        self._closed = True
        if self._run is not None:
            self._run.stop(wait=True)

    def __enter__(self) -> Pipeline[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _with_progress(results: Iterator[Any], progress: Progress) -> Iterator[Any]:
    """``results``, advancing ``progress`` per output (a ``Failed`` record counts as failed)."""
    try:
        with progress:
            for item in results:
                progress.advance(1, failed=int(isinstance(item, Failed)))
                yield item
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def _results(run: _PipelineRun) -> Iterator[Any]:
    try:
        while chunk := run.next_chunk():
            yield from chunk
    finally:
        run.stop(wait=run.ended)
    if run.source_error is not None:
        raise run.source_error


class _PipelineRun:
    """One run of a pipeline: its buffers, stage threads and source thread.

    ``stopped`` is set once, by the first error or by the consumer leaving; from then on
    every buffer returns at once and every pool refuses work.
    """

    def __init__(self, source: Iterator[Any], specs: list[StageSpec], collect: bool) -> None:
        self._source = source
        self._collect = collect
        self._lock = threading.Lock()
        self.stopped = False
        self.ended = False
        self.error: BaseException | None = None
        self.source_error: BaseException | None = None
        inboxes = [Buffer(spec.buffer) for spec in specs]
        # The consumer's side holds no more than the last stage may.
        self._output = Buffer(specs[-1].buffer if specs else 64)
        self._buffers = [*inboxes, self._output]
        self._stages = [
            Stage(spec, inbox, outbox, collect, self.fail)
            for spec, inbox, outbox in zip(specs, inboxes, self._buffers[1:], strict=True)
        ]
        self._started = time.monotonic()
        self._ended_at: float | None = None
        self._source_thread = threading.Thread(
            target=self._pull, name="conveyor-pipeline-source", daemon=True
        )
        try:
            for index, stage in enumerate(self._stages):
                stage.start(index)
            self._source_thread.start()
        except BaseException:
            self.stop(wait=True)
            raise

    def _pull(self) -> None:
        put = self._buffers[0].put
        try:
            for item in self._source:
                if not put(item):
                    return
        except BaseException as exc:
            if self._collect:
                self.source_error = exc
            else:
                self.fail(exc)
        finally:
            self._buffers[0].close()

    def fail(self, error: BaseException) -> bool:
        """Stop the run because of ``error``; False if it was stopping already."""
        with self._lock:
            if self.stopped:
                return False
            self.stopped = True
            self.error = error
        self._halt()
        return True

    def _halt(self) -> None:
        self._ended_at = time.monotonic()
        for buffer in self._buffers:
            buffer.stop()
        for stage in self._stages:
            if stage.pool is not None:
                stage.pool._halt()

    def next_chunk(self) -> list[Any]:
        """The next items for the consumer; ``[]`` at the end. Raises the run's error."""
        chunk = self._output.take(self._output.capacity)
        if chunk:
            return chunk
        if self.error is not None:
            raise self.error
        if self.stopped:
            raise RuntimeError("the pipeline was closed while it was being iterated")
        self.ended = True
        if self._ended_at is None:
            self._ended_at = time.monotonic()
        return []

    def stop(self, wait: bool) -> None:
        """Stop everything (unless it ended); with ``wait``, until every thread has ended."""
        if not self.ended:
            with self._lock:
                halt = not self.stopped
                self.stopped = True
            if halt:
                self._halt()
        if wait:
            current = threading.current_thread()
            threads = [stage.thread for stage in self._stages] + [self._source_thread]
            for thread in threads:
                if thread is not None and thread is not current and thread.ident is not None:
                    thread.join()

    def statistics(self) -> tuple[StageStatistics, ...]:
        end = self._ended_at if self._ended_at is not None else time.monotonic()
        seconds = end - self._started
        return tuple(stage.statistics(seconds) for stage in self._stages)
