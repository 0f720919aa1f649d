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

    def make_spooled_sink(self, writer: MemoryWriter, spool_dir: Path) -> Any:
        return cio_sync.AdvancedSink(writer, flush_interval=None, spool_dir=spool_dir)


class TestAdvancedCsvMeetsTheContract(SinkContract):
    def make_sink(self, writer: MemoryWriter) -> Any:
        return cio_sync.AdvancedSink(writer, format="csv", flush_interval=None)

    def make_spooled_sink(self, writer: MemoryWriter, spool_dir: Path) -> Any:
        return cio_sync.AdvancedSink(writer, format="csv", flush_interval=None, spool_dir=spool_dir)


class TestAdvancedJsonMeetsTheContract(SinkContract):
    def make_sink(self, writer: MemoryWriter) -> Any:
        return cio_sync.AdvancedSink(writer, format="json", flush_interval=None)

    def make_spooled_sink(self, writer: MemoryWriter, spool_dir: Path) -> Any:
        return cio_sync.AdvancedSink(writer, format="json", flush_interval=None, spool_dir=spool_dir)


class TestTheExampleCustomSinkMeetsTheContract(SinkContract):
    def make_sink(self, writer: MemoryWriter) -> Any:
        return EXAMPLE.OrdersSink(writer, flush_interval=None)

    def make_spooled_sink(self, writer: MemoryWriter, spool_dir: Path) -> Any:
        return EXAMPLE.OrdersSink(writer, flush_interval=None, spool_dir=spool_dir)

    def accepts(self, call: dict[str, Any]) -> bool:
        return call["type"] == "track" and call.get("event") == "Order Completed"


def _contract_for(sink_class: type) -> TestTheExampleCustomSinkMeetsTheContract:
    class Contract(TestTheExampleCustomSinkMeetsTheContract):
        def make_sink(self, writer: MemoryWriter) -> Any:
            return sink_class(writer, flush_interval=None)

        def make_spooled_sink(self, writer: MemoryWriter, spool_dir: Path) -> Any:
            return sink_class(writer, flush_interval=None, spool_dir=spool_dir)

    return Contract()


def test_the_contract_catches_a_sink_that_loses_calls() -> None:
    class Lossy(EXAMPLE.OrdersSink):  # type: ignore[misc, name-defined]
        def route(self, call: cio_sync.Call) -> Any:
            return [] if call.message_id.endswith("7") else super().route(call)

    with pytest.raises(AssertionError, match="lost"):
        _contract_for(Lossy).test_every_accepted_call_is_published_exactly_once()


def test_the_contract_catches_a_sink_that_reuses_names_once_the_files_are_deleted() -> None:
    class CountsItsFiles(EXAMPLE.OrdersSink):  # type: ignore[misc, name-defined]
        """Names its files by counting those present: the next name is one that was given before, once the
        loaded files are deleted."""

        def _name_for(self, table: str) -> str:
            return f"orders.{len(self.writer.data_files()) + 1}.parquet"  # type: ignore[attr-defined]

    contract = _contract_for(CountsItsFiles)
    contract.test_every_accepted_call_is_published_exactly_once()  # it works, until files are deleted
    with pytest.raises(AssertionError, match="reused the name"):
        contract.test_names_are_never_reused_even_after_the_files_are_deleted()


def test_the_contract_catches_a_sink_that_rewrites_a_file() -> None:
    class Appends(EXAMPLE.OrdersSink):  # type: ignore[misc, name-defined]
        """Keeps one file per table and rewrites it with the new rows at each flush."""

        def flush(self) -> list[cio_sync.WrittenFile]:
            files = list(super().flush())
            for written in files:
                data = self.writer.files.pop(written.name)
                self.writer.files.pop("orders.1.parquet", None)
                self.writer.publish("orders.1.parquet", data + b"", table="orders", rows=written.rows)
            return files

    with pytest.raises(AssertionError, match="reused the name"):
        _contract_for(Appends).test_a_restart_leaves_the_published_files_as_they_are()


def test_the_contract_catches_a_sink_whose_files_change_after_a_restart() -> None:
    class Compacts(EXAMPLE.OrdersSink):  # type: ignore[misc, name-defined]
        """Merges the files it finds into one when it starts."""

        def __init__(self, writer: MemoryWriter, **kwargs: Any) -> None:
            super().__init__(writer, **kwargs)
            for name in [n for n in writer.data_files() if n.startswith("orders.")]:
                writer.remove(name)

    with pytest.raises(AssertionError, match="removed"):
        _contract_for(Compacts).test_a_restart_leaves_the_published_files_as_they_are()


def test_the_contract_catches_a_sink_that_loses_spooled_rows_in_a_crash() -> None:
    class NoSpool(EXAMPLE.OrdersSink):  # type: ignore[misc, name-defined]
        """Takes a spool directory and keeps its rows in memory anyway."""

        def __init__(self, writer: MemoryWriter, *, spool_dir: Any = None, **kwargs: Any) -> None:
            super().__init__(writer, **kwargs)

    contract = _contract_for(NoSpool)
    contract.test_every_accepted_call_is_published_exactly_once()
    with pytest.raises(AssertionError, match="lost after a crash"):
        contract.test_every_accepted_call_survives_a_crash_with_a_spool()


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


def test_abandon_lets_a_standard_sinks_state_go_as_a_killed_process_does(tmp_path: Path) -> None:
    from cio_sync.testing import abandon

    state = tmp_path / "ws.sqlite"
    sink = cio_sync.StandardSink(MemoryWriter(), workspace_id=1, state=state, flush_interval=None,
                                 commit_every=1000)
    sink.write({"type": "identify", "userId": "kept", "traits": {"a": 1}})
    sink.commit()
    sink.write({"type": "identify", "userId": "lost", "traits": {"a": 1}})  # not committed when it "dies"
    abandon(sink)
    with cio_sync.StandardSink(MemoryWriter(), workspace_id=1, state=state, flush_interval=None) as again:
        assert again.person("kept")["attributes"] == {"a": "1"}
        with pytest.raises(cio_sync.UnknownPerson):
            again.person("lost")
