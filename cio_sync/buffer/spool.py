"""The durable spool: accepted rows on local disk, in Avro container segments, until their file is published.

With a spool, ``write()`` returns only after the call's row was appended to a segment file (and, by the sync
policy, flushed to the disk), so a call it accepted survives the process being killed. Layout, one folder per
table::

    <spool_dir>/.lock                         locked (flock) by the one sink that uses the directory
    <spool_dir>/<table>/000000000007.avro     rows of one batch, one Avro block per row
    <spool_dir>/<table>/000000000007.data     the encoded file of that batch once it has a name, then its name record
    <spool_dir>/<table>/000000000007.name     the name record: name, row count, size and SHA-256 of the file
    <spool_dir>/<table>/000000000007.end      rare: where the whole blocks of a retired segment end (see below)

A batch is cut by closing its segment. Before the upload, the batch's file and name are recorded beside the
segment (``.data`` then ``.name``, each written to a temporary file, fsynced and renamed); no name is uploaded
before it is recorded. After the upload, the three files are deleted (the segment first).

Framing. A segment is an Avro object container file (codec null) of ``SpooledRow`` records: the row, its size, its
time, and a CRC-32 of those three fields. fastavro writes the header; each row is then one block framed here and
appended with a single ``os.write``: its record count (1), its byte size, the record, and the segment's 16-byte
sync marker. The spool remembers each segment's length:

- a failed append (a write that fails part-way, a failed fsync) truncates the segment back to that length and the
  call is refused with :class:`~cio_sync.StorageError`; nothing of it stays in the segment or in memory;
- if even the truncation fails, the segment is retired: its rows become a batch of their own, nothing is ever
  appended behind the torn block, the table's next row starts a new segment, and the segment's length is recorded
  in ``.end`` (best effort) so that a refused row whose bytes are whole is never read back; a failed fsync with
  ``spool_sync="interval"`` retires the segment too (the rows since the last fsync may not be on disk: they are
  published from memory), and so does a failed fsync of :meth:`AvroSpool.sync` (see below);
- a failure creating a segment (its folder, its header, the fsyncs of the file and its folder) refuses the call
  and removes the file.

Recovery. A sink opened on the spool reads what an earlier process left, and never fails on what it finds:

- a segment is read block by block; a block counts only if its sync marker, its size and its CRC agree. Bytes that
  do not form a whole, valid block (damage, garbage) are skipped: the reader resynchronises at the next valid
  block (one that ends exactly at the next sync marker). They are kept as a dead letter with the reason and their
  offsets (under ``_cio_sync/dead_letters/<table>/`` on the target), and every whole record around them is
  published;
- a torn last block (a block cut short by the end of the file: the row of a ``write()`` that never returned, never
  accepted) is dropped, and so is a segment whose header is missing or cut short (its creation never finished, so
  it holds no row). A segment whose header is damaged is read with the sync marker its blocks end with;
- a batch whose name was recorded is published again under that name with its recorded bytes (an upload that had
  landed is recognised, not repeated). The name comes from ``.name``, or from the copy at the end of ``.data`` if
  ``.name`` is damaged; if ``.data`` is damaged, the rows are read from the segment and encoded again, under the
  recorded name. Other segments get the next names;
- the spool's own temporary files are removed; files and folders that are not the spool's are left alone (logged).

Sync policies (``spool_sync``): ``"always"`` fsyncs after every row (a call that ``write`` accepted survives power
loss); ``"interval"`` fsyncs at most every ``spool_sync_interval`` seconds (a power loss may lose that window);
``"os"`` leaves it to the operating system; ``"group"`` does not fsync in ``append`` at all: rows become durable
when :meth:`AvroSpool.sync` returns (and when their segment is closed, as with ``"interval"``). In every policy a
row is handed to the OS before ``write`` returns, so a crash of the process alone never loses an accepted call.

The durability barrier (group commit). :meth:`AvroSpool.sync` returns once every row appended before it was called
is fsynced (its segment's data, and the folder entry of a new segment), whatever the policy. Rows are numbered as
they are appended (under the spool's condition); each segment knows the first row that is not yet fsynced. One
caller at a time leads: it takes the segments that hold rows not yet fsynced, fsyncs them outside the lock (a cut
that closes one of them meanwhile waits for the round), and settles; the callers that came meanwhile wait on the
condition, and each returns without an fsync of its own if the round covered its rows (it started after they were
appended). :attr:`AvroSpool.fsyncs` counts the segment fsyncs, so that sharing
shows. If an fsync fails, the segment is retired as with ``"interval"`` (its rows go on to be published from
memory, nothing is appended to it again, the table's next row starts a new segment), and every ``sync()`` whose
rows include one of that segment's not-yet-fsynced rows raises :class:`~cio_sync.StorageError`, until the rows are
durable another way: their batch's name and file recorded beside the segment (fsynced) or published.

One spool directory serves one sink: the sink holds an exclusive ``flock`` on ``<spool_dir>/.lock`` from its start
to its ``close()``, and a second sink (in this process or another) raises :class:`~cio_sync.StateError`.
"""

from __future__ import annotations

import base64
import contextlib
import errno as errnos
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import fastavro
import orjson
import pyarrow as pa
from fastavro.write import Writer as AvroWriter

from cio_sync._errors import CioSyncError, ConfigError, StateError, StorageError, library_error, make_error
from cio_sync._types import Batch, BatchState, Buffered, Filled
from cio_sync.buffer.rows import TableRows
from cio_sync.buffer.seen import FILE_NAME as SEEN_FILE
from cio_sync.schemas.tables import is_document_schema

log = logging.getLogger("cio_sync.spool")

