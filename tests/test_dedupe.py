"""The dedupe window: a client's retry of calls the sink already took lands once (``dedupe_window=``,
``cio-sync serve --dedupe-hours``).

What a user sees: the published files hold each ``messageId`` once however often the call was sent, whether its first
copy was still in the spool, published, or left in the spool by a kill -9 in the middle of a batch; the window
survives restarts; a full disk under the window's file stops publishing (nothing lost, nothing twice) until space
returns. The sweep kills a sink at every kind of write point of a run that writes, publishes and writes again
(sampled: ``CIO_SYNC_FAULT_POINTS`` points, 12 by default), then retries every call ever sent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

import cio_sync
from cio_sync.buffer.seen import FILE_NAME, MessageIdWindow
from tests import faults
from tests.fault_scenarios import _call, read_log
from tests.faults import EIO, ENOSPC, published_ids
from tests.helpers import post

DAY = 86400


def call(i: int, tag: str = "m") -> dict[str, Any]:
    return {"type": "track", "userId": f"u{i % 5}", "event": "E", "messageId": f"{tag}{i}", "properties": {"i": i}}


def open_sink(tmp_path: Path, **options: Any) -> cio_sync.AdvancedSink:
    options.setdefault("dedupe_window", DAY)
    return cio_sync.AdvancedSink(str(tmp_path / "target"), spool_dir=tmp_path / "spool", flush_interval=None, **options)


# -- in one process ------------------------------------------------------------------------------------------------


def test_a_retry_lands_once_whether_its_first_copy_waits_or_was_published(tmp_path: Path) -> None:
    with open_sink(tmp_path) as sink:
        for i in range(10):
            sink.write(call(i))
        for i in range(10):  # the first copies wait in the spool
            assert sink.write(call(i)) == f"m{i}"
        sink.flush()
        for i in range(5, 15):  # half published, half new
            sink.write(call(i))
        assert sink.stats.calls_duplicate == 15
        assert sink.stats.calls_accepted == 15
    assert published_ids(tmp_path / "target") == Counter(f"m{i}" for i in range(15))


def test_the_window_is_kept_across_restarts_in_the_spool_directory(tmp_path: Path) -> None:
    with open_sink(tmp_path) as sink:
        for i in range(6):
            sink.write(call(i))
    assert (tmp_path / "spool" / FILE_NAME).exists()
    with open_sink(tmp_path) as again:
        for i in range(10):
            again.write(call(i))
        assert again.stats.calls_duplicate == 6
    assert published_ids(tmp_path / "target") == Counter(f"m{i}" for i in range(10))


def test_without_a_window_a_retry_lands_twice(tmp_path: Path) -> None:
    """What the window is for: the default sink takes every call it is given."""
    with open_sink(tmp_path, dedupe_window=None) as sink:
        sink.write(call(1))
        sink.write(call(1))
        assert sink.stats.calls_duplicate == 0
    assert published_ids(tmp_path / "target") == Counter({"m1": 2})


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_calls_recovered_from_the_spool_are_in_the_window(tmp_path: Path, fmt: str) -> None:
    """A crash leaves calls in the spool: after the restart their ids are known before anything is published."""
    from tests.test_spool_faults import abandon

    sink = open_sink(tmp_path, format=fmt)
    for i in range(8):
        sink.write(call(i))
    abandon(sink)  # as a kill -9: nothing published, the spool left as it is
    with open_sink(tmp_path, format=fmt) as again:
        for i in range(12):
            again.write(call(i))
        assert again.stats.calls_duplicate == 8
    assert published_ids(tmp_path / "target") == Counter(f"m{i}" for i in range(12))


def test_a_pipeline_drops_a_retry_in_its_advanced_sink(tmp_path: Path) -> None:
    advanced = open_sink(tmp_path)
    standard = cio_sync.StandardSink(str(tmp_path / "standard"), workspace_id=3, flush_interval=None)
    with cio_sync.Pipeline(advanced=advanced, standard=standard) as both:
        for _ in range(3):
            both.write({"type": "identify", "userId": "u1", "messageId": "id-1", "traits": {"plan": "pro"}})
        assert advanced.stats.calls_duplicate == 2
    assert published_ids(tmp_path / "target") == Counter({"id-1": 1})


def test_ids_past_the_window_are_forgotten(tmp_path: Path) -> None:
    now = [1_000_000.0]
    window = MessageIdWindow(tmp_path / FILE_NAME, timedelta(hours=24), clock=lambda: now[0])
    window.hold(["a", "b"])
    assert window.seen("a")
    assert not window.seen("c")
    window.keep(window.snapshot())
    assert window.held == 0
    assert window.kept() == 2
    assert window.seen("b")
    now[0] += 24 * 3600 - 1
    assert window.seen("a")
    now[0] += 2
    assert not window.seen("a")
    window.hold(["c"])
    window.keep(window.snapshot())  # and the expired ones are deleted as new ones are kept
    assert window.kept() == 1
    window.close()


def test_a_prefetch_of_a_batch_answers_like_the_file_and_a_keep_in_between_is_not_missed(tmp_path: Path) -> None:
    import threading

    window = MessageIdWindow(tmp_path / FILE_NAME, DAY)
    long_id = "x" * 200  # kept as a digest
    window.hold(["a", long_id])
    window.keep(window.snapshot())
    with window.prefetched(["a", "b", long_id, "é" * 40]):
        assert window.seen("a")
        assert window.seen(long_id)
        assert not window.seen("b")
        assert not window.seen("é" * 40)

        def elsewhere() -> None:  # another request takes "b" and its publishing round keeps it
            window.hold(["b"])
            window.keep(window.snapshot())

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert window.seen("b")  # the prefetch is older than that keep: the file is asked again
    assert window.seen("b")
    window.close()


def test_an_intake_batch_with_retried_calls_lands_once(tmp_path: Path) -> None:
    """Through the ASGI application: a batch whose calls the sink already has in part (spooled, or published)."""
    import asyncio

    from cio_sync.asgi import app

    sink = open_sink(tmp_path)
    intake = app(sink, write_keys={"k": "test"})

    async def post(calls: list[dict[str, Any]]) -> int:
        body = orjson.dumps({"batch": calls, "writeKey": "k"})
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await intake({"type": "http", "method": "POST", "path": "/v1/batch", "headers": []}, receive, send)
        return int(sent[0]["status"])

    assert asyncio.run(post([call(i) for i in range(5)])) == 200
    sink.flush()
    assert asyncio.run(post([call(i) for i in range(3, 9)])) == 200  # 3 and 4 published, the rest new
    assert asyncio.run(post([call(i) for i in range(7, 12)])) == 200  # 7 and 8 in the spool
    sink.close()
    assert published_ids(tmp_path / "target") == Counter(f"m{i}" for i in range(12))
    assert sink.stats.calls_duplicate == 4


@pytest.mark.parametrize("window", [0, -1, "24h", True])
def test_a_bad_window_is_refused_by_name(tmp_path: Path, window: Any) -> None:
    with pytest.raises(cio_sync.ConfigError, match="dedupe_window"):
        open_sink(tmp_path, dedupe_window=window)


def test_a_custom_sink_needs_a_message_id_column_for_a_window(tmp_path: Path) -> None:
    import pyarrow as pa

    class Orders(cio_sync.BufferedSink):
        tables = {"orders": pa.schema([("order_id", pa.string())])}
        layout = "{table}.{position}.{ext}"

        def route(self, call: Any) -> Any:
            yield "orders", {"order_id": call.data.get("event")}

    with pytest.raises(cio_sync.ConfigError, match=r"message_id .*column.*orders"):
        Orders(str(tmp_path / "out"), dedupe_window=DAY)


def _standard(tmp_path: Path, **options: Any) -> cio_sync.StandardSink:
    options.setdefault("dedupe_window", DAY)
    return cio_sync.StandardSink(str(tmp_path / "standard"), workspace_id=3, state=str(tmp_path / "state.sqlite"),
                                 flush_interval=None, **options)


def _plans(tmp_path: Path) -> list[str]:
    """The values of the trait ``plan`` in the published attribute changes, in order."""
    import pyarrow.parquet as pq

    return [row["attribute_value"] for path in sorted((tmp_path / "standard").glob("attributes_*.parquet"))
            for row in pq.read_table(path).to_pylist() if row["attribute_name"] == "plan"]


def test_a_standard_retry_after_a_later_change_does_not_undo_it(tmp_path: Path) -> None:
    """A client retries an identify it sent before a newer one: applied again, it would put the old value back."""
    first = {"type": "identify", "userId": "u1", "messageId": "a", "traits": {"plan": "pro"}}
    second = {"type": "identify", "userId": "u1", "messageId": "b", "traits": {"plan": "free"}}
    with _standard(tmp_path) as sink:
        assert sink.write(first) > 0  # the person and their attribute
        assert sink.write(second) == 1
        assert sink.write(first) == 0
        assert sink.stats.calls_duplicate == 1
        assert sink.stats.calls_accepted == 2
    with _standard(tmp_path) as again:  # the window is in the state file: it outlives the process
        assert again.write(first) == 0
        assert again.stats.calls_duplicate == 1
    assert _plans(tmp_path) == ["pro", "free"]


def test_without_a_window_the_standard_sink_applies_a_retry_again(tmp_path: Path) -> None:
    first = {"type": "identify", "userId": "u1", "messageId": "a", "traits": {"plan": "pro"}}
    second = {"type": "identify", "userId": "u1", "messageId": "b", "traits": {"plan": "free"}}
    with _standard(tmp_path, dedupe_window=None) as sink:
        for call_ in (first, second, first):
            sink.write(call_)
    assert _plans(tmp_path) == ["pro", "free", "pro"]


# -- under faults ---------------------------------------------------------------------------------------------------


def _paths(tmp_path: Path) -> dict[str, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return {"target": str(tmp_path / "target"), "spool": str(tmp_path / "spool"), "log": str(tmp_path / "log")}


def _retry_everything(paths: dict[str, str], sent: int) -> None:
    """The clients' view after a crash: every call they ever sent is sent again (an answer may have been lost)."""
    with cio_sync.AdvancedSink(paths["target"], spool_dir=paths["spool"], flush_interval=None,
                               dedupe_window=DAY) as sink:
        for i in range(sent):
            sink.write(_call("advanced", f"c{i}", i))


