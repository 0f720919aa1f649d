"""cio_sync.testing: the contract suite over the built-in sinks and the example custom sink; the sink registry."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

import cio_sync
from cio_sync.testing import MemoryWriter, SinkContract

ROOT = Path(__file__).resolve().parents[1]


def _example_module() -> Any:
    spec = importlib.util.spec_from_file_location("custom_sink_example", ROOT / "examples" / "custom_sink.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["custom_sink_example"] = module
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example_module()


class TestAdvancedParquetMeetsTheContract(SinkContract):
    def make_sink(self, writer: MemoryWriter) -> Any:
        return cio_sync.AdvancedSink(writer, flush_interval=None)


class TestAdvancedCsvMeetsTheContract(SinkContract):
    def make_sink(self, writer: MemoryWriter) -> Any:
        return cio_sync.AdvancedSink(writer, format="csv", flush_interval=None)


class TestAdvancedJsonMeetsTheContract(SinkContract):
    def make_sink(self, writer: MemoryWriter) -> Any:
        return cio_sync.AdvancedSink(writer, format="json", flush_interval=None)


class TestTheExampleCustomSinkMeetsTheContract(SinkContract):
    def make_sink(self, writer: MemoryWriter) -> Any:
        return EXAMPLE.OrdersSink(writer)

    def accepts(self, call: dict[str, Any]) -> bool:
        return call["type"] == "track" and call.get("event") == "Order Completed"


def test_the_contract_catches_a_sink_that_loses_calls() -> None:
    class Lossy(EXAMPLE.OrdersSink):  # type: ignore[misc, name-defined]
        def flush(self) -> list[cio_sync.WrittenFile]:
            self._rows = self._rows[1:]
            return list(super().flush())

    class Contract(TestTheExampleCustomSinkMeetsTheContract):
        def make_sink(self, writer: MemoryWriter) -> Any:
            return Lossy(writer)

    with pytest.raises(AssertionError, match="lost"):
        Contract().test_every_accepted_call_is_published_exactly_once()


def test_memory_writer_is_create_only() -> None:
    writer = MemoryWriter()
    writer.publish("a/b.csv", b"1", table="t", rows=1)
    with pytest.raises(cio_sync.PublishConflict):
        writer.publish("a/b.csv", b"2", table="t", rows=1)
    assert writer.files == {"a/b.csv": b"1"}
    assert writer.list("a") == ["b.csv"]


def test_sinks_open_by_name() -> None:
    assert {"advanced", "standard", "orders"} <= set(cio_sync.sink_names())
    sink = cio_sync.open_sink("advanced", "memory://registry/x", flush_interval=None)
    assert isinstance(sink, cio_sync.AdvancedSink)
    sink.close()
    assert isinstance(cio_sync.open_sink("orders", MemoryWriter()), EXAMPLE.OrdersSink)
    with pytest.raises(cio_sync.ConfigError, match="no sink named"):
        cio_sync.open_sink("nope")
