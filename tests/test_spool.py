"""The durable spool, the memory budget, manifests and CSV formula neutralising."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cio_sync
from cio_sync import FsspecWriter, RetryPolicy
from cio_sync.publish.publisher import _OPEN
from tests.conftest import Storage
from tests.helpers import parse_advanced_name
from tests.test_writer import FlakyMemory


def abandon(sink: cio_sync.AdvancedSink) -> None:
    """Drop a sink as if its process had been killed: no flush at exit, its files left as they are."""
    _OPEN.discard(sink._publisher)
    if sink.spool is not None:
        for segment in sink.spool._open.values():
            os.close(segment.fd)
        if sink.spool._lock_fd is not None:  # a dead process holds no lock
            os.close(sink.spool._lock_fd)
            sink.spool._lock_fd = None


def ids_in(storage: Storage) -> list[str]:
    ids = []
    for name in storage.data_files():
        ids += pq.read_table(storage.fs.open(f"{storage.root}/{name}")).column("messageId").to_pylist()
    return ids


def test_calls_accepted_before_a_crash_are_published_by_the_next_sink(memory_storage: Storage,
                                                                      tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    sink = cio_sync.AdvancedSink(memory_storage.url, spool_dir=spool, flush_interval=None)
    ids = [sink.write({"type": "track", "userId": str(i), "event": "E"}) for i in range(50)]
    abandon(sink)
    assert memory_storage.data_files() == []
    with cio_sync.AdvancedSink(memory_storage.url, spool_dir=spool, flush_interval=None) as again:
        ids.append(again.write({"type": "track", "userId": "new", "event": "E"}))
    assert sorted(ids_in(memory_storage)) == sorted(ids)
    assert not list(spool.rglob("*.avro"))


def test_a_batch_named_before_a_crash_keeps_its_name_and_is_not_published_twice(memory_storage: Storage,
                                                                               tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    sink = cio_sync.AdvancedSink(memory_storage.url, spool_dir=spool, flush_interval=None)
    sink.write({"type": "track", "userId": "1", "event": "E"})

    def die(batch: Any) -> None:
        raise KeyboardInterrupt("killed after the upload")

    sink.spool.published = die  # type: ignore[union-attr, method-assign]
    with pytest.raises(KeyboardInterrupt):
        sink.flush()
    [name] = memory_storage.data_files()
    abandon(sink)
    with cio_sync.AdvancedSink(memory_storage.url, spool_dir=spool, flush_interval=None):
        pass
    assert memory_storage.data_files() == [name]
    assert not list(spool.rglob("*.avro"))


def test_a_torn_last_row_is_dropped_and_the_rest_kept(memory_storage: Storage, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    sink = cio_sync.AdvancedSink(memory_storage.url, spool_dir=spool, flush_interval=None)
    for i in range(10):
        sink.write({"type": "track", "userId": str(i), "event": "E"})
    abandon(sink)
    [segment] = spool.rglob("*.avro")
    segment.write_bytes(segment.read_bytes()[:-20])  # the last write() never finished
    with cio_sync.AdvancedSink(memory_storage.url, spool_dir=spool, flush_interval=None):
        pass
    assert len(ids_in(memory_storage)) == 9


@pytest.mark.parametrize("fmt", ["parquet", "json", "csv"])
def test_the_spool_keeps_every_format_exactly(memory_storage: Storage, tmp_path: Path, fmt: str) -> None:
    call = {"type": "identify", "userId": "1", "traits": {"a": [1, {"b": "ü"}]}, "timestamp": "2026-01-01T00:00:00Z",
            "extraKey": 5}
    with cio_sync.AdvancedSink(f"{memory_storage.url}/plain", format=fmt, flush_interval=None) as plain:
        plain.write({**call, "messageId": "m"})
    sink = cio_sync.AdvancedSink(f"{memory_storage.url}/spooled", format=fmt, flush_interval=None,
                                 spool_dir=tmp_path / "s")
    sink.write({**call, "messageId": "m"})
    abandon(sink)
    cio_sync.AdvancedSink(f"{memory_storage.url}/spooled", format=fmt, flush_interval=None,
                          spool_dir=tmp_path / "s").close()
    fs = memory_storage.fs
    [a] = [p for p in fs.find(f"{memory_storage.root}/plain") if "/_" not in p]
    [b] = [p for p in fs.find(f"{memory_storage.root}/spooled") if "/_" not in p]
    if fmt == "parquet":
        left, right = pq.read_table(fs.open(a)).to_pylist(), pq.read_table(fs.open(b)).to_pylist()
        for row in (*left, *right):
            row.pop("receivedAt")
        assert left == right
    else:
        assert fs.cat_file(a).count(b"\n") == fs.cat_file(b).count(b"\n") == 1 + (fmt == "csv")


def test_bad_spool_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(cio_sync.ConfigError, match="spool_sync"):
        cio_sync.AdvancedSink("memory://x/y", spool_dir=tmp_path, spool_sync="sometimes")
    (tmp_path / "file").write_text("")
    with pytest.raises(cio_sync.ConfigError, match="spool"):
        cio_sync.AdvancedSink("memory://x/y", spool_dir=tmp_path / "file" / "below")


def _down_writer() -> tuple[FsspecWriter, FlakyMemory]:
    fs = FlakyMemory(failures=["before"] * 1000, data_only=True, skip_instance_cache=True)
    return FsspecWriter(f"/down-{time.monotonic_ns()}", filesystem=fs,
                        retry=RetryPolicy(attempts=1, initial_delay=0)), fs


def test_with_storage_down_a_full_buffer_blocks_then_refuses_without_dropping() -> None:
    writer, fs = _down_writer()
    sink = cio_sync.AdvancedSink(writer, flush_interval=None, max_buffer_bytes=2_000, block_timeout=0.3)
    accepted = 0
    refused = None
    for i in range(1_000):
        try:
            sink.write({"type": "track", "userId": str(i), "event": "E", "properties": {"pad": "x" * 100}})
        except cio_sync.BufferFull as exc:
            refused = exc
            break
        accepted += 1
    assert isinstance(refused, cio_sync.BufferFull)
    assert 0 < accepted < 1_000
    assert sink.stats.rows_buffered == accepted
    fs.failures.clear()  # storage is back
    assert sum(f.rows for f in sink.close()) == accepted


def test_a_blocked_writer_goes_on_when_storage_comes_back() -> None:
    writer, fs = _down_writer()
    sink = cio_sync.AdvancedSink(writer, flush_interval=None, max_buffer_bytes=2_000)
    threading.Timer(0.5, fs.failures.clear).start()
    for i in range(200):
        sink.write({"type": "track", "userId": str(i), "event": "E", "properties": {"pad": "x" * 100}})
    assert sum(f.rows for f in sink.close()) == 200


def test_with_a_spool_a_full_buffer_spills_to_disk_and_keeps_accepting(tmp_path: Path) -> None:
    writer, fs = _down_writer()
    sink = cio_sync.AdvancedSink(writer, flush_interval=None, max_buffer_bytes=5_000, max_rows=10,
                                 spool_dir=tmp_path / "spool")
    for i in range(500):
        sink.write({"type": "track", "userId": str(i), "event": "E", "properties": {"pad": "x" * 100}})
    assert sink.stats.bytes_in_memory < 5_000 + 1_000
    fs.failures.clear()
    assert sum(f.rows for f in sink.close()) == 500


def test_each_sync_writes_a_manifest_listing_its_files(storage: Storage) -> None:
    with cio_sync.AdvancedSink(storage.url, storage_options=storage.storage_options, destination_id=77,
                               flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "1", "event": "E"})
        sink.write({"type": "identify", "userId": "1"})
        first = sink.flush()
        sink.write({"type": "page", "userId": "1", "name": "Home"})
    fs = storage.fs
    fs.invalidate_cache()
    manifests = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{storage.root}/_manifests", detail=False))
    assert manifests == ["advanced.77.1.json", "advanced.77.2.json"]
    doc = orjson.loads(fs.cat_file(f"{storage.root}/_manifests/advanced.77.1.json"))
    assert doc["mode"] == "advanced"
    assert doc["destination_id"] == 77
    assert sorted(f["name"] for f in doc["files"]) == sorted(f.name for f in first)
    for entry in doc["files"]:
        data = storage.read(entry["name"])
        import hashlib

        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["rows"] == 1
        assert entry["min_received_at"] <= entry["max_received_at"]
        assert parse_advanced_name(entry["name"])["destination"] == 77


def test_standard_manifests_give_the_change_time_range(memory_storage: Storage) -> None:
    with cio_sync.StandardSink(memory_storage.url, workspace_id=3, flush_interval=None) as sink:
        sink.write({"type": "identify", "userId": "1", "traits": {"a": 1}})
    fs = memory_storage.fs
    [manifest] = fs.ls(f"{memory_storage.root}/_manifests", detail=False)
    doc = orjson.loads(fs.cat_file(manifest))
    assert doc["mode"] == "standard"
    assert doc["workspace_id"] == 3
    assert {f["table"] for f in doc["files"]} == {"people", "attributes"}
    assert all(f["min_changed_at"] and f["max_changed_at"] for f in doc["files"])


def test_manifests_can_be_turned_off(memory_storage: Storage) -> None:
    with cio_sync.AdvancedSink(memory_storage.url, flush_interval=None, manifests=False) as sink:
        sink.write({"type": "track", "userId": "1", "event": "E"})
    assert not memory_storage.fs.exists(f"{memory_storage.root}/_manifests")


def test_csv_formula_neutralising_is_opt_in(memory_storage: Storage) -> None:
    call = {"type": "track", "userId": "=HYPERLINK(\"http://x\")", "event": "+1", "properties": {"a": "@b"}}
    with cio_sync.AdvancedSink(f"{memory_storage.url}/raw", format="csv", flush_interval=None) as sink:
        sink.write(call)
    with cio_sync.AdvancedSink(f"{memory_storage.url}/safe", format="csv", flush_interval=None,
                               csv_neutralize_formulas=True) as sink:
        sink.write(call)
    fs = memory_storage.fs
    [raw] = [p for p in fs.find(f"{memory_storage.root}/raw") if p.endswith(".csv")]
    [safe] = [p for p in fs.find(f"{memory_storage.root}/safe") if p.endswith(".csv")]
    assert b'"=HYPERLINK' in fs.cat_file(raw)
    assert b"\"'=HYPERLINK" in fs.cat_file(safe)
    assert b"\"'+1\"" in fs.cat_file(safe)
    with pytest.raises(cio_sync.ConfigError):
        cio_sync.AdvancedSink("memory://x/z", format="json", csv_neutralize_formulas=True)


def test_rejected_calls_can_be_kept_as_dead_letters(memory_storage: Storage) -> None:
    with cio_sync.AdvancedSink(memory_storage.url, flush_interval=None, keep_rejected=True) as sink:
        with pytest.raises(cio_sync.InvalidCall):
            sink.write({"type": "track", "userId": 5, "event": "E"})
        with pytest.raises(cio_sync.InvalidCall):
            sink.write(b"{broken")
        sink.write({"type": "track", "userId": "5", "event": "E"})
    fs = memory_storage.fs
    [letters] = fs.find(f"{memory_storage.root}/_cio_sync/dead_letters/rejected")
    kept = [orjson.loads(line) for line in fs.cat_file(letters).splitlines()]
    assert [k["input"] for k in kept] == [{"type": "track", "userId": 5, "event": "E"}, "{broken"]
    assert "userId" in kept[0]["reason"]
    assert len(memory_storage.data_files()) == 1


def test_hand_framed_blocks_are_avro_that_fastavro_reads_back(tmp_path: Path) -> None:
    import fastavro
    from fastavro.write import Writer

    from cio_sync.buffer.spool import _AVRO_SCHEMA, _block

    records = [(b"[1,2]", 5, 1_796_010_578_123_000), (b"x" * 20_000, 20_000, None), (b"", 0, -5),
               (b"y", 2**40, 0), (b"z" * 200, 63, 64), (b"q", 8191, 8192), (b"r", 2**63 - 1, -(2**63))]
    path = tmp_path / "segment.avro"
    with open(path, "xb") as f:
        writer = Writer(f, _AVRO_SCHEMA)
        writer.flush()
        f.flush()
        for row, size, at in records:
            os.write(f.fileno(), _block(row, size, at, writer.sync_marker))  # type: ignore[attr-defined]
        writer.flush()
    with open(path, "rb") as f:
        got = [(r["row"], r["size"], r["time"]) for r in fastavro.reader(f)]  # type: ignore[index,call-overload]
    assert got == records


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(1_700_000_000_000_000, 1_900_000_000_000_000),
                min_size=1, max_size=20))
def test_avro_longs_framed_by_hand_match_the_spec_encoding(values: list[int]) -> None:
    """Zigzag then base-128 varint (Avro spec), checked value by value, also in runs of close times (the cache)."""
    from cio_sync.buffer.spool import _long

    for value in values:
        n = (value << 1) ^ (value >> 63)
        expected = bytearray()
        while n >= 0x80:
            expected.append((n & 0x7F) | 0x80)
            n >>= 7
        expected.append(n)
        assert _long(value) == bytes(expected)
