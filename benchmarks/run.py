"""Run every benchmark script, one after the other, and end with the list of floors.

    python benchmarks/run.py            # all of them
    python benchmarks/run.py thread     # only bench_thread.py (also: process, peers, pipeline,
                                        # auto, dask, asyncio)

Each script runs in a fresh interpreter (so that one script's threads and worker processes
cannot slow the next) and prints its own tables; the ``FLOOR`` lines are collected and printed
again at the end. The exit status is 0 when every floor is met, 1 otherwise.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {
    "thread": "bench_thread.py",
    "process": "bench_process.py",
    "peers": "bench_peers.py",
    "pipeline": "bench_pipeline.py",
    "auto": "bench_auto.py",
    "dask": "bench_dask.py",
    "asyncio": "bench_asyncio.py",
}


def main() -> int:
    chosen = sys.argv[1:] or list(SCRIPTS)
    unknown = [name for name in chosen if name not in SCRIPTS]
    if unknown:
        sys.exit(f"unknown benchmark {unknown[0]!r}; choose among {', '.join(SCRIPTS)}")
    floors: list[str] = []
    failed: list[str] = []
    for name in chosen:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-u", str(HERE / SCRIPTS[name])],
            stdout=subprocess.PIPE,
            text=True,
            cwd=HERE,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("FLOOR "):
                floors.append(line.rstrip("\n"))
        if proc.wait() != 0:
            failed.append(f"{SCRIPTS[name]} exited with status {proc.returncode}")
        print(f"   ({SCRIPTS[name]} took {time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print("== floors")
    for line in floors:
        print(line)
    for line in failed:
        print(f"ERROR {line}")
    missed = [line for line in floors if not line.endswith(" MET")]
    print(f"{len(floors) - len(missed)} of {len(floors)} floors met")
    return 1 if missed or failed else 0


if __name__ == "__main__":
    sys.exit(main())
