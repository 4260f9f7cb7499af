"""The Python documentation's ``concurrent.futures`` thread-pool examples, on conveyor.

The examples are rewritten as tests: the page loader talks to a local ``http.server`` bound
to 127.0.0.1 (and never through a proxy), and the documentation's deadlocks become calls that
end, either because the pool has room or because conveyor's per-call ``timeout`` ends them.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from conveyor import TaskTimeout, ThreadPoolExecutor

WAIT = 30.0

#: Path -> body size of the pages the local server knows.
PAGES = {f"/page/{size}": size for size in (0, 1, 17, 1000, 65536)}


class _Handler(BaseHTTPRequestHandler):
    server: Site

    def do_GET(self) -> None:
        if self.path == "/slow":
            # answers only once the test lets it
            if not self.server.slow_release.wait(WAIT):
                self.send_error(503)
                return
            body = b"slow"
        elif self.path in PAGES:
            body = b"x" * PAGES[self.path]
        else:
            self.send_error(404, "no such page")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output quiet


class Site(ThreadingHTTPServer):
    """A local web server with a few pages, a missing one and a slow one."""

    # Request threads are joined by server_close(), so none outlives the test.
    daemon_threads = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.slow_release = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        assert host == "127.0.0.1"
        return f"http://127.0.0.1:{port}"


@pytest.fixture
def site() -> Iterator[Site]:
    """A local web server, stopped after the test."""
    server = Site()
    thread = threading.Thread(target=server.serve_forever, name="local-http-server")
    thread.start()
    try:
        yield server
    finally:
        server.slow_release.set()
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


#: Only the local server is ever asked: no proxy from the environment is used.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def load_url(url: str, timeout: float) -> bytes:
    """Fetch one page and return its body."""
    try:
        with _opener.open(url, timeout=timeout) as conn:
            body: bytes = conn.read()
            return body
    except urllib.error.HTTPError as error:
        error.close()
        raise


# -- loading pages --------------------------------------------------------------------------


def test_the_page_loading_example_with_as_completed(site: Site) -> None:
    urls = [site.url + path for path in PAGES] + [site.url + "/missing"]
    report: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=5) as executor:
        # start every load and remember which URL each future is for
        future_to_url = {executor.submit(load_url, url, 60): url for url in urls}
        for future in cf.as_completed(future_to_url, timeout=WAIT):
            url = future_to_url[future]
            try:
                data = future.result()
            except Exception as exc:
                report[url] = f"{url!r} generated an exception: {exc}"
            else:
                report[url] = f"{url!r} page is {len(data)} bytes"
    assert set(report) == set(urls)
    for path, size in PAGES.items():
        url = site.url + path
        assert report[url] == f"{url!r} page is {size} bytes"
    assert "generated an exception: HTTP Error 404" in report[site.url + "/missing"]
    stats = executor.statistics()
    assert (stats.completed, stats.failed) == (len(PAGES), 1)


def test_the_page_loading_example_with_map(site: Site) -> None:
    urls = [site.url + path for path in PAGES]
    with ThreadPoolExecutor(max_workers=3) as executor:
        bodies = executor.map(load_url, urls, [60] * len(urls))
        sizes = {url: len(body) for url, body in zip(urls, bodies, strict=True)}
    assert sizes == {site.url + path: size for path, size in PAGES.items()}


def test_the_first_answer_wins_with_wait_first_completed(site: Site) -> None:
    with ThreadPoolExecutor(max_workers=2) as executor:
        slow = executor.submit(load_url, site.url + "/slow", 60)
        fast = executor.submit(load_url, site.url + "/page/17", 60)
        try:
            done, not_done = cf.wait([slow, fast], timeout=WAIT, return_when=cf.FIRST_COMPLETED)
            assert done == {fast}
            assert not_done == {slow}
            assert fast.result() == b"x" * 17
        finally:
            site.slow_release.set()
        assert slow.result(WAIT) == b"slow"


# -- submit and map -------------------------------------------------------------------------


def test_the_submit_example() -> None:
    with ThreadPoolExecutor(max_workers=1) as executor:
        future = executor.submit(pow, 323, 1235)
        assert future.result() == 323**1235


def test_the_map_example() -> None:
    with ThreadPoolExecutor(max_workers=2) as executor:
        assert list(executor.map(pow, [2, 3, 10], [3, 2, 2])) == [8, 9, 100]


NUMBERS = [1_000_003, 1_000_033, 1_000_035, 999_983, 1_234_567, 2_147_483_647, 1]


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % i for i in range(3, math.isqrt(n) + 1, 2))


def test_the_prime_checking_example() -> None:
    lines = []
    with ThreadPoolExecutor() as executor:
        for number, prime in zip(NUMBERS, executor.map(is_prime, NUMBERS), strict=True):
            lines.append(f"{number} is prime: {prime}")
    assert lines == [
        "1000003 is prime: True",
        "1000033 is prime: True",
        "1000035 is prime: False",
        "999983 is prime: True",
        "1234567 is prime: False",
        "2147483647 is prime: True",
        "1 is prime: False",
    ]


# -- the documentation's deadlocks, ended -----------------------------------------------------


def test_a_call_waiting_on_its_own_pool_ends_when_the_pool_has_room() -> None:
    with ThreadPoolExecutor(max_workers=2) as executor:

        def wait_on_future() -> int:
            inner = executor.submit(pow, 5, 2)
            # one worker runs this call, the other runs the inner one
            return inner.result(WAIT)

        assert executor.submit(wait_on_future).result(WAIT) == 25


def test_a_call_waiting_on_its_own_one_worker_pool_times_out_instead_of_deadlocking() -> None:
    inner: list[cf.Future[int]] = []
    outer_ended = threading.Event()

    def wait_on_future() -> int:
        try:
            inner.append(executor.submit(pow, 5, 2))
            # the only worker runs this call, so without a timeout this would never end
            return inner[0].result(WAIT)
        finally:
            outer_ended.set()

    with ThreadPoolExecutor(max_workers=1, timeout=0.5) as executor:
        outer = executor.submit(wait_on_future)
        assert isinstance(outer.exception(WAIT), TaskTimeout)
        # the worker that replaced the stuck one ran the inner call, which freed the outer one
        assert inner[0].result(WAIT) == 25
        assert outer_ended.wait(WAIT)
        assert isinstance(outer.exception(0), TaskTimeout)  # its late result was discarded


def test_two_calls_waiting_on_each_other_time_out_instead_of_deadlocking() -> None:
    futures: dict[str, cf.Future[int]] = {}
    both_submitted = threading.Event()

    def wait_on(other: str, value: int) -> int:
        if not both_submitted.wait(WAIT):
            raise AssertionError("never submitted")
        futures[other].result(WAIT)  # each waits for the other: a deadlock without timeout
        return value

    with ThreadPoolExecutor(max_workers=2, timeout=0.5) as executor:
        futures["a"] = executor.submit(wait_on, "b", 5)
        futures["b"] = executor.submit(wait_on, "a", 6)
        both_submitted.set()
        _, not_done = cf.wait(futures.values(), timeout=WAIT)
        assert not not_done
        # the first to reach its deadline fails with TaskTimeout, and so does the other: it
        # either reaches its own deadline or receives that error from the first
        assert isinstance(futures["a"].exception(), TaskTimeout)
        assert isinstance(futures["b"].exception(), TaskTimeout)
        assert executor.submit(pow, 2, 2).result(WAIT) == 4
    stats = executor.statistics()
    assert stats.failed == 2
    assert stats.timed_out >= 1
