"""Argument checks shared by ``Pool``, the drop-in executors and ``Pipeline``.

Each raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for one out of
range, naming the argument and what it accepts, before anything has been started.
"""

from __future__ import annotations

__all__ = [
    "check_callable",
    "check_count",
    "check_exception_classes",
    "check_max_workers",
    "check_timeout",
]


def check_timeout(name: str, value: float | None) -> None:
    """``value`` is a number of seconds >= 0, or None."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 seconds or None, got {value!r}")


def check_callable(fn: object, name: str = "fn") -> None:
    """``fn`` can be called."""
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__} {fn!r}")


def check_count(name: str, value: int | None, minimum: int, allow_none: bool = True) -> None:
    """``value`` is an int >= ``minimum`` (or None, when ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def check_exception_classes(
    name: str, value: type[BaseException] | tuple[type[BaseException], ...]
) -> tuple[type[BaseException], ...]:
    """``value`` is an exception class or a tuple of them; returned as a tuple."""
    classes = value if isinstance(value, tuple) else (value,)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"{name} must hold exception classes, got {cls!r}")
    return classes


def check_max_workers(max_workers: int | None) -> None:
    """The stdlib executors' ``max_workers``: an int > 0, or None (with their message)."""
    if max_workers is not None and (
        isinstance(max_workers, bool) or not isinstance(max_workers, int)
    ):
        raise TypeError(f"max_workers must be an int > 0 or None, got {max_workers!r}")
    if max_workers is not None and max_workers <= 0:
        raise ValueError("max_workers must be greater than 0")
