"""A live status line: how many items are done, of how many, how fast, how long to go, how
many failed.

``Progress`` holds the counts and draws them on one line of a stream (standard error by
default), redrawn at most ``interval`` times a second and wiped when it closes, so the line
never mixes with what the program prints on standard output. ``track`` wraps an iterator so
that each item it yields advances a ``Progress``; ``Pool.map(..., progress=True)`` is built on
it, and a pipeline can drive a ``Progress`` by hand with ``advance``.

Nothing here is thread-safe: one thread advances a given ``Progress``.
"""

from __future__ import annotations

import shutil
import sys
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

__all__ = ["Progress", "Tracked", "length_of", "track"]

T = TypeVar("T")

#: Seconds between two redraws of the line.
DEFAULT_INTERVAL = 0.1


class Progress:
    """Counts of done and failed items, drawn as one live line on ``stream``.

    Args:
        total: how many items there are, when known; ``None`` shows the count alone.
        stream: where the line goes (default ``sys.stderr``, looked up when drawing).
        interval: least seconds between two redraws.
        label: words in front of the counts.

    ``advance`` counts items (failures included) and redraws when ``interval`` has passed;
    ``close`` wipes the line. A ``Progress`` is a context manager that closes on exit.

    Example:
        >>> import io
        >>> from conveyor._progress import Progress
        >>> with Progress(total=3, stream=io.StringIO()) as progress:
        ...     progress.advance(2)
        ...     progress.advance(1, failed=1)
        ...     progress.render().split(" | ")[0]
        '3/3 100%'
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        interval: float = DEFAULT_INTERVAL,
        label: str = "",
    ) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.label = label
        self._stream = stream
        self._interval = interval
        self._started = time.monotonic()
        self._next_draw = self._started  # the first advance draws at once
        self._shown = 0  # characters of the line now on screen
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        """Seconds since the ``Progress`` was made."""
        return time.monotonic() - self._started

    @property
    def rate(self) -> float:
        """Items per second so far."""
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, done: int = 1, *, failed: int = 0) -> None:
        """Count ``done`` more items, of which ``failed`` failed; redraw if it is time (and
        at once on the first failure, which should not wait to be seen)."""
        first_failure = failed and not self.failed
        self.done += done
        self.failed += failed
        if first_failure or time.monotonic() >= self._next_draw:
            self.draw()

    def render(self) -> str:
        """The text of the line, without drawing it.

        Example:
            >>> from conveyor._progress import Progress
            >>> Progress().render().split(" | ")[0]
            '0 done'
        """
        parts = []
        if self.total is not None:
            share = f" {100 * self.done / self.total:.0f}%" if self.total else ""
            parts.append(f"{self.done}/{self.total}{share}")
        else:
            parts.append(f"{self.done} done")
        rate = self.rate
        parts.append(f"{_number(rate)}/s")
        if self.total is not None and self.done < self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        elif self.total is None or self.done < self.total:
            parts.append(f"{_duration(self.elapsed)} so far")
        else:
            parts.append(f"took {_duration(self.elapsed)}")
        if self.failed:
            parts.append(f"{self.failed} failed")
        text = " | ".join(parts)
        return f"{self.label} {text}" if self.label else text

    def draw(self) -> None:
        """Redraw the line now."""
        if self._closed:
            return
        stream = self._stream if self._stream is not None else sys.stderr
        # A line wider than the terminal wraps, and a wrapped line cannot be redrawn in place.
        width = max(10, shutil.get_terminal_size().columns - 1)
        text = self.render()[:width]
        # Padding with spaces wipes the end of a longer earlier line; no terminal escapes are
        # needed, so the line also reads right in a log file.
        _write(stream, "\r" + text.ljust(self._shown))
        self._shown = len(text)
        self._next_draw = time.monotonic() + self._interval

    def clear(self) -> None:
        """Wipe the line (the next ``advance`` or ``draw`` brings it back), e.g. before
        printing something on the same terminal."""
        if self._shown:
            stream = self._stream if self._stream is not None else sys.stderr
            _write(stream, "\r" + " " * self._shown + "\r")
            self._shown = 0
            self._next_draw = time.monotonic()

    def close(self) -> None:
        """Wipe the line for good. Idempotent."""
        if not self._closed:
            self.clear()
            self._closed = True


def _write(stream: TextIO, text: str) -> None:
    try:
        stream.write(text)
        stream.flush()
    except Exception:
        # A status line is not worth failing the work for: a closed or broken stream (or a
        # signal handler drawing while the stream is busy) only loses the display.
        pass


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{minutes}:{seconds:02d}"


def length_of(*iterables: Iterable[object]) -> int | None:
    """How many items a zip of ``iterables`` yields, when every one of them has a length.

    Example:
        >>> from conveyor._progress import length_of
        >>> length_of([1, 2, 3], "ab"), length_of(iter([1]))
        (2, None)
    """
    lengths = []
    for iterable in iterables:
        try:
            lengths.append(len(iterable))  # type: ignore[arg-type]
        except TypeError:
            return None
    return min(lengths) if lengths else None


class Tracked(Iterator[T]):
    """An iterator that advances a ``Progress`` for each item it yields.

    An exception from the wrapped iterator counts one failure, wipes the line and goes on to
    the caller. ``close()`` wipes the line and closes the wrapped iterator when it has a
    ``close`` (a lazy map cancels its queued calls); so does exhausting it.
    """

    __slots__ = ("__weakref__", "_finalizer", "_inner", "progress")

    def __init__(self, inner: Iterator[T], progress: Progress) -> None:
        self._inner = inner
        self.progress = progress
        # An iterator dropped half-way must not leave its line on the screen.
        self._finalizer = weakref.finalize(self, progress.close)

    def __iter__(self) -> Tracked[T]:
        return self

    def __next__(self) -> T:
        try:
            item = next(self._inner)
        except StopIteration:
            self._finalizer()
            raise
        except BaseException:
            self.progress.advance(1, failed=1)
            self._finalizer()
            raise
        self.progress.advance()
        return item

    def close(self) -> None:
        """Stop: wipe the line and close the wrapped iterator."""
        self._finalizer()
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


def track(
    iterable: Iterable[T],
    total: int | None = None,
    *,
    stream: TextIO | None = None,
    label: str = "",
) -> Tracked[T]:
    """Iterate over ``iterable`` with a live status line on ``stream`` (standard error).

    ``total`` defaults to ``len(iterable)`` when it has one.

    Example:
        >>> import io
        >>> from conveyor._progress import track
        >>> stream = io.StringIO()
        >>> sum(track(range(5), stream=stream))
        10
        >>> stream.getvalue().endswith("\\r")  # the line was wiped at the end
        True
    """
    if total is None:
        total = length_of(iterable)
    return Tracked(iter(iterable), Progress(total, stream=stream, label=label))
