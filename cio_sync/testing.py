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
  its files, ``close`` idempotent, no file ever overwritten or removed, no name used twice (even after the files
  were deleted, as a user does once they are loaded), no file changed by a restart, and, if you provide
  ``make_spooled_sink(writer, spool_dir)``, no accepted call lost or published twice after a crash.
- :func:`abandon`: drop a sink built on the toolkit as if its process had been killed.
"""

from __future__ import annotations

import builtins
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
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
    is lost, its spool files stay as they are and its spool lock is let go (a StandardSink's workspace state too:
    what it had not committed is lost). Open a new sink on the same spool and
    target to see what a restart after a crash recovers."""
    publisher = getattr(sink, "_publisher", None)
    if publisher is None:
        raise TypeError(f"abandon() takes a sink built on cio_sync's toolkit; got {type(sink).__name__}")
    publisher.abandon()
    spool = getattr(sink, "spool", None)
    if spool is not None:
        spool.close()  # what the kernel does for a killed process: its files closed, its flock released
    state = getattr(sink, "state", None)
    if state is not None and callable(getattr(state, "abandon", None)):
        state.abandon()  # a StandardSink's workspace state: uncommitted changes lost, its lock released


class MemoryWriter:
    """A :class:`~cio_sync.Writer` that keeps published files in :attr:`files` (name -> bytes)."""

    def __init__(self, url: str = "memory-writer://") -> None:
        self.url = url
        self.files: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._watchers: list[Callable[[str, bytes | None], None]] = []

    def __repr__(self) -> str:
        return f"MemoryWriter({len(self.files)} files)"

    def publish(self, name: str, data: bytes, *, table: str, rows: int, resume: bool = False) -> WrittenFile:
        check_name(name)
        with self._lock:
            existing = self.files.get(name)
            if existing is not None and not (resume and existing == data):
                raise PublishConflict(f"{self.url}{name} already exists; it was left unchanged", path=name)
            self.files[name] = bytes(data)
        for watch in self._watchers:
            watch(name, bytes(data))
        return WrittenFile(path=f"{self.url}{name}", name=name, table=table, rows=rows, bytes=len(data))

    def list(self, folder: str) -> list[str]:
        prefix = folder.rstrip("/") + "/"
        with self._lock:
            return sorted({n[len(prefix):].split("/", 1)[0] for n in self.files if n.startswith(prefix)})

    def remove(self, name: str) -> None:
        with self._lock:
            self.files.pop(name, None)
        for watch in self._watchers:
            watch(name, None)

    def watch(self, callback: Callable[[str, bytes | None], None]) -> None:
        """Call ``callback(name, data)`` after each publish, and ``callback(name, None)`` after each remove."""
        self._watchers.append(callback)

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

    # -- names and files are for ever ------------------------------------------------------------------------------

    def _history(self, writer: MemoryWriter) -> dict[str, bytes]:
        """Watch ``writer``: fail as soon as a data file is removed by the sink, or a name that was ever published
        is published again with other bytes; the returned dict holds every data file's first bytes."""
        first: dict[str, bytes] = {}
        self._allowed = {"removing": False}
        self._violations: list[str] = []

        def watch(name: str, data: bytes | None) -> None:
            if name.startswith("_"):
                return  # the sink's own bookkeeping (counters, manifests, dead letters)
            problem = None
            if data is None and not self._allowed["removing"]:
                problem = f"the sink removed {name}: published files must never change"
            elif data is not None and name in first and first[name] != data:
                problem = (f"the sink reused the name {name} for other bytes: a name is never given twice and a "
                           "published file never rewritten")
            if problem is not None:
                self._violations.append(problem)  # also when a background publish swallows the error
                raise AssertionError(problem)
            if data is not None:
                first.setdefault(name, data)

        writer.watch(watch)
        return first

    def _check_history(self) -> None:
        assert not self._violations, self._violations[0]

    def _write_some(self, sink: Any, tag: str, count: int = 60) -> list[str]:
        ids = []
        for i, sample in enumerate(sample_calls(count, seed=len(tag) + 7)):
            call = {**sample, "messageId": f"{tag}-{i}"}
            sink.write(call)
            if self.accepts(call):
                ids.append(call["messageId"])
            if i % 20 == 19:
                sink.flush()
        return ids

    def test_names_are_never_reused_even_after_the_files_are_deleted(self) -> None:
        writer = MemoryWriter()
        history = self._history(writer)
        sink = self.make_sink(writer)
        self._write_some(sink, "before")
        sink.close()
        before = set(writer.data_files())
        self._allowed["removing"] = True  # the user loads the files, then deletes them
        for name in before:
            writer.remove(name)
        self._allowed["removing"] = False
        sink = self.make_sink(writer)
        self._write_some(sink, "after")
        sink.close()
        self._check_history()
        reused = before & set(writer.data_files())
        assert not reused, f"names given twice: {sorted(reused)[:5]}"
        assert set(history) == before | set(writer.data_files())

    def test_a_restart_leaves_the_published_files_as_they_are(self) -> None:
        writer = MemoryWriter()
        self._history(writer)
        sink = self.make_sink(writer)
        ids = self._write_some(sink, "first")
        sink.close()
        published = dict(writer.data_files())
        sink = self.make_sink(writer)  # a restart: a new process on the same target
        ids += self._write_some(sink, "second")
        sink.close()
        self._check_history()
        after = writer.data_files()
        changed = sorted(n for n, data in published.items() if after.get(n) != data)
        assert not changed, f"files changed or gone after a restart: {changed[:5]}"
        assert sorted(self.message_ids(writer)) == sorted(ids), "calls lost or published twice across a restart"

    # -- crashes ---------------------------------------------------------------------------------------------------

    def make_spooled_sink(self, writer: MemoryWriter, spool_dir: Path) -> Any:
        """Your sink on ``writer`` with its spool in ``spool_dir``; override it to run the crash test."""
        return None

    def crash(self, sink: Any) -> None:
        """Drop ``sink`` as its process being killed would (:func:`abandon` for sinks built on the toolkit)."""
        abandon(sink)

    def test_every_accepted_call_survives_a_crash_with_a_spool(self) -> None:
        import pytest

        with tempfile.TemporaryDirectory(prefix="cio-sync-contract-") as folder:
            writer = MemoryWriter()
            spool = Path(folder) / "spool"
            sink = self.make_spooled_sink(writer, spool)
            if sink is None:
                pytest.skip("make_spooled_sink is not provided")
            ids = []
            for crash in range(3):
                ids += self._write_some(sink, f"run{crash}", count=50)  # some published, the rest only spooled
                self.crash(sink)
                sink = self.make_spooled_sink(writer, spool)
            sink.close()
            published = self.message_ids(writer)
            lost = set(ids) - set(published)
            assert not lost, f"{len(lost)} accepted calls lost after a crash, e.g. {sorted(lost)[:3]}"
            assert sorted(published) == sorted(ids), "calls published twice after a crash"