#: A run that writes, publishes (early cuts at max_rows=4, and a flush), and writes again: every kind of write point.
_STEPS: list[list[Any]] = [["open"], ["write", 10], ["flush"], ["write", 7], ["flush"], ["write", 3], ["exit"]]
_SENT = 20


def _sweep_points(total: int) -> list[int]:
    wanted = int(os.environ.get("CIO_SYNC_FAULT_POINTS", "12"))
    if wanted >= total:
        return list(range(1, total + 1))
    return sorted({1 + (total - 1) * k // (wanted - 1) for k in range(wanted)})


def test_kill_9_at_any_write_point_then_retrying_every_call_lands_each_once(faultfs: Path, tmp_path: Path) -> None:
    options = {"dedupe_window": DAY, "max_rows": 4}
    clean = tmp_path / "clean"
    done = faults.run_child("drive", "advanced", _paths(clean), _STEPS, options, prefix=clean)
    assert done.result is not None, done.stderr
    assert done.result["errors"] == []
    probe = tmp_path / "probe"
    counted = faults.run_child("tests.test_dedupe:count_ops", _paths(probe), options, "advanced", _STEPS[:-1],
                               prefix=probe)
    total = counted.result["all"]
    assert total > 50, counted.result  # spool, window file and target writes of one run
    killed = 0
    for point in _sweep_points(total):
        folder = tmp_path / f"kill-{point}"
        trial = faults.run_child("drive", "advanced", _paths(folder), _STEPS, options, prefix=folder,
                                 ops="all", nth=point, kill="before")
        killed += trial.killed
        log = read_log(str(folder / "log"))
        _retry_everything(_paths(folder), _SENT)
        ids = published_ids(folder / "target")
        assert {i: n for i, n in ids.items() if n != 1} == {}, (point, trial.returncode, trial.stderr)
        assert set(ids) == {f"c{i}" for i in range(_SENT)}, (point, log)
    assert killed >= len(_sweep_points(total)) - 1  # each point is a kill (the last may be past the run's end)


def count_ops(paths: dict[str, str], options: dict[str, Any], mode: str = "advanced",
              steps: list[list[Any]] | None = None) -> dict[str, int]:
    """In a faultfs child: the write points of one clean run of ``steps`` (:data:`_STEPS` without its exit)."""
    from tests.fault_scenarios import drive

    injector = faults.faults()
    injector.reset_totals()
    drive(mode, paths, steps or _STEPS[:-1], options)
    totals = injector.totals()
    return {**totals, "all": sum(totals.values())}


def test_standard_kill_9_at_any_write_point_then_retrying_every_call_changes_each_once(faultfs: Path,
                                                                                      tmp_path: Path) -> None:
    """Each identify sets the trait ``n`` to its own id (tests/fault_scenarios.py), so each applied once makes one
    attributes row: killed at any write of the state, then every call sent again, each id is published once."""
    from tests.test_state_faults import changes

    options = {"dedupe_window": DAY, "max_rows": 4}
    steps: list[list[Any]] = [["open"], ["write", 8], ["flush"], ["write", 6], ["exit"]]
    sent = 14

    def paths(folder: Path) -> dict[str, str]:
        folder.mkdir(parents=True, exist_ok=True)
        return {"target": str(folder / "target"), "state": str(folder / "state.sqlite"), "log": str(folder / "log")}

    probe = tmp_path / "probe"
    counted = faults.run_child("tests.test_dedupe:count_ops", paths(probe), options, "standard", steps[:-1],
                               prefix=probe)
    total = counted.result["all"]
    killed = 0
    for point in _sweep_points(total):
        folder = tmp_path / f"kill-{point}"
        trial = faults.run_child("drive", "standard", paths(folder), steps, options, prefix=folder, ops="all",
                                 nth=point, kill="before")
        killed += trial.killed
        with cio_sync.StandardSink(str(folder / "target"), workspace_id=7, state=str(folder / "state.sqlite"),
                                   flush_interval=None, dedupe_window=DAY) as sink:
            for i in range(sent):
                sink.write(_call("standard", f"c{i}", i))
        found = changes(folder / "target")
        assert {i: n for i, n in found.items() if n != 1} == {}, (point, trial.returncode, trial.stderr)
        assert set(found) == {f"c{i}" for i in range(sent)}, point
    assert killed >= len(_sweep_points(total)) - 1


@pytest.mark.parametrize("errno", [ENOSPC, EIO])
def test_a_window_file_that_cannot_be_written_stops_publishing_until_it_can(faultfs: Path, tmp_path: Path,
                                                                            errno: int) -> None:
    paths = _paths(tmp_path)
    window = str(tmp_path / "spool" / FILE_NAME)
    # Every write and fsync of the window's file fails while armed (faultfs watches paths under the prefix).
    steps: list[list[Any]] = [["open"], ["write", 6], ["arm", {"ops": ["write", "fsync"], "count": 10**6,
                                                               "errno": errno}],
                              ["flush"], ["write", 2], ["disarm"], ["flush"], ["write", 2], ["close"]]
    done = faults.run_child("drive", "advanced", paths, steps, {"dedupe_window": DAY}, prefix=window)
    report = done.result
    assert report is not None, done.stderr
    [(step, error)] = report["errors"]
    assert step == "flush"
    assert "StorageError" in error
    assert FILE_NAME in error
    assert report["refused"] == []
    assert published_ids(tmp_path / "target") == Counter(f"c{i}" for i in range(10))
    _retry_everything(paths, 10)  # and the window has them all
    assert published_ids(tmp_path / "target") == Counter(f"c{i}" for i in range(10))


# -- over HTTP: cio-sync serve killed in the middle of a batch --------------------------------------------------------

KEY = "wk_dedupe_7f1e"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(root: Path, port: int, env: dict[str, str] | None = None, *extra: str) -> subprocess.Popen[str]:
    log = root / f"serve-{time.monotonic_ns()}.log"
    with open(log, "w") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cio_sync.cli", "serve", "--advanced", str(root / "advanced"), "--spool-dir",
             str(root / "spool"), "--port", str(port), *extra],
            stdout=subprocess.PIPE, stderr=errors, text=True,
            env={**os.environ, "CIO_SYNC_WRITE_KEYS": KEY, **(env or {})})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise AssertionError(f"serve did not start: {line!r} {log.read_text()}")
    return proc


