"""The files in ``/dev/shm`` that a pool writes its jobs' large buffers into, again and again
(see ``_wire``, whose module doc says why they are made as they are).

A segment is made by the first buffer that finds no free one (written with ``pwrite``, which
allocates its pages as it copies), or ahead of need by a helper thread (allocated, never
written: a blank). The helper then maps each written segment into this process, so that the
next buffers written into it are only copied; until it has, they are written with ``pwrite``.

Threads: the thread that owns the pool's workers makes every call; the helper thread, started
by the first segment made, adds blanks to the free segments and mappings to written ones. Both
take ``Segments._lock`` for what they share (named in ``__init__``).
"""

from __future__ import annotations

import itertools
import mmap
import os
import secrets
import threading

__all__ = ["BLANKS", "SEGMENTS_KEPT", "Segments"]

#: Bytes of unused segments a pool keeps for later jobs; beyond that, the oldest go.
SEGMENTS_KEPT = 256 << 20
#: Blank segments kept free, once a buffer has needed a new segment.
BLANKS = 2
_UNIT = 1 << 20  # a segment's capacity is whole mebibytes
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_names = itertools.count()


class _Segment:
    __slots__ = ("blank", "capacity", "gone", "mapping", "name")

    def __init__(self, name: str, capacity: int, blank: bool) -> None:
        self.name = name
        self.capacity = capacity
        self.blank = blank  # allocated ahead, never written
        self.mapping: mmap.mmap | None = None  # this process's, made by the helper
        self.gone = False  # unlinked: the helper must not map it