SYNC_POLICIES: Final = ("always", "interval", "os", "group")
_AVRO_SCHEMA: Final = fastavro.parse_schema({
    "type": "record", "name": "SpooledRow", "namespace": "cio_sync",
    "fields": [
        {"name": "row", "type": "bytes"},
        {"name": "size", "type": "long"},
        {"name": "time", "type": ["null", "long"]},
        # CRC-32 (little-endian) of the encoding of the three fields above: a block with a flipped byte is found.
        {"name": "crc", "type": {"type": "fixed", "name": "crc32", "size": 4}},
    ],
})
_WIDTH: Final = 12
#: How many of a segment's last appended blocks can be taken back (the rows of one call, at most).
_UNDO_BLOCKS: Final = 4096
_MAGIC: Final = b"Obj\x01"
_SYNC_SIZE: Final = 16
_LOCK_FILE: Final = ".lock"
#: The files of the spool in a table's folder, and its own temporary files.
_OWN_FILE: Final = re.compile(r"(\d+)\.(avro|data|name|end)")
_OWN_TMP: Final = re.compile(r"\d+\.(data|name|end)\.tmp")
#: The files of one batch beside its segment, deleted in this order once it is published (the segment first).
_SUFFIXES: Final = (".avro", ".data", ".name", ".end")
#: Ends a ``.data`` file: the name record (JSON), its length (4 bytes, little-endian), then these 16 bytes.
_TRAILER: Final = b"cio_sync:name:v1"
#: The rows of a dead letter for bytes of a segment that could not be read.
LETTER_SCHEMA: Final = pa.schema([
    ("segment", pa.string()), ("offset", pa.int64()), ("length", pa.int64()), ("reason", pa.string()),
    ("text", pa.string()), ("base64", pa.string()),
])


# Avro blocks are framed here rather than by fastavro's Writer: a block per row through Writer.write + flush costs
# ~6 us a row, framing it by hand ~1 us (the record is four fields; the layout is the Avro 1.11 spec's "Object
# Container Files": a block is its record count and byte size as zigzag varints, the records, the sync marker).
# fastavro still writes each segment's header; segments are read back here, leniently (see _read_segment).


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
    """One Avro block holding one SpooledRow record (fields: row bytes, size long, time union null|long, crc)."""
    record = b"".join((_long(len(row)), row, _long(size), b"\x00" if at is None else b"\x02" + _long(at)))
    return b"".join((b"\x02", _long(len(record) + 4), record, zlib.crc32(record).to_bytes(4, "little"), sync))


# -- reading segments back ---------------------------------------------------------------------------------------


class _Torn(Exception):
    """The bytes end before the structure being read does."""


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """The Avro long at ``pos`` and the position after it; :class:`_Torn` if the bytes end first."""
    try:
        byte = data[pos]
        n = byte & 0x7F
        shift = 7
        while byte & 0x80:
            pos += 1
            byte = data[pos]
            n |= (byte & 0x7F) << shift
            shift += 7
            if shift > 70:
                raise ValueError("a number longer than ten bytes")
    except IndexError:
        raise _Torn from None
    return (n >> 1) ^ -(n & 1), pos + 1


