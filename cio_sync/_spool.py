"""The durable spool: accepted rows on local disk, in Avro container segments, until their file is published.

With a spool, ``write()`` returns only after the call's row was appended to a segment file (and, by the sync
policy, flushed to the disk), so a call it accepted survives the process being killed. Layout, one folder per
table::

    <spool_dir>/<table>/000000000007.avro    rows of one batch, one Avro block per row
    <spool_dir>/<table>/000000000007.data    the encoded file of that batch, once it has a name
    <spool_dir>/<table>/000000000007.name    its name, row count and SHA-256 (written after .data)

A batch is cut by closing its segment. Before the upload, the batch's file name and bytes are written beside the
segment; after the upload, the three files are deleted. On start, every segment left behind becomes a pending
batch: named ones are published again under their name with their bytes (an upload that had landed is recognised,
not repeated), unnamed ones get the next name. A segment's torn last block (the row of a ``write()`` that never
returned) is dropped.

Sync policies (``spool_sync``): ``"always"`` fsyncs after every row (a call that ``write`` accepted survives power
loss); ``"interval"`` fsyncs at most every ``spool_sync_interval`` seconds (a power loss may lose that window);
``"os"`` leaves it to the operating system. In every policy a row is handed to the OS before ``write`` returns, so
a crash of the process alone never loses an accepted call.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import fastavro
import orjson
import pyarrow as pa
from fastavro.write import Writer as AvroWriter

from cio_sync._errors import ConfigError, StorageError
from cio_sync._publisher import Batch, Buffered, Filled, TableRows
from cio_sync._schemas import is_document_schema

log = logging.getLogger("cio_sync.spool")

SYNC_POLICIES: Final = ("always", "interval", "os")
_AVRO_SCHEMA: Final = fastavro.parse_schema({
    "type": "record", "name": "SpooledRow", "namespace": "cio_sync",
    "fields": [
        {"name": "row", "type": "bytes"},
        {"name": "size", "type": "long"},
        {"name": "time", "type": ["null", "long"]},
    ],
})
_WIDTH: Final = 12


# Avro blocks are framed here rather than by fastavro's Writer: a block per row through Writer.write + flush costs
# ~6 us a row, framing it by hand ~1 us (the record is three fields; the layout is the Avro 1.11 spec's "Object
# Container Files": a block is its record count and byte size as zigzag varints, the records, the sync marker).
# fastavro still writes each segment's header and reads segments back.


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


#: The varint of the high part (bits 28 and up) of the last large value: consecutive times share it for minutes.
#: One tuple, swapped whole, so a thread never pairs one value's high bits with another's encoding.
_HIGH: list[tuple[int, bytes]] = [(0, b"\x00")]


def _long(value: int) -> bytes:
    """An Avro long: zigzag, then base-128 varint. Small values (sizes) take one or two bytes without a loop;
    large ones (times in microseconds) reuse the encoding of their high bits from the value before."""
    n = (value << 1) ^ (value >> 63)
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if n < 0x10000000:
        return _varint(n)
    high = _HIGH[0]
    if high[0] != n >> 28:
        high = _HIGH[0] = (n >> 28, _varint(n >> 28))
    low = bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, ((n >> 14) & 0x7F) | 0x80,
                 ((n >> 21) & 0x7F) | 0x80))
    return low + high[1]


def _block(row: bytes, size: int, at: int | None, sync: bytes) -> bytes:
    """One Avro block holding one SpooledRow record (fields: row bytes, size long, time union null|long)."""
    record = b"".join((_long(len(row)), row, _long(size), b"\x00" if at is None else b"\x02" + _long(at)))
    return b"".join((b"\x02", _long(len(record)), record, sync))


def _text_of_bytes(value: Any) -> str:
    """JSON-text cells are kept as UTF-8 bytes in rows; the spool stores them as strings."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    raise TypeError(f"cannot spool a {type(value).__name__}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class _Segment:
    """The open segment of one table: rows appended since the last cut."""

    generation: int
    path: Path
    file: IO[bytes]
    writer: AvroWriter
    buffer: TableRows
    #: The segment's sync marker (from its header), which ends each block appended by hand.
    sync: bytes


