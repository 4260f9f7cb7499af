"""Run CPython 3.13's own ``test_concurrent_futures`` tests against conveyor's drop-ins.

The generic test classes of CPython's ``Lib/test/test_concurrent_futures`` (``ExecutorTest``,
``AsCompletedTests``, ``WaitTests``, ``ExecutorShutdownTest``, ``ExecutorDeadlockTest``, the
initializer tests, and the per-executor classes those modules build over them) are imported from
the interpreter's own ``test`` package and combined with mixins whose ``executor_type`` is
``conveyor.ThreadPoolExecutor`` or ``conveyor.ProcessPoolExecutor`` (fork, forkserver and spawn
contexts), the way CPython's ``util.create_executor_tests`` builds them for the stdlib executors.

Usage (Python 3.13, with conveyor importable or run from the repository)::

    python3.13 tests/cpython/run_suites.py                      # everything
    python3.13 tests/cpython/run_suites.py test_deadlock         # a test-id prefix
    python3.13 tests/cpython/run_suites.py -k ThreadPool -k wait # unittest-style -k patterns

The exit status is 0 only if every test passed (skips listed in ``SKIPS`` aside), no test left
a thread or a child process behind, and the interpreter exited by itself; a hang anywhere dumps
every thread's stack and exits non-zero after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import fnmatch
import os
import pickle
import sys
import threading
import time
import unittest
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[2] / "src"
try:
    import conveyor
except ImportError:  # run from a checkout without an install: use the source tree
    sys.path.insert(0, str(SRC))
    import conveyor

# The interpreter's own test package (Lib/test), not a copy: these are CPython's tests.
from test import support  # noqa: E402
from test.support import script_helper  # noqa: E402
from test.test_concurrent_futures import (  # noqa: E402
    executor,
    test_as_completed,
    test_deadlock,
    test_init,
    test_shutdown,
    test_wait,
    util,
)

#: Where conveyor was imported from: subprocesses started by the tests import it from there too.
CONVEYOR_PATH = str(Path(conveyor.__file__).resolve().parents[1])

#: Seconds a test's new interpreter gets before its stacks are dumped and it is ended.
CHILD_TIMEOUT = 60
WATCHDOG = f"faulthandler.dump_traceback_later({CHILD_TIMEOUT}, exit=True)"

#: The executor kinds, by the prefix CPython's mixins give the generated class names.
KINDS = ("ProcessPoolForkserver", "ProcessPoolFork", "ProcessPoolSpawn", "ThreadPool")


# -- mixins over conveyor's executors -------------------------------------------------------------
# Named as CPython names its own, so the generated classes carry CPython's names
# (ThreadPoolExecutorTest, ProcessPoolForkWaitTest, ...). Each keeps CPython's get_context().


class ThreadPoolMixin(util.ThreadPoolMixin):
    executor_type = conveyor.ThreadPoolExecutor


class ProcessPoolForkMixin(util.ProcessPoolForkMixin):
    executor_type = conveyor.ProcessPoolExecutor


class ProcessPoolForkserverMixin(util.ProcessPoolForkserverMixin):
    executor_type = conveyor.ProcessPoolExecutor


class ProcessPoolSpawnMixin(util.ProcessPoolSpawnMixin):
    executor_type = conveyor.ProcessPoolExecutor


PROCESS_MIXINS = (ProcessPoolForkMixin, ProcessPoolForkserverMixin, ProcessPoolSpawnMixin)
ALL_MIXINS = (ThreadPoolMixin, *PROCESS_MIXINS)


class BaseTestCase(util.BaseTestCase):
    """CPython's base, whose tearDown only *warns* (``support.environment_altered``) when a test
    leaves threads or child processes behind; regrtest's ``--fail-env-changed`` makes that a
    failure, and so does this runner: conveyor promises that nothing outlives its pool."""

    def tearDown(self) -> None:
        support.environment_altered = False
        super().tearDown()
        if support.environment_altered:
            support.environment_altered = False
            left = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
            self.fail(f"the test left threads or child processes behind; threads now: {left}")


# -- adapted tests --------------------------------------------------------------------------------


class ExecutorDeadlockTest(test_deadlock.ExecutorDeadlockTest):
    def _fail_on_deadlock(self, executor: Any) -> None:
        # Not a test: the helper CPython calls when a call did not end in time. It terminates
        # the stdlib's worker processes through the private ``_processes``; conveyor's
        # ``terminate()`` is the public way to do the same.
        import tempfile

        with tempfile.TemporaryFile(mode="w+") as f:
            faulthandler.dump_traceback(file=f)
            f.seek(0)
            tb = f.read()
        executor.terminate()
        print(f"\nTraceback:\n {tb}", file=sys.__stderr__)
        self.fail(f"Executor deadlock:\n\n{tb}")

    def test_exit_during_result_pickle_on_worker(self) -> None:
        # Adapted. The stdlib's worker catches the SystemExit raised while pickling the result
        # and sends it back as the call's exception, so CPython expects SystemExit. In conveyor
        # a result that cannot cross the process boundary fails only its own call with an error
        # that is both a BrokenProcessPool and a PicklingError (DESIGN.md, "Names and errors")
        # and names what pickling raised; the pool goes on.
        self.executor.shutdown(wait=True)
        with self.executor_type(max_workers=2, mp_context=self.get_context()) as executor:
            future = executor.submit(test_deadlock._return_instance, test_deadlock.ExitAtPickle)
            try:
                error = future.exception(timeout=self.TIMEOUT)
            except TimeoutError:
                self._fail_on_deadlock(executor)
            self.assertIsInstance(error, BrokenProcessPool)
            self.assertIsInstance(error, pickle.PicklingError)
            self.assertIn("SystemExit", str(error))
            self.assertEqual(executor.submit(abs, -1).result(timeout=self.TIMEOUT), 1)


class ProcessPoolShutdownTest(test_shutdown.ProcessPoolShutdownTest):
    def test_cancel_futures(self) -> None:
        # Adapted. CPython expects at least one of 50 calls submitted just before
        # shutdown(cancel_futures=True) to finish: the stdlib marks up to workers + 1 calls
        # running as it queues them for its workers, even before those have started. conveyor
        # marks a call running only once a worker takes it, and starts workers as calls come,
        # so a shutdown right after the submits can find every call still waiting for a
        # worker, and cancel them all. Here the first call is waited for before the shutdown;
        # the rest is CPython's test.
        fs = [self.executor.submit(time.sleep, 0.1) for _ in range(50)]
        fs[0].result(timeout=support.SHORT_TIMEOUT)
        self.executor.shutdown(cancel_futures=True)
        cancelled = [fut for fut in fs if fut.cancelled()]
        self.assertGreater(len(cancelled), 20)
        others = [fut for fut in fs if not fut.cancelled()]
        for fut in others:
            self.assertTrue(fut.done())
            self.assertIsNone(fut.exception())
        self.assertGreater(len(others), 0)


class FailingInitializerMixin(test_init.FailingInitializerMixin):
    def test_initializer(self) -> None:
        # Adapted: CPython polls the stdlib executor's private ``_broken`` until the pool is
        # broken. A conveyor pool is broken before the failing initializer's error reaches
        # any future, so once ``result()`` has raised, ``submit()`` raises at once; the rest,
        # the CRITICAL log line included, is CPython's test.
        with self._assert_logged("ValueError: error in initializer"):
            try:
                future = self.executor.submit(test_init.get_init_status)
            except BrokenExecutor:
                pass
            else:
                with self.assertRaises(BrokenExecutor):
                    future.result()
            with self.assertRaises(BrokenExecutor):
                self.executor.submit(test_init.get_init_status)


def _run_with_conveyor(original: Callable[..., Any]) -> Callable[..., Any]:
    """``test_shutdown``'s interpreter-exit tests run a script in a new interpreter that does
    ``from concurrent.futures import {executor_type.__name__}``: with our executors' names that
    imports the *stdlib's* class, and the test would pass without touching conveyor. Adapted:
    the script imports the same name from ``conveyor`` instead, and finds conveyor where this
    process found it. ``import multiprocessing`` is added because ``test_hang_gh83386`` calls
    ``multiprocessing.set_start_method`` without importing it: CPython skips that test for its
    own process pool (which hangs there, gh-83386), so the script never ran for processes;
    conveyor promises no hang, so it runs here. ``script_helper`` waits for the new interpreter
    without a timeout: a watchdog in the script dumps its stacks to its stderr and ends it, so
    that a hang there fails the test, with the stacks, instead of hanging the run."""

    def assert_python_ok(*args: str, **env_vars: Any) -> Any:
        args = tuple(
            f"import faulthandler, multiprocessing\n{WATCHDOG}\n"
            + arg.replace("from concurrent.futures import", "from conveyor import")
            if isinstance(arg, str) and "from concurrent.futures import" in arg
            else arg
            for arg in args
        )
        pythonpath = os.pathsep.join(
            p for p in (CONVEYOR_PATH, os.environ.get("PYTHONPATH", "")) if p
        )
        env_vars.setdefault("PYTHONPATH", pythonpath)
        return original(*args, **env_vars)

    return assert_python_ok


# -- skips: only tests that read the stdlib executor's private attributes -------------------------

SKIPS: dict[tuple[str, str], str] = {
    ("ThreadPoolShutdownTest", "test_threads_terminate"): (
        "reads the stdlib executor's private _threads"
    ),
    ("ThreadPoolShutdownTest", "test_context_manager_shutdown"): (
        "reads the private _threads (of a stdlib ThreadPoolExecutor it builds by name)"
    ),
    ("ThreadPoolShutdownTest", "test_del_shutdown"): (
        "reads the private _threads (of a stdlib ThreadPoolExecutor it builds by name)"
    ),
    ("ThreadPoolShutdownTest", "test_shutdown_no_wait"): (
        "reads the private _threads (of a stdlib ThreadPoolExecutor it builds by name)"
    ),
    ("ThreadPoolShutdownTest", "test_thread_names_assigned"): (
        "reads the private _threads (of a stdlib ThreadPoolExecutor it builds by name)"
    ),
    ("ThreadPoolShutdownTest", "test_thread_names_default"): (
        "reads the private _threads (of a stdlib ThreadPoolExecutor it builds by name)"
    ),
    ("ProcessPoolShutdownTest", "test_processes_terminate"): (
        "reads the stdlib executor's private _processes"
    ),
    ("ProcessPoolShutdownTest", "test_context_manager_shutdown"): (
        "reads the private _processes (of a stdlib ProcessPoolExecutor it builds by name)"
    ),
    ("ProcessPoolShutdownTest", "test_del_shutdown"): (
        "reads the private _processes, _call_queue and _executor_manager_thread "
        "(of a stdlib ProcessPoolExecutor it builds by name)"
    ),
    ("ProcessPoolShutdownTest", "test_shutdown_no_wait"): (
        "reads the private _processes, _call_queue and _executor_manager_thread "
        "(of a stdlib ProcessPoolExecutor it builds by name)"
    ),
    ("ExecutorDeadlockTest", "test_shutdown_deadlock_pickle"): (
        "reads the stdlib executor's private _executor_manager_thread"
    ),
}


def _skipped(reason: str) -> Callable[..., None]:
    @unittest.skip(reason)
    def test(self: unittest.TestCase) -> None:  # pragma: no cover - never runs
        pass

    return test


# -- building the classes -------------------------------------------------------------------------


def _build(module: str, mixin: type, mixins: tuple[type, ...]) -> list[type]:
    """``util.create_executor_tests`` over conveyor's mixins; the classes get ``module`` (the
    CPython module's short name) as ``__module__``, so test ids read ``test_wait.Thread...``."""
    made: dict[str, Any] = {"__name__": module}
    util.create_executor_tests(made, mixin, bases=(BaseTestCase,), executor_mixins=mixins)
    return [cls for name, cls in made.items() if name != "__name__"]


