"""Pipeline: one call, both modes."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import cio_sync
from cio_sync.buffer.rows import CHUNK_ROWS
from tests import faults
from tests.conftest import Storage
from tests.test_writer import FlakyMemory


def test_each_call_reaches_both_sinks_once_with_the_same_ids(memory_storage: Storage, tmp_path: Path) -> None:
    advanced = cio_sync.AdvancedSink(f"{memory_storage.url}/raw", flush_interval=None)
    standard = cio_sync.StandardSink(f"{memory_storage.url}/ws", workspace_id=7, flush_interval=None)
    with cio_sync.Pipeline(advanced=advanced, standard=standard) as pipeline:
        first = pipeline.write({"type": "identify", "userId": "42", "traits": {"plan": "pro"}})
        pipeline.write({"type": "identify", "userId": "42", "traits": {"plan": "pro"}})  # changes nothing
        with pytest.raises(cio_sync.InvalidCall):
            pipeline.write({"type": "identify", "userId": 42})
        files = pipeline.flush()
    assert pipeline.closed
    by_table = {f.table: f for f in files}
    assert by_table["identify"].rows == 2  # the Advanced sink keeps both calls as sent
    assert by_table["people"].rows == 1  # the Standard sink shows what they changed
    assert by_table["attributes"].rows == 1
    raw = pq.read_table(memory_storage.fs.open(f"{memory_storage.root}/raw/{by_table['identify'].name}"))
    assert first in raw.column("messageId").to_pylist()
    assert advanced.stats.calls_rejected == standard.stats.calls_rejected == 1


def test_a_call_that_one_sink_cannot_take_reaches_neither(memory_storage: Storage) -> None:
    from decimal import Decimal

    advanced = cio_sync.AdvancedSink(f"{memory_storage.url}/raw", format="json", flush_interval=None)
    standard = cio_sync.StandardSink(f"{memory_storage.url}/ws", workspace_id=7, flush_interval=None)
    with cio_sync.Pipeline(advanced=advanced, standard=standard) as pipeline:
        with pytest.raises(cio_sync.InvalidCall, match="traits"):
            pipeline.write({"type": "identify", "userId": "1", "traits": {"price": Decimal("1.5")}})
        assert pipeline.flush() == []


def test_a_pipeline_needs_a_sink() -> None:
    with pytest.raises(cio_sync.ConfigError):
        cio_sync.Pipeline()


def _attribute_values(storage: Storage, folder: str, name: str = "n") -> list[str]:
    fs, root = storage.fs, f"{storage.root}/{folder}"
    values = []
    for path in sorted(fs.glob(f"{root}/attributes_*.parquet")):
        table = pq.read_table(fs.open(path)).to_pylist()
        values += [r["attribute_value"] for r in table if r["attribute_name"] == name]
    return values


def _message_ids(storage: Storage, folder: str) -> list[str]:
    fs, root = storage.fs, f"{storage.root}/{folder}"
    return [m for path in sorted(fs.glob(f"{root}/*.parquet"))
            for m in pq.read_table(fs.open(path)).column("messageId").to_pylist()]


def test_a_call_the_advanced_sink_refuses_for_want_of_room_changes_nothing_in_the_standard_sink(
        memory_storage: Storage) -> None:
    fs = FlakyMemory(failures=["before"] * 10_000, data_only=True, skip_instance_cache=True)
    writer = cio_sync.FsspecWriter(f"/{uuid.uuid4().hex}", filesystem=fs,
                                   retry=cio_sync.RetryPolicy(attempts=1))
    advanced = cio_sync.AdvancedSink(writer, flush_interval=None, max_buffer_bytes=1_000, block_timeout=0,
                                     when_full="block")
    standard = cio_sync.StandardSink(f"{memory_storage.url}/ws", workspace_id=7, flush_interval=None)
    pipeline = cio_sync.Pipeline(advanced=advanced, standard=standard)
    accepted, refused = [], []
    for i in range(300):
        call = {"type": "identify", "userId": f"u{i}", "messageId": f"m{i}", "traits": {"n": f"m{i}"}}
        try:
            pipeline.write(call)
        except cio_sync.BufferFull:
            refused.append(f"m{i}")
        else:
            accepted.append(f"m{i}")
    assert refused, "the Advanced sink's budget never filled up"
    fs.failures.clear()  # storage is back
    pipeline.close()
    assert sorted(_attribute_values(memory_storage, "ws")) == sorted(accepted)
    assert sorted(m for path in fs.glob(f"{writer.root}/*.parquet")
                  for m in pq.read_table(fs.open(path)).column("messageId").to_pylist()) == sorted(accepted)


@pytest.mark.parametrize("calls_before", [10, CHUNK_ROWS])
def test_a_call_the_standard_sink_refuses_is_taken_back_from_the_advanced_sink(
        memory_storage: Storage, tmp_path: Path, calls_before: int) -> None:
    advanced = cio_sync.AdvancedSink(f"{memory_storage.url}/raw", flush_interval=None,
                                     spool_dir=tmp_path / "spool")
    standard = cio_sync.StandardSink(f"{memory_storage.url}/ws", workspace_id=7, flush_interval=None)
    pipeline = cio_sync.Pipeline(advanced=advanced, standard=standard)
    ids = [pipeline.write({"type": "track", "userId": "1", "event": "E", "messageId": f"m{i}"})
           for i in range(calls_before)]
    standard.close()  # the Standard sink now refuses every call
    with pytest.raises(cio_sync.SinkClosed):
        pipeline.write({"type": "track", "userId": "1", "event": "E", "messageId": "refused"})
    assert advanced.stats.calls_accepted == calls_before
    advanced.close()
    assert sorted(_message_ids(memory_storage, "raw")) == sorted(ids)
    assert not list((tmp_path / "spool").rglob("*.avro"))  # and the spool does not keep it for a restart


@pytest.mark.parametrize("where", ["spool", "state"])
def test_a_call_refused_for_a_failed_disk_write_in_one_sink_reaches_neither(faultfs: Path, tmp_path: Path,
                                                                          where: str) -> None:
    paths = {"advanced": str(tmp_path / "raw"), "standard": str(tmp_path / "ws"), "spool": str(tmp_path / "spool"),
             "state": str(tmp_path / "state" / "ws.sqlite")}
    (tmp_path / "state").mkdir()
    prefix = tmp_path / ("spool" if where == "spool" else "state")
    steps = [["open"], ["write", 5], ["arm", {"ops": "write", "nth": 1, "count": 1, "errno": faults.EIO}],
             ["write", 3], ["disarm"], ["write", 5], ["close"]]
    done = faults.run_child("drive", "pipeline", paths, steps, {}, "c", prefix=prefix)
    assert done.returncode == 0, done.stderr
    assert done.result["errors"] == []
    assert len(done.result["refused"]) == 1, done.result["refusals"]
    accepted = sorted(done.result["accepted"])
    assert sorted(faults.published_ids(tmp_path / "raw")) == accepted
    standard = Storage("local", str(tmp_path))
    assert sorted(_attribute_values(standard, "ws")) == accepted


def test_pipeline_stats_are_each_sinks_own_and_its_writer_is_the_advanced_one(memory_storage: Storage) -> None:
    advanced = cio_sync.AdvancedSink(f"{memory_storage.url}/raw", flush_interval=None)
    standard = cio_sync.StandardSink(f"{memory_storage.url}/ws", workspace_id=7, flush_interval=None)
    with cio_sync.Pipeline(advanced=advanced, standard=standard) as pipeline:
        pipeline.write({"type": "identify", "userId": "42", "traits": {"plan": "pro"}})
        with pytest.raises(cio_sync.InvalidCall):
            pipeline.write({"type": "identify", "userId": 42})
        stats = pipeline.stats
        assert pipeline.writer is advanced.writer
    assert stats.advanced is not None
    assert stats.standard is not None
    assert (stats.advanced.calls_accepted, stats.advanced.calls_rejected) == (1, 1)
    assert (stats.standard.calls_accepted, stats.standard.calls_rejected) == (1, 1)
    assert stats.advanced.rows_buffered == 1
    only = cio_sync.Pipeline(standard=cio_sync.StandardSink(f"{memory_storage.url}/ws2", workspace_id=8,
                                                            flush_interval=None))
    assert only.stats.advanced is None
    assert only.writer is only.standard.writer  # type: ignore[union-attr]
    only.close()


def test_a_custom_sink_takes_the_advanced_place_and_a_refused_call_reaches_neither(memory_storage: Storage) -> None:
    from tests.buffered_scenarios import OrdersSink, order

    orders = OrdersSink(f"{memory_storage.url}/orders", flush_interval=None)
    standard = cio_sync.StandardSink(f"{memory_storage.url}/ws", workspace_id=7, flush_interval=None)
    with cio_sync.Pipeline(advanced=orders, standard=standard) as pipeline:
        pipeline.write(order("o1", revenue=5.0))
        with pytest.raises(cio_sync.InvalidCall, match=r"orders\.revenue"):
            pipeline.write(order("o2", revenue="five"))  # fits the Standard sink, not the orders table
        files = pipeline.close()
    assert sorted(f.name for f in files if f.table == "orders") == ["orders.1.parquet"]
    assert pipeline.stats.standard is not None
    assert pipeline.stats.standard.calls_accepted == 1
