"""`cio-sync serve` with the real client libraries: Customer.io's and Segment's Python clients send every call type
(batched, gzip on and off) to a running server; every call lands once, as sent. Plus SIGTERM (drain, publish, exit
0), kill -9 (every call that got a 200 is published after the restart), and the command line's errors.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

from tests.helpers import post, published
from tests.servers import SERVE_KEY, Served

KEY = SERVE_KEY


def send_all(client: Any) -> list[str]:
    """Every call type through ``client``; the messageIds it sent."""
    sent = [
        client.identify("u1", {"email": "ana@example.com", "plan": "pro"}),
        client.track("u1", "Order Completed", {"revenue": 42.5, "currency": "EUR"}),
        client.page("u1", "Docs", "Install", {"path": "/docs/install"}),
        client.screen("u1", "App", "Home", {"build": 7}),
        client.group("u1", "acme", {"name": "Acme", "employees": 12}),
        client.alias("anon-1", "u1"),
    ]
    for _ in range(40):  # enough to make the client send several batches
        sent.append(client.track("u2", "Clicked", {"n": 1}))
    client.flush()
    client.shutdown()
    return [msg["messageId"] for _, msg in sent]


@pytest.mark.parametrize("gzip", [False, True])
@pytest.mark.parametrize("library", ["customerio", "segment"])
def test_the_real_python_clients_land_every_call_once(tmp_path: Path, library: str, gzip: bool) -> None:
    served = Served(tmp_path)
    errors: list[Any] = []
    try:
        if library == "customerio":
            from customerio.analytics import Client as CioClient

            client: Any = CioClient(KEY, host=served.url, gzip=gzip, upload_size=10, max_retries=1,
                                    on_error=lambda e, batch: errors.append(e))
        else:
            from segment.analytics import Client as SegmentClient

            client = SegmentClient(KEY, host=served.url, gzip=gzip, upload_size=10, max_retries=1,
                                   on_error=lambda e, batch: errors.append(e))
        ids = send_all(client)
    finally:
        assert served.stop() == 0
    assert errors == []
    rows = published(tmp_path / "advanced")
    assert Counter(r["messageId"] for r in rows) == Counter(ids)
    by_type = Counter(r["type"] for r in rows)
    assert by_type == {"identify": 1, "track": 41, "page": 1, "screen": 1, "group": 1, "alias": 1}
    [identify] = [r for r in rows if r["type"] == "identify"]
    assert orjson.loads(identify["traits"]) == {"email": "ana@example.com", "plan": "pro"}
    assert KEY not in orjson.dumps(rows, default=str).decode()


def _post(url: str, payload: Any, key: str = KEY) -> int | None:
    return post(url, payload, key)


def test_every_call_that_got_a_200_survives_a_kill_9(tmp_path: Path) -> None:
    served = Served(tmp_path)
    acked: list[str] = []
    try:
        for batch in range(30):
            calls = [{"type": "track", "userId": "u", "event": "E", "messageId": f"m-{batch}-{i}"} for i in range(20)]
            if _post(served.url, {"batch": calls}) == 200:
                acked += [c["messageId"] for c in calls]
    finally:
        assert served.stop(signal.SIGKILL) == -signal.SIGKILL  # nothing published, nothing flushed
    assert len(acked) == 600
    again = Served(tmp_path)
    assert again.stop() == 0
    assert Counter(r["messageId"] for r in published(tmp_path / "advanced")) == Counter(acked)


def test_wrong_key_and_operations_over_http(tmp_path: Path) -> None:
    served = Served(tmp_path)
    try:
        assert _post(served.url, {"batch": [{"type": "track", "userId": "u", "event": "E"}]}, key="nope") == 401
        with urllib.request.urlopen(f"{served.url}/ready", timeout=10) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"{served.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert 'cio_sync_http_requests_total{status="401"} 1.0' in text
    finally:
        assert served.stop(signal.SIGINT) == 0
    logged = served.log.read_text()
    assert "listening" not in logged or KEY not in logged
    assert KEY not in logged


@pytest.mark.parametrize(("args", "words"), [
    (["--spool-dir", "x"], "write key"),
    (["--spool-dir", "x", "--write-key", KEY], "--advanced URL, --standard URL"),
    (["--spool-dir", "x", "--write-key", KEY, "--standard", "y"], "--workspace-id"),
    (["--spool-dir", "x", "--write-key", KEY, "--advanced", "y", "--header-timeout", "0"], "--header-timeout"),
    (["--spool-dir", "x", "--write-key", KEY, "--advanced", "y", "--dedupe-hours", "-1"], "--dedupe-hours"),
    (["--write-key", KEY, "--advanced", "y"], "--spool-dir"),
    (["--write-key", KEY, "--nats", "nats://127.0.0.1:1"], "--stream NAME"),
    (["--write-key", KEY, "--nats", "nats://127.0.0.1:1", "--stream", "s", "--advanced", "y"], "leave out"),
    (["--write-key", KEY, "--spool-dir", "x", "--advanced", "y", "--stream", "s"], "--stream goes with --nats"),
    (["--write-key", KEY, "--nats", "nats://127.0.0.1:1", "--stream", "s", "--partitions", "0"], "--partitions"),
])
def test_serve_explains_a_bad_command_line_in_one_line(tmp_path: Path, args: list[str], words: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CIO_SYNC_WRITE_KEYS"}
    args = [str(tmp_path / a) if a in ("x", "y") else a for a in args]
    done = subprocess.run([sys.executable, "-m", "cio_sync.cli", "serve", *args], capture_output=True, text=True,
                          check=False,
                          env=env, timeout=60)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("cio-sync: error:")
    assert words in line


def test_a_port_in_use_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    served = Served(tmp_path / "one")
    (tmp_path / "two").mkdir()
    try:
        port = served.url.rsplit(":", 1)[1]
        env = {**os.environ, "CIO_SYNC_WRITE_KEYS": KEY}
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "cio_sync.cli", "serve", "--advanced", str(tmp_path / "two"),
                               "--spool-dir", str(tmp_path / "two-spool"), "--port", port],
                              capture_output=True, text=True, env=env, timeout=60, check=False)
        assert time.monotonic() - start < 60
        assert done.returncode == 1
        [line] = done.stderr.strip().splitlines()
        assert line == (f"cio-sync: error: cannot listen on 127.0.0.1:{port}: Address already in use; choose another "
                        "--port or --host")
    finally:
        assert served.stop() == 0


def test_a_client_that_never_finishes_its_body_gets_408_and_others_are_answered(tmp_path: Path) -> None:
    served = Served(tmp_path, "--body-timeout", "1")
    try:
        host, port = served.url.removeprefix("http://").rsplit(":", 1)
        auth = base64.b64encode(f"{KEY}:".encode())
        with socket.create_connection((host, int(port)), timeout=30) as slow:
            slow.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Basic " + auth + b"\r\nContent-Length: 1000\r\n\r\n{\"batch\": [")
            # Meanwhile another client is answered.
            assert _post(served.url, {"batch": [{"type": "track", "userId": "u", "event": "E"}]}) == 200
            answer = b""
            while b"request_timeout" not in answer:  # the head and the body may come in separate reads
                piece = slow.recv(4096)
                if not piece:
                    break
                answer += piece
        assert answer.startswith(b"HTTP/1.1 408")
        assert b'"code":"request_timeout"' in answer
    finally:
        assert served.stop() == 0


def test_a_client_that_never_finishes_its_head_is_cut_off_and_others_are_answered(tmp_path: Path) -> None:
    """A slowloris: one connection sends half a request head and stops, another sends nothing at all. Both are
    closed after --header-timeout (the first with a 408 and a JSON body), and the server answers others meanwhile."""
    served = Served(tmp_path, "--header-timeout", "1")
    try:
        host, port = served.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as half, \
                socket.create_connection((host, int(port)), timeout=30) as silent:
            half.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
            assert _post(served.url, {"batch": [{"type": "track", "userId": "u", "event": "E"}]}) == 200
            answer = b""
            while piece := half.recv(4096):  # until the server closes it
                answer += piece
            assert silent.recv(4096) == b""  # closed without a word: it never began a request
        assert answer.startswith(b"HTTP/1.1 408")
        assert b'"code":"request_timeout"' in answer
    finally:
        assert served.stop() == 0


def test_the_invalid_calls_of_a_batch_are_in_the_dead_letters_with_their_reasons(tmp_path: Path) -> None:
    served = Served(tmp_path)
    calls = [{"type": "track", "userId": "u", "event": "Ok", "messageId": "good-1"},
             {"type": "track", "userId": "u", "messageId": "no-event"},  # a track needs its event
             {"type": "identify", "messageId": "no-ids", "traits": {"a": 1}}]  # and an identify an id
    try:
        assert post(served.url, {"batch": calls, "writeKey": KEY}, KEY) == 200
    finally:
        assert served.stop() == 0
    assert [r["messageId"] for r in published(tmp_path / "advanced")] == ["good-1"]
    letters = [orjson.loads(line) for p in sorted((tmp_path / "advanced" / "_cio_sync").rglob("*.jsonl"))
               for line in p.read_text().splitlines()]
    kept = {letter["input"]["messageId"]: letter["reason"] for letter in letters if "input" in letter}
    assert set(kept) == {"no-event", "no-ids"}, letters
    assert "event" in kept["no-event"]
    assert KEY not in orjson.dumps(letters).decode()  # the batch's writeKey is never kept


def test_both_modes_behind_one_intake(tmp_path: Path) -> None:
    served = Served(tmp_path, "--standard", str(tmp_path / "standard"), "--workspace-id", "111528", "--state",
                    str(tmp_path / "ws.sqlite"))
    try:
        calls = [{"type": "identify", "userId": "ana", "traits": {"email": "ana@example.com", "plan": "pro"}},
                 {"type": "identify", "userId": "ana", "traits": {"plan": "pro"}},  # changes nothing
                 {"type": "track", "userId": "ana", "event": "Signed Up"}]
        assert _post(served.url, {"batch": calls}) == 200
    finally:
        assert served.stop() == 0
    assert Counter(r["type"] for r in published(tmp_path / "advanced")) == {"identify": 2, "track": 1}
    standard = tmp_path / "standard"
    [people] = [r for p in standard.glob("people_v4_111528_*.parquet") for r in pq.read_table(p).to_pylist()]
    assert (people["customer_id"], people["email_addr"]) == ("ana", "ana@example.com")
    attributes = sorted((r["attribute_name"], r["attribute_value"]) for p in standard.glob("attributes_v4_*.parquet")
                        for r in pq.read_table(p).to_pylist())
    assert attributes == [("email", "ana@example.com"), ("plan", "pro")]


def test_ten_thousand_idle_connections_do_not_stop_the_server_answering_others(tmp_path: Path) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 10_500:
        pytest.skip(f"the open-files limit is {hard}: 10,000 connections need more (ulimit -n)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20_000)) if hard != resource.RLIM_INFINITY
                                                else max(soft, 20_000), hard))
    served = Served(tmp_path)  # inherits the limit
    held: list[socket.socket] = []
    try:
        host, port = served.url.removeprefix("http://").rsplit(":", 1)
        for _ in range(10_000):
            conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            conn.settimeout(30)
            conn.connect((host, int(port)))
            held.append(conn)
        assert _post(served.url, {"batch": [{"type": "track", "userId": "u", "event": "E"}]}) == 200
        with urllib.request.urlopen(f"{served.url}/health", timeout=30) as response:
            assert response.status == 200
    finally:
        for conn in held:
            conn.close()
        assert served.stop() == 0
    assert len(published(tmp_path / "advanced")) == 1