class AvroSpool:
    """A :class:`~cio_sync._publisher.RowStore` that keeps every row on local disk until its file is published."""

    def __init__(self, directory: str | os.PathLike[str], *, schema_of: Callable[[str], pa.Schema],
                 sync: str = "always", sync_interval: float = 0.2) -> None:
        if sync not in SYNC_POLICIES:
            raise ConfigError(f"spool_sync must be one of {', '.join(SYNC_POLICIES)}; got {sync!r}")
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot use spool directory {self.directory}: {exc}") from exc
        self._schema_of = schema_of
        self._sync = sync
        self._sync_interval = sync_interval
        self._last_sync = 0.0
        self._open: dict[str, _Segment] = {}
        self._next_generation: dict[str, int] = {}
        self._recovered = self._recover()

    # -- encoding rows -------------------------------------------------------------------------------------------

    @staticmethod
    def _encode(schema: pa.Schema, row: tuple[Any, ...]) -> bytes:
        if is_document_schema(schema):
            return bytes(row[0])
        return orjson.dumps(row, default=_text_of_bytes)

    @staticmethod
    def _decode(schema: pa.Schema, data: bytes) -> tuple[Any, ...]:
        if is_document_schema(schema):
            return (data,)
        return tuple(orjson.loads(data))

    # -- appending -----------------------------------------------------------------------------------------------

    def _segment(self, table: str) -> _Segment:
        segment = self._open.get(table)
        if segment is not None:
            return segment
        folder = self.directory / table
        folder.mkdir(exist_ok=True)
        generation = self._next_generation.get(table, 1)
        self._next_generation[table] = generation + 1
        path = folder / f"{generation:0{_WIDTH}d}.avro"
        file = open(path, "xb")  # noqa: SIM115 - stays open until the batch is cut
        writer = AvroWriter(file, _AVRO_SCHEMA)
        writer.flush()
        file.flush()
        if self._sync != "os":
            os.fsync(file.fileno())
            _fsync_dir(folder)
        segment = self._open[table] = _Segment(generation, path, file, writer, TableRows(self._schema_of(table)),
                                               bytes(writer.sync_marker))  # type: ignore[attr-defined]
        return segment

    def append(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int,
               at: int | None = None) -> Filled:
        try:
            segment = self._segment(table)
            block = _block(self._encode(schema, row), size, at, segment.sync)
            fd = segment.file.fileno()
            written = os.write(fd, block)
            while written < len(block):  # a short write (a signal, a full disk that raises next time)
                written += os.write(fd, block[written:])
            if self._sync == "always" or (
                self._sync == "interval" and time.monotonic() - self._last_sync >= self._sync_interval
            ):
                os.fsync(segment.file.fileno())
                self._last_sync = time.monotonic()
        except OSError as exc:
            raise StorageError(f"could not append to the spool in {self.directory}: {exc}",
                               path=str(self.directory)) from exc
        return segment.buffer.add(row, size, at)

    def tables(self) -> list[str]:
        return [t for t, s in self._open.items() if s.buffer.count]

    def cut(self, table: str) -> Batch | None:
        segment = self._open.get(table)
        if segment is None or not segment.buffer.count:
            return None
        del self._open[table]
        self._close(segment)
        return segment.buffer.take(table, key=segment.path)

    def _close(self, segment: _Segment) -> None:
        segment.writer.flush()
        segment.file.flush()
        if self._sync != "os":
            os.fsync(segment.file.fileno())
        segment.file.close()

    # -- the life of a batch -------------------------------------------------------------------------------------

    def named(self, batch: Batch) -> None:
        assert batch.name is not None
        assert batch.encoded is not None
        segment: Path = batch.key
        _write_atomically(segment.with_suffix(".data"), batch.encoded)
        record = {"name": batch.name, "rows": batch.rows, "bytes": len(batch.encoded),
                  "sha256": hashlib.sha256(batch.encoded).hexdigest(),
                  "first_time": batch.first_time, "last_time": batch.last_time}
        _write_atomically(segment.with_suffix(".name"), orjson.dumps(record))
        _fsync_dir(segment.parent)

    def published(self, batch: Batch) -> None:
        segment: Path = batch.key
        for suffix in (".avro", ".data", ".name"):
            with contextlib.suppress(FileNotFoundError):
                segment.with_suffix(suffix).unlink()
        if self._sync != "os":
            _fsync_dir(segment.parent)

    def load(self, batch: Batch) -> None:
        """Read a batch's rows (or its encoded file) back from disk, after they were let go from memory."""
        segment: Path = batch.key
        if batch.name is not None:
            batch.encoded = segment.with_suffix(".data").read_bytes()
        else:
            batch.data = self._read_rows(segment, batch.table)[0]

    def release(self, batch: Batch) -> None:
        """Let go of a pending batch's rows and bytes in memory: they are on disk and :meth:`load` brings them back."""
        batch.data = None
        batch.encoded = None

    def pending(self) -> list[Batch]:
        recovered, self._recovered = self._recovered, []
        return recovered

    def buffered(self) -> dict[str, Buffered]:
        return {t: s.buffer.buffered() for t, s in self._open.items() if s.buffer.count}

    def close(self) -> None:
        for segment in self._open.values():
            with contextlib.suppress(OSError, ValueError):
                self._close(segment)
        self._open.clear()

    # -- recovery ------------------------------------------------------------------------------------------------

    def _read_rows(self, path: Path, table: str) -> tuple[list[tuple[Any, ...]], int, int | None, int | None]:
        schema = self._schema_of(table)
        rows: list[tuple[Any, ...]] = []
        nbytes = 0
        first: int | None = None
        last: int | None = None
        try:
            with open(path, "rb") as f:
                for record in fastavro.reader(f):
                    assert isinstance(record, dict)
                    rows.append(self._decode(schema, record["row"]))
                    nbytes += int(record["size"])
                    at = record.get("time")
                    if at is not None:
                        first = at if first is None else min(first, at)
                        last = at if last is None else max(last, at)
        except (EOFError, ValueError, StopIteration, OSError) as exc:
            # A torn last block: the row of a write() that never returned. Everything before it is kept.
            log.warning("spool segment %s ends in a torn block after %d rows (%s); the rest is dropped",
                        path, len(rows), type(exc).__name__)
        return rows, nbytes, first, last

    def _recover(self) -> list[Batch]:
        batches: list[tuple[int, str, Batch]] = []
        for folder in sorted(p for p in self.directory.iterdir() if p.is_dir()):
            table = folder.name
            generations = sorted({int(p.stem) for p in folder.iterdir() if p.stem.isdigit()})
            self._next_generation[table] = (generations[-1] + 1) if generations else 1
            for generation in generations:
                segment = folder / f"{generation:0{_WIDTH}d}.avro"
                batch = self._recover_one(table, segment)
                if batch is not None:
                    batches.append((generation, table, batch))
            for stray in folder.glob("*.tmp"):
                stray.unlink()
        if batches:
            log.info("spool %s: recovered %d batches (%d rows) not yet published", self.directory, len(batches),
                     sum(b.rows for _, _, b in batches))
        return [b for _, _, b in sorted(batches, key=lambda x: (x[0], x[1]))]

    def _recover_one(self, table: str, segment: Path) -> Batch | None:
        name_file, data_file = segment.with_suffix(".name"), segment.with_suffix(".data")
        if name_file.exists() and data_file.exists():
            record = orjson.loads(name_file.read_bytes())
            data = data_file.read_bytes()
            if hashlib.sha256(data).hexdigest() == record["sha256"]:
                return Batch(table, int(record["rows"]), None, self._schema_of(table), name=record["name"],
                             encoded=data, key=segment, attempted=True, nbytes=len(data),
                             first_time=record.get("first_time"), last_time=record.get("last_time"))
            log.warning("spool %s: %s does not match its checksum; the batch is encoded again", self.directory,
                        data_file)
        for leftover in (name_file, data_file):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        if not segment.exists():
            return None
        rows, nbytes, first, last = self._read_rows(segment, table)
        if not rows:
            segment.unlink()
            return None
        return Batch(table, len(rows), rows, self._schema_of(table), key=segment, nbytes=nbytes, first_time=first,
                     last_time=last)
