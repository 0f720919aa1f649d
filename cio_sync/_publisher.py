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
import contextlib
import hashlib
import json
import logging
import math
import reprlib
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any, Final, NamedTuple, Protocol

import orjson
import pyarrow as pa

from cio_sync._calls import EPOCH, parse_time, time_array
from cio_sync._errors import CioSyncError, ConfigError, PublishConflict, SinkClosed
from cio_sync._formats import Format
from cio_sync._schemas import TIMESTAMP
from cio_sync._writer import Writer, WrittenFile

log = logging.getLogger("cio_sync.sink")

#: Where rows that could not be encoded are kept, under the sink's root, with the reason.
DEAD_LETTERS_FOLDER = "_cio_sync/dead_letters"
#: Where the manifest of each sync goes, under the sink's root.
MANIFESTS_FOLDER = "_manifests"
#: Published files remembered for the next ``flush()`` to return.
_MAX_UNREPORTED = 100_000
#: Rejected calls kept in memory for the dead letters between two syncs (more are counted, not kept).
_MAX_REJECTED_KEPT = 10_000
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
    #: Bytes of rows held in memory, buffered or waiting to be published (what ``max_buffer_bytes`` bounds).
    bytes_in_memory: int = 0


@dataclass(eq=False)
class Batch:
    """Rows of one table cut for one file. ``name`` and ``encoded`` are set once, just before the first upload."""

    table: str
    rows: int
    #: The rows (tuples in ``schema`` order, or an Arrow table) until the batch is encoded; ``None`` once the bytes
    #: are known.
    data: list[Any] | pa.Table | None
    schema: pa.Schema | None = None
    name: str | None = None
    encoded: bytes | None = None
    #: The store's handle on the batch (e.g. its id in a durable outbox).
    key: Any = None
    #: Set once an upload of ``encoded`` under ``name`` may have happened (an earlier try, or an earlier process).
    attempted: bool = False
    #: Approximate bytes the batch holds in memory (what the memory budget counts).
    nbytes: int = 0
    #: Earliest and latest row time (µs): receivedAt for calls, the change time for workspace rows.
    first_time: int | None = None
    last_time: int | None = None
    #: SHA-256 of ``encoded``, for the manifest.
    sha256: str | None = None
    #: ``name`` was claimed but the store has not recorded it yet: :meth:`RowStore.named` must succeed before any
    #: upload under it (a name that is not recorded would be given again, to the same rows, after a crash).
    unrecorded: bool = False
    #: Set by a store for bytes it could not read back (``data`` then describes them, under ``schema``): the batch
    #: goes to the dead letters with this reason instead of being published.
    damage: BaseException | None = None


class Buffered(NamedTuple):
    """What a store holds for one table that is not yet cut (a tuple: stores make one per appended row)."""

    rows: int
    nbytes: int
    since: float | None


#: What a store's ``append`` returns: the table's buffered rows, bytes and since when (a :class:`Buffered` or a
#: plain tuple, which costs less to make once per row).
Filled = tuple[int, int, float | None]


class RowStore(Protocol):
    """Where a sink's rows wait until they are published. Calls are serialised by the :class:`Publisher`."""

    def append(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int,
               at: int | None = None) -> Filled:
        """Keep one row of ``table`` (``at``: its time in µs, for the manifest); return what the table buffers."""
        ...

    def tables(self) -> list[str]:
        """Tables with rows that are not cut yet."""
        ...

    def cut(self, table: str) -> Batch | None:
        """Take buffered rows of ``table`` as one batch (``None`` if there are none). Called again until it returns
        ``None``: a store may hold several batches of one table (e.g. a spool segment retired after a fault)."""
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

    def release(self, batch: Batch) -> None:
        """Let go of a pending batch's rows in memory if they can be read back (:meth:`load`); else do nothing."""
        ...

    def load(self, batch: Batch) -> None:
        """Read back what :meth:`release` let go of."""
        ...

    def retract(self, table: str, size: int) -> None:
        """Take back the last row appended to ``table`` (of ``size`` bytes): its call was refused after all. Only
        right after that append, before any cut. Never raises: a durable store that cannot undo the append on disk
        makes sure the row is never read back (and logs it)."""
        ...


