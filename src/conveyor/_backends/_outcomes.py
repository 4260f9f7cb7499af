"""What the process backend keeps of a batch's outcomes until it ends, and how it ends it.

A worker's outcomes stay pickled on the batch's ``BatchRun`` while the dispatcher role is held
(unpickling a result runs its code); ``BatchRun.end`` unpickles them and finishes the batch,
outside the role (see ``_schedule`` and ``process``). ``Broken`` is the same for the news
that the pool cannot run calls any more. The errors a call fails with when it cannot cross
the process boundary are made here too.
"""

from __future__ import annotations

from collections.abc import Callable

from .._errors import PicklingFailed, UnpicklingFailed
from . import _wire, _worker
from ._base import Batch, RunAlone

__all__ = [
    "BatchRun",
    "Broken",
    "Ended",
    "end_all",
    "pickling_failed",
    "unreadable_arguments",
    "unreadable_result",
]


class BatchRun:
    """A batch being run, possibly as several jobs (after a crash or a split), and the
    outcomes its workers sent, still pickled: they are read once the batch has ended
    (``end``), outside the dispatcher role."""

    __slots__ = ("batch", "open_jobs", "results", "unread")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.open_jobs = 0
        # (batch positions, the pickle of (errors, values) a worker sent for them)
        self.results: list[tuple[range | list[int], memoryview]] = []
        # (batch position, why the worker could not unpickle the call: see pack_error)
        self.unread: list[tuple[int, tuple[bytes, str]]] = []

    def end(self) -> None:
        """Put the outcomes in the batch and finish it. Runs user code (unpickling results
        and exceptions, then the batch's done callbacks or sink): never under the role."""
        batch = self.batch
        results, self.results = self.results, []
        for placed, blob in results:
            _place(batch, placed, blob)
        del results
        if self.unread:
            for index, packed in self.unread:
                batch.fail(index, unreadable_arguments(_worker.unpack_error(packed)))
            self.unread = []
        batch.finish()


def _place(batch: Batch, placed: range | list[int], blob: memoryview) -> None:
    """Unpickle a worker's outcomes for calls ``placed`` into ``batch``.

    A message of several outcomes that cannot be unpickled whole has its calls run again, each
    in a batch of its own (``RunAlone``): only the one at fault then fails. The others run
    twice, which costs nothing on the normal path (see the README's process section)."""
    try:
        errors, values = _wire.loads(blob)
    except BaseException as exc:
        for index in placed:
            failure = unreadable_result(exc)
            batch.fail(index, failure if len(placed) == 1 else RunAlone(failure))
        return
    if isinstance(placed, range):
        batch.values[placed.start : placed.stop] = values
    else:
        for place, value in zip(placed, values, strict=True):
            batch.values[place] = value
    for offset, packed in errors.items():
        batch.fail(placed[offset], _worker.unpack_error(packed))


class Broken:
    """An entry of the ``_ended`` list: the pool cannot run calls any more. Telling ``Pool``
    ends what it holds (done callbacks run), so it is told outside the role, and before the
    calls failed after it end: they are to fail with its error."""

    __slots__ = ("cause", "tell")

    def __init__(
        self, tell: Callable[[BaseException], None], cause: BaseException | tuple[bytes, str]
    ) -> None:
        self.tell = tell
        self.cause = cause  # an error, or one a worker packed (see _worker.pack_error)

    def end(self) -> None:
        cause = self.cause
        self.tell(cause if isinstance(cause, BaseException) else _worker.unpack_error(cause))


#: What the holder of the role leaves for others to end once it has let go of it.
Ended = BatchRun | Broken


def end_all(ended: list[Ended]) -> None:
    """End each of ``ended`` in order, every one even if one raises (Ctrl-C)."""
    try:
        while ended:
            ended.pop(0).end()
    finally:
        if ended:
            end_all(ended)


def unreadable_result(error: BaseException) -> UnpicklingFailed:
    problem = UnpicklingFailed(
        f"the call's result could not be unpickled in the pool: {type(error).__name__}: {error}"
    )
    problem.__cause__ = error
    return problem


def unreadable_arguments(error: BaseException) -> UnpicklingFailed:
    problem = UnpicklingFailed(
        "the worker could not unpickle the call's function or arguments: "
        f"{type(error).__name__}: {error}"
    )
    problem.__cause__ = error
    return problem


def pickling_failed(what: str, error: BaseException) -> PicklingFailed:
    problem = PicklingFailed(
        f"the call's {what} cannot be pickled for a worker process: {type(error).__name__}: {error}"
    )
    problem.__cause__ = error
    return problem