def _post_batch(port: int, calls: list[dict[str, Any]]) -> int | None:
    return post(f"http://127.0.0.1:{port}", {"batch": calls, "sentAt": "2026-12-02T10:00:00Z"}, KEY, timeout=20)


@pytest.mark.parametrize("dedupe", [True, False])
def test_a_batch_cut_short_by_kill_9_and_retried_by_its_client_lands_once(faultfs: Path, tmp_path: Path,
                                                                           dedupe: bool) -> None:
    """The server dies (faultfs kills it at the 25th write to its spool) half-way through a batch of 40 calls: part
    of the batch is in the spool. The client got no answer and sends the batch again to the restarted server: with
    the window (the default) every call lands once; with ``--dedupe-hours 0`` the part already spooled lands twice.
    """
    port = _free_port()
    extra = () if dedupe else ("--dedupe-hours", "0")
    spool = tmp_path / "spool"
    spool.mkdir()
    env = {"LD_PRELOAD": str(faultfs), "FAULTFS_PREFIX": str(spool / "advanced" / "track"), "FAULTFS_OPS": "write",
           "FAULTFS_NTH": "25", "FAULTFS_COUNT": "1", "FAULTFS_ERRNO": str(ENOSPC), "FAULTFS_PARTIAL": "0",
           "FAULTFS_KILL": "1"}
    batch = [call(i) for i in range(40)]
    server = _serve(tmp_path, port, env, "--spool-sync", "always", *extra)
    try:
        assert _post_batch(port, batch) is None
        assert server.wait(timeout=30) == -signal.SIGKILL
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
    server = _serve(tmp_path, port, None, *extra)
    try:
        deadline = time.monotonic() + 30
        while (status := _post_batch(port, batch)) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 200
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        if server.stdout is not None:
            server.stdout.close()
    ids = published_ids(tmp_path / "advanced")
    assert set(ids) == {c["messageId"] for c in batch}
    twice = {i for i, n in ids.items() if n > 1}
    if dedupe:
        assert twice == set()
    else:
        assert len(twice) >= 20  # the calls spooled before the kill, published at the restart and again


