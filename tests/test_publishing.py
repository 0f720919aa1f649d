"""How sinks publish when things go wrong: taken names, ambiguous uploads, bad rows, close racing writes."""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cio_sync
from cio_sync import FsspecWriter, RetryPolicy, WrittenFile
from cio_sync.storage.backends import secrets_in
from tests.conftest import Storage
from tests.test_writer import FlakyMemory

NO_WAIT = RetryPolicy(attempts=2, initial_delay=0, max_delay=0)


def test_a_batch_whose_last_try_landed_unseen_is_not_written_twice() -> None:
    fs = FlakyMemory(failures=["before", "after"], data_only=True, skip_instance_cache=True)
    writer = FsspecWriter("/amb", filesystem=fs, retry=NO_WAIT)
    sink = cio_sync.AdvancedSink(writer, flush_interval=None)
    sink.write({"type": "track", "userId": "1", "event": "E"})
    with pytest.raises(cio_sync.StorageError):
        sink.flush()  # both tries failed as far as the sink can tell; the second had landed
    [written] = sink.flush()
    assert written.name == "1.2.1.track.parquet"
    data_files = [p for p in fs.find("/amb") if "/_cio_sync/" not in p and "/_manifests/" not in p]
    assert data_files == ["/amb/1.2.1.track.parquet"]
    assert sink.stats.rows_published == 1
    sink.close()


def test_a_name_taken_by_a_foreign_file_is_skipped_and_left_alone(memory_storage: Storage) -> None:
    fs = memory_storage.fs
    fs.pipe_file(f"{memory_storage.root}/2184.2.1.track.parquet", b"not ours")
    with cio_sync.AdvancedSink(memory_storage.url, destination_id=2184, flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "1", "event": "E"})
        sink.write({"type": "identify", "userId": "1"})
        files = sink.flush()
    assert sorted(f.name for f in files) == ["2184.1.1.identify.parquet", "2184.2.2.track.parquet"]
    assert fs.cat_file(f"{memory_storage.root}/2184.2.1.track.parquet") == b"not ours"


class _SlowWriter:
    """A Writer that takes its time, to open a window for races."""

    def __init__(self, inner: FsspecWriter, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.url = inner.url

    def publish(self, name: str, data: bytes, *, table: str, rows: int, resume: bool = False) -> WrittenFile:
        if not name.startswith("_cio_sync/"):
            time.sleep(self.delay)
        return self.inner.publish(name, data, table=table, rows=rows, resume=resume)

    def list(self, folder: str) -> list[str]:
        return self.inner.list(folder)

    def remove(self, name: str) -> None:
        self.inner.remove(name)


def test_calls_written_while_close_runs_are_refused_or_published_never_lost(memory_storage: Storage) -> None:
    sink = cio_sync.AdvancedSink(_SlowWriter(FsspecWriter(memory_storage.url), 0.3), flush_interval=None)
    sink.write({"type": "track", "userId": "0", "event": "E"})
    accepted, refused = 1, 0
    closer = threading.Thread(target=sink.close)
    closer.start()
    deadline = time.monotonic() + 5
    while closer.is_alive() and time.monotonic() < deadline:
        try:
            sink.write({"type": "track", "userId": "1", "event": "E"})
            accepted += 1
        except cio_sync.SinkClosed:
            refused += 1
        time.sleep(0.01)
    closer.join()
    assert refused > 0
    assert sink.stats.rows_published == accepted
    assert sink.stats.rows_buffered == 0


def test_files_published_early_are_returned_by_the_next_flush_and_reported(storage: Storage) -> None:
    seen: list[WrittenFile] = []
    with cio_sync.AdvancedSink(storage.url, storage_options=storage.storage_options, flush_interval=None,
                               max_rows=10, on_publish=seen.append) as sink:
        for i in range(25):
            sink.write({"type": "track", "userId": str(i), "event": "E"})
        files = sink.flush()
    assert [f.rows for f in files] == [10, 10, 5]
    assert seen == files
    assert sum(f.rows for f in files) == 25


class _FailingFormat:
    """A format that cannot encode rows whose event is 'poison'."""

    name = "failing"
    extension = "dat"

    def encode(self, table: pa.Table) -> bytes:
        if "poison" in table.column("event").to_pylist():
            raise ValueError("cannot encode this row")
        return b"ok\n"


def test_rows_that_cannot_be_encoded_go_to_dead_letters_and_the_sink_goes_on(memory_storage: Storage) -> None:
    with cio_sync.AdvancedSink(memory_storage.url, format=_FailingFormat(), flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "1", "event": "poison"})
        assert sink.flush() == []
        sink.write({"type": "track", "userId": "2", "event": "fine"})
        [written] = sink.flush()
        assert sink.stats.rows_dead_lettered == 1
    assert written.name == "1.2.1.track.dat"
    fs = memory_storage.fs
    [letter] = fs.find(f"{memory_storage.root}/_cio_sync/dead_letters")
    header, row = fs.cat_file(letter).decode().splitlines()
    assert "cannot encode this row" in orjson.loads(header)["reason"]
    assert orjson.loads(row)["event"] == "poison"


