"""Serialisation between the pool and its worker processes.

Objects are pickled with protocol 5. Functions and objects that pickle cannot handle by
reference (lambdas, closures, anything defined in ``__main__``) fall back to cloudpickle.

Large buffers (NumPy arrays, ``bytes``, ``bytearray``, ``memoryview`` of ``BIG`` bytes or more)
travel out of band: the sender writes each into a file in ``/dev/shm`` (the one copy), the
receiver maps that file and unpickles straight from the mapping (no copy), then unlinks it so
the memory goes away with the last reference. Where ``/dev/shm`` is missing they stay in band.

The pool sends its jobs' buffers through ``Segments`` instead (see ``_segments``): files it
keeps and writes again for later jobs, so that sending a buffer is one copy into memory already
there. The worker maps them for the job, then tells the pool of any it could not let go (the
call kept a reference to its argument): those the pool never writes again.

What a new pool pays for is new pages. Measured here (2 CPUs, a VM) per 8 MB, 2,048 pages:
copying into a segment already mapped takes 0.7 ms; making one by ``posix_fallocate`` and then
copying through a new mapping 5.5 ms, each page faulted in (zero-filled, then mapped) as the
copy first touches it. Mapping with ``MAP_POPULATE`` or ``MADV_POPULATE_WRITE`` when the segment
is made only moves that work (6.3 and 4.7 ms). ``pwrite`` into a new file allocates each page
as it copies into it, with no zero fill and no fault: 3.6 ms, of which 1.9 is the allocation
(``posix_fallocate`` alone) and 1.7 the copy. Mapping pages that exist takes 1.0 ms. Hence,
in ``_segments``:

* a new segment is written with ``pwrite``;
* once a buffer has needed a new segment, a helper thread keeps ``BLANKS`` (2) segments of
  that size free, allocated but never written: the next buffers that need a new one are only
  copied into one (``pwrite``, 1.7 ms) while the helper allocates the next, on the other CPU;
* when it has no blank to make, the helper maps the written segments, so that later buffers
  are copied into them; one written again before that is written with ``pwrite``.

Measured with ``benchmarks/_fresh_map.py`` (a script importing numpy at its top; the first map
of 20 arrays of 8 MB on a new pool; interleaved rounds, medians): the number of blanks, with
segments mapped when first written again (16 rounds): 1,480 MB/s before, 2,150 with 1 blank,
2,230 with 2, 2,190 with 3; 2 against 4 and 6 (14 rounds): 2,210, 1,990, 2,010. Blanks the map
does not use are allocation taken from the workers' CPUs. Where the mapping is made, first,
second and third map on one new pool (12 to 20 rounds): when a segment is first written again,
2,010, 4,030 and 5,020 MB/s against 1,470, 5,380 and 5,320 before (the second map pays for
mapping every page); on the helper, released segments only, 2,060, 4,680 and 5,500; on the
helper, every written segment (this), 2,130, 5,230 and 5,590 against 1,470, 5,240 and 5,360.

Blanks count with the free segments against ``SEGMENTS_KEPT``. Where /dev/shm has no room,
``pwrite`` and ``posix_fallocate`` raise OSError (never SIGBUS): the buffer travels another
way, and the helper stops making blanks.

A message is one of::

    b"\\x00" + pickle            everything in band
    b"\\x01" + pickle((files, pickle))   with out-of-band buffers in ``files``
    b"\\x02" + pickle((files, pickle))   the same, in the sender's segments (never unlinked)
"""

from __future__ import annotations

import io
import itertools
import mmap
import os
import pickle
import secrets
import sys
from collections.abc import Sequence
from typing import Any

import cloudpickle

from . import _segments

__all__ = ["BIG", "dumps", "dumps_function", "forget_files", "loads"]

#: Buffers of at least this many bytes go through shared memory.
BIG = 1 << 20
_SHM_DIR = "/dev/shm"
_HAS_SHM = os.path.isdir(_SHM_DIR) and os.access(_SHM_DIR, os.W_OK)
_names = itertools.count()
_MAIN_REFERENCE = b"__main__"