def _rebase(module: str, cpython_class: type, mixin: type) -> type:
    """One of CPython's executor-specific classes (already combined with CPython's mixin for the
    stdlib executor), with conveyor's mixin in front."""
    return type(
        cpython_class.__name__,
        (mixin, cpython_class, BaseTestCase),
        {"__module__": module},
    )


def _apply_skips(cls: type) -> None:
    for klass in cls.__mro__:
        for (owner, method), reason in SKIPS.items():
            if klass.__name__ == owner and method in vars(klass):
                setattr(cls, method, _skipped(reason))


def test_classes() -> list[type]:
    classes: list[type] = []
    classes += _build("executor", executor.ExecutorTest, ALL_MIXINS)
    classes += _build("test_as_completed", test_as_completed.AsCompletedTests, ALL_MIXINS)
    # CPython: ThreadPoolWaitTests (WaitTests + test_pending_calls_race) and the generic
    # WaitTests over the three process mixins.
    classes.append(_rebase("test_wait", test_wait.ThreadPoolWaitTests, ThreadPoolMixin))
    classes += _build("test_wait", test_wait.WaitTests, PROCESS_MIXINS)
    # CPython: ThreadPoolShutdownTest and ProcessPoolShutdownTest over the process mixins, both
    # ExecutorShutdownTest plus tests of the stdlib's internals (skipped, see SKIPS).
    classes.append(_rebase("test_shutdown", test_shutdown.ThreadPoolShutdownTest, ThreadPoolMixin))
    classes += _build("test_shutdown", ProcessPoolShutdownTest, PROCESS_MIXINS)
    classes += _build("test_deadlock", ExecutorDeadlockTest, PROCESS_MIXINS)
    classes += _build("test_init", test_init.InitializerMixin, ALL_MIXINS)
    classes += _build("test_init", FailingInitializerMixin, ALL_MIXINS)
    for cls in classes:
        _apply_skips(cls)
    return classes