def test_a_lone_surrogate_is_refused_at_intake_not_at_flush(memory_storage: Storage) -> None:
    with cio_sync.AdvancedSink(memory_storage.url, flush_interval=None, max_rows=1) as sink:
        with pytest.raises(cio_sync.InvalidCall, match="userId"):
            sink.write({"type": "track", "userId": "\ud800x", "event": "E"})
        with pytest.raises(cio_sync.InvalidCall, match="surrogate"):
            sink.write('{"type": "track", "userId": "1", "event": "\\ud800"}')
        with pytest.raises(cio_sync.InvalidCall, match="properties"):
            sink.write({"type": "track", "userId": "1", "event": "E", "properties": {"a": "\udfff"}})
        sink.write({"type": "track", "userId": "1", "event": "E"})
    assert sink.stats.rows_published == 1


def test_integers_beyond_64_bits_in_json_text_are_refused_not_rounded(memory_storage: Storage) -> None:
    with cio_sync.AdvancedSink(memory_storage.url, format="json", flush_interval=None) as sink:
        with pytest.raises(cio_sync.InvalidCall, match="properties"):
            sink.write(b'{"type":"track","userId":"1","event":"E","properties":{"x":123456789012345678901234567890}}')
        sink.write(b'{"type":"track","userId":"1","event":"E","properties":{"x":18446744073709551615,'
                   b'"id":"123456789012345678901234567890"}}')
        [written] = sink.flush()
    doc = orjson.loads(memory_storage.read(written.name))
    assert doc["properties"] == {"x": 18446744073709551615, "id": "123456789012345678901234567890"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compression": "snappy", "compression_level": 5}, "compression"),
        ({"compression": "gzip", "compression_level": 20}, "compression"),
        ({"row_group_size": 0}, "row_group_size"),
    ],
)
def test_parquet_options_that_cannot_work_are_refused_up_front(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(cio_sync.ConfigError, match=match):
        cio_sync.ParquetFormat(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"flush_interval": "600"}, "flush_interval"),
        ({"flush_interval": float("nan")}, "flush_interval"),
        ({"flush_interval": -1}, "flush_interval"),
        ({"max_rows": "10"}, "max_rows"),
        ({"max_rows": 2.5}, "max_rows"),
        ({"max_bytes": 1.5}, "max_bytes"),
        ({"max_bytes": True}, "max_bytes"),
    ],
)
def test_timer_and_rotation_settings_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(cio_sync.ConfigError, match=match):
        cio_sync.AdvancedSink("memory://cfg/x", **kwargs)


def test_format_names_are_case_insensitive() -> None:
    sink = cio_sync.AdvancedSink("memory://cfg/y", format="PARQUET", compression="gzip", flush_interval=None)
    assert sink.format == cio_sync.ParquetFormat(compression="gzip")
    sink.close()
    cio_sync.register_format("MyCsv", cio_sync.CsvFormat)
    assert isinstance(cio_sync.get_format("MyCsv"), cio_sync.CsvFormat)


def test_credentials_in_a_url_never_show(memory_storage: Storage) -> None:
    sink = cio_sync.AdvancedSink("memory://AKIAEXAMPLE:SuperSecret123@bucket/raw", flush_interval=None)
    assert "SuperSecret123" not in repr(sink)
    assert "SuperSecret123" not in sink.writer.url
    sink.close()


def test_secret_storage_options_are_found_for_redaction() -> None:
    found = secrets_in({
        "key": "AKIAEXAMPLE", "secret": "abc123secret", "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"aws_session_token": "tok-456789"},
        "connection_string": "DefaultEndpointsProtocol=http;AccountName=dev;AccountKey=c2VjcmV0a2V5PT0=;",
    })
    for secret in ("AKIAEXAMPLE", "abc123secret", "tok-456789", "c2VjcmV0a2V5PT0="):
        assert secret in found
    assert "http://127.0.0.1:9000" not in found


@pytest.mark.s3
def test_s3_error_messages_carry_no_secret_from_storage_options(s3_storage: Storage) -> None:
    options = {**s3_storage.storage_options, "secret": "wrong-secret-value-123"}
    sink = cio_sync.AdvancedSink("s3://no-such-bucket-cio/p", storage_options=options, flush_interval=None,
                                 retry=NO_WAIT)
    sink.write({"type": "track", "userId": "1", "event": "E"})
    with pytest.raises(cio_sync.StorageError) as caught:
        sink.flush()
    assert "no-such-bucket-cio" in str(caught.value)
    assert "wrong-secret-value-123" not in str(caught.value)
    assert "wrong-secret-value-123" not in repr(sink)
    assert sink.stats.rows_buffered == 1  # kept for the next flush


