"""AdvancedSink contract: over memory, local files and real S3 (SeaweedFS), in every format."""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import cio_sync
from cio_sync._sample import sample_calls
from tests.conftest import Storage
from tests.helpers import (
    as_instant,
    as_object,
    duckdb_rows,
    duckdb_types,
    group_positions,
    parse_advanced_name,
)

FORMATS = ["parquet", "csv", "json"]
STRING_FIELDS = ("type", "userId", "anonymousId", "event", "name", "category", "groupId", "previousId")
OBJECT_FIELDS = ("traits", "properties", "context", "integrations")
TIME_FIELDS = ("timestamp", "originalTimestamp", "sentAt")
#: The 10,000-call run: every format on memory and local disk, Parquet on each object store. A writer publishes a
#: file's bytes the same way whatever their format (these files are far below the multipart size), and CSV and JSON
#: files on the object stores are read back by test_rows_read_back_equal_the_calls_sent and
#: test_json_files_keep_each_call_as_sent_with_message_id_and_received_at.
TEN_THOUSAND_RUNS = [
    *(pytest.param(kind, fmt, id=f"{kind}-{fmt}") for kind in ("memory", "local") for fmt in FORMATS),
    *(pytest.param(kind, "parquet", marks=mark, id=f"{kind}-parquet")
      for kind, mark in (("s3", pytest.mark.s3), ("gcs", pytest.mark.gcs), ("azure", pytest.mark.azure))),
]


def sink_for(storage: Storage, fmt: str = "parquet", **kwargs: Any) -> cio_sync.AdvancedSink:
    kwargs.setdefault("flush_interval", None)
    kwargs.setdefault("destination_id", 2184)
    return cio_sync.AdvancedSink(storage.url, format=fmt, storage_options=storage.storage_options, **kwargs)


def read_all(storage: Storage, scratch: Path, fmt: str) -> dict[str, list[dict[str, Any]]]:
    """Rows of every data file, by file name, read by DuckDB from a local copy."""
    storage.download(scratch)
    return {name: duckdb_rows(scratch / name, fmt) for name in storage.data_files()}


@pytest.mark.parametrize(("storage", "fmt"), TEN_THOUSAND_RUNS, indirect=["storage"])
def test_ten_thousand_mixed_calls_land_once_in_files_named_by_the_pattern(
    storage: Storage, scratch: Path, fmt: str
) -> None:
    calls = list(sample_calls(10_000, seed=7))
    message_ids = []
    with sink_for(storage, fmt, max_rows=1_500) as sink:
        for i, call in enumerate(calls):
            message_ids.append(sink.write(call))
            if i == 5_000:
                sink.flush()

    rows_by_file = read_all(storage, scratch, fmt)
    names = list(rows_by_file)
    parsed = [parse_advanced_name(n) for n in names]
    assert {p["ext"] for p in parsed} == {fmt}
    assert {p["destination"] for p in parsed} == {2184}
    # One action id per call type, and positions per (destination, action) run 1, 2, 3, ... without gaps.
    action_of = {p["type"]: p["action"] for p in parsed}
    assert len(set(action_of.values())) == len(action_of) == 6
    for positions in group_positions(names).values():
        assert positions == list(range(1, len(positions) + 1))
    # Each file holds only its type; row counts add up to the calls sent; every messageId exactly once.
    all_ids = []
    for name, rows in rows_by_file.items():
        file_type = parse_advanced_name(name)["type"]
        assert rows, f"{name} is empty"
        assert {r["type"] for r in rows} == {file_type}
        all_ids.extend(str(r["messageId"]) for r in rows)
    assert sum(len(r) for r in rows_by_file.values()) == 10_000
    assert Counter(all_ids) == Counter(message_ids)
    assert len(set(all_ids)) == 10_000
    if fmt == "parquet":
        types = duckdb_types(scratch / next(n for n in names if ".track." in n))
        for column in (*TIME_FIELDS, "receivedAt"):
            assert types[column].startswith("TIMESTAMP"), (column, types[column])


