"""``AsyncResult``: what ``Pool.apply_async`` returns, with ``multiprocessing``'s methods."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

__all__ = ["AsyncResult"]


class AsyncResult:
    """The outcome of ``Pool.apply_async``, with ``multiprocessing``'s ``AsyncResult`` methods.

    Example:
        >>> import conveyor
        >>> with conveyor.Pool(workers=1) as pool:
        ...     pool.apply_async(pow, (2, 10)).get(timeout=10)
        1024
    """

    def __init__(
        self,
        future: Future[Any],
        callback: Callable[[Any], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> None:
        self._future = future
        self._callback = callback
        self._error_callback = error_callback
        self._callback_error: BaseException | None = None
        self._settled = threading.Event()
        future.add_done_callback(self._settle)

    def _settle(self, future: Future[Any]) -> None:
        try:
            if future.cancelled():
                return
            error = future.exception()
            if error is None:
                if self._callback is not None:
                    self._callback(future.result())
            elif self._error_callback is not None:
                self._error_callback(error)
        except BaseException as exc:
            # A failing callback must not vanish into a log: get() raises it.
            self._callback_error = exc
        finally:
            self._settled.set()

    @property
    def future(self) -> Future[Any]:
        """The underlying ``concurrent.futures.Future``."""
        return self._future

    def ready(self) -> bool:
        """Whether the call has ended."""
        return self._settled.is_set()

    def successful(self) -> bool:
        """Whether the call returned; ``ValueError`` if it has not ended yet."""
        if not self.ready():
            raise ValueError("the call has not ended yet; wait() or check ready() first")
        return not self._future.cancelled() and self._future.exception() is None

    def wait(self, timeout: float | None = None) -> None:
        """Block until the call has ended or ``timeout`` seconds passed."""
        self._wait(timeout)

    def _wait(self, timeout: float | None) -> bool:
        # Through the future first: its waiter may run the pool meanwhile (a process pool
        # reads the call's outcome on this thread), as ``future.result()`` does. The callback
        # that settles this object may still be running on another thread after that.
        end = None if timeout is None else time.monotonic() + timeout
        try:
            self._future.exception(timeout)
        except (CancelledError, FutureTimeoutError):
            pass
        return self._settled.wait(None if end is None else max(0.0, end - time.monotonic()))

    def get(self, timeout: float | None = None) -> Any:
        """The call's result; its exception is raised; ``multiprocessing.TimeoutError`` if
        it has not ended within ``timeout`` seconds."""
        if not self._wait(timeout):
            raise multiprocessing.TimeoutError(f"no result within {timeout} s")
        if self._callback_error is not None:
            raise self._callback_error
        return self._future.result()
