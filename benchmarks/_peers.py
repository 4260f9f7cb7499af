"""The process pools that the benchmark scripts time, behind one small interface.

``Peer`` starts a pool, maps (with the library's default chunks or a given ``chunksize``),
calls, submits and stops it; one subclass per library (conveyor, ``concurrent.futures``,
``multiprocessing``, loky, mpire, pebble, joblib). ``_started`` gives warm pools of every kind,
and the helpers below turn timings into table rows and checks.

The peer libraries are imported when a pool starts, not at the top: workers started by
``forkserver`` or ``spawn`` run the benchmark script's top-level imports again, and would
otherwise all pay for importing every peer.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from _harness import Timings, note
from _work import inc, noop

import conveyor

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
CONVEYOR = "conveyor.Pool"
MP_POOL = "multiprocessing.Pool"


class Peer:
    """A process pool: ``start``, ``map``, one ``call``, ``submit`` and its ``result``,
    ``stop``.

    ``map`` returns every result in input order; ``chunksize=None`` leaves the size of the
    chunks to the library. ``submit`` returns the library's handle on one call (a future, an
    ``AsyncResult``) and ``result`` waits for its value. A library without one of these does
    not override it: ``supports(name)`` tells.
    """

    name = ""
    how = ""  # start method and anything else a reader should know
    submits = ""  # how this library submits one call and waits for it, for the tables

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers

    def start(self) -> None:
        raise NotImplementedError

    def map(self, fn: Callable[[Any], Any], items: Any, chunksize: int | None = None) -> list[Any]:
        raise NotImplementedError

    def imap(self, fn: Callable[[Any], Any], items: Any, chunksize: int | None = None) -> list[Any]:
        """The library's lazy ordered map, consumed to the end."""
        raise NotImplementedError

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def result(self, handle: Any) -> Any:
        return handle.result()

    def stop(self) -> None:
        raise NotImplementedError

    def supports(self, method: str) -> bool:
        """Whether this library has ``method`` (``imap``, ``submit``, ...)."""
        return getattr(type(self), method) is not getattr(Peer, method)


def _chunks(chunksize: int | None, keyword: str = "chunksize") -> dict[str, int]:
    """The keyword argument that passes ``chunksize`` on, or none for the default."""
    return {} if chunksize is None else {keyword: chunksize}


class _ExecutorPeer(Peer):
    """A ``concurrent.futures.Executor`` started by ``start`` as ``self.pool``."""

    submits = "executor.submit(f, x) ... future.result()"

    def map(self, fn: Callable[[Any], Any], items: Any, chunksize: int | None = None) -> list[Any]:
        return list(self.pool.map(fn, items, **_chunks(chunksize)))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(fn, *args).result()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(fn, *args)

    def stop(self) -> None:
        self.pool.shutdown()


class ConveyorPeer(_ExecutorPeer):
    name = CONVEYOR
    how = "backend='process', forkserver"
    submits = "pool.submit(f, x) ... future.result()"

    def start(self) -> None:
        self.pool: conveyor.Pool = conveyor.Pool(backend="process", workers=self.workers)

    def imap(self, fn: Callable[[Any], Any], items: Any, chunksize: int | None = None) -> list[Any]:
        return list(self.pool.imap(fn, items, chunksize=chunksize))

    def imap_unordered(self, fn: Callable[[Any], Any], items: Any) -> list[Any]:
        return list(self.pool.imap_unordered(fn, items))


class ConveyorExecutorPeer(ConveyorPeer):
    """conveyor's drop-in for the stdlib's executor (its ``map`` submits the whole input at
    once, as the stdlib's does)."""

    name = "conveyor.ProcessPoolExecutor"
    how = "the drop-in executor, forkserver"
    submits = "executor.submit(f, x) ... future.result()"

    def start(self) -> None:
        self.pool = conveyor.ProcessPoolExecutor(max_workers=self.workers)


class StdlibPeer(_ExecutorPeer):
    name = "concurrent.futures.ProcessPoolExecutor"
    how = f"{multiprocessing.get_start_method()} (the default here)"

    def start(self) -> None:
        self.pool = cf.ProcessPoolExecutor(max_workers=self.workers)


class MultiprocessingPeer(Peer):
    name = MP_POOL
    how = f"{multiprocessing.get_start_method()} (the default here)"

    submits = "pool.apply_async(f, (x,)) ... result.get()"

    def start(self) -> None:
        self.pool = multiprocessing.Pool(self.workers)

    def map(self, fn: Callable[[Any], Any], items: Any, chunksize: int | None = None) -> list[Any]:
        return self.pool.map(fn, items, chunksize)

    def imap(self, fn: Callable[[Any], Any], items: Any, chunksize: int | None = None) -> list[Any]:
        # Pool.imap's own default is 1.
        return list(self.pool.imap(fn, items, **_chunks(chunksize)))

    def imap_unordered(self, fn: Callable[[Any], Any], items: Any) -> list[Any]:
        return list(self.pool.imap_unordered(fn, items))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.apply(fn, args)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.apply_async(fn, args)

    def result(self, handle: Any) -> Any:
        return handle.get()

    def stop(self) -> None:
        self.pool.close()
        self.pool.join()


class LokyPeer(_ExecutorPeer):
    name = "loky.ProcessPoolExecutor"
    how = "loky's own start method"

    def start(self) -> None:
        import loky  # type: ignore[import-untyped]

        self.pool = loky.ProcessPoolExecutor(max_workers=self.workers)


