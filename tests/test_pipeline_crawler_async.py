"""The asyncio crawler example (coroutine stages over asyncio streams, consumed with
``async for``) runs end to end against the local site and fetches every page exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "crawler_async.py"


def test_the_async_crawler_fetches_every_detail_page_exactly_once(tmp_path: Path) -> None:
    output = tmp_path / "items.jsonl"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), str(output)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stderr.strip().splitlines()[-1])
    records = [json.loads(line) for line in output.read_text().splitlines()]
    pages = summary["detail_pages"]
    assert pages > 0 and summary["records"] == len(records) == pages
    assert summary["detail_hits"] == {f"/item/{i}": 1 for i in range(pages)}
    assert set(summary["list_hits"].values()) == {1}
    assert sorted(r["id"] for r in records) == list(range(pages))
    assert all(r["title"] == f"Item {r['id']} & friends" for r in records)