#: Rows a table buffers as Python tuples before they are turned into Arrow columns: large enough that the
#: conversion's fixed cost does not matter, small enough that Python objects never pile up (a buffer of a million
#: rows is a million tuples and their strings otherwise, several times the size of the same data in Arrow).
CHUNK_ROWS: Final = 8192


class TableRows:
    """The rows of one table not yet cut, with their size, age and time range (shared by the row stores).

    Rows arrive as tuples and are turned into Arrow columns every :data:`CHUNK_ROWS` rows, so memory holds the
    compact columnar form and the final cut only joins the chunks. A chunk that Arrow cannot convert stays as
    tuples (its batch then goes to the dead letters when it is encoded, with its rows)."""

    __slots__ = ("chunks", "columnar", "count", "first", "last", "nbytes", "rows", "schema", "since")

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.rows: list[tuple[Any, ...]] = []
        self.chunks: list[pa.Table] = []
        self.columnar = True  # until a chunk fails to convert; then the rest of this buffer stays as tuples
        self.count = 0
        self.nbytes = 0
        self.since = 0.0
        self.first: int | None = None
        self.last: int | None = None

    def add(self, row: tuple[Any, ...], size: int, at: int | None) -> Filled:
        if not self.count:
            self.since = time.monotonic()
            self.first = self.last = at
        elif at is not None:
            self.first = at if self.first is None or at < self.first else self.first
            self.last = at if self.last is None or at > self.last else self.last
        rows = self.rows
        if len(rows) >= CHUNK_ROWS and self.columnar:
            # Converted before the next row rather than after the last, so that the row just added is always a
            # tuple that retract() can take back.
            self._convert()
            rows = self.rows
        rows.append(row)
        self.count += 1
        self.nbytes += size
        return self.count, self.nbytes, self.since

    def retract(self, size: int) -> None:
        """Take back the row :meth:`add` just added (its time stays in the range: a range a little wide is
        harmless, the manifest's times are bounds)."""
        self.rows.pop()
        self.count -= 1
        self.nbytes -= size

    def _convert(self) -> None:
        try:
            self.chunks.append(rows_to_table(self.rows, self.schema))
        except Exception as exc:  # kept as tuples: encoding the batch will say what is wrong and keep the rows
            log.warning("rows of %d cannot be converted to Arrow columns (%s); they are kept as rows", self.count,
                        exc)
            self.rows = self._as_rows() + self.rows
            self.chunks = []
            self.columnar = False
            return
        self.rows = []

    def _as_rows(self) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for chunk in self.chunks:
            out.extend(zip(*(column.to_pylist() for column in chunk.columns), strict=True))
        return out

    def buffered(self) -> Buffered:
        return Buffered(self.count, self.nbytes, self.since)

    def take(self, table: str, key: Any = None) -> Batch:
        """Everything buffered, as one batch (an Arrow table, or rows when few or not convertible); the buffer
        starts again empty."""
        data: list[Any] | pa.Table = self.rows
        if self.chunks:
            try:
                tail = [rows_to_table(self.rows, self.schema)] if self.rows else []
                data = pa.concat_tables(self.chunks + tail)
            except Exception:
                data = self._as_rows() + self.rows
        batch = Batch(table, self.count, data, self.schema, key=key, nbytes=self.nbytes,
                      first_time=self.first, last_time=self.last)
        self.rows = []
        self.chunks = []
        self.columnar = True
        self.count = 0
        self.nbytes = 0
        return batch