# -- selecting and running ------------------------------------------------------------------------


def _iter_tests(suite: unittest.TestSuite) -> Iterator[unittest.TestCase]:
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from _iter_tests(test)
        else:
            yield test


def _selected(test_id: str, prefixes: list[str], patterns: list[str]) -> bool:
    if prefixes and not any(test_id.startswith(p) for p in prefixes):
        return False
    if patterns:
        # unittest's -k: a pattern without wildcards matches as a substring.
        globs = [p if "*" in p else f"*{p}*" for p in patterns]
        return any(fnmatch.fnmatchcase(test_id, g) for g in globs)
    return True


def kind_of(test_id: str) -> str:
    class_name = test_id.split(".")[1]
    return next((k for k in KINDS if class_name.startswith(k)), "other")


class Result(unittest.TextTestResult):
    """Keeps each test's worst outcome, for the per-kind counts at the end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, str] = {}

    def _note(self, test: Any, outcome: str) -> None:
        test_id = test.id() if isinstance(test, unittest.TestCase) else str(test)
        order = ("pass", "skip", "fail", "error")
        previous = self.outcomes.get(test_id, "pass")
        self.outcomes[test_id] = max(previous, outcome, key=order.index)

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self._note(test, "pass")

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._note(test, "fail")

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self._note(test, "error")

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._note(test, "skip")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self._note(test, "fail" if failed else "error")


def _print_counts(outcomes: dict[str, str], elapsed: float) -> None:
    table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for test_id, outcome in outcomes.items():
        table[kind_of(test_id)][outcome] += 1
    print(f"\n== CPython test_concurrent_futures against conveyor, {elapsed:.1f}s", flush=True)
    for kind in sorted(table):
        c = table[kind]
        print(
            f"  {kind:22} passed {c['pass']:3}  failed {c['fail']:3}  errors {c['error']:3}"
            f"  skipped {c['skip']:3}",
            flush=True,
        )


def _module_cleanup() -> bool:
    """What CPython's ``util.setup_module`` registers as module cleanups: stop multiprocessing's
    helpers (fork server, resource tracker), reap children, then check no thread is left."""
    import multiprocessing.util

    support.environment_altered = False
    # Executors that a failed test dropped without shutdown() may be held by reference cycles
    # (exception -> traceback -> frame); collect them first, as the stdlib's would need too.
    support.gc_collect()
    left = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if left:
        # Before stopping the fork server: a live pool's processes keep it alive, and
        # multiprocessing's _stop() then waits for it forever.
        print(f"\nthreads left after every test: {[t.name for t in left]}", flush=True)
        faulthandler.dump_traceback(all_threads=True)
    multiprocessing.util._cleanup_tests()
    return not left and not support.environment_altered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", nargs="*", help="run the tests whose id starts with this")
    parser.add_argument(
        "-k", dest="patterns", action="append", default=[], help="unittest-style -k pattern"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds for the whole run; then dump every stack and exit 1 (default 1800)",
    )
    parser.add_argument(
        "--exit-timeout",
        type=float,
        default=120.0,
        help="seconds the interpreter gets to exit after the tests (default 120)",
    )
    parser.add_argument("--list", action="store_true", help="print the selected ids and exit")
    args = parser.parse_args(argv)
    if sys.version_info[:2] != (3, 13):
        print("run_suites.py runs CPython 3.13's tests: use Python 3.13", file=sys.stderr)
        return 2

    faulthandler.enable(all_threads=True)
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    # Adapted, see _run_with_conveyor: the scripts test_shutdown runs in new interpreters.
    test_shutdown.assert_python_ok = _run_with_conveyor(script_helper.assert_python_ok)

    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for cls in test_classes():
        for test in _iter_tests(loader.loadTestsFromTestCase(cls)):
            if _selected(test.id(), args.prefix, args.patterns):
                suite.addTest(test)
    # The suite lets go of each test once it has run; this name must not keep the last one
    # (and what it holds, such as a multiprocessing.Queue) alive past the module's cleanup.
    del test
    if args.list:
        for test in _iter_tests(suite):
            print(test.id())
        return 0
    if not suite.countTestCases():
        print("no test matches", file=sys.stderr)
        return 2

    print(f"conveyor from {CONVEYOR_PATH}; CPython tests from {Path(util.__file__).parent}")
    started = time.monotonic()
    runner = unittest.TextTestRunner(verbosity=2, resultclass=Result, stream=sys.stdout)
    result = runner.run(suite)
    _print_counts(result.outcomes, time.monotonic() - started)
    # Stopping multiprocessing's helpers and the interpreter's exit (atexit hooks,
    # multiprocessing's finalizers) must end by themselves.
    faulthandler.dump_traceback_later(args.exit_timeout, exit=True)
    clean = _module_cleanup()
    ok = result.wasSuccessful() and clean
    print("OK" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
