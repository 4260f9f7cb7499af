"""What a worker runs for each input of ``conveyor run``: the function, and the encoding of
its result as JSON text.

A pickled ``_Call`` names this module, so every process worker imports it: it imports only
the standard library's ``json`` and ``traceback``, never the command line, the run loop or
the pool. It holds no state beyond the function it wraps, and any thread may call it.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["encode_value"]


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
            if not self.spread:
                result = self.fn(arg)
            elif type(arg) is list:
                result = self.fn(*arg)
            elif type(arg) is dict:
                result = self.fn(**arg)
            else:
                result = self.fn(arg)
        except Exception as exc:
            tb = exc.__traceback__
            frames = tb.tb_next if tb is not None else None  # leave out this frame
            try:
                exc._conveyor_traceback = "".join(  # type: ignore[attr-defined]
                    traceback.format_exception(type(exc), exc, frames)
                )
            except Exception:
                pass  # an exception type that refuses attributes keeps its own traceback
            raise
        return encode_value(result)

    def __getstate__(self) -> tuple[Callable[..., Any], bool]:
        return self.fn, self.spread

    def __setstate__(self, state: tuple[Callable[..., Any], bool]) -> None:
        self.fn, self.spread = state


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
