"""Collecting the package's doctests (``src/conveyor`` is among pyproject's testpaths): the
modules of an optional extra that is not installed are left out, as their tests are."""

from __future__ import annotations

import importlib.util

collect_ignore: list[str] = []
if importlib.util.find_spec("distributed") is None:
    collect_ignore += ["src/conveyor/_backends/dask.py", "src/conveyor/_backends/_dask_cluster.py"]
