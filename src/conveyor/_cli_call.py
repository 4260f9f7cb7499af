"""What a worker runs for each input of ``conveyor run``: the function, and the encoding of
its result as JSON text.

A pickled ``_Call`` names this module, so every process worker imports it: it imports only
the standard library's ``json`` and ``traceback``, never the command line, the run loop or
the pool. It holds no state beyond the function it wraps, and any thread may call it.
``_AsyncCall`` is its twin for a coroutine function on the asyncio backend (``call_for``
picks the backend and the call).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["call_for", "encode_value"]


class _Call:
    """``fn`` as a worker runs it: the result comes back already encoded as JSON text.

    Encoding in the worker means that what travels back is always a ``str``, so an output
    that cannot be pickled is still written (as its repr). An exception gets the traceback of
    the function's own frames attached, formatted where it happened.
    """

    __slots__ = ("fn", "spread")

    def __init__(self, fn: Callable[..., Any], spread: bool) -> None:
        self.fn = fn
        self.spread = spread

    def __call__(self, arg: Any) -> str:
        try:
            result = _invoke(self.fn, self.spread, arg)
        except Exception as exc:
            _attach_traceback(exc)
            raise
        return encode_value(result)

    def __getstate__(self) -> tuple[Callable[..., Any], bool]:
        return self.fn, self.spread

    def __setstate__(self, state: tuple[Callable[..., Any], bool]) -> None:
        self.fn, self.spread = state


class _AsyncCall(_Call):
    """``_Call`` for a coroutine function, awaited on the asyncio backend."""

    __slots__ = ()

    async def __call__(self, arg: Any) -> str:  # type: ignore[override]
        try:
            result = await _invoke(self.fn, self.spread, arg)
        except Exception as exc:
            _attach_traceback(exc)
            raise
        return encode_value(result)


def _invoke(fn: Callable[..., Any], spread: bool, arg: Any) -> Any:
    if not spread:
        return fn(arg)
    if type(arg) is list:
        return fn(*arg)
    if type(arg) is dict:
        return fn(**arg)
    return fn(arg)


def _attach_traceback(exc: BaseException) -> None:
    """Format ``exc``'s traceback without this module's frames, where it happened."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next  # leave out this module's frames
    try:
        exc._conveyor_traceback = "".join(  # type: ignore[attr-defined]
            traceback.format_exception(type(exc), exc, tb)
        )
    except Exception:
        pass  # an exception type that refuses attributes keeps its own traceback


def call_for(fn: Callable[..., Any], backend: str | None, spread: bool) -> tuple[str, _Call]:
    """The backend (``-b``; its default is ``auto``) and the call that run ``fn``: a
    coroutine function runs on the asyncio backend unless a backend other than ``auto`` is
    named, where each call runs on an event loop of its own; a plain function cannot run on
    the asyncio backend."""
    from ._coroutines import is_coroutine_function, not_coroutine_error, on_own_loop

    if is_coroutine_function(fn):
        if backend in (None, "auto", "asyncio"):
            return "asyncio", _AsyncCall(fn, spread)
        return backend, _Call(on_own_loop(fn), spread)
    if backend == "asyncio":
        raise not_coroutine_error(fn, "FUNCTION")
    return backend or "auto", _Call(fn, spread)


def encode_value(value: object) -> str:
    """``value`` as JSON text; its repr, as a JSON string, when it is not serialisable.

    Example:
        >>> from conveyor._cli_call import encode_value
        >>> encode_value([1, "a"]), encode_value({1, 2}), encode_value(float("nan"))
        ('[1, "a"]', '"{1, 2}"', '"nan"')
    """
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return json.dumps(repr(value), ensure_ascii=False)
