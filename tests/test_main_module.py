"""Scripts whose ``__main__`` is not a file (read from standard input, ``python -c``) can use
process pools: their functions and classes travel to the workers by value."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import conveyor

    class Box:
        def __init__(self, value):
            self.value = value

    def unbox(box):
        return box.value * 2

    if __name__ == "__main__":
        with conveyor.Pool("process", 2) as pool:
            print(list(pool.map(unbox, [Box(i) for i in range(5)])))
    """
)


@pytest.mark.parametrize("how", ["stdin", "-c"])
def test_a_main_that_is_not_a_file_runs_on_process_workers(how: str) -> None:
    if how == "stdin":
        command, stdin = [sys.executable, "-"], SCRIPT
    else:
        command, stdin = [sys.executable, "-c", SCRIPT], ""
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 2, 4, 6, 8]"


def test_spawn_refuses_a_main_read_from_stdin_with_a_clear_error() -> None:
    script = (
        "import multiprocessing, conveyor\n"
        "try:\n"
        "    conveyor.Pool('process', 1, mp_context=multiprocessing.get_context('spawn'))\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "mp_context" in done.stdout
    assert "not a file" in done.stdout
