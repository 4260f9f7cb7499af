"""Fetch many pages from a local HTTP server, one after another and then on 32 threads.

Run it with ``python examples/fetch.py``: it starts its own server on 127.0.0.1, where every
page takes 20 ms to answer, and prints how long each way took.
"""

from __future__ import annotations

import http.server
import threading
import time
import urllib.request

import conveyor

PAGES = 200
LATENCY = 0.02


class _SlowPages(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(LATENCY)
        body = f"<html><body>page {self.path}</body></html>".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default of 5 drops connections when 32 arrive at once


def fetch(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return len(response.read())


def main() -> None:
    server = _Server(("127.0.0.1", 0), _SlowPages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        urls = [f"http://127.0.0.1:{server.server_port}/page/{i}" for i in range(PAGES)]
        start = time.perf_counter()
        serial = sum(map(fetch, urls))
        serial_time = time.perf_counter() - start
        start = time.perf_counter()
        with conveyor.Pool(workers=32) as pool:
            threaded = sum(pool.map(fetch, urls))
        threaded_time = time.perf_counter() - start
        assert serial == threaded
        print(f"{PAGES} pages, {LATENCY * 1000:.0f} ms each")
        speedup = serial_time / threaded_time
        print(f"  serial:               {serial_time:6.2f} s")
        print(f"  conveyor, 32 threads: {threaded_time:6.2f} s  ({speedup:.1f}x faster)")
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
