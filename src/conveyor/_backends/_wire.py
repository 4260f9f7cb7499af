"""Serialisation between the pool and its worker processes.

Objects are pickled with protocol 5. Functions and objects that pickle cannot handle by
reference (lambdas, closures, anything defined in ``__main__``) fall back to cloudpickle.

Large buffers (NumPy arrays, ``bytes``, ``bytearray``, ``memoryview`` of ``BIG`` bytes or more)
travel out of band: the sender writes each into a file in ``/dev/shm`` (the one copy), the
receiver maps that file and unpickles straight from the mapping (no copy), then unlinks it so
the memory goes away with the last reference. Where ``/dev/shm`` is missing they stay in band.

A message is one of::

    b"\\x00" + pickle            everything in band
    b"\\x01" + pickle((files, pickle))   with out-of-band buffers in ``files``
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


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` into one message; raises what pickle and cloudpickle both raise."""
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
        return _INBAND + data
    files: list[tuple[str, int]] = []
    try:
        for buffer in big:
            files.append(_write_file(buffer.raw()))
    except OSError:
        forget_files(name for name, _ in files)
        return _INBAND + pickle.dumps(obj, protocol=5)
    return _OUTBAND + pickle.dumps((files, data), protocol=5)


class _Pickler(pickle.Pickler):
    """pickle, plus ``memoryview``s (rebuilt as memoryviews: over shared memory when big)."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is memoryview:
            return memoryview, (pickle.PickleBuffer(obj),)
        return NotImplemented


class _BigBytes:
    """Stands for a large ``bytes`` object so that it travels out of band.

    pickle writes ``bytes`` in band whatever their size (and never asks ``reducer_override``
    about them); wrapped, they are sent as a buffer and rebuilt as ``bytes`` on arrival.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return bytes, (pickle.PickleBuffer(self.data),)


def _wrap(item: Any) -> Any:
    if type(item) is bytes and len(item) >= BIG:
        return _BigBytes(item)
    if type(item) is tuple and any(type(x) is bytes and len(x) >= BIG for x in item):
        return tuple(_wrap(x) for x in item)
    return item


def wrap_big_bytes(items: Sequence[Any]) -> Sequence[Any]:
    """``items`` with every large ``bytes`` (alone or in a tuple) marked to go out of band.

    Only short lists are looked at: large data comes in few items, and a long list of small
    items should not pay for the look.
    """
    if not _HAS_SHM or len(items) > 64:
        return items
    wrapped = [_wrap(item) for item in items]
    return wrapped if any(a is not b for a, b in zip(wrapped, items, strict=True)) else items


def loads(message: bytes | bytearray | memoryview) -> Any:
    """Rebuild an object from ``dumps``' message."""
    view = memoryview(message)
    if view[:1] == _INBAND:
        return pickle.loads(view[1:])
    files, data = pickle.loads(view[1:])
    buffers: list[Any] = []
    try:
        for name, size in files:
            buffers.append(_map_file(name, size))
    finally:
        forget_files(name for name, _ in files)
    return pickle.loads(data, buffers=buffers)


def files_of(message: bytes) -> list[str]:
    """The shared-memory files a message refers to (to unlink if it is never received)."""
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
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)
