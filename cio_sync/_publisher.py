"""The rolling buffer shared by every sink: rows accumulate per table, batches are cut and published in order.

A sink hands rows (tuples in its table's fixed column order) to a :class:`Publisher`, which owns:
- one buffer per table, cut into a batch on ``flush()``, on ``close()``, every ``flush_interval`` seconds from a
  background thread, and early when a table reaches ``max_rows`` rows or ``max_bytes`` bytes;
- the queue of cut batches: each is encoded once, named once (its name comes from the sink's durable counter) and
  then published, retried under the same name with the same bytes until it lands, so an ambiguous failure can
  never make two files of the same rows;
- statistics about what is buffered and what was published.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from cio_sync._errors import CioSyncError, ConfigError, SinkClosed
from cio_sync._formats import Format
from cio_sync._writer import Writer, WrittenFile

log = logging.getLogger("cio_sync.sink")


@dataclass(frozen=True)
class SinkStats:
    """A snapshot of what a sink has done. Readable in a notebook; cheap to take."""

    calls_accepted: int
    calls_rejected: int
    rows_buffered: int
    bytes_buffered: int
    batches_pending: int
    files_published: int
    rows_published: int
    bytes_published: int
    last_publish_at: datetime | None
    oldest_buffered_age: float | None
    last_error: str | None


class _TableBuffer:
    __slots__ = ("nbytes", "rows", "schema", "since")

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.rows: list[tuple[Any, ...]] = []
        self.nbytes = 0
        self.since = 0.0

    def take(self) -> pa.Table:
        columns = list(zip(*self.rows, strict=True)) if self.rows else [() for _ in self.schema]
        arrays = [pa.array(col, type=f.type) for col, f in zip(columns, self.schema, strict=True)]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self.rows = []
        self.nbytes = 0
        return table


@dataclass(eq=False)
class _Batch:
    table: str
    data: pa.Table
    rows: int
    encoded: bytes | None = None
    name: str | None = None


@dataclass(eq=False)
class _Counts:
    accepted: int = 0
    rejected: int = 0
    files: int = 0
    rows: int = 0
    bytes: int = 0
    last_publish_at: datetime | None = None
    last_error: str | None = None


_OPEN: weakref.WeakSet[Publisher] = weakref.WeakSet()


@atexit.register
def _flush_open_publishers() -> None:
    """At interpreter exit, publish what sinks that were never closed still buffer, rather than drop it."""
    for publisher in list(_OPEN):
        try:
            publisher.close()
        except Exception:
            log.exception("could not publish buffered rows of %s at exit", publisher.label)


class Publisher:
    """Buffers rows per table and publishes them as files through ``format`` and ``writer``."""

    def __init__(
        self,
        *,
        label: str,
        writer: Writer,
        format: Format,
        name_for: Callable[[str], str],
        flush_interval: float | None,
        max_rows: int | None,
        max_bytes: int | None,
    ) -> None:
        if flush_interval is not None and flush_interval <= 0:
            raise ConfigError(f"flush_interval must be positive seconds or None; got {flush_interval!r}")
        if max_rows is not None and max_rows < 1:
            raise ConfigError(f"max_rows must be at least 1 or None; got {max_rows!r}")
        if max_bytes is not None and max_bytes < 1:
            raise ConfigError(f"max_bytes must be at least 1 or None; got {max_bytes!r}")
        self.label = label
        self.writer = writer
        self.format = format
        self._name_for = name_for
        self.flush_interval = flush_interval
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._buffers: dict[str, _TableBuffer] = {}
        self._pending: deque[_Batch] = deque()
        self._counts = _Counts()
        self._lock = threading.Lock()  # guards buffers, pending and counts
        self._publish_lock = threading.RLock()  # one publisher of batches at a time, in order
        self._closed = False
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        if flush_interval is not None:
            self._timer = threading.Thread(target=self._run_timer, name=f"cio_sync-flush-{label}", daemon=True)
            self._timer.start()
        _OPEN.add(self)

    # -- intake --------------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def reject(self) -> None:
        with self._lock:
            self._counts.rejected += 1

    def add(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int) -> None:
        """Buffer one row of ``table``; publish that table early if it reached ``max_rows`` or ``max_bytes``."""
        with self._lock:
            if self._closed:
                raise SinkClosed(f"{self.label} is closed; create a new sink to write more")
            buffer = self._buffers.get(table)
            if buffer is None:
                buffer = self._buffers[table] = _TableBuffer(schema)
            if not buffer.rows:
                buffer.since = time.monotonic()
            buffer.rows.append(row)
            buffer.nbytes += size
            self._counts.accepted += 1
            full = (self.max_rows is not None and len(buffer.rows) >= self.max_rows) or (
                self.max_bytes is not None and buffer.nbytes >= self.max_bytes
            )
            if full:
                self._cut(table, buffer)
        if full:
            try:
                self._publish_pending()
            except CioSyncError as exc:
                # The rows stay queued and are published by the next flush; write() must not fail for a call it
                # already accepted.
                log.warning("%s: early publish failed, will retry on the next flush: %s", self.label, exc)

    def _cut(self, table: str, buffer: _TableBuffer) -> None:
        rows = len(buffer.rows)
        self._pending.append(_Batch(table, buffer.take(), rows))

    # -- publishing ----------------------------------------------------------------------------------------------

    def flush(self) -> list[WrittenFile]:
        """Publish everything buffered now, one file per table with rows; return the files published."""
        with self._publish_lock:
            with self._lock:
                for table, buffer in self._buffers.items():
                    if buffer.rows:
                        self._cut(table, buffer)
            return self._publish_pending()

    def _publish_pending(self) -> list[WrittenFile]:
        published: list[WrittenFile] = []
        with self._publish_lock:
            while True:
                with self._lock:
                    if not self._pending:
                        break
                    batch = self._pending[0]
                try:
                    if batch.encoded is None:
                        batch.encoded = self.format.encode(batch.data)
                    if batch.name is None:
                        batch.name = self._name_for(batch.table)
                    written = self.writer.publish(batch.name, batch.encoded, table=batch.table, rows=batch.rows)
                except CioSyncError as exc:
                    with self._lock:
                        self._counts.last_error = str(exc)
                    raise
                with self._lock:
                    self._pending.popleft()
                    self._counts.files += 1
                    self._counts.rows += written.rows
                    self._counts.bytes += written.bytes
                    self._counts.last_publish_at = datetime.now(UTC)
                    self._counts.last_error = None
                log.info("%s: published %s (%d rows, %d bytes)", self.label, written.path, written.rows, written.bytes)
                published.append(written)
        return published

    def _run_timer(self) -> None:
        assert self.flush_interval is not None
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush()
            except Exception as exc:
                log.warning("%s: timed flush failed, the rows stay buffered: %s", self.label, exc)

    def close(self) -> list[WrittenFile]:
        """Stop the timer and publish everything; idempotent. If publishing fails, nothing is dropped and
        ``close()`` may be called again."""
        if self._closed:
            return []
        self._stop.set()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join()
        with self._publish_lock:
            with self._lock:
                if self._closed:
                    return []
            files = self.flush()
            with self._lock:
                self._closed = True
        _OPEN.discard(self)
        return files

    # -- observation ---------------------------------------------------------------------------------------------

    def stats(self) -> SinkStats:
        now = time.monotonic()
        with self._lock:
            buffered = [b for b in self._buffers.values() if b.rows]
            counts = self._counts
            return SinkStats(
                calls_accepted=counts.accepted,
                calls_rejected=counts.rejected,
                rows_buffered=sum(len(b.rows) for b in buffered) + sum(p.rows for p in self._pending),
                bytes_buffered=sum(b.nbytes for b in buffered),
                batches_pending=len(self._pending),
                files_published=counts.files,
                rows_published=counts.rows,
                bytes_published=counts.bytes,
                last_publish_at=counts.last_publish_at,
                oldest_buffered_age=(now - min(b.since for b in buffered)) if buffered else None,
                last_error=counts.last_error,
            )
