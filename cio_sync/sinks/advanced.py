"""The Advanced sink: every incoming call, as it was sent, to Parquet, CSV or JSON files."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import Any, Final

import pyarrow as pa
from fsspec import AbstractFileSystem

from cio_sync._errors import ConfigError, InvalidCall
from cio_sync._time import to_micros
from cio_sync.buffer.spool import AvroSpool
from cio_sync.formats.base import Format
from cio_sync.formats.registry import get_format
from cio_sync.intake.calls import DOCUMENT_ROW_OVERHEAD, Call, call_document, call_row, call_to_row, parse_call
from cio_sync.publish.counters import Counters
from cio_sync.publish.manifests import MANIFESTS_FOLDER, ManifestSpec
from cio_sync.publish.publisher import Publisher
from cio_sync.schemas.tables import CALL_SCHEMAS, CALL_TYPES, DOCUMENT_SCHEMA
from cio_sync.sinks.base import BaseSink, check_int, make_writer
from cio_sync.storage.writer import RetryPolicy, Writer, WrittenFile

#: Default action id of each call type: one per type, so each type has its own run of positions.
DEFAULT_ACTION_IDS: Final[Mapping[str, int]] = MappingProxyType(
    {"identify": 1, "track": 2, "page": 3, "screen": 4, "group": 5, "alias": 6}
)

DEFAULT_MAX_ROWS: Final = 500_000
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_BUFFER_BYTES: Final = 256 * 1024 * 1024


class AdvancedSink(BaseSink):
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
    before ``write`` returns and survives a crash (``spool_sync``: "always", "interval" or "os"); if the spool cannot
    take a call (a full disk), ``write`` raises :class:`~cio_sync.StorageError` and the call is not accepted. One
    spool directory serves one sink: another sink on it raises :class:`~cio_sync.StateError`. All rows held in
    memory are bounded by ``max_buffer_bytes``: past it the sink publishes early, and if storage does not take the
    files it spills them to the spool (``when_full="spill"``, the default with a spool) or waits
    (``"block"``, up to ``block_timeout`` seconds, then raises ``BufferFull``). ``manifests`` writes a manifest
    per sync under ``_manifests/``. ``keep_rejected`` also keeps calls that validation refused, with the reason,
    under ``_cio_sync/dead_letters/rejected/`` (written at each sync). ``csv_neutralize_formulas`` prefixes CSV
    cells that a spreadsheet would run as a formula.
    """

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
    ) -> None:
        self.destination_id = check_int("destination_id", destination_id)
        ids = dict(DEFAULT_ACTION_IDS)
        for call_type, action_id in (action_ids or {}).items():
            if call_type not in DEFAULT_ACTION_IDS:
                raise ConfigError(f"action_ids: unknown call type {call_type!r}; known: {', '.join(CALL_TYPES)}")
            ids[call_type] = check_int(f"action_ids[{call_type!r}]", action_id)
        if len(set(ids.values())) != len(ids):
            raise ConfigError(f"action_ids must differ between call types; got {ids}")
        self.action_ids: Mapping[str, int] = MappingProxyType(ids)
        options: dict[str, Any] = {"compression": compression} if compression is not None else {}
        if options and not (isinstance(format, str) and format.lower() == "parquet"):
            raise ConfigError("compression applies to the parquet format only (or configure your Format object)")
        if csv_neutralize_formulas:
            if not (isinstance(format, str) and format.lower() == "csv"):
                raise ConfigError("csv_neutralize_formulas applies to the csv format only")
            options["neutralize_formulas"] = True
        self.format = get_format(format, **options)
        self._documents = bool(getattr(self.format, "accepts_documents", False))
        writer = make_writer(target, filesystem=filesystem, storage_options=storage_options, retry=retry)
        self._counters = Counters(writer)
        schema_of = (lambda table: DOCUMENT_SCHEMA) if self._documents else CALL_SCHEMAS.__getitem__
        self.spool = None if spool_dir is None else AvroSpool(spool_dir, schema_of=schema_of, sync=spool_sync,
                                                               sync_interval=spool_sync_interval)
        manifest = None
        if manifests:
            header = {"mode": "advanced", "destination_id": self.destination_id, "format": self.format.name}
            manifest = ManifestSpec(self._manifest_name, header, "received_at")
        try:
            self._publisher = Publisher(
                label=f"AdvancedSink({writer.url!r})",
                writer=writer,
                format=self.format,
                name_for=self._name_for,
                flush_interval=flush_interval,
                max_rows=max_rows,
                max_bytes=max_bytes,
                on_publish=on_publish,
                store=self.spool,
                max_buffer_bytes=max_buffer_bytes,
                when_full=when_full or ("spill" if self.spool is not None else "block"),
                block_timeout=block_timeout,
                manifest=manifest,
                keep_rejected=keep_rejected,
            )
        except BaseException:
            if self.spool is not None:
                self.spool.close()  # lets go of the spool directory's lock
            raise
        if self._publisher.stats().batches_pending:
            # Calls spooled before a crash: publish them first, under the names they were given.
            self._publisher.publish_ready()

    @property
    def writes_documents(self) -> bool:
        """Whether calls are kept as JSON documents (the JSON format) rather than as rows of columns."""
        return self._documents

    def __repr__(self) -> str:
        return (
            f"AdvancedSink({self.writer.url!r}, format={self.format.name!r}, destination_id={self.destination_id}, "
            f"closed={self.closed})"
        )

    def _manifest_name(self) -> str:
        sequence = self._counters.claim(f"manifest.{self.destination_id}")
        return f"{MANIFESTS_FOLDER}/advanced.{self.destination_id}.{sequence}.json"

    def close(self) -> list[WrittenFile]:
        if self._publisher.inherited:
            return []  # a child after fork: the buffers, the spool and its lock are the parent's
        files = self._publisher.close()
        if self.spool is not None:
            self.spool.close()
        return files

    def _name_for(self, call_type: str) -> str:
        action_id = self.action_ids[call_type]
        position = self._counters.claim(f"{self.destination_id}.{action_id}")
        return f"{self.destination_id}.{action_id}.{position}.{call_type}.{self.format.extension}"

    def write(self, call: Any) -> str:
        """Validate and buffer one call (a dict, JSON str or JSON bytes); return its ``messageId``.

        Raises :class:`~cio_sync.InvalidCall` naming the field and the reason if the call is bad; the sink keeps
        working and nothing else is affected.
        """
        if self._documents:
            try:
                parsed = parse_call(call)
            except InvalidCall as exc:
                self._publisher.reject(call, exc)
                raise
            return self.write_call(parsed)
        received = time.time_ns() // 1000
        try:
            call_type, row, size = call_to_row(call, received)
        except InvalidCall as exc:
            self._publisher.reject(call, exc)
            raise
        self._publisher.add(call_type, CALL_SCHEMAS[call_type], row, size, received)
        return row[0]  # type: ignore[no-any-return]

    def write_call(self, parsed: Call) -> str:
        """Buffer a call already validated by ``parse_call`` (used by :class:`~cio_sync.Pipeline`)."""
        schema, row, size = self._row_of(parsed)
        self._publisher.add(parsed.type, schema, row, size, to_micros(parsed.received_at))
        return parsed.message_id

    def _row_of(self, parsed: Call) -> tuple[pa.Schema, tuple[Any, ...], int]:
        """The schema, row and size ``parsed`` is buffered as; :class:`~cio_sync.InvalidCall` (counted as a
        rejection) if it cannot be encoded."""
        try:
            if self._documents:
                document = call_document(parsed)
                return DOCUMENT_SCHEMA, (document,), len(document) + DOCUMENT_ROW_OVERHEAD
            row, size = call_row(parsed)
            return CALL_SCHEMAS[parsed.type], row, size
        except InvalidCall as exc:
            self._publisher.reject(parsed.data, exc)
            raise

    def _holding(self, parsed: Call) -> AbstractContextManager[None]:
        """Buffer ``parsed`` for as long as the ``with`` block does not raise: if it does, the call is taken back,
        as if it had never been written (see Publisher.holding). The Pipeline's way to give a call to both sinks or
        to neither."""
        schema, row, size = self._row_of(parsed)
        return self._publisher.holding(parsed.type, schema, row, size, to_micros(parsed.received_at))