def main_is_a_file() -> bool:
    """Whether a worker can import ``__main__`` again: it is a script's file, not a REPL,
    ``python -c`` or a script read from standard input (whose ``__file__`` is ``<stdin>``)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return isinstance(path, str) and os.path.isfile(path)


_MAIN_IMPORTABLE = main_is_a_file()
_INBAND = b"\x00"
_OUTBAND = b"\x01"
_SEGMENTS = b"\x02"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _prefix(pid: int) -> str:
    return f"{_SHM_DIR}/conveyor-{pid}-"


def dumps_function(fn: Any) -> bytes:
    """Pickle a function into a message: by reference when it can be imported again (the
    worker imports its module), else by value (lambdas, closures, ``__main__``)."""
    if getattr(fn, "__module__", None) != "__main__":
        try:
            return _INBAND + pickle.dumps(fn, protocol=5)
        except Exception:
            pass
    by_value: bytes = cloudpickle.dumps(fn, protocol=5)
    return _INBAND + by_value


def dumps(obj: Any, segments: Segments | None = None, header: bytes = b"") -> bytes:
    """Pickle ``obj`` into one message; raises what pickle and cloudpickle both raise.

    With ``segments``, large buffers are written into them; the names used are in
    ``segments.last``. ``header`` goes in front of the message (copied once with it)."""
    big: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        # Returning False sends the buffer out of band.
        if not _HAS_SHM:
            return True
        try:
            size = buffer.raw().nbytes
        except BufferError:  # not contiguous: pickle copies it in band
            return True
        if size < BIG:
            return True
        big.append(buffer)
        return False

    try:
        try:
            # pickle's own, in C: a few times faster than a Pickler subclass (whose
            # reducer_override is asked about every object), which only memoryviews need.
            data = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
        except TypeError:
            big.clear()
            stream = io.BytesIO()
            _Pickler(stream, protocol=5, buffer_callback=out_of_band).dump(obj)
            data = stream.getvalue()
        if _MAIN_REFERENCE in data and not _MAIN_IMPORTABLE:
            # Classes and functions of an interactive __main__ cannot be found by name in a
            # worker: send them by value.
            raise pickle.PicklingError("refers to an interactive __main__")
    except Exception:
        big.clear()
        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    if not big:
        return b"".join((header, _INBAND, data))
    files: list[tuple[str, int]] = []
    if segments is not None:
        try:
            for buffer in big:
                files.append(segments.write(buffer.raw()))
        except OSError:
            segments.release([name for name, _ in files])
        else:
            segments.last = [name for name, _ in files]
            return header + _SEGMENTS + pickle.dumps((files, data), protocol=5)
        files = []
    try:
        for buffer in big:
            files.append(_write_file(buffer.raw()))
    except OSError:
        forget_files(name for name, _ in files)
        return b"".join((header, _INBAND, pickle.dumps(obj, protocol=5)))
    return header + _OUTBAND + pickle.dumps((files, data), protocol=5)


class _Pickler(pickle.Pickler):
    """pickle, plus ``memoryview``s (rebuilt as memoryviews: over shared memory when big)."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is memoryview:
            return memoryview, (pickle.PickleBuffer(obj),)
        return NotImplemented


