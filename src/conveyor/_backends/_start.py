"""How worker processes start: the default start method, and a fork server that has imported
the worker's code (and the main module) before it forks any worker.

Threads: any thread that creates a process pool may call these; the fork server is started
once per process, under ``_fork_server_lock``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
from multiprocessing.context import BaseContext

from . import _forker, _wire, _worker

__all__ = ["default_context", "preload_worker"]


def default_context() -> BaseContext:
    """The start method used when the caller names none.

    ``forkserver`` where the platform has it, else ``spawn``. ``fork`` is fast but unsafe in a
    process that has threads (the pool's own dispatcher is one; Python 3.12 warns about it);
    measured here, a forkserver child starts in a few milliseconds once the server runs, while
    ``spawn`` pays a whole interpreter start and the imports of ``__main__`` for every worker.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


_fork_server_lock = threading.Lock()
_fork_server_started = False


def preload_worker(context: BaseContext) -> None:
    """Have a fork server import the worker's code and the main module once, not in every
    worker it forks.

    Measured here: start two workers, run one call, shut down takes about 15 ms with the
    preload and 40 ms without, more when the main script imports much (each worker would
    import it all again). It only matters if the server has not started yet.
    """
    if context.get_start_method() != "forkserver":
        return
    main_is_a_file = _wire.main_is_a_file()
    preload = [*(["__main__"] if main_is_a_file else []), _worker.__name__]
    if _forker.available(context):
        # Each pool's forker is a child of the server: what the server has imported, no
        # forker imports again as it starts. The forker itself (7-11 ms here when Python
        # compiles it, without bytecode caches), ctypes (it asks the kernel through ctypes to
        # kill workers with it) and what multiprocessing needs to hand it its sockets.
        preload += [_forker.__name__, "ctypes", "multiprocessing.popen_forkserver"]
    context.set_forkserver_preload(preload)
    _start_fork_server(main_is_a_file)


def _start_fork_server(main_is_a_file: bool) -> None:
    """Start the fork server now, telling it how to import ``__main__`` (see
    ``_worker._preload_parent_main``) through an environment variable that only it sees."""
    global _fork_server_started
    from multiprocessing import forkserver, spawn

    with _fork_server_lock:
        if _fork_server_started:
            return
        _fork_server_started = True
        data = spawn.get_preparation_data("conveyor")
        if "init_main_from_name" in data:
            spec = ["name", data["init_main_from_name"], sys.argv, sys.path]
        elif "init_main_from_path" in data and main_is_a_file:
            spec = ["path", data["init_main_from_path"], sys.argv, sys.path]
        else:
            return
        os.environ[_worker.MAIN_ENV] = json.dumps(spec)
        try:
            forkserver.ensure_running()
        finally:
            os.environ.pop(_worker.MAIN_ENV, None)
