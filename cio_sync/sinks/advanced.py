"""The Advanced sink: every incoming call, as it was sent, to Parquet, CSV or JSON files."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Final

import orjson
import pyarrow as pa
from fsspec import AbstractFileSystem

from cio_sync._errors import ConfigError, InvalidCall
from cio_sync._time import to_micros
from cio_sync._types import Batch
from cio_sync.formats.base import Format
from cio_sync.formats.registry import get_format
from cio_sync.intake.calls import DOCUMENT_ROW_OVERHEAD, Call, call_document, call_row, call_to_row
from cio_sync.publish.layout import advanced_counter, advanced_manifest_counter, advanced_manifest_name
from cio_sync.schemas.tables import CALL_SCHEMAS, CALL_TYPES, DOCUMENT_SCHEMA
from cio_sync.sinks.base import check_int
from cio_sync.sinks.buffered import DEFAULT_MAX_BUFFER_BYTES, DEFAULT_MAX_BYTES, DEFAULT_MAX_ROWS, BufferedSink
from cio_sync.storage.writer import RetryPolicy, Writer, WrittenFile

#: Default action id of each call type: one per type, so each type has its own run of positions.
DEFAULT_ACTION_IDS: Final[Mapping[str, int]] = MappingProxyType(
    {"identify": 1, "track": 2, "page": 3, "screen": 4, "group": 5, "alias": 6}
)

__all__ = ["DEFAULT_ACTION_IDS", "DEFAULT_MAX_BUFFER_BYTES", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_ROWS", "AdvancedSink",
           "action_ids_of", "advanced_row"]


def action_ids_of(given: Mapping[str, int] | None) -> Mapping[str, int]:
    """The action id of each call type: the defaults, with ``given`` (checked) over them."""
    ids = dict(DEFAULT_ACTION_IDS)
    for call_type, action_id in (given or {}).items():
        if call_type not in DEFAULT_ACTION_IDS:
            raise ConfigError(f"action_ids: unknown call type {call_type!r}; known: {', '.join(CALL_TYPES)}")
        ids[call_type] = check_int(f"action_ids[{call_type!r}]", action_id)
    if len(set(ids.values())) != len(ids):
        raise ConfigError(f"action_ids must differ between call types; got {ids}")
    return MappingProxyType(ids)


def advanced_row(parsed: Call, *, documents: bool) -> tuple[pa.Schema, tuple[Any, ...], int]:
    """The schema, row and size (bytes it takes in memory) of ``parsed`` in an Advanced file: its columns, or with
    ``documents`` (a format that writes JSON documents) the call as one JSON document. Raises
    :class:`~cio_sync.InvalidCall` if the call cannot be encoded."""
    if documents:
        document = call_document(parsed)
        return DOCUMENT_SCHEMA, (document,), len(document) + DOCUMENT_ROW_OVERHEAD
    row, size = call_row(parsed)
    return CALL_SCHEMAS[parsed.type], row, size


class AdvancedSink(BufferedSink):
    """Writes identify, track, page, screen, group and alias calls, as sent, to one file per call type per sync.

    Files are named ``<destination_id>.<action_id>.<position>.<type>.<ext>``: ``action_id`` is the call type's
    (``action_ids``, default identify 1, track 2, page 3, screen 4, group 5, alias 6) and ``position`` starts at 1
    and goes up by one with each file of that (destination, action), continuing across restarts and never reused,
    even after the files are deleted (the counters live in ``_cio_sync/`` under the prefix: keep that folder).

    ``target`` is a URL (``s3://bucket/raw``, ``gs://...``, ``az://...``, ``memory://...``, a local path) with
    ``storage_options`` for its backend, a path on ``filesystem``, or a :class:`~cio_sync.Writer`.

    The sink publishes on :meth:`flush`, on :meth:`close`, every ``flush_interval`` seconds from a background thread
    (``None`` turns the timer off) and early when one call type buffers ``max_rows`` rows or ``max_bytes`` bytes.
    ``compression`` is the Parquet codec (default zstd). ``on_publish`` is called with each
    :class:`~cio_sync.WrittenFile` as it lands (from whichever thread published it).

    Reliability (docs/reliability.md): with ``spool_dir``, every accepted call is appended to a local Avro spool
    before ``write`` returns and survives a crash (``spool_sync``: "always", "interval", "os" or "group": with
    "group", ``write`` never waits for the disk and :meth:`sync` makes every call accepted before it durable,
    sharing fsyncs between threads); if the spool cannot
    take a call (a full disk), ``write`` raises :class:`~cio_sync.StorageError` and the call is not accepted. One
    spool directory serves one sink: another sink on it raises :class:`~cio_sync.StateError`. All rows held in
    memory are bounded by ``max_buffer_bytes``: past it the sink publishes early, and if storage does not take the
    files it spills them to the spool (``when_full="spill"``, the default with a spool) or waits
    (``"block"``, up to ``block_timeout`` seconds, then raises ``BufferFull``). ``dedupe_window`` (seconds or a
    ``timedelta``; ``None``, the default: off) drops a call whose ``messageId`` the sink took within the window, a
    client's retry, whether its first copy is still in the spool or was published (``stats().calls_duplicate``
    counts them); with a spool the window's ids survive restarts and kill -9 (:mod:`cio_sync.buffer.seen`).
    ``manifests`` writes a manifest
    per sync under ``_manifests/``. ``keep_rejected`` also keeps calls that validation refused, with the reason,
    under ``_cio_sync/dead_letters/rejected/`` (written at each sync). ``csv_neutralize_formulas`` prefixes CSV
    cells that a spreadsheet would run as a formula.
    """

    tables = CALL_SCHEMAS
    layout = "{destination_id}.{action_id}.{position}.{call_type}.{ext}"
    layout_fields = ("destination_id", "action_id", "call_type")

    def __init__(
        self,
        target: str | Writer,
        *,
        format: str | Format = "parquet",
        destination_id: int = 1,
        action_ids: Mapping[str, int] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        filesystem: AbstractFileSystem | None = None,
        flush_interval: float | None = 600.0,
        max_rows: int | None = DEFAULT_MAX_ROWS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        compression: str | None = None,
        retry: RetryPolicy | None = None,
        on_publish: Callable[[WrittenFile], None] | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_sync: str = "always",
        spool_sync_interval: float = 0.2,
        max_buffer_bytes: int | None = DEFAULT_MAX_BUFFER_BYTES,
        when_full: str | None = None,
        block_timeout: float | None = None,
        manifests: bool = True,
        csv_neutralize_formulas: bool = False,
        keep_rejected: bool = False,
        dedupe_window: float | timedelta | None = None,
    ) -> None:
        self.destination_id = check_int("destination_id", destination_id)
        self.action_ids = action_ids_of(action_ids)
        options: dict[str, Any] = {"compression": compression} if compression is not None else {}
        if options and not (isinstance(format, str) and format.lower() == "parquet"):
            raise ConfigError("compression applies to the parquet format only (or configure your Format object)")
        if csv_neutralize_formulas:
            if not (isinstance(format, str) and format.lower() == "csv"):
                raise ConfigError("csv_neutralize_formulas applies to the csv format only")
            options["neutralize_formulas"] = True
        chosen = get_format(format, **options)
        self._documents = bool(getattr(chosen, "accepts_documents", False))
        self._start(
            target, format=chosen, storage_options=storage_options, filesystem=filesystem,
            flush_interval=flush_interval, max_rows=max_rows, max_bytes=max_bytes,
            max_buffer_bytes=max_buffer_bytes, when_full=when_full, block_timeout=block_timeout,
            spool_dir=spool_dir, spool_sync=spool_sync, spool_sync_interval=spool_sync_interval,
            manifests=manifests, retry=retry, on_publish=on_publish, keep_rejected=keep_rejected,
            dedupe_window=dedupe_window,
        )

    @property
    def writes_documents(self) -> bool:
        """Whether calls are kept as JSON documents (the JSON format) rather than as rows of columns."""
        return self._documents

    def __repr__(self) -> str:
        return (
            f"AdvancedSink({self.writer.url!r}, format={self.format.name!r}, destination_id={self.destination_id}, "
            f"closed={self.closed})"
        )

    # -- the toolkit's hooks: the six call types as tables, named <destination>.<action>.<position>.<type>.<ext> --

    def _spool_schema(self, table: str) -> pa.Schema:
        return DOCUMENT_SCHEMA if self._documents else CALL_SCHEMAS[table]

    def _reads_message_ids(self, table: str) -> bool:
        return True  # a column of its rows, or a field of its documents

    def _message_ids_of(self, batch: Batch) -> list[str]:
        if not self._documents:
            return super()._message_ids_of(batch)
        assert batch.data is not None
        return [str(orjson.loads(row[0])["messageId"]) for row in batch.data]

    def _spool_codec(self, table: str) -> None:
        return None  # rows of calls (JSON text as UTF-8 bytes, or whole documents) are the spool's own kind

    def _counter_key(self, table: str) -> str:
        return advanced_counter(self.destination_id, self.action_ids[table])

    def _name_fields(self, table: str) -> dict[str, object]:
        return {"destination_id": self.destination_id, "action_id": self.action_ids[table], "call_type": table}

    def _manifest_header(self) -> dict[str, Any]:
        return {"mode": "advanced", "destination_id": self.destination_id, "format": self.format.name}

    def _manifest_counter(self) -> str:
        return advanced_manifest_counter(self.destination_id)

    def _manifest_file(self, sequence: int) -> str:
        return advanced_manifest_name(self.destination_id, sequence)

    def route(self, call: Call) -> Iterator[tuple[str, Any]]:
        """The call as one row of its type's table (what :meth:`write` buffers, by a faster path)."""
        _, row, _ = self._row_of(call)
        yield call.type, row

    def write(self, call: Any) -> str:
        """Validate and buffer one call (a dict, JSON str or JSON bytes); return its ``messageId``.

        Raises :class:`~cio_sync.InvalidCall` naming the field and the reason if the call is bad; the sink keeps
        working and nothing else is affected.
        """
        if self._documents:  # the JSON format keeps each call as sent: the toolkit's path
            return self.write_call(self._parse(call))
        received = time.time_ns() // 1000
        try:
            call_type, row, size = call_to_row(call, received)
        except InvalidCall as exc:
            self._publisher.reject(call, exc)
            raise
        self._publisher.add(call_type, CALL_SCHEMAS[call_type], row, size, received, message_id=row[0])
        return row[0]  # type: ignore[no-any-return]

    def write_call(self, parsed: Call) -> str:
        """Buffer a call already validated by ``parse_call`` (used by :class:`~cio_sync.Pipeline`)."""
        schema, row, size = self._row_of(parsed)
        self._publisher.add(parsed.type, schema, row, size, to_micros(parsed.received_at), message_id=parsed.message_id)
        return parsed.message_id

    def _row_of(self, parsed: Call) -> tuple[pa.Schema, tuple[Any, ...], int]:
        """The schema, row and size ``parsed`` is buffered as; :class:`~cio_sync.InvalidCall` (counted as a
        rejection) if it cannot be encoded."""
        try:
            return advanced_row(parsed, documents=self._documents)
        except InvalidCall as exc:
            self._publisher.reject(parsed.data, exc)
            raise

    def check_call(self, parsed: Call) -> None:
        call_document(parsed) if self._documents else call_row(parsed)

    def holding(self, parsed: Call) -> AbstractContextManager[None]:
        schema, row, size = self._row_of(parsed)
        return self._publisher.holding(parsed.type, schema, row, size, to_micros(parsed.received_at),
                                       message_id=parsed.message_id)
