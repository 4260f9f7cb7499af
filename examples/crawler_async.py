"""The crawler of ``crawler.py`` written for asyncio: the same local site, the same records.

Run it with ``python examples/crawler_async.py [OUTPUT]``. Pages are fetched by a coroutine
over ``asyncio`` streams (plain HTTP/1.1, standard library only), so its stages run on the
asyncio backend, with many requests in flight on one thread, beside a thread stage and a
process stage; the pipeline is consumed with ``async for``::

    list pages -> fetch (4 in flight) -> detail links (flat_map, a thread)
        -> fetch details (64 in flight, at most 400 starts a second)
        -> parse (2 processes) -> JSON lines on stdout, or in OUTPUT

The summary on stderr is ``crawler.py``'s: every detail page should be served exactly once.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any
from urllib.parse import urlsplit

from crawler import LIST_PAGES, detail_links, parse, run_on_local_site

import conveyor


async def fetch(url: str) -> tuple[str, str]:
    """The page at ``url`` and its text, over one HTTP/1.1 connection."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    try:
        request = f"GET {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode("ascii"))
        await writer.drain()
        answer = await reader.read()  # the server closes the connection after the body
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(None, 2)[1])
    if status != 200:
        raise OSError(f"{url}: HTTP {status}")
    return url, body.decode()


async def crawl(root: str, out: Any) -> int:
    """Crawl the site at ``root``, writing JSON lines to ``out``; returns the record count."""
    list_pages = (f"{root}/list/{n}" for n in range(LIST_PAGES))
    pipeline = (
        conveyor.Pipeline(list_pages)
        .map(fetch, workers=4, timeout=10, name="lists")
        .flat_map(detail_links, name="links")
        .map(fetch, workers=64, rate="400/s", timeout=10, name="details")
        .map(parse, backend="process", workers=2, name="parse")
    )
    records = 0
    async for record in pipeline:
        out.write(json.dumps(record) + "\n")
        records += 1
    for stage in pipeline.statistics():
        print(
            f"  {stage.name:<8} in {stage.items_in:>4}  out {stage.items_out:>4}  "
            f"{stage.throughput:7.1f} items/s",
            file=sys.stderr,
        )
    return records


def main() -> None:
    run_on_local_site(lambda root, out: asyncio.run(crawl(root, out)))


if __name__ == "__main__":
    main()
