"""Serialisation between the pool and its worker processes.

Objects are pickled with protocol 5. Functions and objects that pickle cannot handle by
reference (lambdas, closures, anything defined in ``__main__``) fall back to cloudpickle.

Large buffers (NumPy arrays, ``bytes``, ``bytearray``, ``memoryview`` of ``BIG`` bytes or more)
travel out of band: the sender writes each into a file in ``/dev/shm`` (the one copy), the
receiver maps that file and unpickles straight from the mapping (no copy), then unlinks it so
the memory goes away with the last reference. Where ``/dev/shm`` is missing they stay in band.

The pool sends its jobs' buffers through ``Segments`` instead: files it keeps and writes again
for later jobs, so that sending a buffer is one copy into memory already there (making the
file's pages anew each time cost as much as the copy, and more when memory is busy). The
worker maps them for the job, then tells the pool of any it could not let go (the call kept a
reference to its argument): those the pool never writes again.

A message is one of::

    b"\\x00" + pickle            everything in band
    b"\\x01" + pickle((files, pickle))   with out-of-band buffers in ``files``
    b"\\x02" + pickle((files, pickle))   the same, in the sender's segments (never unlinked)
"""

from __future__ import annotations

import bisect
import io
import itertools
import mmap
import os
import pickle
import pickletools
import secrets
import struct
import sys
from collections.abc import Sequence
from typing import Any

import cloudpickle

__all__ = ["BIG", "dumps", "dumps_function", "forget_files", "loads", "loads_salvaging"]

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
#: Bytes of unused segments a pool keeps for later jobs; beyond that, the oldest go.
SEGMENTS_KEPT = 256 << 20
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
    if type(item) is tuple and any(_is_big_bytes(x) for x in item):
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
    wrapped = [_wrap(item) for item in items]
    return wrapped if any(a is not b for a, b in zip(wrapped, items, strict=True)) else items


def loads(
    message: bytes | bytearray | memoryview, mapped: list[tuple[str, Any]] | None = None
) -> Any:
    """Rebuild an object from ``dumps``' message. The mappings of the sender's segments are
    appended to ``mapped`` (see ``let_go``); without it, they are not expected."""
    data, buffers = _open(message, mapped)
    return pickle.loads(data, buffers=buffers)


def loads_salvaging(
    message: bytes | bytearray | memoryview,
) -> tuple[Any, dict[int, BaseException] | None]:
    """``loads`` for a message whose object is a tuple ending in a list, and the errors of the
    list's items that could not be unpickled (None if all could).

    Only when the whole cannot be unpickled is each item of the list unpickled on its own
    (see ``_salvage``): those that fail are None in the list, their errors given by position.
    Raises what ``loads`` raised if anything else fails.
    """
    data, buffers = _open(message, None)
    try:
        return pickle.loads(data, buffers=buffers), None
    except BaseException:
        try:
            salvaged = _salvage(data, buffers)
        except Exception:
            salvaged = None
        if salvaged is None:
            raise
        return salvaged


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


# -- unpickling a list's items one by one --------------------------------------------------
#
# A pickle is one stream: an item that cannot be rebuilt stops the whole. To get the others,
# ``_salvage`` reads the opcodes (pickletools), finds where each item of the list begins and
# ends, and unpickles each item's opcodes alone, all with one Unpickler so that its memo (the
# objects later opcodes refer back to) carries on from item to item as in the whole stream.
# When an item fails, its memo entries that were never set are set to None, so that later
# entries keep their numbers; those and the entries of objects it had not finished (or that
# refer to one) are broken: a later item referring to any of them fails too.

