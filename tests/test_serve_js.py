"""`cio-sync serve` with the real JavaScript clients: Customer.io's and Segment's Node libraries send every call type
(batched) to a running server; every call lands once, as sent.

The npm packages are pinned in tests/clients/package.json and installed by the noxfile's tests session; without
them these tests skip locally and fail in CI.
"""

from __future__ import annotations

import os
import subprocess
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

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
