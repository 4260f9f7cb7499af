"""A process worker runs each input's call of ``conveyor run`` without importing the command
line: the call's module stands alone."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from conveyor._cli_call import _Call
from conveyor.examples import fib

#: The rooms of the command line that a worker must not load.
CLI_ROOMS = {"conveyor._cli", "conveyor._cli_io", "conveyor._cli_loop", "conveyor._journal_resume"}

UNPICKLE = """
import pickle, sys
call = pickle.loads(sys.stdin.buffer.read())
print(call(10))
print(" ".join(sorted(name for name in sys.modules if name.startswith("conveyor"))))
"""

IMPORT = """
import sys
import conveyor._cli_call
print(conveyor._cli_call._Call(abs, False)(-55))
print(" ".join(sorted(name for name in sys.modules if name.startswith("conveyor"))))
"""


@pytest.mark.parametrize("how", ["unpickle", "import"])
def test_a_call_loads_no_other_room_of_the_command_line(how: str) -> None:
    data = pickle.dumps(_Call(fib, False))
    assert b"conveyor._cli_call" in data
    script, stdin = (UNPICKLE, data) if how == "unpickle" else (IMPORT, b"")
    done = subprocess.run(
        [sys.executable, "-c", script], input=stdin, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()
    result, modules = done.stdout.decode().splitlines()
    assert result == "55"
    loaded = set(modules.split())
    assert "conveyor._cli_call" in loaded
    assert not loaded & CLI_ROOMS, sorted(loaded & CLI_ROOMS)
    assert {name for name in loaded if name.startswith("conveyor._cli")} == {"conveyor._cli_call"}
