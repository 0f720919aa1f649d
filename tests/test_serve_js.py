"""`cio-sync serve` with the real JavaScript clients: Customer.io's and Segment's Node libraries send every call type
(batched) to a running server, and analytics.js (Segment's analytics-next and Customer.io's browser build) runs in
headless Chromium on a page of another origin (so CORS is in play); every call lands once, as sent.

The npm packages are pinned in tests/clients/package.json and installed by the noxfile's tests session, Chromium
from Debian's packages; without them these tests skip locally and fail in CI.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests import servers
from tests.helpers import as_object, published
from tests.servers import CLIENTS_DIR, SERVE_KEY, Served

#: What the Node script sends: [method, params] as the libraries take them. Enough tracks for several batches.
NODE_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("identify", {"userId": "u1", "traits": {"email": "ana@example.com", "plan": "pro"}}),
    ("track", {"userId": "u1", "event": "Order Completed", "properties": {"revenue": 42.5, "currency": "EUR"}}),
    ("page", {"userId": "u1", "category": "Docs", "name": "Install", "properties": {"path": "/docs/install"}}),
    ("screen", {"userId": "u1", "name": "Home", "properties": {"build": 7}}),
    ("group", {"userId": "u1", "groupId": "acme", "traits": {"name": "Acme", "employees": 12}}),
    ("alias", {"userId": "u1", "previousId": "anon-1"}),
    *[("track", {"anonymousId": "anon-2", "event": "Clicked", "properties": {"n": n}}) for n in range(40)],
]

#: The fields of a call that must land as sent.
FIELDS = ("type", "userId", "anonymousId", "event", "name", "category", "groupId", "previousId")
NESTED = ("properties", "traits")


def expected_row(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The published row's fields for one call as a Node library sends it."""
    row: dict[str, Any] = {field: params.get(field) for field in FIELDS}
    row["type"] = method
    row["properties"] = params.get("properties")
    row["traits"] = params.get("traits")
    if method == "page" and "category" in params:
        # Both Node libraries copy a page's category into its properties (shared/TESTING.md).
        row["properties"] = {**params["properties"], "category": params["category"]}
    return row


def as_sent(row: dict[str, Any]) -> dict[str, Any]:
    """A published row's fields, nested objects parsed back from their JSON text."""
    return {**{field: row.get(field) for field in FIELDS}, **{field: as_object(row.get(field)) for field in NESTED}}


