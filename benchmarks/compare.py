"""Run the benchmark scripts against an earlier commit and against this tree, in one run.

    python benchmarks/compare.py REF                # every script, REF (a commit) then now
    python benchmarks/compare.py REF process thread  # only these scripts

REF's ``src/`` is exported to a temporary directory (``git archive``); each script of *this*
tree then runs twice per round, once importing conveyor from REF and once from here, in an
order that alternates between rounds so that a drift in the machine's load favours neither.
The scripts already time conveyor beside the stdlib and its peers in the same process, so the
figures to compare are the ratios in their tables; the seconds drift with the machine.

What is printed: for every table row about conveyor, the row as REF measured it and as this
tree measures it, then both runs' ``FLOOR`` lines. A case that this tree's script runs with a
keyword REF does not know shows REF's error in its row; ``--ref-scripts`` runs REF's own copy
of each script against REF instead (the cases may then differ too).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from run import SCRIPTS  # noqa: E402

Rows = dict[tuple[str, str], str]


def export(ref: str, into: Path) -> Path:
    """Write REF's ``src/`` and ``benchmarks/`` under ``into``; return ``into``."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "src", "benchmarks"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_script(script: Path, src: Path) -> tuple[Rows, list[str], str]:
    """Run one benchmark script importing conveyor from ``src``; return its conveyor rows (by
    table heading and contender), its FLOOR lines and its whole output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), str(script.parent)]))
    proc = subprocess.run(
        [sys.executable, "-u", str(script)],
        cwd=script.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    rows: Rows = {}
    floors: list[str] = []
    heading = ""
    for line in proc.stdout.splitlines():
        if line.startswith("== "):
            heading = line[3:].strip()
        elif line.startswith("FLOOR "):
            floors.append(line)
        elif line.strip().startswith("conveyor"):
            row = line.strip()
            rows[(heading, row.split("  ")[0])] = row
    if proc.returncode != 0:
        floors.append(f"(exited with status {proc.returncode}: {proc.stderr.strip()[-300:]})")
    return rows, floors, proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="the commit to compare with (e.g. HEAD~5, a tag, a hash)")
    parser.add_argument("scripts", nargs="*", help=f"among {', '.join(SCRIPTS)} (default: all)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each side (default 1)")
    parser.add_argument(
        "--ref-scripts", action="store_true", help="run REF's own copy of each script for REF"
    )
    args = parser.parse_args()
    chosen = args.scripts or list(SCRIPTS)
    unknown = [name for name in chosen if name not in SCRIPTS]
    if unknown:
        sys.exit(f"unknown benchmark {unknown[0]!r}; choose among {', '.join(SCRIPTS)}")
    with tempfile.TemporaryDirectory(prefix="conveyor-compare-") as tmp:
        old = export(args.ref, Path(tmp))
        for name in chosen:
            script = SCRIPTS[name]
            print(f"\n##### {script}: {args.ref} (before) against this tree (now)", flush=True)
            results: dict[str, list[tuple[Rows, list[str]]]] = {"before": [], "now": []}
            old_script = (old / "benchmarks" if args.ref_scripts else HERE) / script
            for round_ in range(args.rounds):
                sides = [("before", old_script, old / "src"), ("now", HERE / script, ROOT / "src")]
                for side, path, src in sides if round_ % 2 == 0 else sides[::-1]:
                    rows, floors, _ = run_script(path, src)
                    results[side].append((rows, floors))
            keys: list[tuple[str, str]] = []
            for side in ("now", "before"):
                for rows, _ in results[side]:
                    keys += [key for key in rows if key not in keys]
            heading = None
            for key in keys:
                if key[0] != heading:
                    heading = key[0]
                    print(f"\n== {heading}")
                for side in ("before", "now"):
                    for rows, _ in results[side]:
                        print(f"   {side:6}  {rows.get(key, '(no such row)')}")
            for side in ("before", "now"):
                for _, floors in results[side]:
                    for line in floors:
                        print(f"   {side:6}  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
