"""Remembering functions without keeping them, or what they are bound to, alive.

Pools remember things per function (its pickle, its measured call time) across calls. Holding
the function itself would hold a bound method's object, and with it whatever the caller
dropped, for as long as the pool lives. So functions are held weakly, and looked up by a key
that a new bound method of the same object and function shares.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["FnRef", "fn_key", "fn_ref", "is_fn", "unwrapped"]

#: A call that returns the function remembered, or None once it is gone.
FnRef = Callable[[], object]


def unwrapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The function a wrapper of conveyor's own stands for (``conveyor_wraps``: a coroutine
    function made plain, new for each call), else ``fn``: it is remembered as that function."""
    # (Asked of the class: an object that answers any attribute, a mock, is not a wrapper.)
    if getattr(type(fn), "conveyor_wraps", None) is None:
        return fn
    inner: Callable[..., Any] = fn.conveyor_wraps  # type: ignore[attr-defined]
    return inner


def fn_key(fn: Callable[..., Any]) -> Hashable:
    """What ``fn`` is remembered under: its id, or for a bound method, those of its function
    and object (each ``obj.method`` is a new object)."""
    fn = unwrapped(fn)
    if type(fn) is types.MethodType:
        return (id(fn.__func__), id(fn.__self__))
    return id(fn)


def fn_ref(fn: Callable[..., Any]) -> FnRef | None:
    """A weak reference to ``fn``; None if it can be neither referred to weakly nor held
    without holding an object (a builtin method bound to an object: ``[].append``)."""
    fn = unwrapped(fn)
    try:
        if type(fn) is types.MethodType:
            return weakref.WeakMethod(fn)
        return weakref.ref(fn)
    except TypeError:
        owner = getattr(fn, "__self__", None)
        if owner is not None and not isinstance(owner, (type, types.ModuleType)):
            return None
        return _Held(fn)  # a builtin function or method of a class: it lives for ever anyway


def is_fn(ref: FnRef, fn: Callable[..., Any]) -> bool:
    """Whether ``ref`` refers to ``fn`` (or to a bound method equal to it)."""
    fn = unwrapped(fn)
    target = ref()
    return target is fn or (type(fn) is types.MethodType and target == fn)


class _Held:
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self) -> object:
        return self.fn
