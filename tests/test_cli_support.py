"""What the command-line tests share: a module of functions to run, a way to drive the real
``python -m conveyor`` in a subprocess, and FIFOs to wait on instead of sleeping.

The functions live in a module written into the test's directory, which is the command's
working directory: running them also checks that the current directory is importable.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest

#: Seconds any wait on a subprocess may take before the test fails (never reached when
#: things work: every wait ends on an event).
WAIT = 60.0

# Test modules import the fixtures by these function names; tests ask for them by the
# fixture names ("work", "fifos").

WORK_MODULE = '''
import os
import threading


def double(x):
    return int(x) * 2


def fail_odd(x):
    if int(x) % 2:
        raise ValueError(f"odd: {x}")
    return int(x)


def show(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


def a_set(x):
    return {x}


def lazy(x):
    return (c for c in x)  # a generator: it cannot be pickled back from a worker process


def noisy(x):
    print("print from", x)
    os.write(1, b"raw write to fd 1\\n")
    return x


def crash(x):
    if x == "die":
        os._exit(3)
    return x


def hang(x):
    if x == "hang":
        threading.Event().wait()
    return x


def gated(x):
    """At the input named by $BLOCK_AT: tell $MARKER, then wait for a byte on $GATE."""
    if x == os.environ.get("BLOCK_AT"):
        fd = os.open(os.environ["MARKER"], os.O_WRONLY)
        os.write(fd, f"{x}\\n".encode())
        os.close(fd)
        fd = os.open(os.environ["GATE"], os.O_RDONLY)
        os.read(fd, 1)
        os.close(fd)
    return int(x) * 2


not_callable = 42
'''


@pytest.fixture(name="work")
def work_directory(tmp_path: Path) -> Path:
    """A directory holding ``work.py``; commands run there."""
    (tmp_path / "work.py").write_text(WORK_MODULE)
    return tmp_path


class Fifo:
    """A named pipe the test reads (marker) or writes (gate) without ever blocking on it.

    Opened read-write, so that the other side's open never blocks and a read never sees
    end-of-file while the test holds it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._buffer = b""

    def read_line(self, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, remaining))
            if not ready:
                raise AssertionError(f"nothing arrived on {self.path} within {timeout} s")
            self._buffer += os.read(self.fd, 4096)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def release(self) -> None:
        os.write(self.fd, b"x")

    def close(self) -> None:
        os.close(self.fd)


class Command:
    """The real ``python -m conveyor`` in a subprocess, always reaped."""

    def __init__(
        self,
        args: Sequence[str],
        cwd: Path,
        *,
        stdin: int | None = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
    ) -> None:
        full_env = dict(os.environ)
        full_env.pop("COLUMNS", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-W", "error", "-m", "conveyor", *args],
            cwd=cwd,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
        )
        self._stderr = b""
        self._stdout = b""

    def read_stdout_lines(self, count: int, timeout: float = WAIT) -> list[str]:
        """Wait for ``count`` complete lines on stdout while the command runs."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while self._stdout.count(b"\n") < count:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"{count} stdout lines did not come within {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._stdout += chunk
        return self._stdout.decode().splitlines()[:count]

    def wait_stderr(self, text: str, timeout: float = WAIT) -> None:
        """Wait until ``text`` appears on the command's stderr."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        while text.encode() not in self._stderr:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"{text!r} not on stderr within {timeout} s: {self._stderr!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"stderr closed without {text!r}: {self._stderr!r}")
            self._stderr += chunk

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def finish(self, timeout: float = WAIT) -> Result:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return Result(
            self.proc.returncode, (self._stdout + out).decode(), (self._stderr + err).decode()
        )

    def kill(self) -> None:
        """Make sure the command has ended and is reaped, its pipes closed."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass  # a stdin whose reader is gone


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    @property
    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines]

    def __repr__(self) -> str:
        return (
            f"Result(code={self.code}, stdout={self.stdout[-300:]!r}, "
            f"stderr={self.stderr[-600:]!r})"
        )


def run(
    args: Sequence[str],
    cwd: Path,
    *,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """Run the command to its end."""
    command = Command(
        args, cwd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL, env=env
    )
    try:
        out, err = command.proc.communicate(
            input.encode() if input is not None else None, timeout=WAIT
        )
    finally:
        if command.proc.poll() is None:
            command.kill()
    return Result(command.proc.returncode, out.decode(), err.decode())


def inputs_of(lines: Sequence[str]) -> list[object]:
    return [json.loads(line)["input"] for line in lines]


def wait_gone(processes: Sequence[psutil.Process]) -> None:
    """Wait until ``processes`` have exited (they were orphaned: nobody reaps them here)."""
    _, alive = psutil.wait_procs(list(processes), timeout=WAIT)
    assert not alive, f"processes outlived the command: {alive}"


@pytest.fixture(name="fifos")
def marker_and_gate(work: Path) -> Iterator[tuple[Fifo, Fifo]]:
    """(marker, gate) FIFOs in the work directory."""
    marker, gate = Fifo(work / "marker"), Fifo(work / "gate")
    yield marker, gate
    marker.close()
    gate.close()


def gate_env(fifos: tuple[Fifo, Fifo], block_at: str) -> dict[str, str]:
    marker, gate = fifos
    return {"BLOCK_AT": block_at, "MARKER": str(marker.path), "GATE": str(gate.path)}


SIGKILL = signal.SIGKILL
SIGINT = signal.SIGINT


def test_the_work_module_runs_in_process(work: Path) -> None:
    result = run(["run", "work:double"], work, input="4\n")
    assert result.code == 0, result
    assert result.records == [{"input": "4", "output": 8}]
