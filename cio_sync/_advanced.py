"""The Advanced sink: every incoming call, as it was sent, to Parquet, CSV or JSON files."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

from fsspec import AbstractFileSystem

from cio_sync._calls import Call, call_document, call_row, parse_call
from cio_sync._counters import Counters
from cio_sync._errors import ConfigError, InvalidCall
from cio_sync._formats import Format, get_format
from cio_sync._publisher import Publisher
from cio_sync._schemas import CALL_SCHEMAS, CALL_TYPES, DOCUMENT_SCHEMA
from cio_sync._sink import BaseSink, check_int, make_writer
from cio_sync._writer import RetryPolicy, Writer, WrittenFile

#: Default action id of each call type: one per type, so each type has its own run of positions.
DEFAULT_ACTION_IDS: Final[Mapping[str, int]] = MappingProxyType(
    {"identify": 1, "track": 2, "page": 3, "screen": 4, "group": 5, "alias": 6}
)

DEFAULT_MAX_ROWS: Final = 500_000
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024


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
        options = {"compression": compression} if compression is not None else {}
        if options and not (isinstance(format, str) and format.lower() == "parquet"):
            raise ConfigError("compression applies to the parquet format only (or configure your Format object)")
        self.format = get_format(format, **options)
        self._documents = bool(getattr(self.format, "accepts_documents", False))
        writer = make_writer(target, filesystem=filesystem, storage_options=storage_options, retry=retry)
        self._counters = Counters(writer)
        self._publisher = Publisher(
            label=f"AdvancedSink({writer.url!r})",
            writer=writer,
            format=self.format,
            name_for=self._name_for,
            flush_interval=flush_interval,
            max_rows=max_rows,
            max_bytes=max_bytes,
            on_publish=on_publish,
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

    def _name_for(self, call_type: str) -> str:
        action_id = self.action_ids[call_type]
        position = self._counters.claim(f"{self.destination_id}.{action_id}")
        return f"{self.destination_id}.{action_id}.{position}.{call_type}.{self.format.extension}"

    def write(self, call: Any) -> str:
        """Validate and buffer one call (a dict, JSON str or JSON bytes); return its ``messageId``.

        Raises :class:`~cio_sync.InvalidCall` naming the field and the reason if the call is bad; the sink keeps
        working and nothing else is affected.
        """
        try:
            parsed = parse_call(call, row=not self._documents)
        except InvalidCall:
            self._publisher.reject()
            raise
        return self.write_call(parsed)

    def write_call(self, parsed: Call) -> str:
        """Buffer a call already validated by ``parse_call`` (used by :class:`~cio_sync.Pipeline`)."""
        try:
            if self._documents:
                document = call_document(parsed)
                row: tuple[Any, ...] = (document,)
                size = len(document)
                schema = DOCUMENT_SCHEMA
            else:
                row, size = call_row(parsed)
                schema = CALL_SCHEMAS[parsed.type]
        except InvalidCall:
            self._publisher.reject()
            raise
        self._publisher.add(parsed.type, schema, row, size)
        return parsed.message_id
