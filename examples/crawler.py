"""Crawl a small local web site with a conveyor Pipeline and write one JSON line per item.

Run it with ``python examples/crawler.py [OUTPUT]``: it starts its own HTTP server on
127.0.0.1 (list pages that link to detail pages, each answer delayed by a few to 30 ms), then

    list pages -> fetch (4 threads) -> detail links (flat_map)
        -> fetch details (16 threads, at most 400 starts a second)
        -> parse (2 processes) -> JSON lines on stdout, or in OUTPUT

and prints a summary to stderr: how many items, how long, and how often the server served
each detail page (every one exactly once, if all went well).
"""

from __future__ import annotations

import html
import http.server
import json
import random
import re
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

import conveyor

LIST_PAGES = 20
ITEMS_PER_PAGE = 10
LATENCY = (0.002, 0.03)


class _Site(http.server.BaseHTTPRequestHandler):
    """``/list/<n>`` links to ``/item/<id>`` for ten ids; ``/item/<id>`` describes one."""

    server: _Server

    def do_GET(self) -> None:
        self.server.count(self.path)
        time.sleep(random.uniform(*LATENCY))
        if match := re.fullmatch(r"/list/(\d+)", self.path):
            first = int(match.group(1)) * ITEMS_PER_PAGE
            links = "".join(
                f'<li><a href="/item/{i}">item {i}</a></li>'
                for i in range(first, first + ITEMS_PER_PAGE)
            )
            self._answer(200, f"<html><body><ul>{links}</ul></body></html>")
        elif match := re.fullmatch(r"/item/(\d+)", self.path):
            item = int(match.group(1))
            self._answer(
                200,
                f"<html><body><h1>Item {item} &amp; friends</h1>"
                f'<p class="price">{item * 3 % 97}.{item % 100:02d}</p></body></html>',
            )
        else:
            self._answer(404, "<html><body>not found</body></html>")

    def _answer(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default of 5 refuses connections when 16 arrive at once

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Site)
        self.hits: Counter[str] = Counter()
        self._hits_lock = threading.Lock()

    def count(self, path: str) -> None:
        with self._hits_lock:
            self.hits[path] += 1


def fetch(url: str) -> tuple[str, str]:
    """The page at ``url`` and its text."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return url, response.read().decode()


def detail_links(page: tuple[str, str]) -> list[str]:
    """The detail pages a list page links to, as absolute URLs."""
    url, text = page
    root = url.split("/list/")[0]
    return [root + path for path in re.findall(r'href="(/item/\d+)"', text)]


def parse(page: tuple[str, str]) -> dict[str, Any]:
    """One record from a detail page (runs in a worker process)."""
    url, text = page
    title = re.search(r"<h1>(.*?)</h1>", text)
    price = re.search(r'class="price">([\d.]+)<', text)
    return {
        "url": url,
        "id": int(url.rsplit("/", 1)[1]),
        "title": html.unescape(title.group(1)) if title else None,
        "price": float(price.group(1)) if price else None,
    }


def crawl(root: str, out: Any) -> int:
    """Crawl the site at ``root``, writing JSON lines to ``out``; returns the record count."""
    list_pages = (f"{root}/list/{n}" for n in range(LIST_PAGES))
    pipeline = (
        conveyor.Pipeline(list_pages)
        .map(fetch, workers=4, name="lists")
        .flat_map(detail_links, name="links")
        .map(fetch, workers=16, rate="400/s", name="details")
        .map(parse, backend="process", workers=2, name="parse")
    )
    records = 0
    with pipeline:
        for record in pipeline:
            out.write(json.dumps(record) + "\n")
            records += 1
    for stage in pipeline.statistics():
        print(
            f"  {stage.name:<8} in {stage.items_in:>4}  out {stage.items_out:>4}  "
            f"{stage.throughput:7.1f} items/s",
            file=sys.stderr,
        )
    return records


def run_on_local_site(crawl: Callable[[str, TextIO], int]) -> None:
    """Serve the site, run ``crawl(root_url, out)`` on it (to the file named on the command
    line, else stdout), then print a summary of what the server saw to stderr."""
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    root = f"http://127.0.0.1:{server.server_port}"
    try:
        start = time.perf_counter()
        if len(sys.argv) > 1:
            with open(sys.argv[1], "w", encoding="utf-8") as out:
                records = crawl(root, out)
        else:
            records = crawl(root, sys.stdout)
        seconds = time.perf_counter() - start
    finally:
        server.shutdown()
        server.server_close()
    details = {path: n for path, n in server.hits.items() if path.startswith("/item/")}
    summary = {
        "records": records,
        "seconds": round(seconds, 3),
        "detail_pages": LIST_PAGES * ITEMS_PER_PAGE,
        "detail_hits": details,
        "list_hits": {path: n for path, n in server.hits.items() if path.startswith("/list/")},
    }
    print(json.dumps(summary), file=sys.stderr)


def main() -> None:
    run_on_local_site(crawl)


if __name__ == "__main__":
    main()