def _check_row(row: dict[str, Any], call: dict[str, Any], fmt: str) -> None:
    for key in STRING_FIELDS:
        if key in row or key in call:
            assert (row.get(key) or None) == (call.get(key) or None), key
    for key in OBJECT_FIELDS:
        if key in row:
            assert as_object(row[key]) == call.get(key), key
    for key in TIME_FIELDS:
        if key in row:
            assert as_instant(row[key]) == as_instant(call.get(key)), key
    assert as_instant(row["receivedAt"]) is not None


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_rows_read_back_equal_the_calls_sent(storage: Storage, scratch: Path, fmt: str) -> None:
    calls = list(sample_calls(600, seed=3))
    with sink_for(storage, fmt) as sink:
        ids = [sink.write(call) for call in calls]
    rows = {r["messageId"]: r for rs in read_all(storage, scratch, fmt).values() for r in rs}
    assert len(rows) == len(calls)
    for message_id, call in zip(ids, calls, strict=True):
        _check_row(rows[message_id], call, fmt)


def test_json_files_keep_each_call_as_sent_with_message_id_and_received_at(
    storage: Storage, scratch: Path
) -> None:
    calls = list(sample_calls(300, seed=5))
    calls[0] = {**calls[0], "_metadata": {"bundled": ["Segment.io"]}, "writeKey": "abc"}
    with sink_for(storage, "json") as sink:
        ids = [sink.write(call) for call in calls]
    lines = {}
    for name in storage.data_files():
        for line in storage.read(name).splitlines():
            doc = orjson.loads(line)
            lines[doc["messageId"]] = doc
    for message_id, call in zip(ids, calls, strict=True):
        doc = lines[message_id]
        received = doc.pop("receivedAt")
        assert as_instant(received) is not None
        assert doc == {**call, "messageId": message_id}
    # DuckDB loads them too, with the nested objects as structured values.
    rows = read_all(storage, scratch, "json")
    assert sum(len(r) for r in rows.values()) == len(calls)


def test_nested_objects_unknown_keys_and_offsets_survive_in_parquet(storage: Storage, scratch: Path) -> None:
    call = {
        "type": "identify",
        "userId": "42",
        "traits": {"plan": "pro", "age": 31, "tags": ["a", "b"], "address": {"city": "Zürich"}, "none": None},
        "timestamp": "2026-01-02T03:04:05.678+05:30",
        "context": {"ip": "203.0.113.9"},
        "version": 2,
        "channel": "server",
        "_metadata": {"bundled": ["Segment.io"]},
        "writeKey": "k",
    }
    with sink_for(storage) as sink:
        sink.write(call)
    [rows] = read_all(storage, scratch, "parquet").values()
    [row] = rows
    assert orjson.loads(row["traits"]) == call["traits"]
    assert orjson.loads(row["context"]) == call["context"]
    assert as_instant(row["timestamp"]) == as_instant("2026-01-01T21:34:05.678Z")
    assert row["version"] == "2"
    assert row["channel"] == "server"
    assert orjson.loads(row["extra"]) == {"_metadata": {"bundled": ["Segment.io"]}, "writeKey": "k"}


def test_trait_type_drift_and_all_null_columns_keep_the_schema(storage: Storage, scratch: Path) -> None:
    with sink_for(storage) as sink:
        sink.write({"type": "identify", "userId": "1", "traits": {"age": 30}})
        sink.flush()
        sink.write({"type": "identify", "userId": "1", "traits": {"age": "thirty"}})
        sink.flush()
        sink.write({"type": "identify", "anonymousId": "a"})  # every optional column null
    storage.download(scratch)
    schemas = {duckdb_types(scratch / n).__repr__() for n in storage.data_files()}
    assert len(schemas) == 1
    assert len(storage.data_files()) == 3


def test_a_restarted_sink_continues_positions_and_leaves_earlier_files_unchanged(storage: Storage) -> None:
    calls = list(sample_calls(500, seed=11))
    with sink_for(storage) as sink:
        sink.write_many(calls[:250])
    before = {name: storage.read(name) for name in storage.data_files()}
    with sink_for(storage) as sink:
        sink.write_many(calls[250:])
    after = storage.data_files()
    for name, content in before.items():
        assert storage.read(name) == content
    new = [n for n in after if n not in before]
    assert {parse_advanced_name(n)["position"] for n in new} == {2}
    for positions in group_positions(after).values():
        assert positions == [1, 2]


def test_positions_are_not_reused_after_the_files_were_deleted(storage: Storage) -> None:
    with sink_for(storage) as sink:
        sink.write({"type": "track", "userId": "1", "event": "A"})
    [first] = storage.data_files()
    storage.fs.rm_file(f"{storage.root}/{first}")
    with sink_for(storage) as sink:
        sink.write({"type": "track", "userId": "1", "event": "B"})
    [second] = storage.data_files()
    assert parse_advanced_name(first)["position"] == 1
    assert parse_advanced_name(second)["position"] == 2


