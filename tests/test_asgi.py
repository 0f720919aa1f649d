"""The HTTP intake as an ASGI application, driven in process: routes, auth, limits, encodings, errors, CORS.

Each test sends requests the way an ASGI server hands them over (scope, body chunks) and asserts what a client
sees (status, JSON body, headers) and what the sink then publishes.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
from pathlib import Path
from typing import Any

import orjson
import pytest

import cio_sync
from cio_sync.asgi import Limits, app
from cio_sync.testing import MemoryWriter

KEY = "wk_test_0123456789"
AUTH = (b"authorization", b"Basic " + base64.b64encode(KEY.encode() + b":"))


class Response:
    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return orjson.loads(self.body)


def request(application: Any, method: str, path: str, body: bytes = b"", *,
            headers: list[tuple[bytes, bytes]] | None = None, chunks: int = 1, stall: bool = False) -> Response:
    """One request through ``application``, its body in ``chunks`` pieces (``stall``: the body never ends)."""
    scope = {"type": "http", "method": method, "path": path, "headers": headers or [], "query_string": b""}
    size = max(1, -(-len(body) // chunks))
    pieces = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pieces:
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces) or stall}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(application(scope, receive, send))
    start, end = sent
    return Response(start["status"], dict(start["headers"]), end["body"])


def post(application: Any, path: str, payload: Any, headers: list[tuple[bytes, bytes]] | None = None,
         **kwargs: Any) -> Response:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return request(application, "POST", path, body, headers=[AUTH, (b"content-type", b"application/json"),
                                                             *(headers or [])], **kwargs)


@pytest.fixture
def writer() -> MemoryWriter:
    return MemoryWriter()


@pytest.fixture
def sink(writer: MemoryWriter) -> cio_sync.AdvancedSink:
    return cio_sync.AdvancedSink(writer, flush_interval=None, keep_rejected=True)


def published(sink: cio_sync.AdvancedSink, writer: MemoryWriter) -> list[dict[str, Any]]:
    sink.flush()
    return writer.rows()


def call(n: int, kind: str = "track") -> dict[str, Any]:
    base: dict[str, Any] = {"type": kind, "userId": f"u{n}", "messageId": f"m-{n}"}
    if kind == "track":
        base["event"] = "Clicked"
    if kind == "alias":
        base["previousId"] = f"anon-{n}"
    if kind == "group":
        base["groupId"] = "acme"
    return base


def test_a_batch_is_accepted_and_published(sink: cio_sync.AdvancedSink, writer: MemoryWriter) -> None:
    intake = app(sink, write_keys={KEY: "web"})
    response = post(intake, "/v1/batch", {"batch": [call(i) for i in range(5)], "sentAt": "2026-12-02T10:00:00Z",
                                          "writeKey": KEY})
    assert (response.status, response.json()) == (200, {"success": True})
    rows = published(sink, writer)
    assert sorted(r["messageId"] for r in rows) == [f"m-{i}" for i in range(5)]
    assert all("writeKey" not in (r.get("extra") or "") for r in rows)


@pytest.mark.parametrize(("path", "kind"), [
    ("/v1/identify", "identify"), ("/v1/i", "identify"), ("/v1/track", "track"), ("/v1/t", "track"),
    ("/v1/page", "page"), ("/v1/p", "page"), ("/v1/screen", "screen"), ("/v1/s", "screen"),
    ("/v1/group", "group"), ("/v1/g", "group"), ("/v1/alias", "alias"), ("/v1/a", "alias"),
])
def test_each_call_route_takes_its_type(sink: cio_sync.AdvancedSink, writer: MemoryWriter, path: str,
                                        kind: str) -> None:
    intake = app(sink, write_keys=[KEY])
    given = call(1, kind)
    del given["type"]  # the route says what it is
    assert post(intake, path, given).status == 200
    [row] = published(sink, writer)
    assert (row["type"], row["messageId"]) == (kind, "m-1")


def test_analytics_js_text_plain_with_the_key_in_the_body(sink: cio_sync.AdvancedSink, writer: MemoryWriter) -> None:
    intake = app(sink, write_keys=[KEY])
    body = orjson.dumps({**call(1), "writeKey": KEY})
    response = request(intake, "POST", "/v1/t", body, headers=[(b"content-type", b"text/plain"),
                                                                (b"origin", b"https://shop.example.com")])
    assert response.status == 200
    assert response.headers[b"access-control-allow-origin"] == b"*"
    [row] = published(sink, writer)
    assert "writeKey" not in orjson.dumps(row).decode()


def test_a_cors_preflight_is_answered(sink: cio_sync.AdvancedSink) -> None:
    intake = app(sink, write_keys=[KEY], cors_origins=["https://shop.example.com"])
    response = request(intake, "OPTIONS", "/v1/batch", headers=[(b"origin", b"https://shop.example.com")])
    assert response.status == 204
    assert response.headers[b"access-control-allow-origin"] == b"https://shop.example.com"
    assert b"content-encoding" in response.headers[b"access-control-allow-headers"]
    assert b"x-retry-count" in response.headers[b"access-control-allow-headers"]  # analytics-next's retries send it
    other = request(intake, "OPTIONS", "/v1/batch", headers=[(b"origin", b"https://evil.example.com")])
    assert b"access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("headers", [
    [],
    [(b"authorization", b"Basic " + base64.b64encode(b"wrong:"))],
    [(b"authorization", b"Bearer nope")],
    [(b"authorization", b"Basic !!!")],
])
def test_a_missing_or_wrong_key_is_401_with_a_code(sink: cio_sync.AdvancedSink, writer: MemoryWriter,
                                                    headers: list[tuple[bytes, bytes]]) -> None:
    intake = app(sink, write_keys=[KEY])
    response = request(intake, "POST", "/v1/batch", orjson.dumps({"batch": [call(1)]}), headers=headers)
    assert response.status == 401
    assert response.json()["code"] == "unauthorized"
    assert KEY not in response.body.decode()
    assert published(sink, writer) == []


def test_a_bearer_key_and_a_key_of_another_label_are_taken(sink: cio_sync.AdvancedSink) -> None:
    intake = app(sink, write_keys={KEY: "web", "other": "backend"})
    assert request(intake, "POST", "/v1/track", orjson.dumps(call(1)),
                   headers=[(b"authorization", b"Bearer other")]).status == 200


def test_gzip_bodies_are_taken_and_a_bomb_is_cut_off(sink: cio_sync.AdvancedSink, writer: MemoryWriter) -> None:
    intake = app(sink, write_keys=[KEY])
    body = gzip.compress(orjson.dumps({"batch": [call(i) for i in range(3)]}))
    assert post(intake, "/v1/batch", body, [(b"content-encoding", b"gzip")]).status == 200
    assert len(published(sink, writer)) == 3
    bomb = gzip.compress(b" " * (200 * 1024 * 1024))  # 200 MB of spaces in ~200 KB
    assert len(bomb) < Limits().request_bytes
    response = post(intake, "/v1/batch", bomb, [(b"content-encoding", b"gzip")])
    assert (response.status, response.json()["code"]) == (413, "request_too_large")
    assert "decompressed" in response.json()["message"]
    broken = post(intake, "/v1/batch", body[:-10], [(b"content-encoding", b"gzip")])
    assert (broken.status, broken.json()["code"]) == (400, "malformed_gzip")
    assert post(intake, "/v1/batch", body, [(b"content-encoding", b"br")]).status == 415


def test_limits_are_400_or_413_and_say_which(sink: cio_sync.AdvancedSink, writer: MemoryWriter) -> None:
    intake = app(sink, write_keys=[KEY])
    big = post(intake, "/v1/batch", b"{" + b" " * (600 * 1024) + b"}", chunks=7)
    assert (big.status, big.json()["code"]) == (413, "request_too_large")
    many = post(intake, "/v1/batch", {"batch": [call(i) for i in range(2501)]})
    assert (many.status, many.json()["code"]) == (400, "too_many_calls")
    assert "2,500" in many.json()["message"]
    huge = {**call(1), "properties": {"blob": "x" * (33 * 1024)}}
    one = post(intake, "/v1/track", huge)
    assert (one.status, one.json()["code"]) == (400, "call_too_large")
    # In a batch, the call over the limit is refused and the others are kept.
    mixed = post(intake, "/v1/batch", {"batch": [call(1), huge, call(2)]})
    assert mixed.status == 200
    assert (mixed.json()["refused"], mixed.json()["errors"][0]["index"]) == (1, 1)
    assert sorted(r["messageId"] for r in published(sink, writer)) == ["m-1", "m-2"]
    assert sink.stats.calls_rejected == 2


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "malformed_json"), (b"", "malformed_json"), (b"[1, 2]", "invalid_body"),
    (b'{"sentAt": "x"}', "invalid_body"), (b'{"batch": {}}', "invalid_body"),
])
def test_bodies_that_are_not_a_batch_are_400_with_the_reason(sink: cio_sync.AdvancedSink, body: bytes,
                                                             code: str) -> None:
    response = post(app(sink, write_keys=[KEY]), "/v1/batch", body)
    assert (response.status, response.json()["code"]) == (400, code)
    assert response.json()["message"]


def test_invalid_calls_of_a_batch_are_refused_and_the_valid_ones_kept(sink: cio_sync.AdvancedSink,
                                                                      writer: MemoryWriter) -> None:
    intake = app(sink, write_keys=[KEY])
    response = post(intake, "/v1/batch", {"batch": [call(1), {"type": "track", "userId": "u"}, call(2),
                                                    {"type": "nope"}]})
    assert response.status == 200
    body = response.json()
    assert (body["success"], body["accepted"], body["refused"]) == (True, 2, 2)
    assert [e["index"] for e in body["errors"]] == [1, 3]
    assert all(e["code"] == "invalid_call" and e["message"] for e in body["errors"])
    assert sorted(r["messageId"] for r in published(sink, writer)) == ["m-1", "m-2"]
    # Every call refused: 400, with the first reason.
    bad = post(intake, "/v1/batch", {"batch": [{"type": "nope"}]})
    assert (bad.status, bad.json()["code"]) == (400, "invalid_call")
    # A call of one type sent to another's route.
    wrong = post(intake, "/v1/identify", call(3, "track"))
    assert (wrong.status, wrong.json()["code"]) == (400, "invalid_call")


def test_a_body_that_never_ends_times_out_with_408(sink: cio_sync.AdvancedSink) -> None:
    intake = app(sink, write_keys=[KEY], limits=Limits(body_timeout=0.2))
    response = post(intake, "/v1/batch", {"batch": [call(1)]}, stall=True)
    assert (response.status, response.json()["code"]) == (408, "request_timeout")


def test_routes_methods_and_operations(sink: cio_sync.AdvancedSink) -> None:
    intake = app(sink, write_keys=[KEY])
    assert request(intake, "GET", "/health").status == 200
    assert request(intake, "GET", "/ready").json() == {"status": "ready"}
    missing = request(intake, "POST", "/v2/batch", b"{}", headers=[AUTH])
    assert (missing.status, missing.json()["code"]) == (404, "not_found")
    assert request(intake, "GET", "/v1/batch").status == 405
    metrics = request(intake, "GET", "/metrics")
    assert metrics.status == 200
    assert b"cio_sync_http_requests_total" in metrics.body


def test_metrics_count_calls_by_label_and_refusals_by_reason(sink: cio_sync.AdvancedSink) -> None:
    intake = app(sink, write_keys={KEY: "web"})
    post(intake, "/v1/batch", {"batch": [call(1), {"type": "nope"}]})
    request(intake, "POST", "/v1/batch", b"{}", headers=[])
    text = request(intake, "GET", "/metrics").body.decode()
    assert 'cio_sync_calls_accepted_total{source="web"} 1.0' in text
    assert 'cio_sync_calls_refused_total{reason="invalid_call"} 1.0' in text
    assert 'cio_sync_calls_refused_total{reason="unauthorized"} 1.0' in text
    assert 'cio_sync_http_requests_total{status="401"} 1.0' in text
    assert KEY not in text


def test_a_closed_sink_or_a_draining_intake_answers_503_with_retry_after(sink: cio_sync.AdvancedSink) -> None:
    intake = app(sink, write_keys=[KEY], retry_after=7)
    asyncio.run(intake.drain())
    response = post(intake, "/v1/track", call(1))
    assert (response.status, response.headers[b"retry-after"]) == (503, b"7")
    assert request(intake, "GET", "/ready").status == 503
    closed = cio_sync.AdvancedSink(MemoryWriter(), flush_interval=None)
    closed.close()
    assert post(app(closed, write_keys=[KEY]), "/v1/track", call(1)).status == 503


def test_a_full_buffer_with_storage_down_is_503_not_a_drop(tmp_path: Path) -> None:
    class Down(MemoryWriter):
        def publish(self, name: str, data: bytes, **kwargs: Any) -> Any:
            raise cio_sync.StorageError("storage is down")

    sink = cio_sync.AdvancedSink(Down(), flush_interval=None, max_rows=1, max_buffer_bytes=64 * 1024,
                                 when_full="block", block_timeout=0.05)
    intake = app(sink, write_keys=[KEY])
    statuses = [post(intake, "/v1/batch", {"batch": [{**call(i), "properties": {"pad": "x" * 2000}}
                                                     for i in range(k * 20, k * 20 + 20)]}).status
                for k in range(10)]
    assert 503 in statuses
    assert set(statuses) <= {200, 503}


def test_write_keys_are_required() -> None:
    with pytest.raises(ValueError, match="at least one write key"):
        app(cio_sync.AdvancedSink(MemoryWriter(), flush_interval=None), write_keys=[])