def rows_to_table(rows: list[tuple[Any, ...]] | list[list[Any]] | pa.Table, schema: pa.Schema) -> pa.Table:
    """Rows (tuples in schema order) as an Arrow table under ``schema``, column by column (a table as is)."""
    if isinstance(rows, pa.Table):
        return rows
    width = len(schema)
    if any(len(row) != width for row in rows):
        raise ValueError(f"rows must have {width} values, one per column of {schema.names}")
    # A column at a time with itemgetter: zip(*rows) would make one iterator object per row, and with them a
    # garbage collection every few hundred rows (3x slower on a large batch).
    columns = [list(map(itemgetter(i), rows)) for i in range(width)]
    arrays = [time_array(col, f.name) if f.type == TIMESTAMP else pa.array(col, type=f.type)
              for col, f in zip(columns, schema, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


def _letter_time(value: Any) -> Any:
    """A timestamp cell of a dead letter in one form, ISO-8601 UTC (rows hold microseconds, the text as sent, or a
    datetime once in Arrow); text that does not read as a timestamp is kept as it is."""
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            moment = EPOCH + timedelta(microseconds=value)
        elif isinstance(value, str | datetime):
            moment = parse_time(value, "timestamp")
        else:
            return value
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except (CioSyncError, OverflowError, ValueError):
        return value


class MemoryRowStore:
    """Rows kept in this process's memory: fast, and lost if the process dies before they are published."""

    def __init__(self) -> None:
        self._tables: dict[str, TableRows] = {}

    def append(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int,
               at: int | None = None) -> Filled:
        rows = self._tables.get(table)
        if rows is None:
            rows = self._tables[table] = TableRows(schema)
        return rows.add(row, size, at)

    def tables(self) -> list[str]:
        return [t for t, r in self._tables.items() if r.count]

    def cut(self, table: str) -> Batch | None:
        rows = self._tables.get(table)
        if rows is None or not rows.count:
            return None
        return rows.take(table)

    def pending(self) -> list[Batch]:
        return []

    def named(self, batch: Batch) -> None:
        pass

    def published(self, batch: Batch) -> None:
        pass

    def buffered(self) -> dict[str, Buffered]:
        return {t: r.buffered() for t, r in self._tables.items() if r.count}

    def release(self, batch: Batch) -> None:
        pass  # memory is all there is

    def load(self, batch: Batch) -> None:
        pass

    def retract(self, table: str, size: int) -> None:
        self._tables[table].retract(size)


def _rejected_line(entry: dict[str, Any]) -> str:
    """One dead letter as a line of ASCII JSON. A rejected input JSON cannot hold (keys of other types, nesting
    deeper than the encoder goes, NaN) is kept as its (shortened) repr instead, so that one bad call never stops a
    flush."""
    try:
        return json.dumps(entry, default=repr, ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return json.dumps({**entry, "input": reprlib.repr(entry.get("input"))}, ensure_ascii=True)


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


@dataclass(frozen=True)
class ManifestSpec:
    """How a sink's manifests are named and what they say about the sink (see docs/manifests.md)."""

    #: Returns the name (under the sink's root) of the next manifest; names never repeat.
    name_for: Callable[[], str]
    #: Fields about the sink written at the top of every manifest (mode, destination or workspace id).
    header: dict[str, Any]
    #: What the files' time range is: ``"received_at"`` (Advanced) or ``"changed_at"`` (Standard).
    time_label: str


WHEN_FULL: Final = ("block", "spill")


class BufferFull(CioSyncError):
    """The sink's memory budget is used up, storage is not taking files, and ``block_timeout`` ran out; the call
    was not accepted."""


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
        max_buffer_bytes: int | None = None,
        when_full: str = "block",
        block_timeout: float | None = None,
        manifest: ManifestSpec | None = None,
        keep_rejected: bool = False,
    ) -> None:
        if flush_interval is not None and (
            isinstance(flush_interval, bool) or not isinstance(flush_interval, int | float)
            or not math.isfinite(flush_interval) or flush_interval <= 0
        ):
            raise ConfigError(f"flush_interval must be a positive number of seconds or None; got {flush_interval!r}")
        for name, value in (("max_rows", max_rows), ("max_bytes", max_bytes), ("max_buffer_bytes", max_buffer_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an integer of at least 1, or None; got {value!r}")
        if when_full not in WHEN_FULL:
            raise ConfigError(f"when_full must be one of {', '.join(WHEN_FULL)}; got {when_full!r}")
        if block_timeout is not None and not (isinstance(block_timeout, int | float) and block_timeout >= 0):
            raise ConfigError(f"block_timeout must be seconds >= 0 or None; got {block_timeout!r}")
        self.label = label
        self.writer = writer
        self.format = format
        self._name_for = name_for
        self.flush_interval = flush_interval
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_buffer_bytes = max_buffer_bytes
        self.when_full = when_full
        self.block_timeout = block_timeout
        self.manifest = manifest
        self.keep_rejected = keep_rejected
        self._rejected: list[dict[str, Any]] = []
        self.store: RowStore = store if store is not None else MemoryRowStore()
        self._pending: deque[Batch] = deque(self.store.pending())
        for batch in self._pending:
            batch.attempted = batch.attempted or batch.name is not None
        self._memory = sum(b.nbytes for b in self._pending)
        self._counts = _Counts()
        self._on_publish = on_publish
        self._unreported: deque[WrittenFile] = deque(maxlen=_MAX_UNREPORTED)
        # ``lock`` guards the store, the queue and the counts; sinks hold it to make a state change and its rows
        # one step. ``_publish_lock`` lets one thread at a time publish, in order.
        self.lock = threading.RLock()
        self._publish_lock = threading.RLock()
        self._closed = False
        self._closing = False
        #: The batch being published (a spill never lets go of its bytes meanwhile).
        self._busy: Batch | None = None
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

    def reject(self, given: Any = None, error: BaseException | None = None) -> None:
        """Count a rejected call or record; with ``keep_rejected``, keep it and the reason for the dead letters."""
        with self.lock:
            self._counts.rejected += 1
            if self.keep_rejected and error is not None and len(self._rejected) < _MAX_REJECTED_KEPT:
                if isinstance(given, bytes | bytearray | memoryview):
                    given = bytes(given).decode("utf-8", errors="backslashreplace")
                self._rejected.append({"reason": str(error), "at": datetime.now(UTC).isoformat(), "input": given})

    def _publish_rejected(self) -> None:
        with self.lock:
            rejected, self._rejected = self._rejected, []
        if not rejected:
            return
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{DEAD_LETTERS_FOLDER}/rejected/{stamp}-{uuid.uuid4().hex[:12]}.jsonl"
        lines = [_rejected_line(r) for r in rejected]
        try:
            self.writer.publish(name, ("\n".join(lines) + "\n").encode(), table="_rejected", rows=len(lines))
        except CioSyncError:
            with self.lock:
                self._rejected = rejected + self._rejected
            raise

    def accept(self) -> None:
        """Count one call or record accepted (whether or not it produced rows)."""
        with self.lock:
            self._counts.accepted += 1

    def make_room(self) -> None:
        """Before accepting a call: if the memory budget is used up, publish early; if storage does not take the
        files, spill them to the spool (``when_full="spill"``) or wait for storage (``"block"``), and after
        ``block_timeout`` raise :class:`BufferFull` rather than drop anything."""
        if self.max_buffer_bytes is None or self._memory < self.max_buffer_bytes:
            return
        with self.lock:
            for table in self.store.tables():
                self._cut(table)
        self.publish_ready()
        if self._memory < self.max_buffer_bytes:
            return
        if self.when_full == "spill":
            with self.lock:
                for batch in self._pending:
                    if batch is self._busy:
                        continue  # being published by another thread right now
                    if batch.data is not None or batch.encoded is not None:
                        self.store.release(batch)
                        if batch.data is None and batch.encoded is None:
                            self._memory -= batch.nbytes
            if self._memory < self.max_buffer_bytes:
                return
        deadline = None if self.block_timeout is None else time.monotonic() + self.block_timeout
        pause = 0.05
        while self._memory >= self.max_buffer_bytes:
            self.check_open()
            if deadline is not None and time.monotonic() >= deadline:
                raise BufferFull(
                    f"{self.label}: {self._memory:,} bytes wait to be published (max_buffer_bytes="
                    f"{self.max_buffer_bytes:,}) and storage is not taking files: {self._counts.last_error}"
                )
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, 5.0)
            self.publish_ready()

    def _is_full(self, now: Filled) -> bool:
        return (self.max_rows is not None and now[0] >= self.max_rows) or (
            self.max_bytes is not None and now[1] >= self.max_bytes
        )

    def append_rows(self, rows: list[tuple[str, pa.Schema, tuple[Any, ...], int, int | None]]) -> set[str]:
        """Buffer the rows one call or record produced (table, schema, row, size, time); return the tables they
        filled. Cut those with :meth:`cut_tables` once the call's step is kept, so that a step undone after this
        never leaves its rows in a batch, and a durable store keeps a call's rows whole."""
        with self.lock:
            self.check_open()
            full: set[str] = set()
            append, max_rows, max_bytes = self.store.append, self.max_rows, self.max_bytes
            added = 0
            for table, schema, row, size, at in rows:
                count, nbytes, _ = append(table, schema, row, size, at)
                if (max_rows is not None and count >= max_rows) or (max_bytes is not None and nbytes >= max_bytes):
                    full.add(table)
                added += size
            self._memory += added
            return full

    def cut_tables(self, tables: set[str]) -> bool:
        """Cut these tables' rows into batches. Returns True if something was cut: then call :meth:`publish_ready`
        once, outside any transaction of your own."""
        if not tables:
            return False
        with self.lock:
            for table in tables:
                self._cut(table)
        return True

    def add(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int, at: int | None = None) -> None:
        """Buffer one row of one accepted call, publishing early if its table is full."""
        if self.max_buffer_bytes is not None and self._memory >= self.max_buffer_bytes:
            self.make_room()
        with self.lock:
            if self._closed or self._closing:
                self.check_open()
            now = self.store.append(table, schema, row, size, at)
            self._memory += size
            self._counts.accepted += 1
            full = (self.max_rows is not None and now[0] >= self.max_rows) or (
                self.max_bytes is not None and now[1] >= self.max_bytes
            )
            if full:
                self._cut(table)
        if full:
            self.publish_ready()

    @contextlib.contextmanager
    def holding(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int,
                at: int | None = None) -> Iterator[None]:
        """Buffer one row of a call whose acceptance depends on what the ``with`` block does (the other sink of a
        :class:`~cio_sync.Pipeline`): the row is appended before the block runs (a failure to append raises before
        it), taken back if the block raises, and counted — its table cut when full — only once the block is done.
        No cut can happen in between: the lock is held throughout."""
        if self.max_buffer_bytes is not None and self._memory >= self.max_buffer_bytes:
            self.make_room()
        with self.lock:
            if self._closed or self._closing:
                self.check_open()
            now = self.store.append(table, schema, row, size, at)
            try:
                yield
            except BaseException:
                self.store.retract(table, size)
                raise
            self._memory += size
            self._counts.accepted += 1
            full = (self.max_rows is not None and now[0] >= self.max_rows) or (
                self.max_bytes is not None and now[1] >= self.max_bytes
            )
            if full:
                self._cut(table)
        if full:
            self.publish_ready()

    def _cut(self, table: str) -> None:
        batch = self.store.cut(table)
        while batch is not None:
            self._pending.append(batch)
            batch = self.store.cut(table)

    def reconcile(self, holds: Callable[[Batch], bool]) -> None:
        """After a durable store undid changes (a failed write rolled back): drop the queued batches it no longer
        ``holds``, and count the memory held again from what is left."""
        with self.lock:
            self._pending = deque(batch for batch in self._pending if holds(batch))
            self._memory = sum(b.nbytes for b in self._pending if b.data is not None or b.encoded is not None) + sum(
                b.nbytes for b in self.store.buffered().values())

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
            self._publish_rejected()
            with self.lock:
                files = list(self._unreported)
                self._unreported.clear()
            return files

    def _publish_pending(self) -> None:
        """Publish queued batches in order, then the manifest of what landed, then let the batches go.

        A table whose batch fails keeps its later batches queued behind it (files of a table land in order); other
        tables go on. Batches leave the store only after the manifest that lists them was published, so a crash or
        a failure in between publishes them again (recognised, not duplicated) with the next manifest. The first
        failure is raised at the end.
        """
        failed: set[str] = set()
        first_error: CioSyncError | None = None
        landed: list[tuple[Batch, WrittenFile | None]] = []
        with self._publish_lock:
            with self.lock:
                queue = list(self._pending)
            for batch in queue:
                if batch.table in failed:
                    continue
                with self.lock:
                    self._busy = batch
                try:
                    landed.append((batch, self._publish_one(batch)))
                except CioSyncError as exc:
                    failed.add(batch.table)
                    first_error = first_error or exc
                    with self.lock:
                        self._counts.last_error = str(exc)
                finally:
                    self._busy = None
            files = [(b, w) for b, w in landed if w is not None]
            if files and self.manifest is not None:
                try:
                    self._publish_manifest(files)
                except CioSyncError as exc:
                    with self.lock:
                        self._counts.last_error = str(exc)
                    raise exc from (first_error if first_error is not exc else None)
            for batch, written in landed:
                with self.lock:
                    self.store.published(batch)
                    self._pending.remove(batch)
                    self._memory -= batch.nbytes if (batch.data is not None or batch.encoded is not None) else 0
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
        if batch.damage is not None:
            self._dead_letter(batch, batch.damage)
            return None
        if batch.data is None and batch.encoded is None:
            self.store.load(batch)  # spilled: read back from the spool
            with self.lock:
                self._memory += batch.nbytes  # in memory again (let go of once more by the next spill or publish)
        if batch.encoded is None:
            try:
                assert batch.data is not None
                assert batch.schema is not None
                batch.encoded = self.format.encode(rows_to_table(batch.data, batch.schema))
            except Exception as exc:
                self._dead_letter(batch, exc)
                return None
            batch.data = None
        if batch.sha256 is None:
            batch.sha256 = hashlib.sha256(batch.encoded).hexdigest()
        for _ in range(_MAX_RENAMES):
            if batch.name is None:
                batch.name = self._name_for(batch.table)
                batch.unrecorded = True
            if batch.unrecorded:
                # If recording fails the batch keeps its name and records it on the next try, before any upload.
                with self.lock:
                    self.store.named(batch)
                batch.unrecorded = False
            batch.attempted = True
            try:
                # Always as a resume: the name is ours (claimed from the counter), so a file already under it
                # with exactly these bytes is this batch landed by an earlier try, ours or the backend client's
                # own retry after a lost response (botocore, gcsfs and azure-core all retry by themselves).
                return self.writer.publish(batch.name, batch.encoded, table=batch.table, rows=batch.rows,
                                           resume=True)
            except PublishConflict as exc:
                # The name holds someone else's file (counters lost, or files from another writer): leave it
                # alone and publish these rows under the next name.
                log.error("%s: %s; publishing the batch under a new name", self.label, exc)
                batch.name = None
                batch.attempted = False
        raise CioSyncError(f"{self.label}: gave up after {_MAX_RENAMES} names that were already taken")

    def _publish_manifest(self, files: list[tuple[Batch, WrittenFile]]) -> None:
        assert self.manifest is not None
        label = self.manifest.time_label

        def when(micros: int | None) -> str | None:
            if micros is None:
                return None
            moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
            return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        entries = [{
            "name": w.name, "table": w.table, "rows": w.rows, "bytes": w.bytes, "sha256": b.sha256,
            f"min_{label}": when(b.first_time), f"max_{label}": when(b.last_time),
        } for b, w in files]
        name = self.manifest.name_for()
        document = {
            "manifest_version": 1, **self.manifest.header, "name": name,
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "files": entries, "rows": sum(w.rows for _, w in files),
        }
        self.writer.publish(name, orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n", table="_manifest",
                            rows=len(entries))

    def _dead_letter(self, batch: Batch, exc: BaseException) -> None:
        """Keep rows that cannot be encoded under ``_cio_sync/dead_letters/`` with the reason, never drop them."""
        reason = f"{type(exc).__name__}: {exc}"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{DEAD_LETTERS_FOLDER}/{batch.table}/{stamp}-{uuid.uuid4().hex[:12]}.jsonl"
        lines = [json.dumps({"reason": reason, "table": batch.table, "rows": batch.rows, "format": self.format.name})]
        names = batch.schema.names if batch.schema is not None else None
        times = {i for i, f in enumerate(batch.schema) if f.type == TIMESTAMP} if batch.schema is not None else set()
        data = batch.data
        if isinstance(data, pa.Table):
            data = list(zip(*(column.to_pylist() for column in data.columns), strict=True))
        for row in data or []:
            cells = [_letter_time(v) if i in times else v for i, v in enumerate(row)]
            record = dict(zip(names, cells, strict=False)) if names else cells
            lines.append(json.dumps(record, default=str, ensure_ascii=True))
        data = ("\n".join(lines) + "\n").encode()
        self.writer.publish(name, data, table=batch.table, rows=batch.rows)
        log.error("%s: %d rows of %s could not be %s (%s); kept in %s", self.label, batch.rows, batch.table,
                  "encoded" if batch.damage is None else "read back", reason, name)
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
                bytes_in_memory=self._memory,
            )