def test_clients_sending_through_three_kill_9s_land_every_call_exactly_once(tmp_path: Path) -> None:
    """Four clients send batches as the real ones do (the same batch again, under the same messageIds, until a 200)
    while the server is killed with SIGKILL three times and restarted on the same port: every call lands once."""
    import threading

    port = _free_port()
    batches = [[call(i, tag=f"t{t}-b{b}-") for i in range(25)] for t in range(4) for b in range(60)]
    acked: list[str] = []
    tries = Counter[int]()
    done = threading.Event()

    def client(mine: list[list[dict[str, Any]]]) -> None:
        for batch in mine:
            while not done.is_set():
                tries[id(batch)] += 1
                if _post_batch(port, batch) == 200:
                    acked.extend(c["messageId"] for c in batch)
                    break
                time.sleep(0.05)

    server = _serve(tmp_path, port)
    threads = [threading.Thread(target=client, args=(batches[t::4],)) for t in range(4)]
    for thread in threads:
        thread.start()
    total = sum(len(batch) for batch in batches)
    try:
        for share in (0.2, 0.45, 0.7):  # each kill lands while the clients send, at a point of their progress
            while len(acked) < share * total and any(thread.is_alive() for thread in threads):
                time.sleep(0.005)
            server.kill()
            assert server.wait(timeout=30) == -signal.SIGKILL
            assert server.stdout is not None
            server.stdout.close()
            server = _serve(tmp_path, port)
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        done.set()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        if server.stdout is not None:
            server.stdout.close()
    sent = [c["messageId"] for batch in batches for c in batch]
    assert sorted(acked) == sorted(sent)
    ids = published_ids(tmp_path / "advanced")
    assert {i: n for i, n in ids.items() if n != 1} == {}
    assert set(ids) == set(sent)
    assert sum(tries.values()) > len(batches)  # some batches were sent again: the kills hit the clients