class Segments:
    """Files that one sender writes buffers into, named ``prefix`` and a number.

    A segment is in use from ``write`` until ``release`` (the receiver is done with it: it
    is kept for another buffer) or ``discard`` (it may still be read: it is unlinked and
    forgotten).
    """

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._used: dict[str, _Segment] = {}
        self.last: list[str] = []  # the segments the last _wire.dumps() wrote into
        # Shared with the helper thread, under the lock:
        self._lock = threading.Condition()
        self._free: list[_Segment] = []  # oldest first
        self._free_bytes = 0
        self._blank_size = 0  # the capacity of the blanks to keep free; 0: none
        self._to_map: list[_Segment] = []  # written, not mapped yet
        self._closed = False
        self._helper: threading.Thread | None = None

    def write(self, data: memoryview) -> tuple[str, int]:
        """Copy ``data`` (contiguous) into a segment: its name and size. Raises OSError
        when /dev/shm has no room (the buffer must travel another way)."""
        size = data.nbytes
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        with self._lock:
            segment = self._take(size)
        if segment is None:
            segment = self._create(max(_UNIT, -(-size // _UNIT) * _UNIT), data)
            self._keep_blanks(segment.capacity)
        else:
            try:
                if segment.mapping is not None:
                    segment.mapping[:size] = data
                else:
                    _rewrite(segment.name, data)
            except BaseException:
                self._drop(segment)
                raise
        self._used[segment.name] = segment
        if segment.mapping is None:
            with self._lock:
                if segment.blank or segment not in self._to_map:
                    segment.blank = False
                    self._to_map.append(segment)
                    self._lock.notify()
        return segment.name, size

    def _take(self, size: int) -> _Segment | None:
        """The smallest free segment that fits, if it is not much too big; a blank one only
        if no other fits (a blank stands for a segment that would be made)."""
        chosen = None
        for position, segment in enumerate(self._free):
            if size <= segment.capacity <= 2 * size and (
                chosen is None
                or (segment.blank, segment.capacity)
                < (self._free[chosen].blank, self._free[chosen].capacity)
            ):
                chosen = position
        if chosen is None:
            return None
        segment = self._free.pop(chosen)
        self._free_bytes -= segment.capacity
        if segment.blank:
            self._lock.notify()  # the helper makes the next one
        return segment

    def _keep_blanks(self, capacity: int) -> None:
        """A buffer found no free segment: more may follow, so keep blank ones ready."""
        with self._lock:
            self._blank_size = capacity
            if self._helper is None:
                self._helper = threading.Thread(
                    target=self._help, name="conveyor-segments", daemon=True
                )
                try:
                    self._helper.start()
                except RuntimeError:  # no thread to be had: buffers make their own
                    self._blank_size = 0
            self._lock.notify()

    def _blank_wanted(self) -> bool:
        size = self._blank_size
        return (
            size > 0
            and self._free_bytes + size <= SEGMENTS_KEPT
            and sum(1 for s in self._free if s.blank and s.capacity == size) < BLANKS
        )

    def _help(self) -> None:
        """The helper thread's loop: BLANKS blank segments free, of the size last made; when
        there are, map the written segments."""
        lock = self._lock
        while True:
            with lock:
                while not (self._closed or self._blank_wanted() or self._to_map):
                    lock.wait()
                if self._closed:
                    return
                capacity = self._blank_size if self._blank_wanted() else 0
                written = None if capacity else self._to_map.pop(0)
            if written is not None:
                self._map(written)
                continue
            try:
                segment = self._create(capacity)
            except OSError:
                with lock:
                    self._blank_size = 0  # no room: buffers make their own as they come
                continue
            with lock:
                if not self._closed:
                    self._free.append(segment)
                    self._free_bytes += capacity
                    continue
            self._drop(segment)
            return

    def _create(self, capacity: int, data: memoryview | None = None) -> _Segment:
        """A new segment holding ``data``, or blank. Every page is allocated here: writing
        through a mapping of a sparse file that /dev/shm has no room for (64 MB in a default
        Docker container) would kill the process with SIGBUS, where this raises OSError."""
        name = f"{self._prefix}{next(_names)}-{secrets.token_hex(4)}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            written = 0 if data is None else _pwrite(fd, data)
            if capacity > written:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, written, capacity - written)
                else:  # pragma: no cover - not on Linux
                    os.ftruncate(fd, capacity)
        except BaseException:
            _unlink(name)
            raise
        finally:
            os.close(fd)
        return _Segment(name, capacity, blank=data is None)

    def _map(self, segment: _Segment) -> None:
        """Map a written segment, every page in one go (they exist): on the helper thread."""
        try:
            fd = os.open(segment.name, os.O_RDWR)
        except OSError:
            return  # unlinked meanwhile
        try:
            mapping: mmap.mmap | None = mmap.mmap(
                fd, segment.capacity, flags=mmap.MAP_SHARED | _POPULATE
            )
        except OSError:
            return  # it is written with pwrite instead
        finally:
            os.close(fd)
        with self._lock:
            if not segment.gone and segment.mapping is None:
                segment.mapping, mapping = mapping, None
        if mapping is not None:
            mapping.close()

    def release(self, names: list[str]) -> None:
        """The receiver is done with these: keep them for later buffers."""
        dropped = []
        with self._lock:
            for name in names:
                segment = self._used.pop(name, None)
                if segment is not None:
                    self._free.append(segment)
                    self._free_bytes += segment.capacity
            while self._free_bytes > SEGMENTS_KEPT:
                dropped.append(self._free.pop(0))
                self._free_bytes -= dropped[-1].capacity
        for segment in dropped:
            self._drop(segment)

    def discard(self, names: list[str]) -> None:
        """These may still be read: never write them again."""
        for name in names:
            segment = self._used.pop(name, None)
            if segment is not None:
                self._drop(segment)

    def close(self) -> None:
        """Unlink every segment; the helper thread is gone when this returns."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._helper is not None:
            self._helper.join()
        for segment in [*self._free, *self._used.values()]:
            self._drop(segment)
        self._free.clear()
        self._used.clear()
        self._to_map.clear()
        self._free_bytes = 0

    def _drop(self, segment: _Segment) -> None:
        _unlink(segment.name)
        with self._lock:
            segment.gone = True
            mapping, segment.mapping = segment.mapping, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # a memoryview of it lives on: the mapping goes with it


def _pwrite(fd: int, data: memoryview) -> int:
    written = 0
    while written < data.nbytes:
        written += os.pwrite(fd, data[written:], written)
    return written


def _rewrite(name: str, data: memoryview) -> None:
    fd = os.open(name, os.O_RDWR)
    try:
        _pwrite(fd, data)
    finally:
        os.close(fd)


def _unlink(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass
