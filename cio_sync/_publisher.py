"""The rolling buffer shared by every sink: rows accumulate per table, batches are cut and published in order.

A sink hands rows (tuples in its table's fixed column order) to a :class:`Publisher`, which
- keeps them in a :class:`RowStore` (in memory by default; the Standard sink's store is its workspace state's
  transactional outbox, so a state change and its rows are committed together);
- cuts a table's rows into a batch on ``flush()``, on ``close()``, every ``flush_interval`` seconds from a
  background thread, and early when the table reaches ``max_rows`` rows or ``max_bytes`` bytes;
- publishes batches in the order they were cut: each is encoded once and named once (the name comes from the
  sink's durable counter), the name and bytes are kept by the store before the upload, and the batch is retried
  under that name with those bytes until it lands, so an ambiguous failure, or a crash with a durable store, can
  never make two files of the same rows;
- keeps statistics about what is buffered and what was published.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import pyarrow as pa

from cio_sync._errors import CioSyncError, ConfigError, PublishConflict, SinkClosed
from cio_sync._formats import Format
from cio_sync._writer import Writer, WrittenFile

log = logging.getLogger("cio_sync.sink")

#: Where rows that could not be encoded are kept, under the sink's root, with the reason.
DEAD_LETTERS_FOLDER = "_cio_sync/dead_letters"
#: Published files remembered for the next ``flush()`` to return.
_MAX_UNREPORTED = 100_000
#: New names tried for one batch whose names were taken by files that are not its own.
_MAX_RENAMES = 20


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
    rows_dead_lettered: int = 0


@dataclass(eq=False)
class Batch:
    """Rows of one table cut for one file. ``name`` and ``encoded`` are set once, just before the first upload."""

    table: str
    rows: int
    #: The rows (tuples in ``schema`` order) until the batch is encoded; ``None`` once the bytes are known.
    data: list[Any] | None
    schema: pa.Schema | None = None
    name: str | None = None
    encoded: bytes | None = None
    #: The store's handle on the batch (e.g. its id in a durable outbox).
    key: Any = None
    #: Set once an upload of ``encoded`` under ``name`` may have happened (an earlier try, or an earlier process).
    attempted: bool = False


@dataclass(frozen=True)
class Buffered:
    """What a store holds for one table that is not yet cut."""

    rows: int
    nbytes: int
    since: float | None


class RowStore(Protocol):
    """Where a sink's rows wait until they are published. Calls are serialised by the :class:`Publisher`."""

    def append(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int) -> Buffered:
        """Keep one row of ``table``; return what the table now buffers."""
        ...

    def tables(self) -> list[str]:
        """Tables with rows that are not cut yet."""
        ...

    def cut(self, table: str) -> Batch | None:
        """Take every buffered row of ``table`` as one batch (``None`` if there are none)."""
        ...

    def pending(self) -> list[Batch]:
        """Batches cut before this store was opened and not yet published (recovery); empty for memory."""
        ...

    def named(self, batch: Batch) -> None:
        """Record ``batch.name`` and ``batch.encoded`` before the first upload."""
        ...

    def published(self, batch: Batch) -> None:
        """Forget a batch whose file landed."""
        ...

    def buffered(self) -> dict[str, Buffered]:
        """What each table buffers now."""
        ...


class _TableRows:
    __slots__ = ("nbytes", "rows", "schema", "since")

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.rows: list[tuple[Any, ...]] = []
        self.nbytes = 0
        self.since = 0.0


