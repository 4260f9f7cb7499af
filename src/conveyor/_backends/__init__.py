"""Backends, by the name given to ``Pool(backend=...)``; each is imported when first used.

The built-in backends are listed here (and declared as entry points too, for tools that list
them); any other name is looked up among the entry points of the group ``conveyor.backends``,
so that a package can add an engine without touching conveyor (see ``_base``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points

from ._base import Backend

__all__ = ["BACKENDS", "ENTRY_POINT_GROUP", "lookup"]

#: name -> "module:class", relative to this package.
BACKENDS = {
    "thread": "thread:ThreadBackend",
    "process": "process:ProcessBackend",
    "auto": "auto:AutoBackend",
    "dask": "dask:DaskBackend",
    "asyncio": "aio:AsyncioBackend",
}

#: The entry-point group where other packages declare backends: ``name = "module:Class"``.
ENTRY_POINT_GROUP = "conveyor.backends"


def _declared() -> dict[str, EntryPoint]:
    """The backends that installed packages declare, by name."""
    return {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}


def lookup(name: object) -> type[Backend]:
    """The backend class called ``name``; ``ValueError`` listing the known ones otherwise.

    Example:
        >>> from conveyor._backends import lookup
        >>> lookup("thread").name
        'thread'
    """
    if isinstance(name, str) and name in BACKENDS:
        module_name, class_name = BACKENDS[name].split(":")
        module = importlib.import_module(f"{__name__}.{module_name}")
        backend: type[Backend] = getattr(module, class_name)
        return backend
    # Only names that are not built in pay for reading the installed packages' metadata.
    declared = _declared() if isinstance(name, str) else {}
    if not isinstance(name, str) or name not in declared:
        known = ", ".join(repr(n) for n in {**BACKENDS, **declared})
        raise ValueError(
            f"backend must be one of {known}; got {name!r} (a package adds a backend through "
            f"the entry-point group {ENTRY_POINT_GROUP!r})"
        )
    loaded = declared[name].load()
    if not (isinstance(loaded, type) and issubclass(loaded, Backend)):
        raise TypeError(
            f"the entry point {name!r} of group {ENTRY_POINT_GROUP!r} names {loaded!r}, "
            "which is not a subclass of conveyor's Backend"
        )
    return loaded