class MpirePeer(Peer):
    """mpire with ``keep_alive=True``, without which every map starts new workers.

    A kept-alive mpire pool that switches between ``map``, ``imap_unordered`` and ``apply``
    fails here (``TypeError`` in the worker), so each kind of call gets its own pool; only
    the first one is started before it is used. ``apply`` and ``apply_async`` share one.
    """

    name = "mpire.WorkerPool"
    how = "fork, keep_alive=True"
    submits = "pool.apply_async(f, (x,)) ... result.get()"

    def start(self) -> None:
        from mpire import WorkerPool  # type: ignore[import-untyped]

        self.pools: dict[str, Any] = {}
        self.make = lambda: WorkerPool(n_jobs=self.workers, keep_alive=True)

    def _pool(self, kind: str) -> Any:
        if kind not in self.pools:
            self.pools[kind] = self.make()
        return self.pools[kind]

    def map(self, fn: Callable[[Any], Any], items: Any, chunksize: int | None = None) -> list[Any]:
        return list(self._pool("map").map(fn, items, **_chunks(chunksize, "chunk_size")))

    def imap_unordered(self, fn: Callable[[Any], Any], items: Any) -> list[Any]:
        with warnings.catch_warnings():
            # mpire warns that it cannot size chunks of an input without len(): that is
            # the point of this case.
            warnings.simplefilter("ignore", RuntimeWarning)
            return list(self._pool("imap_unordered").imap_unordered(fn, items))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._pool("apply").apply(fn, args)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._pool("apply").apply_async(fn, args)

    def result(self, handle: Any) -> Any:
        return handle.get()

    def stop(self) -> None:
        for pool in self.pools.values():
            pool.stop_and_join()


class PebblePeer(Peer):
    name = "pebble.ProcessPool"
    how = f"{multiprocessing.get_start_method()} (the default here)"
    submits = "pool.schedule(f, args=(x,)) ... future.result()"

    def start(self) -> None:
        import pebble  # type: ignore[import-untyped]

        self.pool = pebble.ProcessPool(max_workers=self.workers or CPUS)

    def map(self, fn: Callable[[Any], Any], items: Any, chunksize: int | None = None) -> list[Any]:
        return list(self.pool.map(fn, items, **_chunks(chunksize)).result())

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.schedule(fn, args=args).result()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.schedule(fn, args=args)

    def stop(self) -> None:
        self.pool.close()
        self.pool.join()


class JoblibPeer(Peer):
    """joblib has no call-by-call submit; a ``chunksize`` is its ``Parallel(batch_size=...)``,
    one ``Parallel`` kept open per batch size ('auto' by default)."""

    name = "joblib.Parallel"
    how = "loky backend; its workers are reused between Parallel objects"

    def start(self) -> None:
        import joblib  # type: ignore[import-untyped]

        self.joblib = joblib
        self.parallels: dict[int | str, Any] = {}
        self.parallel = self._parallel(None)

    def _parallel(self, chunksize: int | None) -> Any:
        size = "auto" if chunksize is None else chunksize
        if size not in self.parallels:
            parallel = self.joblib.Parallel(n_jobs=self.workers or CPUS, batch_size=size)
            parallel.__enter__()
            self.parallels[size] = parallel
        return self.parallels[size]

    def map(self, fn: Callable[[Any], Any], items: Any, chunksize: int | None = None) -> list[Any]:
        task = self.joblib.delayed(fn)
        return list(self._parallel(chunksize)(task(x) for x in items))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.parallel([self.joblib.delayed(fn)(*args)])[0]

    def stop(self) -> None:
        for parallel in self.parallels.values():
            parallel.__exit__(None, None, None)


PEERS: list[type[Peer]] = [
    ConveyorPeer,
    StdlibPeer,
    MultiprocessingPeer,
    LokyPeer,
    MpirePeer,
    PebblePeer,
    JoblibPeer,
]


def _warm(peer: Peer) -> None:
    """Some calls of every kind the map and round-trip cases make."""
    peer.map(inc, range(2000))
    peer.call(noop)
    if isinstance(peer, (ConveyorPeer, MultiprocessingPeer, MpirePeer)):
        peer.imap_unordered(inc, range(2000))


def _started(
    workers: int | None = None,
    kinds: Sequence[type[Peer]] = PEERS,
    warm: Callable[[Peer], object] = _warm,
) -> list[Peer]:
    """One warm pool of each kind: started, then ``warm(peer)`` has run some calls on it."""
    peers = []
    for kind in kinds:
        peer = kind(workers)
        peer.start()
        warm(peer)
        peers.append(peer)
    return peers


def _stop(peers: list[Peer]) -> None:
    for peer in peers:
        peer.stop()


def _cells(t: Timings, *values: str) -> list[str]:
    """A table row: the values, or dashes for a contender that failed (see _failures)."""
    if t.ok:
        return [t.name, *values]
    return [t.name, *["-"] * len(values)]


def _failures(results: dict[str, Timings]) -> None:
    for t in results.values():
        if not t.ok:
            note(f"{t.name} failed: {t.error or 'did not run'}")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _check(name: str, ok: bool) -> None:
    if not ok:
        raise AssertionError(f"{name} returned wrong results")
