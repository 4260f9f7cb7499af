"""Backends, by the name given to ``Pool(backend=...)``; each is imported when first used."""

from __future__ import annotations

import importlib

from ._base import Backend

__all__ = ["BACKENDS", "lookup"]

#: name -> "module:class", relative to this package.
BACKENDS = {
    "thread": "thread:ThreadBackend",
    "process": "process:ProcessBackend",
    "auto": "auto:AutoBackend",
}


def lookup(name: object) -> type[Backend]:
    """The backend class called ``name``; ``ValueError`` listing the known ones otherwise."""
    if not isinstance(name, str) or name not in BACKENDS:
        known = ", ".join(repr(n) for n in BACKENDS)
        raise ValueError(f"backend must be one of {known}; got {name!r}")
    module_name, class_name = BACKENDS[name].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    backend: type[Backend] = getattr(module, class_name)
    return backend
