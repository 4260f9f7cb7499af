"""One first map on a new pool, as a user's script makes it: numpy imported at the top, the
arrays made, a pool created, ``pool.map(fn, arrays)``. ``bench_process.py``'s numpy case runs
it once per contender and round, in a process of its own, and reads the seconds it prints.

    python _fresh_map.py "conveyor.Pool"

It is a script of its own because the benchmark script imports numpy inside its case (see its
doc), so that a fork server re-importing it would leave every new worker to import numpy on
its first array: a cost a script that imports numpy at its top does not see. Only the map is
timed, from the call to the last result, with the pool object already created: a pool that
starts its workers as work comes (conveyor, the stdlib's executor, loky) starts them inside
it, ``multiprocessing.Pool`` before it. What a process starts once is not inside it: before
the timed pool, another pool of the same kind runs one call and shuts down (conveyor's fork
server starts then, and imports this script and numpy once).
"""

from __future__ import annotations

import sys
import time

import numpy as np
from _work import array_sum, noop


def main() -> None:
    from _peers import PEERS
    from bench_process import ARRAY_ITEMS, ARRAYS

    kind = {peer.name: peer for peer in PEERS}[sys.argv[1]]
    arrays = [np.arange(ARRAY_ITEMS, dtype=np.float64) + i for i in range(ARRAYS)]
    expected = [array_sum(a) for a in arrays]
    before = kind()
    before.start()
    before.call(noop)
    before.stop()
    peer = kind()
    peer.start()
    try:
        start = time.perf_counter()
        result = peer.map(array_sum, arrays)
        elapsed = time.perf_counter() - start
    finally:
        peer.stop()
    if result != expected:
        sys.exit(f"{kind.name} returned wrong results")
    print(elapsed)


if __name__ == "__main__":
    main()
