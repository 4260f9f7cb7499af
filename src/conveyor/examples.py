"""Small functions to try conveyor with, from Python or from the command line.

Each one takes its argument as a number or as the text of a number, so that
``conveyor run`` can feed it input lines as they are::

    seq 25 34 | conveyor run conveyor.examples:fib -b process
    seq 20 | sed 's/.*/0.1/' | conveyor run conveyor.examples:sleep -j 20

``fib`` is CPU-bound (it holds the GIL: processes run it in parallel, threads do not);
``sleep`` only waits (threads overlap it as well as processes do, and start faster).
"""

from __future__ import annotations

import time

__all__ = ["fib", "sleep"]


def fib(n: int | str) -> int:
    """The ``n``-th Fibonacci number, computed by plain recursion: slow on purpose.

    ``fib(30)`` takes about a tenth of a second of CPU; each step up costs 1.6 times more.

    Example:
        >>> from conveyor.examples import fib
        >>> [fib(n) for n in range(10)], fib("20")
        ([0, 1, 1, 2, 3, 5, 8, 13, 21, 34], 6765)
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"fib() needs n >= 0, got {n}")
    return _fib(n)


def _fib(n: int) -> int:
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


def sleep(seconds: float | str) -> float:
    """Wait ``seconds`` and return them: work that only waits, like a network call.

    Example:
        >>> from conveyor.examples import sleep
        >>> sleep("0.01")
        0.01
    """
    value = float(seconds)
    time.sleep(value)
    return value