def test_a_sync_with_nothing_buffered_writes_no_file(storage: Storage) -> None:
    with sink_for(storage) as sink:
        assert sink.flush() == []
        sink.write({"type": "page", "anonymousId": "a", "name": "Home"})
        files = sink.flush()
        assert [f.table for f in files] == ["page"]
        assert sink.flush() == []
    assert [parse_advanced_name(n)["type"] for n in storage.data_files()] == ["page"]


def test_flush_reports_the_written_files(storage: Storage) -> None:
    with sink_for(storage, "csv") as sink:
        sink.write_many([{"type": "track", "userId": "1", "event": "E"}] * 3)
        [written] = sink.flush()
    assert written.table == "track"
    assert written.rows == 3
    assert written.name in storage.data_files()
    assert written.bytes == len(storage.read(written.name))
    assert written.path.endswith(written.name)


def test_bad_calls_are_rejected_and_the_sink_keeps_everything_else(storage: Storage, scratch: Path) -> None:
    with sink_for(storage) as sink:
        sink.write({"type": "track", "userId": "1", "event": "before"})
        with pytest.raises(cio_sync.InvalidCall, match="event"):
            sink.write({"type": "track", "userId": "1"})
        with pytest.raises(ValueError, match="JSON"):
            sink.write(b"{not json")
        sink.write({"type": "track", "userId": "1", "event": "after"})
        assert sink.stats.calls_rejected == 2
        assert sink.stats.calls_accepted == 2
    rows = [r for rs in read_all(storage, scratch, "parquet").values() for r in rs]
    assert sorted(r["event"] for r in rows) == ["after", "before"]


def test_write_many_accepts_the_good_calls_and_reports_each_bad_one(storage: Storage, scratch: Path) -> None:
    calls: list[Any] = [
        {"type": "track", "userId": "1", "event": "ok-0"},
        {"type": "track", "userId": 1, "event": "bad-id"},
        '{"type": "track", "userId": "2", "event": "ok-2"}',
        {"type": "nope", "userId": "3"},
        b'{"type": "identify", "userId": "4", "traits": {"a": 1}}',
    ]
    with sink_for(storage) as sink:
        with pytest.raises(cio_sync.InvalidCalls) as caught:
            sink.write_many(calls)
        assert caught.value.accepted == 3
        assert [(e.index, e.field) for e in caught.value.errors] == [(1, "userId"), (3, "type")]
    rows = [r for rs in read_all(storage, scratch, "parquet").values() for r in rs]
    assert len(rows) == 3


def test_a_segment_batch_payload_is_expanded_with_its_envelope(storage: Storage, scratch: Path) -> None:
    payload = {
        "batch": [
            {"type": "track", "userId": "1", "event": "A", "messageId": "m1"},
            {"type": "identify", "userId": "1", "traits": {"x": 1}, "messageId": "m2",
             "sentAt": "2026-01-01T00:00:09Z"},
        ],
        "sentAt": "2026-01-01T00:00:00Z",
        "context": {"library": {"name": "analytics-python", "version": "2.2.2"}},
    }
    with sink_for(storage) as sink:
        assert sink.write_many(orjson.dumps(payload)) == 2
    rows = {r["messageId"]: r for rs in read_all(storage, scratch, "parquet").values() for r in rs}
    assert as_instant(rows["m1"]["sentAt"]) == as_instant("2026-01-01T00:00:00Z")
    assert as_instant(rows["m2"]["sentAt"]) == as_instant("2026-01-01T00:00:09Z")
    assert orjson.loads(rows["m1"]["context"])["library"]["name"] == "analytics-python"


def test_max_rows_publishes_early_without_a_flush(storage: Storage) -> None:
    sink = sink_for(storage, max_rows=10)
    for i in range(25):
        sink.write({"type": "track", "userId": str(i), "event": "E"})
    assert len(storage.data_files()) == 2
    assert sink.stats.rows_buffered == 5
    sink.close()
    assert len(storage.data_files()) == 3


def test_max_bytes_publishes_early_without_a_flush(storage: Storage) -> None:
    sink = sink_for(storage, max_bytes=2_000)
    for i in range(20):
        sink.write({"type": "track", "userId": str(i), "event": "E", "properties": {"blob": "x" * 300}})
    assert len(storage.data_files()) >= 2
    sink.close()
    assert sink.stats.rows_published == 20