def test_a_failed_spool_fsync_is_answered_by_publishing_not_by_503s(faultfs: Path, tmp_path: Path) -> None:
    """The spool's fsync fails once (EIO) under a request: its calls are not durable in the spool, so the intake
    publishes them at once and answers 200, instead of 503 to every retry until the next timed publish."""
    port = _free_port()
    spool = tmp_path / "spool"
    spool.mkdir()
    # The track folder's fsyncs: the new segment file (1), the folder's entry for it (2), the first request's sync
    # round (3): that one fails.
    env = {"LD_PRELOAD": str(faultfs), "FAULTFS_PREFIX": str(spool / "advanced" / "track"), "FAULTFS_OPS": "fsync",
           "FAULTFS_NTH": "3", "FAULTFS_COUNT": "1", "FAULTFS_ERRNO": str(EIO), "FAULTFS_PARTIAL": "0",
           "FAULTFS_KILL": "0"}
    server = _serve(tmp_path, port, env)
    try:
        assert _post_batch(port, [call(i) for i in range(10)]) == 200
        assert published_ids(tmp_path / "advanced") == Counter(f"m{i}" for i in range(10))  # before any stop
        assert _post_batch(port, [call(i) for i in range(10, 15)]) == 200  # and the spool goes on
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        if server.stdout is not None:
            server.stdout.close()
    assert published_ids(tmp_path / "advanced") == Counter(f"m{i}" for i in range(15))
