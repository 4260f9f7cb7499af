"""Scripts whose ``__main__`` is not a file (read from standard input, ``python -c``) can use
process pools: their functions and classes travel to the workers by value."""

from __future__ import annotations

import pathlib
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


MAIN_WITH_SIDE_EFFECT = textwrap.dedent(
    """
    import os, sys
    import conveyor
    from beside import square   # a module in the script's directory, not the current one

    with open(sys.argv[1], "a") as runs:   # the top level of this script, run once more
        runs.write(f"{os.getpid()}\\n")     # in every process that imports it

    if __name__ == "__main__":
        for _ in range(3):
            with conveyor.Pool("process", 2, max_tasks_per_worker=1) as pool:
                total = sum(pool.map(square, range(8)))
        print(total)
    """
)


def test_the_main_script_runs_once_in_the_fork_server_not_in_every_worker(
    tmp_path: pathlib.Path,
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    script = app / "main_script.py"
    script.write_text(MAIN_WITH_SIDE_EFFECT)
    (app / "beside.py").write_text("def square(x):\n    return x * x\n")
    runs = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, str(script), str(runs)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(sum(x * x for x in range(8)))
    # Three pools of eight workers ran one call each (max_tasks_per_worker=1); the script's
    # top level ran in the parent and once in the fork server, which all of them came from.
    assert len(runs.read_text().split()) == 2, done.stderr
