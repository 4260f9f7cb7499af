"""The functions the benchmarks send to pools.

They live in a module of their own so that worker processes started with ``spawn`` or
``forkserver`` can import them by name (functions of a script's ``__main__`` are not always
importable there).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

#: Every call ``crash_every_20`` makes with ``x % CRASH_EVERY == 0`` kills its worker.
CRASH_EVERY = 20


def noop() -> None:
    """Return None at once: the cost of a call itself."""


def inc(x: int) -> int:
    return x + 1


def nap(seconds: float) -> None:
    time.sleep(seconds)


def fib(n: int) -> int:
    """The naive recursive Fibonacci number: pure CPU work in the interpreter."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def fib_all(ns: list[int]) -> list[int]:
    """``fib`` of each of ``ns``, in one call."""
    return [fib(n) for n in ns]


def array_sum(array: Any) -> float:
    return float(array.sum())


def crash_every_20(x: int) -> int:
    """``x + 1``, except that one call in CRASH_EVERY kills its worker process."""
    if x % CRASH_EVERY == 0:
        os._exit(1)
    return x + 1


def echo(conn: Any) -> None:
    """Send back whatever arrives on ``conn`` until None arrives: a bare pipe's round trip."""
    while True:
        message = conn.recv()
        if message is None:
            conn.close()
            return
        conn.send(message)


@functools.cache
def blob() -> bytes:
    """A buffer large enough that hashing it lets the GIL go (hashlib does above 2 KiB),
    made on first use: made at import, its 32 MiB would be in every worker process of every
    benchmark (forked from a process that imported this module), and the kernel's cost to
    fork a process and to tear it down grows with its memory."""
    return b"conveyor" * (4 << 20)


def sha256_of_blob(_: object) -> str:
    """SHA-256 of a 32 MiB buffer: CPU work that threads run in parallel."""
    import hashlib

    return hashlib.sha256(blob()).hexdigest()
