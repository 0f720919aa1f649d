"""Pipeline: one call, both modes."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

import cio_sync
from tests.conftest import Storage


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
