"""Where rows wait before they are cut into a batch: the row store contract, the rows of one table in
memory (chunked into Arrow columns), and the in-memory store."""

from __future__ import annotations

import logging
import time
from operator import itemgetter
from typing import Any, Final, Protocol

import pyarrow as pa

from cio_sync._types import Batch, Buffered, Filled
from cio_sync.intake.calls import time_array
from cio_sync.schemas.tables import TIMESTAMP

log = logging.getLogger("cio_sync.sink")


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
    tuples (its batch then goes to the dead letters when it is encoded, with its rows).

    ``nbytes`` is what the rows take in memory: the sizes given with the rows not yet converted (their Python
    form), plus the Arrow buffers of the chunks (measured when each chunk is made, and less than its rows' sizes).
    """

    __slots__ = ("chunk_bytes", "chunks", "columnar", "count", "first", "last", "nbytes", "rows", "schema", "since")

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.rows: list[tuple[Any, ...]] = []
        self.chunks: list[pa.Table] = []
        self.columnar = True  # until a chunk fails to convert; then the rest of this buffer stays as tuples
        self.count = 0
        self.nbytes = 0
        self.chunk_bytes = 0  # the Arrow buffers of ``chunks``
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
        harmless, the manifest's times are bounds). Called again, takes back the row before it (the rows of one
        call are taken back together), from the Arrow chunks if it was converted already."""
        self.count -= 1
        if self.rows:
            self.rows.pop()
            self.nbytes -= size
            return
        last = self.chunks.pop()
        if last.num_rows > 1:
            self.chunks.append(last.slice(0, last.num_rows - 1))
        self.chunk_bytes = sum(chunk.get_total_buffer_size() for chunk in self.chunks)
        self.nbytes = self.chunk_bytes

    def _convert(self) -> None:
        try:
            chunk = rows_to_table(self.rows, self.schema)
        except Exception as exc:  # kept as tuples: encoding the batch will say what is wrong and keep the rows
            log.warning("rows of %d cannot be converted to Arrow columns (%s); they are kept as rows", self.count,
                        exc)
            self.rows = self._as_rows() + self.rows
            self.chunks = []
            self.chunk_bytes = 0
            self.columnar = False
            return
        self.chunks.append(chunk)
        self.chunk_bytes += chunk.get_total_buffer_size()
        self.nbytes = self.chunk_bytes  # the converted rows now take their Arrow size, not their Python size
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
        nbytes = self.nbytes
        if self.chunks:
            try:
                tail = [rows_to_table(self.rows, self.schema)] if self.rows else []
                data = pa.concat_tables(self.chunks + tail)  # no copy: the chunks become the table's chunks
                nbytes = self.chunk_bytes + sum(t.get_total_buffer_size() for t in tail)
            except Exception:
                data = self._as_rows() + self.rows
        batch = Batch(table, self.count, data, self.schema, key=key, nbytes=nbytes,
                      first_time=self.first, last_time=self.last)
        self.rows = []
        self.chunks = []
        self.chunk_bytes = 0
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