#: Opcodes that change the object below their arguments and leave it on the stack.
_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD", "MEMOIZE"})
_TUPLES = frozenset({"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


class _Span:
    """An object on the stack while the opcodes are read: the numbers of its first opcode
    and of the last that changed it and, for a tuple or a list, the opcodes of each item."""

    __slots__ = ("children", "last", "parts", "start")

    def __init__(self, start: int, last: int) -> None:
        self.start = start
        self.last = last
        self.parts: list[tuple[int, int]] = []  # [first, end) opcode numbers of each item
        self.children: list[_Span] = []


_MARK = _Span(-1, -1)


class _Stream:
    """The file an Unpickler reads, given a new piece before each ``load``. Without
    ``peek`` the Unpickler reads no further than the opcode it is running."""

    def __init__(self) -> None:
        self.piece = io.BytesIO()

    def read(self, size: int = -1) -> bytes:
        return self.piece.read(size)

    def readinto(self, buffer: Any) -> int:
        return self.piece.readinto(buffer)

    def readline(self) -> bytes:
        return self.piece.readline()


class _Buffers:
    """Out-of-band buffers handed out from ``at``, which is set before each piece."""

    def __init__(self, buffers: list[Any]) -> None:
        self.buffers = buffers
        self.at = 0

    def __iter__(self) -> _Buffers:
        return self

    def __next__(self) -> Any:
        if self.at >= len(self.buffers):
            raise StopIteration
        self.at += 1
        return self.buffers[self.at - 1]


class _Opcodes:
    """What ``_salvage`` needs to know of each opcode of a pickle, found without running it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.positions: list[int] = []  # of each opcode, then the end
        self.names: list[str] = []
        self.defines: dict[int, int] = {}  # opcode number -> memo entry it sets
        self.objects: dict[int, _Span] = {}  # memo entry -> its object
        self.refers: dict[int, int] = {}  # opcode number -> memo entry it reads
        self.buffers_before: list[int] = []  # out-of-band buffers taken by earlier opcodes
        self.frames: list[int] = []  # FRAME opcodes, left out of the pieces
        self.top: _Span | None = None

    def read(self) -> None:
        stack: list[_Span] = []
        buffers = 0
        for number, (op, arg, position) in enumerate(pickletools.genops(self.data)):
            if position is None:  # only for a stream without tell(), never bytes
                raise ValueError("no position")
            name = op.name
            self.positions.append(position)
            self.names.append(name)
            self.buffers_before.append(buffers)
            if name == "STOP":
                self.positions.append(position + 1)
                self.top = stack.pop()
                return
            if name == "MARK":
                stack.append(_MARK)
                continue
            if name == "FRAME":
                self.frames.append(number)
            elif name == "NEXT_BUFFER":
                buffers += 1
            before = op.stack_before
            items: list[_Span] = []
            fixed = len(before)
            if pickletools.markobject in before:
                mark = len(stack) - 1 - stack[::-1].index(_MARK)
                items = stack[mark + 1 :]
                del stack[mark:]
                fixed = before.index(pickletools.markobject)
            if fixed > len(stack):
                raise ValueError("stack underflow")
            below = stack[len(stack) - fixed :]
            del stack[len(stack) - fixed :]
            if _MARK in below:
                raise ValueError("mark in the way")
            if name in _IN_PLACE:
                span = below[0]
                if name == "APPEND":
                    span.parts += self._ranges(below[1:], number)
                elif name == "APPENDS":
                    span.parts += self._ranges(items, number)
                if name != "MEMOIZE":
                    span.last = number
                stack.append(span)
            elif op.stack_after:
                parts = below + items
                span = _Span(min((s.start for s in parts), default=number), number)
                if name in _TUPLES:
                    span.children = parts
                    span.parts = self._ranges(parts, number)
                stack.extend([span] * len(op.stack_after))
            if name == "MEMOIZE" or name in _PUTS:
                entry = len(self.objects) if name == "MEMOIZE" else int(arg or 0)
                self.defines[number] = entry
                self.objects[entry] = stack[-1]
            elif name in _GETS:
                self.refers[number] = int(arg or 0)
        raise ValueError("no STOP")

    @staticmethod
    def _ranges(spans: list[_Span], end: int) -> list[tuple[int, int]]:
        starts = [s.start for s in spans]
        return list(zip(starts, [*starts[1:], end], strict=True))

    def piece(self, first: int, end: int) -> tuple[bytes, list[tuple[int, int]]]:
        """Opcodes ``first`` to ``end`` (excluded) as a pickle of their own, and where its
        parts come from: (offset in the piece, offset in ``data``), in order."""
        parts = [b"\x80\x05"]
        origins = []
        size = 2
        at = first
        frames = self.frames[
            bisect.bisect_left(self.frames, first) : bisect.bisect_left(self.frames, end)
        ]
        for stop in [*frames, end]:
            part = self.data[self.positions[at] : self.positions[stop]]
            origins.append((size, self.positions[at]))
            parts.append(part)
            size += len(part)
            at = stop + 1
        parts.append(b".")
        return b"".join(parts), origins

    def opcode_at(self, origins: list[tuple[int, int]], offset: int) -> int:
        """The number of the opcode at ``offset`` in a piece (see ``piece``)."""
        index = bisect.bisect_right([o for o, _ in origins], offset) - 1
        if index < 0:
            return -1
        inside, outside = origins[index]
        return bisect.bisect_right(self.positions, outside + offset - inside) - 1

    def refers_within(self, span: _Span) -> set[int]:
        return {self.refers[n] for n in range(span.start, span.last + 1) if n in self.refers}


def _salvage(
    data: Any, buffers: list[Any] | None
) -> tuple[tuple[Any, ...], dict[int, BaseException]] | None:
    """The tuple in ``data`` with each item of its last element, a list, unpickled on its own,
    and the errors of those that failed; None (or an exception) if something else fails."""
    ops = _Opcodes(bytes(data))
    ops.read()
    top = ops.top
    if top is None or not top.children or not top.children[-1].parts:
        return None
    # The tuple's other fields (k None), then each item k of the list, in the stream's order.
    pieces: list[tuple[int, int, int | None]] = [(a, b, None) for a, b in top.parts[:-1]]
    pieces += [(a, b, k) for k, (a, b) in enumerate(top.children[-1].parts)]
    stream = _Stream()
    handed = None if buffers is None else _Buffers(buffers)
    unpickler = pickle.Unpickler(stream, buffers=handed)
    broken: dict[int, BaseException | None] = {}  # memo entries no piece may refer to
    head: list[Any] = []
    items: list[Any] = []
    lost: dict[int, BaseException] = {}

    def load(piece: bytes, first: int) -> Any:
        stream.piece = io.BytesIO(piece)
        if handed is not None:
            handed.at = ops.buffers_before[first]
        return unpickler.load()

    def fill(numbers: list[int]) -> None:
        # Sets the memo entries of opcodes not run, so that later entries keep their numbers.
        if numbers:
            sets = [
                b"\x94" if ops.names[n] == "MEMOIZE" else b"r" + struct.pack("<I", ops.defines[n])
                for n in numbers
            ]
            load(b"\x80\x05N" + b"".join(sets) + b".", 0)

    done = 0
    for first, end, k in pieces:
        glue = [n for n in range(done, first) if n in ops.defines]
        for n in glue:
            broken[ops.defines[n]] = None  # the list or the tuple itself, which no item holds
        fill(glue)
        done = end
        refers = {ops.refers[n] for n in range(first, end) if n in ops.refers}
        shared = [broken[entry] for entry in refers if entry in broken]
        present: dict[Any, Any] = {}  # the memo after the piece failed
        failed_at = first  # the opcode that failed
        problem: BaseException | None = None
        if shared:
            problem = next((error for error in shared if error is not None), None)
            if problem is None or any(error is None for error in shared):
                return None
        else:
            piece, origins = ops.piece(first, end)
            try:
                value = load(piece, first)
            except BaseException as error:
                problem = error
                present = unpickler.memo.copy()
                failed_at = ops.opcode_at(origins, stream.piece.tell() - 1)
        if problem is None:
            (head if k is None else items).append(value)
            continue
        if k is None:
            return None  # one of the message's own fields
        lost[k] = problem
        items.append(None)
        mine = [n for n in range(first, end) if n in ops.defines]
        entries = {ops.defines[n] for n in mine}
        unsafe = {
            e for e in entries if e not in present or not first <= ops.objects[e].last < failed_at
        }
        grown = True
        while grown:  # finished objects that refer to unfinished ones are unsafe too
            more = {e for e in entries - unsafe if ops.refers_within(ops.objects[e]) & unsafe}
            unsafe |= more
            grown = bool(more)
        for entry in unsafe:
            broken[entry] = problem
        fill([n for n in mine if ops.defines[n] not in present])
    return (*head, items), lost


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


class Segments:
    """Files in ``/dev/shm`` that one sender writes buffers into, again and again.

    A segment is in use from ``write`` until ``release`` (the receiver is done with it: it
    is kept for another buffer) or ``discard`` (it may still be read: it is unlinked and
    forgotten). Only the thread that owns the pool's workers uses it.
    """

    def __init__(self) -> None:
        self._free: list[tuple[str, mmap.mmap]] = []  # oldest first
        self._free_bytes = 0
        self._used: dict[str, mmap.mmap] = {}
        self.last: list[str] = []  # the segments the last dumps() wrote into

    def write(self, data: memoryview) -> tuple[str, int]:
        size = data.nbytes
        flat = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        chosen = None
        for position, (_, mapping) in enumerate(self._free):
            # The smallest free segment that fits, if it is not much too big.
            if size <= len(mapping) <= 2 * size and (
                chosen is None or len(mapping) < len(self._free[chosen][1])
            ):
                chosen = position
        if chosen is not None:
            name, mapping = self._free.pop(chosen)
            self._free_bytes -= len(mapping)
        else:
            name, mapping = self._make(size)
        self._used[name] = mapping
        mapping[:size] = flat
        return name, size

    def _make(self, size: int) -> tuple[str, mmap.mmap]:
        capacity = max(BIG, -(-size // BIG) * BIG)  # whole mebibytes
        name = f"{_prefix(os.getpid())}s{next(_names)}-{secrets.token_hex(4)}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserve the memory now: writing through a mapping of a sparse file that /dev/shm
            # has no room for (64 MB in a default Docker container) kills the process with
            # SIGBUS, where this raises OSError and the buffer travels another way.
            _allocate(fd, capacity)
            return name, mmap.mmap(fd, capacity)
        except BaseException:
            forget_files([name])
            raise
        finally:
            os.close(fd)

    def release(self, names: list[str]) -> None:
        """The receiver is done with these: keep them for later buffers."""
        for name in names:
            mapping = self._used.pop(name, None)
            if mapping is None:
                continue
            self._free.append((name, mapping))
            self._free_bytes += len(mapping)
        while self._free_bytes > SEGMENTS_KEPT:
            name, mapping = self._free.pop(0)
            self._free_bytes -= len(mapping)
            _drop(name, mapping)

    def discard(self, names: list[str]) -> None:
        """These may still be read: never write them again."""
        for name in names:
            mapping = self._used.pop(name, None)
            if mapping is not None:
                _drop(name, mapping)

    def close(self) -> None:
        for name, mapping in [*self._free, *self._used.items()]:
            _drop(name, mapping)
        self._free.clear()
        self._used.clear()
        self._free_bytes = 0


def _drop(name: str, mapping: mmap.mmap) -> None:
    forget_files([name])
    try:
        mapping.close()
    except BufferError:
        pass  # a memoryview of it lives on: the mapping goes with it


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


def _allocate(fd: int, size: int) -> None:
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:  # pragma: no cover - not on Linux
        os.ftruncate(fd, size)


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