def rows_to_table(rows: list[tuple[Any, ...]] | list[list[Any]], schema: pa.Schema) -> pa.Table:
    """Rows (tuples in schema order) as an Arrow table under ``schema``, column by column."""
    columns: list[Any] = list(zip(*rows, strict=True)) if rows else [() for _ in schema]
    arrays = [pa.array(col, type=f.type) for col, f in zip(columns, schema, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


class MemoryRowStore:
    """Rows kept in this process's memory: fast, and lost if the process dies before they are published."""

    def __init__(self) -> None:
        self._tables: dict[str, _TableRows] = {}

    def append(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int) -> Buffered:
        rows = self._tables.get(table)
        if rows is None:
            rows = self._tables[table] = _TableRows(schema)
        if not rows.rows:
            rows.since = time.monotonic()
        rows.rows.append(row)
        rows.nbytes += size
        return Buffered(len(rows.rows), rows.nbytes, rows.since)

    def tables(self) -> list[str]:
        return [t for t, r in self._tables.items() if r.rows]

    def cut(self, table: str) -> Batch | None:
        rows = self._tables.get(table)
        if rows is None or not rows.rows:
            return None
        batch = Batch(table, len(rows.rows), rows.rows, rows.schema)
        rows.rows = []
        rows.nbytes = 0
        return batch

    def pending(self) -> list[Batch]:
        return []

    def named(self, batch: Batch) -> None:
        pass

    def published(self, batch: Batch) -> None:
        pass

    def buffered(self) -> dict[str, Buffered]:
        return {t: Buffered(len(r.rows), r.nbytes, r.since) for t, r in self._tables.items() if r.rows}


@dataclass(eq=False)
class _Counts:
    accepted: int = 0
    rejected: int = 0
    files: int = 0
    rows: int = 0
    bytes: int = 0
    last_publish_at: datetime | None = None
    last_error: str | None = None
    dead_letters: int = 0


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
    """Buffers rows per table in a :class:`RowStore` and publishes them as files through ``format`` and ``writer``."""

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
        store: RowStore | None = None,
        on_publish: Callable[[WrittenFile], None] | None = None,
    ) -> None:
        if flush_interval is not None and (
            isinstance(flush_interval, bool) or not isinstance(flush_interval, int | float)
            or not math.isfinite(flush_interval) or flush_interval <= 0
        ):
            raise ConfigError(f"flush_interval must be a positive number of seconds or None; got {flush_interval!r}")
        for name, value in (("max_rows", max_rows), ("max_bytes", max_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an integer of at least 1, or None; got {value!r}")
        self.label = label
        self.writer = writer
        self.format = format
        self._name_for = name_for
        self.flush_interval = flush_interval
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.store: RowStore = store if store is not None else MemoryRowStore()
        self._pending: deque[Batch] = deque(self.store.pending())
        for batch in self._pending:
            batch.attempted = True
        self._counts = _Counts()
        self._on_publish = on_publish
        self._unreported: deque[WrittenFile] = deque(maxlen=_MAX_UNREPORTED)
        # ``lock`` guards the store, the queue and the counts; sinks hold it to make a state change and its rows
        # one step. ``_publish_lock`` lets one thread at a time publish, in order.
        self.lock = threading.RLock()
        self._publish_lock = threading.RLock()
        self._closed = False
        self._closing = False
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

    def check_open(self) -> None:
        if self._closed or self._closing:
            raise SinkClosed(f"{self.label} is closed; create a new sink to write more")

    def reject(self) -> None:
        with self.lock:
            self._counts.rejected += 1

    def accept(self) -> None:
        """Count one call or record accepted (whether or not it produced rows)."""
        with self.lock:
            self._counts.accepted += 1

    def append(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int) -> bool:
        """Buffer one row of ``table``; if the table reached ``max_rows`` or ``max_bytes``, cut it into a batch and
        return True: the caller then calls :meth:`publish_ready` (outside any transaction of its own)."""
        with self.lock:
            self.check_open()
            now = self.store.append(table, schema, row, size)
            full = (self.max_rows is not None and now.rows >= self.max_rows) or (
                self.max_bytes is not None and now.nbytes >= self.max_bytes
            )
            if full:
                self._cut(table)
            return full

    def append_rows(self, rows: list[tuple[str, pa.Schema, tuple[Any, ...], int]]) -> bool:
        """Buffer the rows one call or record produced, then cut the tables they filled (never in between, so a
        durable store commits a call's rows whole). Returns True if something was cut: then call
        :meth:`publish_ready` once outside any transaction of your own."""
        with self.lock:
            self.check_open()
            full: set[str] = set()
            for table, schema, row, size in rows:
                now = self.store.append(table, schema, row, size)
                if (self.max_rows is not None and now.rows >= self.max_rows) or (
                    self.max_bytes is not None and now.nbytes >= self.max_bytes
                ):
                    full.add(table)
            for table in full:
                self._cut(table)
            return bool(full)

    def add(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int) -> None:
        """Buffer one row of one accepted call, publishing early if its table is full."""
        with self.lock:
            full = self.append(table, schema, row, size)
            self._counts.accepted += 1
        if full:
            self.publish_ready()

    def _cut(self, table: str) -> None:
        batch = self.store.cut(table)
        if batch is not None:
            self._pending.append(batch)

    # -- publishing ----------------------------------------------------------------------------------------------

    def publish_ready(self) -> None:
        """Publish the batches already cut; a failure is logged and retried later, never raised: the caller's call
        or record was already accepted."""
        try:
            self._publish_pending()
        except Exception as exc:
            log.warning("%s: early publish failed, will retry on the next flush: %s", self.label, exc)

    def flush(self) -> list[WrittenFile]:
        """Publish everything buffered now, one file per table with rows. Returns every file published since the
        last ``flush()`` or ``close()`` returned, including those published early or by the timer."""
        with self._publish_lock:
            with self.lock:
                for table in self.store.tables():
                    self._cut(table)
            self._publish_pending()
            with self.lock:
                files = list(self._unreported)
                self._unreported.clear()
            return files

    def _publish_pending(self) -> None:
        """Publish queued batches in order. A table whose batch fails keeps its later batches queued behind it
        (files of a table must land in order); other tables go on. The first failure is raised at the end."""
        failed: set[str] = set()
        first_error: CioSyncError | None = None
        with self._publish_lock:
            with self.lock:
                queue = list(self._pending)
            for batch in queue:
                if batch.table in failed:
                    continue
                try:
                    written = self._publish_one(batch)
                except CioSyncError as exc:
                    failed.add(batch.table)
                    first_error = first_error or exc
                    with self.lock:
                        self._counts.last_error = str(exc)
                    continue
                with self.lock:
                    self.store.published(batch)
                    self._pending.remove(batch)
                    if written is not None:
                        self._record(written)
        if first_error is not None:
            raise first_error

    def _record(self, written: WrittenFile) -> None:
        self._counts.files += 1
        self._counts.rows += written.rows
        self._counts.bytes += written.bytes
        self._counts.last_publish_at = datetime.now(UTC)
        self._counts.last_error = None
        self._unreported.append(written)
        log.info("%s: published %s (%d rows, %d bytes)", self.label, written.path, written.rows, written.bytes)
        if self._on_publish is not None:
            try:
                self._on_publish(written)
            except Exception:
                log.exception("%s: on_publish callback failed for %s", self.label, written.path)

    def _publish_one(self, batch: Batch) -> WrittenFile | None:
        """Encode, name and upload one batch; ``None`` if its rows could not be encoded and went to dead letters."""
        if batch.encoded is None:
            try:
                assert batch.data is not None
                assert batch.schema is not None
                batch.encoded = self.format.encode(rows_to_table(batch.data, batch.schema))
            except Exception as exc:
                self._dead_letter(batch, exc)
                return None
            batch.data = None
        for _ in range(_MAX_RENAMES):
            if batch.name is None:
                batch.name = self._name_for(batch.table)
                with self.lock:
                    self.store.named(batch)
            resume, batch.attempted = batch.attempted, True
            try:
                return self.writer.publish(batch.name, batch.encoded, table=batch.table, rows=batch.rows,
                                           resume=resume)
            except PublishConflict as exc:
                # The name holds someone else's file (counters lost, or files from another writer): leave it
                # alone and publish these rows under the next name.
                log.error("%s: %s; publishing the batch under a new name", self.label, exc)
                batch.name = None
                batch.attempted = False
        raise CioSyncError(f"{self.label}: gave up after {_MAX_RENAMES} names that were already taken")

    def _dead_letter(self, batch: Batch, exc: BaseException) -> None:
        """Keep rows that cannot be encoded under ``_cio_sync/dead_letters/`` with the reason, never drop them."""
        reason = f"{type(exc).__name__}: {exc}"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{DEAD_LETTERS_FOLDER}/{batch.table}/{stamp}-{uuid.uuid4().hex[:12]}.jsonl"
        lines = [json.dumps({"reason": reason, "table": batch.table, "rows": batch.rows, "format": self.format.name})]
        names = batch.schema.names if batch.schema is not None else None
        for row in batch.data or []:
            record = dict(zip(names, row, strict=False)) if names else list(row)
            lines.append(json.dumps(record, default=str, ensure_ascii=True))
        data = ("\n".join(lines) + "\n").encode()
        self.writer.publish(name, data, table=batch.table, rows=batch.rows)
        log.error("%s: %d rows of %s could not be encoded (%s); kept in %s", self.label, batch.rows, batch.table,
                  reason, name)
        with self.lock:
            self._counts.dead_letters += batch.rows

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
            if self._closed:
                return []
            with self.lock:
                self._closing = True  # from here on writes are refused, so nothing lands after the last cut
            files = self.flush()
            with self.lock:
                self._closed = True
        _OPEN.discard(self)
        return files

    # -- observation ---------------------------------------------------------------------------------------------

    def stats(self) -> SinkStats:
        now = time.monotonic()
        with self.lock:
            buffered = self.store.buffered()
            counts = self._counts
            since = [b.since for b in buffered.values() if b.since is not None]
            return SinkStats(
                calls_accepted=counts.accepted,
                calls_rejected=counts.rejected,
                rows_buffered=sum(b.rows for b in buffered.values()) + sum(p.rows for p in self._pending),
                bytes_buffered=sum(b.nbytes for b in buffered.values()),
                batches_pending=len(self._pending),
                files_published=counts.files,
                rows_published=counts.rows,
                bytes_published=counts.bytes,
                last_publish_at=counts.last_publish_at,
                oldest_buffered_age=(now - min(since)) if since else None,
                last_error=counts.last_error,
                rows_dead_lettered=counts.dead_letters,
            )
