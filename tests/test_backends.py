"""Backends found by name: the built-in ones, and those other packages declare through the
entry-point group ``conveyor.backends``."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pytest

import conveyor
from conveyor import _backends
from conveyor._backends.thread import ThreadBackend


class CountingBackend(ThreadBackend):
    """A third engine, as a package would declare it (threads underneath)."""

    name = "counting"
    options = frozenset({"label"})

    def __init__(self, workers: int | None, on_broken: Any, *, label: str = "", **kw: Any):
        super().__init__(workers, on_broken, **kw)
        self.label = label

    def default_workers(self) -> int:
        return 3  # asked of the instance, once it exists


def _declare(monkeypatch: pytest.MonkeyPatch, **points: str) -> None:
    declared = {
        name: EntryPoint(name=name, value=value, group=_backends.ENTRY_POINT_GROUP)
        for name, value in points.items()
    }
    monkeypatch.setattr(_backends, "_declared", lambda: declared)


def test_a_declared_backend_is_found_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    _declare(monkeypatch, counting=f"{__name__}:CountingBackend")
    with conveyor.Pool(backend="counting", label="x") as pool:
        assert pool.workers == 3
        assert list(pool.map(abs, [-1, -2])) == [1, 2]
        assert pool._backend.label == "x"  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="label"):
        conveyor.Pool(backend="thread", label="x")


def test_unknown_names_and_bad_entry_points_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    _declare(monkeypatch, broken="conveyor._errors:PoolFull")
    with pytest.raises(ValueError, match=r"conveyor\.backends") as caught:
        conveyor.Pool(backend="nope")
    assert "'dask'" in str(caught.value) and "'broken'" in str(caught.value)
    with pytest.raises(TypeError, match="not a subclass"):
        conveyor.Pool(backend="broken")


def test_the_built_in_backends_are_declared_too() -> None:
    declared = {p.name: p.value for p in entry_points(group=_backends.ENTRY_POINT_GROUP)}
    for name, target in _backends.BACKENDS.items():
        module, cls = target.split(":")
        assert declared.get(name) == f"conveyor._backends.{module}:{cls}"


def test_importing_conveyor_imports_no_engine() -> None:
    code = "import sys, conveyor; print(sorted({'dask', 'distributed'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