class _BigBytes:
    """Stands for a large ``bytes`` or ``bytearray`` so that it travels out of band.

    pickle writes both in band whatever their size (and never asks ``reducer_override``
    about them); wrapped, they are sent as a buffer and rebuilt as their type on arrival.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return type(self.data), (pickle.PickleBuffer(self.data),)


def _is_big_bytes(item: Any) -> bool:
    return (type(item) is bytes or type(item) is bytearray) and len(item) >= BIG


def _wrap(item: Any) -> Any:
    if _is_big_bytes(item):
        return _BigBytes(item)
    if type(item) is tuple:
        for x in item:
            if _is_big_bytes(x):
                return tuple(_wrap(x) for x in item)
    return item


def wrap_big_bytes(items: Sequence[Any]) -> Sequence[Any]:
    """``items`` with every large ``bytes`` or ``bytearray`` (alone or in a tuple) marked to go
    out of band.

    Only short lists are looked at: large data comes in few items, and a long list of small
    items should not pay for the look.
    """
    if not _HAS_SHM or len(items) > 64:
        return items
    if len(items) == 1:  # (a submit's: a tuple of small arguments, most often)
        item = items[0]
        if type(item) is tuple and not any(map(_is_big_bytes, item)):
            return items
        wrapped_one = _wrap(item)
        return items if wrapped_one is item else [wrapped_one]
    wrapped = [_wrap(item) for item in items]
    return wrapped if any(a is not b for a, b in zip(wrapped, items, strict=True)) else items


def loads(
    message: bytes | bytearray | memoryview, mapped: list[tuple[str, Any]] | None = None
) -> Any:
    """Rebuild an object from ``dumps``' message. The mappings of the sender's segments are
    appended to ``mapped`` (see ``let_go``); without it, they are not expected."""
    data, buffers = _open(message, mapped)
    return pickle.loads(data, buffers=buffers)


def _open(
    message: bytes | bytearray | memoryview, mapped: list[tuple[str, Any]] | None
) -> tuple[Any, list[Any] | None]:
    """The pickle in ``message`` and its out-of-band buffers, mapped."""
    view = memoryview(message)
    kind = view[:1]
    if kind == _INBAND:
        return view[1:], None
    files, data = pickle.loads(view[1:])
    buffers: list[Any] = []
    if kind == _SEGMENTS:
        for name, size in files:
            mapping = _map_file(name, size)
            buffers.append(mapping)
            if mapped is not None and size:
                mapped.append((name, mapping))
        return data, buffers
    try:
        for name, size in files:
            buffers.append(_map_file(name, size))
    finally:
        forget_files(name for name, _ in files)
    return data, buffers


def let_go(mapped: list[tuple[str, Any]]) -> list[str]:
    """Unmap the sender's segments; returns the names of those still in use here (an object
    made from the message is still alive), which the sender must not write again."""
    kept = []
    for name, mapping in mapped:
        try:
            mapping.close()
        except BufferError:
            kept.append(name)
    mapped.clear()
    return kept


class Segments(_segments.Segments):
    """The pool's segments, named as this process's other files: ``forget_files_of`` finds
    them once it has died."""

    def __init__(self) -> None:
        super().__init__(f"{_prefix(os.getpid())}s")


def files_of(message: bytes | memoryview) -> list[str]:
    """The shared-memory files a message refers to (to unlink if it is never received);
    not the sender's segments."""
    if message[:1] != _OUTBAND:
        return []
    files, _ = pickle.loads(memoryview(message)[1:])
    return [name for name, _ in files]


def forget_files(names: Any) -> None:
    """Unlink shared-memory files; missing ones are fine (the receiver got there first)."""
    for name in names:
        try:
            os.unlink(name)
        except OSError:
            pass


def forget_files_of(pid: int) -> None:
    """Unlink every shared-memory file a (dead) process created and nobody received."""
    if not _HAS_SHM:
        return
    prefix = os.path.basename(_prefix(pid))
    try:
        with os.scandir(_SHM_DIR) as entries:
            names = [entry.path for entry in entries if entry.name.startswith(prefix)]
    except OSError:
        return
    forget_files(names)


def _write_file(data: memoryview) -> tuple[str, int]:
    name = f"{_prefix(os.getpid())}{next(_names)}-{secrets.token_hex(4)}"
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size = data.nbytes
        written = 0
        flat = data.cast("B") if data.format != "B" else data
        while written < size:
            written += os.write(fd, flat[written:])
    except BaseException:
        os.close(fd)
        forget_files([name])
        raise
    os.close(fd)
    return name, size


def _map_file(name: str, size: int) -> Any:
    if size == 0:
        return bytearray()
    fd = os.open(name, os.O_RDWR)
    try:
        # Populated: the pages are mapped in one go instead of one fault at a time.
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
    finally:
        os.close(fd)