any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=6)
loose_calls = st.fixed_dictionaries(
    {"type": st.sampled_from(["identify", "track", "page", "screen", "group", "alias"])},
    optional={
        "userId": any_text, "anonymousId": any_text, "previousId": any_text, "groupId": any_text,
        "event": any_text, "name": any_text, "version": st.integers() | st.floats() | any_text,
        "traits": st.dictionaries(any_text, any_text | st.integers() | st.floats(), max_size=3),
        "properties": st.dictionaries(any_text, any_text | st.integers(), max_size=3),
        "timestamp": any_text,
    },
)
loose_calls = st.tuples(loose_calls, st.dictionaries(any_text, any_text, max_size=2)).map(lambda p: {**p[1], **p[0]})


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(loose_calls, min_size=1, max_size=8))
def test_whatever_is_accepted_is_published(fmt: str, calls: list[dict[str, Any]]) -> None:
    sink = cio_sync.AdvancedSink("memory://fuzz/x", format=fmt, flush_interval=None)
    accepted = 0
    for call in calls:
        try:
            sink.write(call)
            accepted += 1
        except cio_sync.InvalidCall:
            pass
    files = sink.close()
    assert sum(f.rows for f in files) == accepted
    assert sink.stats.rows_dead_lettered == 0


def test_a_backend_retry_that_finds_its_own_upload_does_not_publish_the_rows_twice() -> None:
    fs = FlakyMemory(failures=["lands-then-exists"], data_only=True, skip_instance_cache=True)
    sink = cio_sync.AdvancedSink(FsspecWriter("/own", filesystem=fs, retry=NO_WAIT), flush_interval=None)
    sink.write({"type": "track", "userId": "1", "event": "E"})
    [written] = sink.close()
    assert written.name == "1.2.1.track.parquet"
    data_files = [p for p in fs.find("/own") if "/_cio_sync/" not in p and "/_manifests/" not in p]
    assert data_files == ["/own/1.2.1.track.parquet"]


def test_rows_beyond_a_chunk_are_held_as_arrow_columns_and_published_whole_in_order(memory_storage: Storage) -> None:
    from datetime import UTC, datetime, timedelta

    import pyarrow.parquet as pq

    from cio_sync.buffer.rows import CHUNK_ROWS

    count = 2 * CHUNK_ROWS + 17
    start = datetime(2026, 11, 30, tzinfo=UTC)
    spellings = ["%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S"]  # the last has no offset
    expected = []
    with cio_sync.AdvancedSink(memory_storage.url, flush_interval=None) as sink:
        for i in range(count):
            moment = start + timedelta(seconds=i, microseconds=i % 1000)
            text = moment.strftime(spellings[(i // 5000) % 3])
            sink.write({"type": "track", "userId": f"u{i}", "event": "E", "timestamp": text})
            expected.append((f"u{i}", datetime.fromisoformat(text).replace(tzinfo=UTC) if "+" not in text
                             and "Z" not in text else datetime.fromisoformat(text)))
        [written] = sink.flush()
    table = pq.read_table(memory_storage.fs.open(f"{memory_storage.root}/{written.name}"))
    assert written.rows == table.num_rows == count
    got = list(zip(table.column("userId").to_pylist(), table.column("timestamp").to_pylist(), strict=True))
    assert got == expected


def test_a_chunk_arrow_cannot_convert_stays_as_rows_and_nothing_is_lost() -> None:
    from cio_sync.buffer.rows import CHUNK_ROWS, TableRows, rows_to_table

    schema = pa.schema([pa.field("n", pa.int64())])
    rows = TableRows(schema)
    sent = [(i,) for i in range(CHUNK_ROWS)] + [("not a number",)] + [(i,) for i in range(2 * CHUNK_ROWS)]
    for row in sent:
        rows.add(row, 8, None)
    batch = rows.take("t")
    assert batch.rows == len(sent)
    assert isinstance(batch.data, list)
    assert batch.data == sent
    good = TableRows(schema)
    for i in range(3 * CHUNK_ROWS + 1):
        good.add((i,), 8, None)
    converted = good.take("t")
    assert isinstance(converted.data, pa.Table)
    assert rows_to_table(converted.data, schema).column("n").to_pylist() == list(range(3 * CHUNK_ROWS + 1))


def test_dead_letters_write_timestamps_one_way_whatever_the_batch_held(memory_storage: Storage) -> None:
    from cio_sync.buffer.rows import CHUNK_ROWS

    call = {"type": "track", "userId": "1", "event": "poison", "timestamp": "2024-01-01T05:00:00+05:00"}
    with cio_sync.AdvancedSink(memory_storage.url, format=_FailingFormat(), flush_interval=None) as sink:
        sink.write(call)  # a small batch: rows as tuples
        assert sink.flush() == []
        for _ in range(CHUNK_ROWS + 1):  # a large one: Arrow chunks
            sink.write(call)
        assert sink.flush() == []
    fs = memory_storage.fs
    letters = sorted(fs.find(f"{memory_storage.root}/_cio_sync/dead_letters"))
    assert len(letters) == 2
    for letter in letters:
        first = orjson.loads(fs.cat_file(letter).decode().splitlines()[1])
        assert first["timestamp"] == "2024-01-01T00:00:00.000000Z"
        assert first["receivedAt"].endswith("Z")
