"""Coroutine functions on every backend: how each kind of worker runs one.

* The asyncio backend runs coroutine functions only, as tasks on its event loop.
* The thread and process backends (and any other) run each call of a coroutine function to
  completion on an event loop of its own (``OnOwnLoop``): ``asyncio.run`` per call, in the
  worker. It costs a new loop per call, so that ``await`` inside CPU-bound or blocking code
  still works there; for many concurrent awaits, use the asyncio backend.
* A pipeline stage whose function is a coroutine function runs on the asyncio backend unless
  it names another (``stage_backend``); ``AsyncStep`` is its step.

Nothing here imports ``asyncio`` until a call runs, so ``import conveyor`` stays light.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "AsyncStep",
    "OnOwnLoop",
    "is_coroutine_function",
    "on_own_loop",
    "stage_backend",
    "stage_step",
]


def is_coroutine_function(fn: object) -> bool:
    """Whether calling ``fn`` makes a coroutine: an ``async def`` function, a method or a
    ``functools.partial`` of one, or an object whose ``__call__`` is one.

    Example:
        >>> async def fetch(url): return url
        >>> is_coroutine_function(fetch), is_coroutine_function(len)
        (True, False)
    """
    kind = type(fn)
    if kind is types.BuiltinFunctionType:
        return False
    if (
        kind is types.FunctionType
        and not fn.__code__.co_flags & inspect.CO_COROUTINE  # type: ignore[attr-defined]
        and not hasattr(fn, "_is_coroutine_marker")  # inspect.markcoroutinefunction's
    ):
        return False  # the common case, asked on every submit: inspect's way costs microseconds
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's, not the object's
    return call is not None and inspect.iscoroutinefunction(call)


class OnOwnLoop:
    """A coroutine function as a plain one: each call runs to completion on a new event loop
    (``asyncio.run``), on the thread or process that calls it. Pickles by its function.

    Example:
        >>> async def double(x): return 2 * x
        >>> OnOwnLoop(double)(21)
        42
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    @property
    def conveyor_wraps(self) -> Callable[..., Any]:
        """The function it stands for: pools remember it as that function (its measured
        call time, its pickle on a process pool), though each call gets a new wrapper."""
        return self.fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import asyncio

        return asyncio.run(self.fn(*args, **kwargs))

    def __reduce__(self) -> tuple[type[OnOwnLoop], tuple[Callable[..., Any]]]:
        return (OnOwnLoop, (self.fn,))

    def __repr__(self) -> str:
        return f"OnOwnLoop({self.fn!r})"


def on_own_loop(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a backend without an event loop runs it: wrapped in ``OnOwnLoop`` when it is
    a coroutine function, else as it is."""
    return OnOwnLoop(fn) if is_coroutine_function(fn) else fn


def not_coroutine_error(fn: object, what: str = "fn") -> TypeError:
    """The error for a plain function given where a coroutine function is needed."""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return TypeError(
        f"the asyncio backend runs coroutine functions (async def), and {what} {name} is not "
        "one: define it with `async def`, or run it on backend='thread' (blocking I/O) or "
        "backend='process' (CPU work)"
    )


def stage_backend(fn: Callable[..., Any], backend: str) -> str:
    """The backend of a pipeline stage: a coroutine function given the default ``"thread"``
    runs on ``"asyncio"``; a plain function named for ``"asyncio"`` is refused."""
    awaits = is_coroutine_function(fn) or inspect.isasyncgenfunction(fn)
    if backend == "thread" and awaits:
        return "asyncio"
    if backend == "asyncio" and not awaits:
        raise not_coroutine_error(fn)
    return backend


def stage_step(
    kind: str,
    fn: Callable[[Any], Any],
    backend: str,
    steps: Mapping[str, Callable[[Callable[[Any], Any]], Callable[[Any], Any]]],
    marker: type,
    dropped: object,
) -> Callable[[Any], Any]:
    """The callable a stage's pool runs per item: ``steps[kind]`` (the stage's own steps)
    around ``fn``; on the asyncio backend an ``AsyncStep``; a coroutine function on another
    backend runs on a loop of its own per item."""
    if backend == "asyncio":
        return AsyncStep(kind, fn, marker, dropped)
    return steps[kind](on_own_loop(fn))


class AsyncStep:
    """A pipeline step whose function is a coroutine function (or, for ``flat_map``, an
    async generator function): awaited on the asyncio backend. Items of type ``marker`` pass
    through untouched; a filter answers ``dropped`` for an item it drops."""

    __slots__ = ("dropped", "fn", "kind", "marker")

    def __init__(self, kind: str, fn: Callable[[Any], Any], marker: type, dropped: object) -> None:
        self.kind = kind
        self.fn = fn
        self.marker = marker
        self.dropped = dropped

    async def __call__(self, item: Any) -> Any:
        if type(item) is self.marker:
            return item
        result = self.fn(item)
        if hasattr(result, "__aiter__"):
            value: Any = [x async for x in result]
        else:
            value = await result
        kind = self.kind
        if kind == "map":
            return value
        if kind == "flat_map":
            return list(value)
        if kind == "filter":
            return item if value else self.dropped
        return item  # each
