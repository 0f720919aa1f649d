"""Helpers for testing code that uses cio_sync, and the contract suite custom sinks can reuse.

- :class:`MemoryWriter`: a real :class:`~cio_sync.Writer` that keeps files in a dict (create-only, like every
  writer), for unit tests that want to look at what a sink published without any filesystem.
- :func:`sample_calls`: realistic, reproducible calls of every type.
- :class:`SinkContract`: pytest tests every sink must pass. Subclass it and provide ``make_sink(writer)``::

      from cio_sync.testing import SinkContract

      class TestMySink(SinkContract):
          def make_sink(self, writer):
              return MySink(writer)

  The tests write calls, good and bad, through your sink and check what lands in the writer: every accepted call
  published exactly once, bad calls refused with ``InvalidCall`` without harming the others, ``flush`` reporting
  its files, ``close`` idempotent, no file ever overwritten.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cio_sync._errors import InvalidCall, PublishConflict
from cio_sync._sample import sample_calls
from cio_sync.storage.writer import WrittenFile, check_name

__all__ = ["MemoryWriter", "SinkContract", "abandon", "sample_calls"]


def abandon(sink: Any) -> None:
    """Drop ``sink`` as if its process had been killed: nothing is flushed or published, what it buffered in memory
    is lost, its spool files stay as they are and its spool lock is let go. Open a new sink on the same spool and
    target to see what a restart after a crash recovers."""
    publisher = getattr(sink, "_publisher", None)
    if publisher is None:
        raise TypeError(f"abandon() takes a sink built on cio_sync's toolkit; got {type(sink).__name__}")
    publisher.abandon()
    spool = getattr(sink, "spool", None)
    if spool is not None:
        spool.close()  # what the kernel does for a killed process: its files closed, its flock released


class MemoryWriter:
    """A :class:`~cio_sync.Writer` that keeps published files in :attr:`files` (name -> bytes)."""

    def __init__(self, url: str = "memory-writer://") -> None:
        self.url = url
        self.files: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryWriter({len(self.files)} files)"

    def publish(self, name: str, data: bytes, *, table: str, rows: int, resume: bool = False) -> WrittenFile:
        check_name(name)
        with self._lock:
            existing = self.files.get(name)
            if existing is not None and not (resume and existing == data):
                raise PublishConflict(f"{self.url}{name} already exists; it was left unchanged", path=name)
            self.files[name] = bytes(data)
        return WrittenFile(path=f"{self.url}{name}", name=name, table=table, rows=rows, bytes=len(data))

    def list(self, folder: str) -> list[str]:
        prefix = folder.rstrip("/") + "/"
        with self._lock:
            return sorted({n[len(prefix):].split("/", 1)[0] for n in self.files if n.startswith(prefix)})

    def remove(self, name: str) -> None:
        with self._lock:
            self.files.pop(name, None)

    def data_files(self) -> dict[str, bytes]:
        """The published files that are not bookkeeping (``_cio_sync/``, ``_manifests/``)."""
        with self._lock:
            return {n: d for n, d in self.files.items() if not n.startswith("_")}

    def rows(self) -> builtins.list[dict[str, Any]]:
        """Every row of every Parquet, CSV or JSON-lines data file, as dicts."""
        import orjson

        rows: builtins.list[dict[str, Any]] = []
        for name, data in sorted(self.data_files().items()):
            if name.endswith(".parquet"):
                rows += pq.read_table(pa.BufferReader(data)).to_pylist()
            elif name.endswith(".csv"):
                rows += pacsv.read_csv(pa.BufferReader(data)).to_pylist()
            elif name.endswith((".json", ".jsonl")):
                rows += [orjson.loads(line) for line in data.splitlines() if line.strip()]
        return rows


class SinkContract:
    """The tests every sink must pass; subclass it in a pytest module and implement :meth:`make_sink`.

    A sink under test takes calls with ``write`` (raising :class:`~cio_sync.InvalidCall` for bad ones), and has
    ``flush()`` and ``close()`` returning the :class:`~cio_sync.WrittenFile` objects it published. Override
    :meth:`message_ids` if your files do not keep a ``messageId`` column.
    """

    #: How many sample calls the bulk test writes.
    calls = 500

    def make_sink(self, writer: MemoryWriter) -> Any:
        raise NotImplementedError("return your sink, publishing through `writer`")

    def message_ids(self, writer: MemoryWriter) -> list[str]:
        return [str(r["messageId"]) for r in writer.rows()]

    def accepts(self, call: dict[str, Any]) -> bool:
        """Whether your sink keeps this (valid) call; a sink that keeps only some types overrides this."""
        return True

    def _sink(self) -> tuple[Any, MemoryWriter]:
        writer = MemoryWriter()
        return self.make_sink(writer), writer

    def test_every_accepted_call_is_published_exactly_once(self) -> None:
        sink, writer = self._sink()
        ids = []
        for i, sample in enumerate(sample_calls(self.calls, seed=21)):
            call = {**sample, "messageId": f"contract-{i}"}
            sink.write(call)
            if self.accepts(call):
                ids.append(call["messageId"])
            if i % 200 == 199:
                sink.flush()
        sink.close()
        published = self.message_ids(writer)
        assert sorted(published) == sorted(ids), "calls lost or published twice"

    def test_bad_calls_raise_invalid_call_and_the_sink_keeps_working(self) -> None:
        sink, writer = self._sink()
        good = {"type": "track", "userId": "1", "event": "Contract", "messageId": "good-1"}
        for bad in ({"type": "nope"}, {"type": "track", "userId": 1, "event": "E"}, b"{broken", 42):
            try:
                sink.write(bad)
            except InvalidCall:
                continue
            raise AssertionError(f"{bad!r} was accepted")
        sink.write(good)
        sink.close()
        if self.accepts(good):
            assert self.message_ids(writer) == ["good-1"]

    def test_flush_reports_what_it_published_and_close_is_idempotent(self) -> None:
        sink, writer = self._sink()
        call = {"type": "track", "userId": "1", "event": "Contract", "messageId": "m"}
        sink.write(call)
        files = sink.flush()
        if self.accepts(call):
            assert files
            assert all(f.name in writer.files and f.bytes == len(writer.files[f.name]) for f in files)
        assert sink.flush() == []
        sink.close()
        assert sink.close() == []

    def test_no_file_is_ever_overwritten(self) -> None:
        writer = MemoryWriter()
        original: Callable[..., WrittenFile] = writer.publish
        seen: set[str] = set()

        def watch(name: str, data: bytes, **kwargs: Any) -> WrittenFile:
            if name in seen and not kwargs.get("resume"):
                raise AssertionError(f"{name} published twice")
            seen.add(name)
            return original(name, data, **kwargs)

        writer.publish = watch  # type: ignore[method-assign]
        sink = self.make_sink(writer)
        for call in sample_calls(100, seed=3):
            sink.write(call)
            sink.flush()
        sink.close()