def test_the_timer_publishes_without_flush(storage: Storage) -> None:
    sink = sink_for(storage, flush_interval=0.2)
    try:
        sink.write({"type": "track", "userId": "1", "event": "E"})
        deadline = time.monotonic() + 30
        while not storage.data_files() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(storage.data_files()) == 1
    finally:
        sink.close()
    assert len(storage.data_files()) == 1


def test_close_is_idempotent_and_writes_after_close_are_refused(storage: Storage) -> None:
    sink = sink_for(storage)
    sink.write({"type": "track", "userId": "1", "event": "E"})
    assert len(sink.close()) == 1
    assert sink.close() == []
    assert sink.closed
    with pytest.raises(cio_sync.SinkClosed):
        sink.write({"type": "track", "userId": "1", "event": "E"})
    assert len(storage.data_files()) == 1


def test_custom_action_ids_name_the_files(storage: Storage) -> None:
    with sink_for(storage, "json", action_ids={"track": 13699}) as sink:
        sink.write({"type": "track", "userId": "1", "event": "E"})
    assert storage.data_files() == ["2184.13699.1.track.json"]


def test_parquet_compression_is_configurable(storage: Storage, scratch: Path) -> None:
    import pyarrow.parquet as pq

    with sink_for(storage, compression="snappy") as sink:
        sink.write({"type": "track", "userId": "1", "event": "E"})
    [name] = storage.data_files()
    (scratch / name).write_bytes(storage.read(name))
    assert pq.ParquetFile(scratch / name).metadata.row_group(0).column(0).compression == "SNAPPY"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "xml"}, "unknown format"),
        ({"destination_id": -1}, "destination_id"),
        ({"destination_id": "2184"}, "destination_id"),
        ({"action_ids": {"track": 1}}, "differ"),
        ({"action_ids": {"purchase": 9}}, "unknown call type"),
        ({"format": "csv", "compression": "gzip"}, "parquet"),
        ({"compression": "lzma"}, "compression"),
        ({"max_rows": 0}, "max_rows"),
        ({"flush_interval": 0}, "flush_interval"),
    ],
)
def test_bad_configuration_is_refused_when_the_sink_is_built(
    memory_storage: Storage, kwargs: dict[str, Any], match: str
) -> None:
    fmt = kwargs.pop("format", "parquet")
    with pytest.raises(cio_sync.ConfigError, match=match):
        sink_for(memory_storage, fmt, **kwargs)


def test_a_filesystem_object_and_path_work_like_a_url(local_storage: Storage) -> None:
    fs = local_storage.fs
    with cio_sync.AdvancedSink(local_storage.root, filesystem=fs, flush_interval=None) as sink:
        sink.write({"type": "alias", "userId": "1", "previousId": "a"})
    assert [parse_advanced_name(n)["type"] for n in local_storage.data_files()] == ["alias"]


@pytest.fixture(scope="module")
def writer_processes() -> Iterator[multiprocessing.pool.Pool]:
    """Eight spawned processes for the writers below, shared by their runs: each has imported what a writer needs
    before it is given one, so the writers of a run start together (and the imports are paid once, not per run)."""
    from tests.workers import import_writer_modules

    with multiprocessing.get_context("spawn").Pool(8, initializer=import_writer_modules) as pool:
        yield pool


@pytest.mark.parametrize("fmt", ["parquet", "json"])
def test_processes_sharing_a_prefix_never_collide_and_lose_nothing(
    request: pytest.FixtureRequest, fmt: str, scratch: Path, writer_processes: multiprocessing.pool.Pool
) -> None:
    from tests.workers import write_tagged_calls

    kinds = ["local", "s3"] if fmt == "parquet" else ["local"]
    for kind in kinds:
        storage: Storage = request.getfixturevalue(f"{kind}_storage")
        # Eight writers on one S3 prefix (issue: "8 processes on one SeaweedFS prefix"), three on local disk.
        processes, per_process = (8, 200) if kind == "s3" else (3, 300)
        args = [(storage.url, storage.storage_options, fmt, w, per_process) for w in range(processes)]
        assert writer_processes.starmap(write_tagged_calls, args, chunksize=1) == [per_process] * processes
        rows = read_all(storage, scratch / kind, fmt)
        ids = [str(r["messageId"]) for rs in rows.values() for r in rs]
        expected = {f"w{w}-{i}" for w in range(processes) for i in range(per_process)}
        expected |= {f"w{w}-id-{i}" for w in range(processes) for i in range(0, per_process, 40)}
        assert Counter(ids) == Counter(expected)
        for positions in group_positions(list(rows)).values():
            assert positions == list(range(1, len(positions) + 1))