def metric(url: str, series: str) -> float:
    """The sum of the running server's /metrics samples whose line starts with ``series``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))


def requests_answered(url: str, status: int) -> float:
    return metric(url, f'cio_sync_http_requests_total{{status="{status}"}} ')


def calls_accepted(url: str) -> float:
    return metric(url, "cio_sync_calls_accepted_total{")


@pytest.mark.parametrize("library", ["customerio", "segment"])
def test_the_real_node_clients_land_every_call_once_as_sent(tmp_path: Path, js_clients: Path, library: str) -> None:
    calls_file, report_file = tmp_path / "calls.json", tmp_path / "report.json"
    calls_file.write_bytes(orjson.dumps(NODE_CALLS))
    served = Served(tmp_path)
    try:
        env = {**os.environ, "NODE_PATH": str(js_clients), "CIO_SYNC_HOST": served.url,
               "CIO_SYNC_WRITE_KEY": SERVE_KEY}
        done = subprocess.run(["node", str(CLIENTS_DIR / "node_client.js"), library, str(calls_file),
                               str(report_file)], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        batches = requests_answered(served.url, 200)
    finally:
        assert served.stop() == 0
    report = orjson.loads(report_file.read_bytes())
    assert report["errors"] == []
    assert [r["error"] for r in report["results"]] == [None] * len(NODE_CALLS)
    sent = {r["messageId"]: expected_row(*NODE_CALLS[r["index"]]) for r in report["results"]}
    assert len(sent) == len(NODE_CALLS)  # one messageId per call
    rows = published(tmp_path / "advanced")
    assert Counter(r["messageId"] for r in rows) == Counter(list(sent))  # each call once
    assert {r["messageId"]: as_sent(r) for r in rows} == sent
    assert batches >= (len(NODE_CALLS) + 9) // 10  # the batch size held: at least 5 requests of at most 10 calls
    assert SERVE_KEY not in orjson.dumps(rows, default=str).decode()  # segment puts writeKey in each batch


# -- analytics.js in headless Chromium -----------------------------------------------------------------------------

#: Each browser library's npm package, whose UMD build (window.AnalyticsNext) the page loads.
BROWSER_PACKAGES = {"segment": "@segment/analytics-next", "customerio": "@customerio/cdp-analytics-browser"}


class _PageServer(http.server.ThreadingHTTPServer):
    """The page's origin: tests/clients/browser.html at /, its settings at /config.js (not in the page's URL, which
    analytics.js sends along with every call), the library's UMD bundle at /bundle.js, and POST /done for the page's
    report. Nothing else: a library that reached for a lazily loaded chunk would fail the test."""

    def __init__(self, bundle_dir: Path, config: dict[str, Any]) -> None:
        super().__init__(("127.0.0.1", 0), _PageHandler)
        self.bundle_dir = bundle_dir
        self.config = config
        self.report: dict[str, Any] | None = None
        self.reported = threading.Event()
        self.paths: list[str] = []

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _PageHandler(http.server.BaseHTTPRequestHandler):
    server: _PageServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.server.paths.append(path)
        if path == "/":
            self._answer(200, (CLIENTS_DIR / "browser.html").read_bytes(), "text/html")
        elif path == "/config.js":
            self._answer(200, b"window.cioSyncTest = " + orjson.dumps(self.server.config), "text/javascript")
        elif path == "/bundle.js":
            self._answer(200, (self.server.bundle_dir / "index.js").read_bytes(), "text/javascript")
        else:
            self._answer(404, b"not here", "text/plain")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self._answer(204, b"", "text/plain")
        if self.path == "/done":
            self.server.report = orjson.loads(body)
            self.server.reported.set()

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def page_server(bundle_dir: Path, config: dict[str, Any]) -> Iterator[_PageServer]:
    server = _PageServer(bundle_dir, config)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def browser_on_page(js_clients: Path, chromium: str, library: str, intake: str, *,
                    batching: bool = False) -> Iterator[_PageServer]:
    """The page, on its own origin, in headless Chromium, sending to ``intake`` (host:port); yields once the page
    has reported (its calls' promises resolved), while the browser still runs (it may still retry)."""
    config = {"library": library, "intake": intake, "writeKey": SERVE_KEY, "batching": batching}
    with (page_server(js_clients / BROWSER_PACKAGES[library] / "dist" / "umd", config) as pages,
          servers.headless_chromium(chromium, f"{pages.origin}/") as browser):
        deadline = time.monotonic() + 30
        while not pages.reported.wait(0.1) and time.monotonic() < deadline:
            assert browser.process.poll() is None, browser.log_tail()
        assert pages.report is not None, f"no report from the page within 30 s:\n{browser.log_tail()}"
        assert "fatal" not in pages.report, pages.report
        assert pages.report["errors"] == []
        yield pages
    # The page loaded its library from the page server alone: no lazily loaded chunk (and no CDN: Chromium resolves
    # no host name).
    assert set(pages.paths) <= {"/", "/config.js", "/bundle.js", "/favicon.ico"}, pages.paths


def assert_the_page_calls_landed(rows: list[dict[str, Any]], messageids: set[str], origin: str) -> None:
    by_id = {r["messageId"]: r for r in rows}
    assert len(rows) == len(by_id)  # each call once
    assert set(by_id) == messageids
    by_type = {r["type"]: r for r in rows}
    assert sorted(by_type) == ["identify", "page", "track"]
    assert {r["userId"] for r in rows} == {"u-browser-1"}
    assert len({r["anonymousId"] for r in rows}) == 1  # the browser's anonymous id, on every call
    assert as_object(by_type["identify"]["traits"]) == {"email": "browser@example.com"}
    assert (by_type["page"]["category"], by_type["page"]["name"]) == ("Docs", "Install")
    assert as_object(by_type["page"]["properties"])["section"] == "intake"
    assert by_type["track"]["event"] == "Button Clicked"
    assert as_object(by_type["track"]["properties"]) == {"button": "buy", "price": 9.5}
    for row in rows:
        assert as_object(row["context"])["page"]["url"].startswith(origin)  # sent from the page, on its origin
    assert SERVE_KEY not in orjson.dumps(rows, default=str).decode()  # analytics.js puts writeKey in every call


@pytest.mark.parametrize("library", ["segment", "customerio"])
def test_analytics_js_in_a_browser_on_another_origin_lands_its_calls(tmp_path: Path, js_clients: Path,
                                                                       chromium: str, library: str) -> None:
    served = Served(tmp_path)
    try:
        # The Customer.io build batches here (one POST to /v1/b), analytics-next sends each call to its route.
        with browser_on_page(js_clients, chromium, library, served.url.removeprefix("http://"),
                             batching=library == "customerio") as pages:
            preflights = requests_answered(served.url, 204)
    finally:
        assert served.stop() == 0
    assert pages.report is not None
    assert [r["failed"] for r in pages.report["results"]] == [None, None, None]
    # analytics-next sends Basic auth, so the browser asks first (a CORS preflight per route); the Customer.io
    # build sends text/plain with the key in the body, which needs none.
    assert (preflights > 0) == (library == "segment")
    assert_the_page_calls_landed(published(tmp_path / "advanced"), {r["messageId"] for r in pages.report["results"]},
                                 pages.origin)


@pytest.mark.parametrize("library", ["segment", "customerio"])
def test_analytics_js_retries_land_once_the_intake_is_up(tmp_path: Path, js_clients: Path, chromium: str,
                                                         library: str) -> None:
    # The page sends while nothing listens on the intake's port: every call fails and waits in the library's retry
    # queue. analytics-next retries with an X-Retry-Count header, which the browser sends only if the preflight
    # allows it. (Each call on its own route: the Customer.io build's batching retries only the call that filled the
    # batch, and its other calls are lost with the failed batch; docs/serve.md says so.)
    port = servers.free_port()
    with browser_on_page(js_clients, chromium, library, f"127.0.0.1:{port}") as pages:
        served = Served(tmp_path, "--port", str(port))
        try:
            deadline = time.monotonic() + 30
            while calls_accepted(served.url) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            assert served.stop() == 0
    assert pages.report is not None
    assert_the_page_calls_landed(published(tmp_path / "advanced"), {r["messageId"] for r in pages.report["results"]},
                                 pages.origin)