def _read_bytes(data: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = _read_long(data, pos)
    if n < 0:
        raise ValueError("a negative length")
    if pos + n > len(data):
        raise _Torn
    return data[pos:pos + n], pos + n


#: A record read back: row bytes, size, time, and the offsets of the block that held it.
_Record = tuple[bytes, int, int | None, int, int]


def _header(data: bytes, *, check_magic: bool = True) -> tuple[bytes, int, bool]:
    """The sync marker, where the first block starts, and whether records carry a CRC (segments written before
    the CRC field do not). :class:`_Torn` if the header is cut short, ``ValueError`` if it is not ours."""
    if check_magic and data[:4] != _MAGIC:
        if len(data) < 4 and _MAGIC.startswith(data):
            raise _Torn
        raise ValueError("the file does not start as an Avro container")
    pos = 4
    meta: dict[bytes, bytes] = {}
    while True:
        count, pos = _read_long(data, pos)
        if count == 0:
            break
        if count < 0:
            count = -count
            _, pos = _read_long(data, pos)
        if count > 64:
            raise ValueError("the header's metadata is not a map")
        for _ in range(count):
            key, pos = _read_bytes(data, pos)
            meta[key], pos = _read_bytes(data, pos)
    if pos + _SYNC_SIZE > len(data):
        raise _Torn
    codec = meta.get(b"avro.codec", b"null")
    if codec != b"null":
        raise ValueError(f"the codec is {codec!r}, not null")
    try:
        names = [f["name"] for f in json.loads(meta[b"avro.schema"])["fields"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("the header holds no SpooledRow schema") from exc
    if names[:3] != ["row", "size", "time"] or names[3:] not in ([], ["crc"]):
        raise ValueError(f"the header's schema has fields {names}, not a SpooledRow's")
    return data[pos:pos + _SYNC_SIZE], pos + _SYNC_SIZE, names[3:] == ["crc"]


def _block_at(data: bytes, start: int, end: int, crc: bool) -> list[_Record]:
    """The records of the block at ``start`` that must end where the sync marker at ``end`` begins; ``ValueError``
    (saying why) if the bytes there are not such a block."""
    try:
        count, pos = _read_long(data, start)
        size, pos = _read_long(data, pos)
    except _Torn:
        raise ValueError("the block is cut short") from None
    if count < 1 or count > end - pos:
        raise ValueError(f"not a block (a record count of {count})")
    if pos + size != end:
        raise ValueError("the block's size does not match where its sync marker is")
    records: list[_Record] = []
    try:
        for _ in range(count):
            first = pos
            row, pos = _read_bytes(data, pos)
            size_field, pos = _read_long(data, pos)
            branch, pos = _read_long(data, pos)
            at: int | None = None
            if branch == 1:
                at, pos = _read_long(data, pos)
            elif branch != 0:
                raise ValueError("the record's time is neither null nor a long")
            if crc:
                if pos + 4 > end or zlib.crc32(data[first:pos]) != int.from_bytes(data[pos:pos + 4], "little"):
                    raise ValueError("the record does not match its CRC")
                pos += 4
            if pos > end:
                raise ValueError("a record runs past its block")
            records.append((row, size_field, at, start, end + _SYNC_SIZE))
    except _Torn:
        raise ValueError("a record runs past its block") from None
    if pos != end:
        raise ValueError("the block holds bytes after its records")
    return records


@dataclass
class _Reading:
    """What a segment held: its whole records, the byte ranges that could not be read (offset, length, why), and
    the size of a torn last block that was dropped."""

    records: list[_Record] = field(default_factory=list)
    damaged: list[tuple[int, int, str]] = field(default_factory=list)
    torn: int = 0


def _own_block(data: bytes, pos: int, sync: bytes) -> tuple[bytes, int, int | None, int] | None:
    """The fast path for a block as the spool writes it (one record with a CRC, its sync marker right where its size
    says): its row, size and time and where the next block starts; ``None`` if it is anything else. The varints are
    read inline: this is most of the time of reading a segment back."""
    try:
        if data[pos] != 2:
            return None
        byte = data[pos + 1]
        n = byte & 0x7F
        at = pos + 2
        shift = 7
        while byte & 0x80:
            byte = data[at]
            at += 1
            n |= (byte & 0x7F) << shift
            shift += 7
        end = at + ((n >> 1) ^ -(n & 1))
        if end <= at or data[end:end + _SYNC_SIZE] != sync:
            return None
        first = at
        values = [0, 0, 0]
        row = b""
        for i in range(3):  # the row's length (then the row), its size, the union branch of its time
            byte = data[at]
            n = byte & 0x7F
            at += 1
            shift = 7
            while byte & 0x80:
                byte = data[at]
                at += 1
                n |= (byte & 0x7F) << shift
                shift += 7
            values[i] = (n >> 1) ^ -(n & 1)
            if i == 0:
                row = data[at:at + values[0]]
                at += values[0]
        time: int | None = None
        if values[2] == 1:
            byte = data[at]
            n = byte & 0x7F
            at += 1
            shift = 7
            while byte & 0x80:
                byte = data[at]
                at += 1
                n |= (byte & 0x7F) << shift
                shift += 7
            time = (n >> 1) ^ -(n & 1)
        elif values[2] != 0:
            return None
        if at + 4 != end or values[0] < 0 or zlib.crc32(memoryview(data)[first:at]) != int.from_bytes(
                data[at:end], "little"):
            return None
    except IndexError:
        return None
    return row, values[1], time, end + _SYNC_SIZE


def _scan(data: bytes, pos: int, sync: bytes, crc: bool) -> _Reading:
    reading = _Reading()
    n = len(data)
    records = reading.records
    while pos < n:
        own = _own_block(data, pos, sync) if crc else None
        if own is not None:
            records.append((own[0], own[1], own[2], pos, own[3]))
            pos = own[3]
            continue
        end = data.find(sync, pos)
        if end < 0:
            why = _tail(data, pos)
            if why is None:
                reading.torn = n - pos
            else:
                reading.damaged.append((pos, n - pos, why))
            break
        try:
            records += _block_at(data, pos, end, crc)
        except ValueError as exc:
            # Resynchronise: the first position after ``pos`` where a whole block ends exactly at this marker.
            for start in range(pos + 1, end):
                try:
                    found = _block_at(data, start, end, crc)
                except ValueError:
                    continue
                reading.damaged.append((pos, start - pos, str(exc)))
                records += found
                break
            else:
                reading.damaged.append((pos, end + _SYNC_SIZE - pos, str(exc)))
        pos = end + _SYNC_SIZE
    return reading


def _tail(data: bytes, pos: int) -> str | None:
    """``None`` if the bytes from ``pos`` to the end are a block cut short (a torn last write), else why not."""
    try:
        count, at = _read_long(data, pos)
        size, at = _read_long(data, at)
    except _Torn:
        return None
    except ValueError as exc:
        return f"the bytes after the last whole block are not a block ({exc})"
    if count == 1 and size >= 0 and at + size + _SYNC_SIZE > len(data):
        return None
    return "the bytes after the last whole block are not a block"


def _read_segment(data: bytes) -> _Reading:
    """Every whole record of a segment, what could not be read, and a torn tail (see the module docstring)."""
    try:
        sync, start, crc = _header(data)
        return _scan(data, start, sync, crc)
    except _Torn:
        # A header cut short: the segment's creation never finished, and no row is ever appended before it did.
        return _Reading(torn=len(data))
    except ValueError as exc:
        damage = f"the segment's header is damaged ({exc})"
    with contextlib.suppress(_Torn, ValueError):  # only the magic is damaged
        sync, start, crc = _header(data, check_magic=False)
        reading = _scan(data, start, sync, crc)
        reading.damaged.insert(0, (0, 4, damage))
        return reading
    # Read with the marker the last block ends with; the header is what comes before its first occurrence.
    if len(data) > _SYNC_SIZE:
        sync = data[-_SYNC_SIZE:]
        start = data.find(sync) + _SYNC_SIZE
        if start < len(data):
            reading = max((_scan(data, start, sync, crc) for crc in (True, False)), key=lambda r: len(r.records))
            if reading.records:
                reading.damaged.insert(0, (0, start, damage))
                return reading
    return _Reading(damaged=[(0, len(data), damage)])


# -- files -------------------------------------------------------------------------------------------------------


#: How a table's rows are written to the spool and read back: ``(encode(row) -> bytes, decode(bytes) -> row)``.
RowCodec = tuple[Callable[[tuple[Any, ...]], bytes], Callable[[bytes], tuple[Any, ...]]]


def _text_of_bytes(value: Any) -> str:
    """JSON-text cells are kept as UTF-8 bytes in rows; the spool stores them as strings."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    raise TypeError(f"cannot spool a {type(value).__name__}")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errnos.ENOSPC, os.strerror(errnos.ENOSPC))
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, parts: Iterable[bytes]) -> None:
    """``path`` holds ``parts`` whole, or is left as it was (its temporary file removed)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for part in parts:
                _write_all(fd, part)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _name_record(data: bytes) -> dict[str, Any] | None:
    """A name record (``.name``, or the end of ``.data``) if it is whole, else ``None``."""
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not (isinstance(record, dict) and isinstance(record.get("name"), str) and record["name"]
            and isinstance(record.get("rows"), int) and isinstance(record.get("bytes"), int)
            and isinstance(record.get("sha256"), str)):
        return None
    return record


def _read_data(path: Path, record: dict[str, Any] | None) -> tuple[bytes, dict[str, Any]] | None:
    """The encoded file kept in ``path`` and its name record (from the file's end, else ``record``), if they
    agree with each other; ``None`` if the file is damaged. ``OSError`` if it cannot be read."""
    with open(path, "rb") as f:
        total = f.seek(0, os.SEEK_END)
        body = total
        if total >= 4 + len(_TRAILER):
            f.seek(total - 4 - len(_TRAILER))
            end = f.read(4 + len(_TRAILER))
            length = int.from_bytes(end[:4], "little")
            if end[4:] == _TRAILER and length <= total - len(end):
                f.seek(total - len(end) - length)
                record = _name_record(f.read(length)) or record
                body = total - len(end) - length
        if record is None or record["bytes"] != body:
            return None
        f.seek(0)
        encoded = f.read(body)
    if hashlib.sha256(encoded).hexdigest() != record["sha256"]:
        return None
    return encoded, record


@dataclass(eq=False)
class _Segment:
    """The open segment of one table: rows appended since the last cut."""

    generation: int
    path: Path
    #: The segment's file descriptor, opened with O_APPEND.
    fd: int
    #: Bytes of the segment that hold whole blocks: where the next block starts, and what a failed append leaves.
    size: int
    #: The segment's sync marker (from its header), which ends each block appended by hand.
    sync: bytes
    buffer: TableRows
    #: Bytes of the last blocks appended, the latest last (what :meth:`AvroSpool.retract` takes back, one by one:
    #: a call's rows are taken back together when one of them is refused).
    last: deque[int] = field(default_factory=lambda: deque(maxlen=_UNDO_BLOCKS))
    # The fields below are guarded by the spool's ``_cond`` (a sync() reads them without the publisher's lock).
    #: The number of the first row appended and not yet fsynced; ``None`` if every row is.
    unsynced: int | None = None
    #: While a sync() round fsyncs this segment: the first row appended since the round took it.
    after: int | None = None
    #: Whether a sync() round is fsyncing this segment now.
    syncing: bool = False
    #: An fsync failed: nothing is appended to it again, its rows are published from memory.
    broken: bool = False
    #: Folders whose entries (this segment's, a new table folder's) are not fsynced yet (``spool_sync="os"``).
    folders: tuple[Path, ...] = ()


class AvroSpool:
    """A :class:`~cio_sync.buffer.rows.RowStore` that keeps every row on local disk until its file is published.

    ``sync`` is the policy: "always", "interval", "os" or "group" (see the module docstring); :meth:`sync` is the
    durability barrier in every policy, and :attr:`fsyncs` counts the fsyncs of segment files.

    Raises :class:`~cio_sync.ConfigError` for a bad policy or a directory that cannot be made,
    :class:`~cio_sync.StateError` if another sink uses the directory, :class:`~cio_sync.StorageError` if the
    directory cannot be read. An ``OSError`` of any later operation is raised as a ``StorageError`` naming the path.
    """

    def __init__(self, directory: str | os.PathLike[str], *, schema_of: Callable[[str], pa.Schema],
                 sync: str = "always", sync_interval: float = 0.2,
                 codec_of: Callable[[str], RowCodec | None] | None = None) -> None:
        if sync not in SYNC_POLICIES:
            raise ConfigError(f"spool_sync must be one of {', '.join(SYNC_POLICIES)}; got {sync!r}")
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot use spool directory {self.directory}: {exc}") from exc
        self._schema_of = schema_of
        #: A table's own way to write and read its rows, where JSON would not bring them back the same.
        self._codec_of = codec_of
        self._codecs: dict[str, RowCodec | None] = {}
        self._sync = sync
        self._sync_interval = sync_interval
        self._last_sync = 0.0
        self._open: dict[str, _Segment] = {}
        #: Segments that could not be restored after a failed append (and dead letters found by a load): cut before
        #: the table's open segment. Guarded by ``_retired_lock``: ``load`` runs outside the publisher's lock.
        self._retired: dict[str, list[Batch]] = {}
        self._retired_lock = threading.Lock()
        self._next_generation: dict[str, int] = {}
        #: Recovered segments shared by several pending batches (dead letters, then rows): deleted with the last.
        self._shares: dict[Path, int] = {}
        #: The durability barrier (see the module docstring): the number of the last row appended, the segments
        #: holding rows not yet fsynced, the segments whose fsync failed (the first row not durable, the error),
        #: whether a sync() round is under way, and how many segment fsyncs the spool made.
        self._cond = threading.Condition(threading.Lock())
        self._appended = 0
        self._dirty: dict[Path, _Segment] = {}
        self._failed: dict[Path, tuple[int, str, OSError]] = {}
        self._leading = False
        #: Segment fsyncs by appends and closes (under ``_cond``), and by sync() rounds (only the leader counts).
        self._fsyncs = 0
        self._round_fsyncs = 0
        self._lock_fd: int | None = self._take_lock()
        self._lock_pid = os.getpid()
        try:
            self._recovered = self._recover()
        except BaseException:
            self.close()
            raise

    def _take_lock(self) -> int:
        path = self.directory / _LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot open the lock file of spool directory {self.directory}: {exc}",
                               path=str(path)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errnos.EWOULDBLOCK, errnos.EAGAIN, errnos.EACCES):
                raise StateError(f"spool directory {self.directory} is in use by another sink or process; one "
                                 "spool directory serves one sink at a time") from None
            raise StorageError(f"cannot lock spool directory {self.directory}: {exc}", path=str(path)) from exc
        return fd

    def _error(self, what: str, exc: OSError, path: Path | None = None) -> CioSyncError:
        where = path if path is not None else self.directory
        # The one map of library errors (cio_sync._errors.LIBRARY_ERRORS): an OSError is a StorageError.
        return make_error(library_error(exc) or StorageError, f"spool {self.directory}: {what}: {exc}", path=str(where))

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
        row = orjson.loads(data)
        if not isinstance(row, list) or len(row) != len(schema):
            raise ValueError(f"the record is not a row of {len(schema)} values")
        return tuple(row)

    def _codec(self, table: str) -> RowCodec | None:
        try:
            return self._codecs[table]
        except KeyError:
            assert self._codec_of is not None
            codec = self._codecs[table] = self._codec_of(table)
            return codec

    # -- appending -----------------------------------------------------------------------------------------------

    def _start(self, table: str) -> _Segment:
        """A new segment for ``table``: its header written (and fsynced with its folder, by the policy)."""
        folder = self.directory / table
        generation = self._next_generation.get(table, 1)
        self._next_generation[table] = generation + 1
        path = folder / f"{generation:0{_WIDTH}d}.avro"
        buffer = io.BytesIO()
        writer = AvroWriter(buffer, _AVRO_SCHEMA)
        writer.flush()
        header = buffer.getvalue()
        unsynced: tuple[Path, ...] = (folder,) if self._sync == "os" else ()
        try:
            if not folder.is_dir():
                folder.mkdir(exist_ok=True)
                if self._sync != "os":
                    _fsync_dir(self.directory)
                else:
                    unsynced += (self.directory,)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except OSError as exc:
            raise self._error("could not start a segment", exc, path) from exc
        try:
            _write_all(fd, header)
            if self._sync != "os":
                os.fsync(fd)
                _fsync_dir(folder)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise self._error("could not start a segment", exc, path) from exc
        segment = self._open[table] = _Segment(generation, path, fd, len(header),
                                               bytes(writer.sync_marker),  # type: ignore[attr-defined]
                                               TableRows(self._schema_of(table)), folders=unsynced)
        return segment

    def append(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int,
               at: int | None = None) -> Filled:
        segment = self._open.get(table)
        if segment is not None and segment.broken:
            self._retire(table, segment)  # its fsync failed in sync(): its rows go on from memory
            segment = None
        if segment is None:
            segment = self._start(table)
        codec = None if self._codec_of is None else self._codec(table)
        block = _block(self._encode(schema, row) if codec is None else codec[0](row), size, at, segment.sync)
        fd = segment.fd
        synced = False
        try:
            written = os.write(fd, block)
            if written < len(block):  # a short write (a signal, a disk filling up): finish it or fail
                _write_all(fd, memoryview(block)[written:])
            if self._sync == "always" or (
                self._sync == "interval" and time.monotonic() - self._last_sync >= self._sync_interval
            ):
                synced = True
                os.fsync(fd)
                self._last_sync = time.monotonic()
        except OSError as exc:
            self._undo(table, segment, synced, exc)
            raise self._error(f"could not append a {table} row, the call is refused", exc, segment.path) from exc
        segment.size += len(block)
        segment.last.append(len(block))
        with self._cond:
            self._appended += 1
            if synced:  # every row of the segment so far is on disk
                self._fsyncs += 1
                segment.unsynced = None
                if segment.syncing and segment.after is None:
                    segment.after = -1  # the round's end finds nothing left to fsync
                self._dirty.pop(segment.path, None)
            elif not segment.broken:
                if segment.unsynced is None:
                    segment.unsynced = self._appended
                    self._dirty[segment.path] = segment
                if segment.syncing and (segment.after is None or segment.after < 0):
                    segment.after = self._appended
        return segment.buffer.add(row, size, at)

    def retract(self, table: str, size: int) -> None:
        """Take back the row just appended to ``table``: truncate its block off the segment (fsynced, by the sync
        policy, so it does not come back after a power loss). If the segment cannot be truncated, it is retired
        like one whose append failed: its valid length goes to ``<n>.end`` and nothing is appended behind the
        refused row."""
        segment = self._open[table]
        segment.buffer.retract(size)
        if not segment.last:  # more rows taken back than can be: cut the segment where its whole blocks are
            self._abandon(table, segment, OSError("too many rows taken back at once"))
            return
        segment.size -= segment.last.pop()
        try:
            os.ftruncate(segment.fd, segment.size)
            if self._sync != "os":
                os.fsync(segment.fd)
        except OSError as exc:
            self._abandon(table, segment, exc)

    def _undo(self, table: str, segment: _Segment, synced: bool, error: OSError) -> None:
        """Put a segment back as it was before a failed append, or retire it if that cannot be done for sure."""
        try:
            os.ftruncate(segment.fd, segment.size)
        except OSError as exc:
            self._abandon(table, segment, exc)
            return
        if synced and self._sync == "interval":
            # The rows since the last fsync may never reach the disk: publish them now, from memory.
            self._retire(table, segment, error)

    def _abandon(self, table: str, segment: _Segment, exc: OSError) -> None:
        """A segment whose bytes past ``segment.size`` could not be taken off: record where its whole blocks end
        (so the refused row is never read back) and retire it, so that nothing is appended behind them."""
        log.error("spool %s: could not truncate %s back after a failed or refused write (%s); its %d rows are cut "
                  "as a batch and the next row starts a new segment", self.directory, segment.path, exc,
                  segment.buffer.count)
        try:
            _write_atomically(segment.path.with_suffix(".end"), (str(segment.size).encode(),))
            _fsync_dir(segment.path.parent)
        except OSError as error:
            log.error("spool %s: could not record where %s ends either (%s)", self.directory, segment.path, error)
        if self._sync == "group" and not segment.broken:
            # The rows before the refused one have not been fsynced yet: make them durable now if the disk lets us.
            try:
                os.fsync(segment.fd)
            except OSError:
                pass
            else:
                with self._cond:
                    self._fsyncs += 1
                    segment.unsynced = None
                    segment.folders = ()
                    self._dirty.pop(segment.path, None)
        self._retire(table, segment, exc)

    def _retire(self, table: str, segment: _Segment, error: OSError | None = None) -> None:
        del self._open[table]
        self._let_go(segment, error)
        if segment.buffer.count:
            batch = segment.buffer.take(table, key=segment.path)
            with self._retired_lock:
                self._retired.setdefault(table, []).append(batch)
        else:
            self._durable(segment.path)  # no row of it was accepted: nothing waits for it
            for suffix in _SUFFIXES:  # no row was accepted into it; whatever stays, recovery drops
                with contextlib.suppress(OSError):
                    segment.path.with_suffix(suffix).unlink()

    def tables(self) -> list[str]:
        tables = [t for t, s in self._open.items() if s.buffer.count]
        with self._retired_lock:
            return tables + [t for t in self._retired if t not in tables]

    def cut(self, table: str) -> Batch | None:
        with self._retired_lock:
            retired = self._retired.get(table)
            if retired:
                batch = retired.pop(0)
                if not retired:
                    del self._retired[table]
                return batch
        segment = self._open.get(table)
        if segment is None or not segment.buffer.count:
            return None
        del self._open[table]
        self._seal(segment)
        return segment.buffer.take(table, key=segment.path)

    def _seal(self, segment: _Segment) -> None:
        """Close a segment for good. Its rows are in memory and go on to be published, so a failure is logged (and
        a :meth:`sync` covering its rows raises)."""
        error = None
        try:
            if self._sync in ("interval", "group") and not segment.broken:
                os.fsync(segment.fd)
                with self._cond:
                    self._fsyncs += 1
                    segment.unsynced = None  # (a round fsyncing it meanwhile finds it gone from _dirty)
                    self._dirty.pop(segment.path, None)
        except OSError as exc:
            error = exc
            log.warning("spool %s: could not fsync %s (%s); its rows are published from memory", self.directory,
                        segment.path, exc)
        finally:
            self._let_go(segment, error)

    def _let_go(self, segment: _Segment, error: OSError | None) -> None:
        """Close a segment's descriptor. Rows of it not yet fsynced either wait for a :meth:`sync` that fsyncs the
        file by its path (a segment whose fsync was left to the OS), or, after ``error`` (an fsync or a write that
        failed), are not durable: a :meth:`sync` covering them raises until their batch is recorded or published."""
        with self._cond:
            while segment.syncing:  # a sync() round is fsyncing this descriptor: never close it under the round
                self._cond.wait()
            # Without an error it stays in ``_dirty``: a round opens it by its path.
            if segment.unsynced is not None and not segment.broken and error is not None:
                self._fail(segment, segment.unsynced, "could not fsync or write it", error)
            fd, segment.fd = segment.fd, -1
        with contextlib.suppress(OSError):
            os.close(fd)

    def _fail(self, segment: _Segment, first: int, what: str, error: OSError) -> None:
        """Under ``_cond``: the rows of ``segment`` from number ``first`` on are not durable (see :meth:`sync`)."""
        segment.broken = True
        self._dirty.pop(segment.path, None)
        known = self._failed.get(segment.path)
        self._failed[segment.path] = (min(first, known[0]) if known else first, what, error)

    def _durable(self, path: Path) -> None:
        """The rows of the segment at ``path`` are durable another way (recorded beside it, or published)."""
        with self._cond:
            self._failed.pop(path, None)
            segment = self._dirty.get(path)
            if segment is not None and segment.fd < 0 and not segment.syncing:
                del self._dirty[path]

    # -- the durability barrier ----------------------------------------------------------------------------------

    @property
    def fsyncs(self) -> int:
        """How many times this spool fsynced a segment file: after a row (``"always"``, ``"interval"``), when a
        segment was closed, and once per segment in each :meth:`sync` round (the count that shows sharing)."""
        with self._cond:
            return self._fsyncs + self._round_fsyncs

    def sync(self) -> None:
        """Return once every row appended before this call is fsynced in the spool: its segment's data, and the
        folder entry of a segment whose creation was not fsynced (``spool_sync="os"``). Callers from many threads
        share fsyncs: one fsyncs the segments that need it while the others wait, and a caller whose rows that
        fsync covered returns without one of its own.

        Raises :class:`~cio_sync.StorageError` (naming the segment) if a row appended before the call cannot be
        made durable: an fsync of its segment failed (here, or when the segment was closed or a write to it
        failed). Such rows are not lost: as with a failed fsync under ``spool_sync="interval"``, their segment is
        retired, never appended to again, and its rows are published from memory with the table's next batch
        (what reached the disk is recovered after a crash, at most once, so they may then be missing). Every
        ``sync()`` covering them raises until they are durable another way: their batch recorded beside its
        segment before its upload, or published (a ``flush()`` does both).
        """
        with self._cond:
            target = self._appended
            while True:
                self._check_failed(target)
                if all(s.unsynced is None or s.unsynced > target for s in self._dirty.values()):
                    return
                if self._leading:
                    self._cond.wait()
                    continue
                round_ = self._take_round()
                if not round_:  # pragma: no cover - every segment holding unsynced rows is in _dirty
                    return
                results: list[OSError | None] | None = None
                self._cond.release()
                try:
                    results = [self._fsync_one(segment, fd) for segment, fd, _ in round_]
                finally:
                    self._cond.acquire()
                    self._settle(round_, results)

    def _take_round(self) -> list[tuple[_Segment, int | None, int]]:
        """Under ``_cond``: lead a round over the segments with rows not yet fsynced; ``(segment, its descriptor or
        ``None`` for a closed one, its first row not fsynced)``. A segment being fsynced is not closed until the
        round is done (:meth:`_let_go` waits), so its descriptor stays its own."""
        round_: list[tuple[_Segment, int | None, int]] = []
        for segment in self._dirty.values():
            assert segment.unsynced is not None
            fd = segment.fd if segment.fd >= 0 else None
            segment.syncing = True
            segment.after = None
            round_.append((segment, fd, segment.unsynced))
        self._leading = bool(round_)
        return round_

    def _fsync_one(self, segment: _Segment, fd: int | None) -> OSError | None:
        """Outside ``_cond``: fsync a segment (and its folders not yet fsynced); the error if that failed. A closed
        segment (its fsync left to the OS) is opened by its path."""
        opened = None
        try:
            if fd is None:
                try:
                    fd = opened = os.open(segment.path, os.O_RDONLY)
                except FileNotFoundError:
                    return None  # published: its batch's segment is deleted once the upload landed
            os.fsync(fd)
            self._round_fsyncs += 1  # only the leader writes it
            for folder in segment.folders:
                _fsync_dir(folder)
        except OSError as exc:
            return exc
        finally:
            if opened is not None:
                with contextlib.suppress(OSError):
                    os.close(opened)
        return None

    def _settle(self, round_: list[tuple[_Segment, int | None, int]], results: list[OSError | None] | None) -> None:
        """Under ``_cond``: the end of a round (``results`` ``None``: interrupted, nothing settled). A segment
        fsynced holds no unsynced row but those appended since the round took it; one whose fsync failed is
        retired (at its table's next append or cut)."""
        try:
            for i, (segment, _, first) in enumerate(round_):
                segment.syncing = False
                after, segment.after = segment.after, None
                if segment.broken or results is None:
                    continue
                error = results[i]
                if error is not None:
                    log.error("spool %s: could not fsync %s in sync() (%s); its rows are not durable, the segment is "
                              "retired and its rows are published from memory", self.directory, segment.path, error)
                    self._fail(segment, first, "could not fsync it", error)
                    continue
                segment.folders = ()
                if self._dirty.get(segment.path) is not segment:
                    continue
                segment.unsynced = after if after is not None and after > 0 else None
                if segment.unsynced is None:
                    del self._dirty[segment.path]
        finally:
            self._leading = False
            self._cond.notify_all()

    def _check_failed(self, target: int) -> None:
        """Under ``_cond``: raise for a segment whose rows up to number ``target`` include one that is not durable."""
        for path, (first, what, error) in self._failed.items():
            if first <= target:
                raise self._error(f"sync(): {what}, so rows appended before sync() are not durable (they are "
                                  "published from memory)", error, path) from error

    # -- the life of a batch -------------------------------------------------------------------------------------

    def named(self, batch: Batch) -> None:
        """Record the batch's name and bytes beside its segment (``.data`` ends with a copy of the name record)."""
        assert batch.name is not None
        assert batch.encoded is not None
        segment: Path = batch.key
        record = orjson.dumps({"name": batch.name, "rows": batch.rows, "bytes": len(batch.encoded),
                               "sha256": batch.sha256 or hashlib.sha256(batch.encoded).hexdigest(),
                               "first_time": batch.first_time, "last_time": batch.last_time})
        try:
            _write_atomically(segment.with_suffix(".data"),
                              (batch.encoded, record, len(record).to_bytes(4, "little"), _TRAILER))
            _write_atomically(segment.with_suffix(".name"), (record,))
            _fsync_dir(segment.parent)
        except OSError as exc:
            raise self._error(f"could not record the name {batch.name} before its upload", exc, segment) from exc
        self._durable(segment)

    def published(self, batch: Batch) -> None:
        segment: Path = batch.key
        shares = self._shares.pop(segment, 1)
        if shares > 1:
            self._shares[segment] = shares - 1
            return
        self._durable(segment)
        try:
            for suffix in _SUFFIXES:  # the segment first: a batch that keeps it is not done
                with contextlib.suppress(FileNotFoundError):
                    segment.with_suffix(suffix).unlink()
            if self._sync != "os":
                _fsync_dir(segment.parent)
        except OSError as exc:
            raise self._error(f"could not delete the published batch {batch.name}", exc, segment) from exc

    def load(self, batch: Batch) -> None:
        """Read a batch's rows (or its encoded file) back from disk, after they were let go from memory."""
        segment: Path = batch.key
        try:
            if batch.state is BatchState.RECORDED:
                name_file, data_file = segment.with_suffix(".name"), segment.with_suffix(".data")
                record = _name_record(name_file.read_bytes()) if name_file.exists() else None
                found = _read_data(data_file, record) if data_file.exists() else None
                if found is not None:
                    batch.encoded = found[0]
                    return
                log.error("spool %s: %s is damaged; the batch's rows are read from its segment and encoded again "
                          "under its name %s", self.directory, segment.with_suffix(".data"), batch.name)
                batch.state = BatchState.NAMED
                batch.sha256 = None
            rows, _, _, _, letter = self._read_rows(segment, batch.table)
        except OSError as exc:
            raise self._error(f"could not read back the {batch.table} batch", exc, segment) from exc
        # The batch's rows come first; a whole row after them is a refused one that could not be taken back.
        del rows[batch.rows:]
        if letter is not None or len(rows) != batch.rows:
            log.error("spool %s: %s changed on disk while its batch waited: %d of its %d rows are whole",
                      self.directory, segment, len(rows), batch.rows)
            batch.rows = len(rows)
            if letter is not None:
                with self._retired_lock:
                    self._retired.setdefault(batch.table, []).insert(0, letter)
        batch.data = rows

    def release(self, batch: Batch) -> None:
        """Let go of a pending batch's rows and bytes in memory: they are on disk and :meth:`load` brings them back
        (the recorded file of a named batch; else the rows, encoded again: nothing was uploaded under a name that is
        not recorded)."""
        if batch.state is BatchState.DAMAGED:
            return  # a dead letter's description is only in memory
        if batch.state is not BatchState.RECORDED:
            batch.sha256 = None
        batch.data = None
        batch.encoded = None

    def pending(self) -> list[Batch]:
        recovered, self._recovered = self._recovered, []
        return recovered

    def buffered(self) -> dict[str, Buffered]:
        out = {t: s.buffer.buffered() for t, s in self._open.items() if s.buffer.count}
        with self._retired_lock:
            retired = {t: list(b) for t, b in self._retired.items()}
        for table, batches in retired.items():
            rows, nbytes, since = out.get(table, (0, 0, None))
            out[table] = Buffered(rows + sum(b.rows for b in batches), nbytes + sum(b.nbytes for b in batches),
                                  since)
        return out

    def close(self) -> None:
        """Close the open segments and let go of the directory's lock (taken by this process: a forked child that
        inherited it never unlocks its parent's spool)."""
        for segment in self._open.values():
            self._seal(segment)
        self._open.clear()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            if os.getpid() == self._lock_pid:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- recovery ------------------------------------------------------------------------------------------------

    def _read_rows(self, path: Path, table: str
                   ) -> tuple[list[tuple[Any, ...]], int, int | None, int | None, Batch | None]:
        """The whole rows of a segment with their bytes and time range, and a dead-letter batch for what could not
        be read (``None`` if everything could). ``OSError`` if the file cannot be read."""
        schema = self._schema_of(table)
        data = path.read_bytes()
        length = path.with_suffix(".end")
        if length.exists():  # a retired segment: what follows its whole blocks was refused
            with contextlib.suppress(ValueError):
                data = data[:int(length.read_bytes())]
        reading = _read_segment(data)
        rows: list[tuple[Any, ...]] = []
        nbytes = 0
        first: int | None = None
        last: int | None = None
        damaged = reading.damaged
        codec = None if self._codec_of is None else self._codec(table)
        for row, size, at, start, end in reading.records:
            try:
                rows.append(self._decode(schema, row) if codec is None else codec[1](row))
            except (ValueError, TypeError) as exc:
                damaged.append((start, end - start, f"the record does not decode ({exc})"))
                continue
            nbytes += size
            if at is not None:
                first = at if first is None else min(first, at)
                last = at if last is None else max(last, at)
        if reading.torn:
            # A torn last block: the row of a write() that never returned. Everything before it is kept.
            log.warning("spool segment %s ends in a torn block of %d bytes after %d rows; the torn block is dropped",
                        path, reading.torn, len(rows))
        letter = None
        if damaged:
            damaged.sort()
            lost = sum(length for _, length, _ in damaged)
            log.error("spool segment %s is damaged: %d bytes in %d places could not be read (%s); its %d whole rows "
                      "are kept and the rest goes to the dead letters", path, lost, len(damaged), damaged[0][2],
                      len(rows))
            letters = [(str(path), offset, length, why, data[offset:offset + length].decode("utf-8", "replace"),
                        base64.b64encode(data[offset:offset + length]).decode("ascii"))
                       for offset, length, why in damaged]
            reason = StorageError(f"spool segment {path} is damaged: {lost} bytes in {len(damaged)} places could "
                                  f"not be read ({'; '.join(sorted({why for _, _, why in damaged}))}); the "
                                  f"{len(rows)} whole rows around them were published", path=str(path))
            letter = Batch(table, len(letters), letters, LETTER_SCHEMA, key=path, nbytes=lost, damage=reason,
                           state=BatchState.DAMAGED)
        return rows, nbytes, first, last, letter

    def _recover(self) -> list[Batch]:
        found: list[tuple[int, str, int, Batch]] = []
        try:
            folders = sorted(self.directory.iterdir())
        except OSError as exc:
            raise self._error("could not list the spool directory", exc) from exc
        for folder in folders:
            if folder.name == _LOCK_FILE or folder.name.startswith(SEEN_FILE):
                continue  # the spool's lock, the dedupe window's file (and SQLite's files beside it)
            if not folder.is_dir():
                log.warning("spool %s: %s is not the spool's; left alone", self.directory, folder)
                continue
            table = folder.name
            try:
                self._schema_of(table)
            except Exception:
                log.warning("spool %s: %s is not the folder of a table; left alone", self.directory, folder)
                continue
            generations: set[int] = set()
            try:
                entries = sorted(folder.iterdir())
            except OSError as exc:
                log.error("spool %s: cannot list %s (%s); its batches wait for the next start", self.directory,
                          folder, exc)
                self._next_generation[table] = 10**_WIDTH  # never collide with what cannot be seen
                continue
            for entry in entries:
                own = _OWN_FILE.fullmatch(entry.name)
                if own is not None:
                    generations.add(int(own.group(1)))
                elif _OWN_TMP.fullmatch(entry.name):
                    with contextlib.suppress(OSError):
                        entry.unlink()
                else:
                    log.warning("spool %s: %s is not the spool's; left alone", self.directory, entry)
            self._next_generation[table] = (max(generations) + 1) if generations else 1
            for generation in sorted(generations):
                segment = folder / f"{generation:0{_WIDTH}d}.avro"
                try:
                    batches = self._recover_one(table, segment)
                except Exception as exc:
                    # Never stop the sink from starting: the files stay as they are, for the next start.
                    log.error("spool %s: could not recover %s (%s: %s); its files are left for the next start",
                              self.directory, segment, type(exc).__name__, exc)
                    continue
                if len(batches) > 1:
                    self._shares[segment] = len(batches)
                found += [(generation, table, i, b) for i, b in enumerate(batches)]
        if found:
            log.info("spool %s: recovered %d batches (%d rows) not yet published", self.directory, len(found),
                     sum(b.rows for *_, b in found if b.state is not BatchState.DAMAGED))
        return [b for *_, b in sorted(found, key=lambda x: (x[0], x[1], x[2]))]

    def _recover_one(self, table: str, segment: Path) -> list[Batch]:
        """The pending batches one segment left: dead letters for what could not be read, then its rows."""
        name_file, data_file = segment.with_suffix(".name"), segment.with_suffix(".data")
        record = _name_record(name_file.read_bytes()) if name_file.exists() else None
        if name_file.exists() and record is None:
            log.error("spool %s: %s is damaged; the batch's name is taken from %s", self.directory, name_file,
                      data_file)
        found = _read_data(data_file, record) if data_file.exists() else None
        schema = self._schema_of(table)
        if found is not None:
            data, record = found
            return [Batch(table, int(record["rows"]), None, schema, name=record["name"], encoded=data, key=segment,
                          state=BatchState.RECORDED, nbytes=len(data), first_time=record.get("first_time"),
                          last_time=record.get("last_time"))]
        if not segment.exists():
            # Published (the segment is deleted first, once the upload and its manifest landed), or never a batch.
            for leftover in (name_file, data_file, segment.with_suffix(".end")):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            return []
        if record is not None:
            log.error("spool %s: %s is damaged; the batch is encoded again from its segment, under its name %s",
                      self.directory, data_file, record["name"])
        elif data_file.exists():
            log.error("spool %s: the name of the batch in %s is lost (%s and %s are damaged); its rows get a new "
                      "name, and if the old one had been published they are published twice", self.directory,
                      segment, name_file, data_file)
        rows, nbytes, first, last, letter = self._read_rows(segment, table)
        batches = [letter] if letter is not None else []
        if rows:
            batch = Batch(table, len(rows), rows, schema, key=segment, nbytes=nbytes, first_time=first,
                          last_time=last)
            if record is not None:
                batch.name, batch.state = record["name"], BatchState.NAMED
            batches.append(batch)
        if not batches:
            for leftover in (segment, name_file, data_file, segment.with_suffix(".end")):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        return batches
