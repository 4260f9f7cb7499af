"""Drop-in replacements for the stdlib executors: change one import, keep the signatures."""

from __future__ import annotations

from collections.abc import Callable
from multiprocessing.context import BaseContext
from typing import Any

from ._checks import check_max_workers
from ._pool import Pool

__all__ = ["ProcessPoolExecutor", "ThreadPoolExecutor"]


class ThreadPoolExecutor(Pool):
    """``concurrent.futures.ThreadPoolExecutor`` with the same signature and behaviour.

    ``map`` submits its whole input at once, as the stdlib's does; pass ``buffersize`` to make
    it lazy. The keyword-only arguments ``max_pending``, ``timeout``, ``retries`` and
    ``retry_on`` and ``statistics()`` come from ``conveyor.Pool``.

    Example:
        >>> from conveyor import ThreadPoolExecutor
        >>> with ThreadPoolExecutor(max_workers=2) as executor:
        ...     list(executor.map(len, ["ab", "c"]))
        [2, 1]
    """

    _eager_map = True

    def __init__(
        self,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_pending: int | None = None,
        timeout: float | None = None,
        retries: int = 0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
    ) -> None:
        check_max_workers(max_workers)
        super().__init__(
            "thread",
            max_workers,
            max_pending=max_pending,
            timeout=timeout,
            retries=retries,
            retry_on=retry_on,
            initializer=initializer,
            initargs=initargs,
            thread_name_prefix=thread_name_prefix,
        )


class ProcessPoolExecutor(Pool):
    """``concurrent.futures.ProcessPoolExecutor`` with the same signature and behaviour,
    except that a worker's crash fails only its own call (still a ``BrokenProcessPool``, as
    ``conveyor.WorkerCrashed``) and the pool stays usable.

    ``map`` submits its whole input at once, as the stdlib's does, in batches of ``chunksize``;
    pass ``buffersize`` to make it lazy. Keyword-only ``max_pending``, ``timeout``, ``retries``
    and ``retry_on`` and ``statistics()`` come from ``conveyor.Pool``.

    Example:
        >>> from conveyor import ProcessPoolExecutor
        >>> with ProcessPoolExecutor(max_workers=2) as executor:
        ...     list(executor.map(abs, [-1, -2]))
        [1, 2]
    """

    _eager_map = True

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: BaseContext | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        max_pending: int | None = None,
        timeout: float | None = None,
        retries: int = 0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
    ) -> None:
        check_max_workers(max_workers)
        super().__init__(
            "process",
            max_workers,
            max_pending=max_pending,
            timeout=timeout,
            retries=retries,
            retry_on=retry_on,
            initializer=initializer,
            initargs=initargs,
            mp_context=mp_context,
            max_tasks_per_worker=max_tasks_per_child,
        )
