"""The public sink toolkit: a sink that declares its tables and how a call becomes rows, and inherits the rest."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Final

import pyarrow as pa
from fsspec import AbstractFileSystem

from cio_sync._errors import ConfigError, InvalidCall
from cio_sync._time import to_micros
from cio_sync._types import Batch, Row
from cio_sync.buffer.rows import RowStore
from cio_sync.buffer.seen import FILE_NAME as SEEN_FILE
from cio_sync.buffer.seen import MessageIdWindow, window_seconds
from cio_sync.buffer.spool import AvroSpool, RowCodec
from cio_sync.formats.base import Format
from cio_sync.formats.registry import get_format
from cio_sync.intake.calls import Call, parse_call, row_size
from cio_sync.publish.counters import Counters
from cio_sync.publish.layout import Layout, check_table_names, custom_manifest_counter, custom_manifest_name
from cio_sync.publish.manifests import ManifestSpec
from cio_sync.publish.publisher import Publisher
from cio_sync.sinks.base import BaseSink, make_writer
from cio_sync.sinks.rowfit import RowFitter, spool_codec
from cio_sync.storage.writer import RetryPolicy, Writer, WrittenFile

DEFAULT_LAYOUT: Final = "{table}.{position}.{ext}"
DEFAULT_FLUSH_INTERVAL: Final = 600.0
DEFAULT_MAX_ROWS: Final = 500_000
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_BUFFER_BYTES: Final = 256 * 1024 * 1024
#: The most rows one call may give (a call's rows are taken back together if one of them cannot be kept).
MAX_ROWS_PER_CALL: Final = 4096


def _schemas(owner: str, tables: Mapping[str, Any]) -> dict[str, pa.Schema]:
    """``tables`` (name -> Arrow schema, or an object with a ``schema``) as name -> schema; ConfigError if wrong."""
    if not isinstance(tables, Mapping) or not tables:
        raise ConfigError(f"{owner}.tables must map at least one table name to an Arrow schema; got {tables!r}")
    check_table_names(tables)
    out = {}
    for name, spec in tables.items():
        schema = spec if isinstance(spec, pa.Schema) else getattr(spec, "schema", None)
        if not isinstance(schema, pa.Schema):
            raise ConfigError(f"{owner}.tables[{name!r}] must be an Arrow schema or carry one as .schema; "
                              f"got {type(spec).__name__}")
        out[name] = schema
    return out


def _layout(owner: str, template: Any, tables: Iterable[str], extra: tuple[str, ...]) -> Layout:
    layout = template if isinstance(template, Layout) else Layout(template, extra=extra)
    if len(list(tables)) > 1 and "table" not in layout.fields and not extra:
        raise ConfigError(f"{owner}.layout {layout.template!r} needs {{table}}: the sink writes several tables, "
                          "each with its own positions, and their names must differ")
    return layout


#: The columns a table's ``messageId`` may be in, for the dedupe window to read back recovered rows.
_ID_COLUMNS: Final = frozenset({"message_id", "messageId"})


class PublishingSink(BaseSink):
    """What every sink built on the toolkit shares, whatever its rows come from: a writer, durable counters, a row
    store and a :class:`Publisher` (rotation, the timer, the memory budget, manifests, dead letters, stats).

    A subclass ends its ``__init__`` with :meth:`_open` and says through small hooks where its rows wait
    (:meth:`_open_store`, :meth:`_close_store`), what its counters are (:meth:`_counter_key`,
    :meth:`_position_floor`, :meth:`_manifest_counter`) and how its files and manifests are named
    (:meth:`_file_name`, :meth:`_manifest_file`, :meth:`_manifest_header`). :class:`BufferedSink` adds declared
    tables, a layout and routing; the Standard sink adds its workspace state, whose outbox is its row store.
    """

    #: What the time range of a manifest's files is about (``min_<label>``/``max_<label>``).
    _manifest_time: ClassVar[str] = "received_at"

    def _open(
        self,
        target: str | Writer,
        *,
        format: Format,
        storage_options: Mapping[str, Any] | None,
        filesystem: AbstractFileSystem | None,
        flush_interval: float | None,
        max_rows: int | None,
        max_bytes: int | None,
        max_buffer_bytes: int | None,
        when_full: str,
        block_timeout: float | None,
        manifests: bool,
        retry: RetryPolicy | None,
        on_publish: Callable[[WrittenFile], None] | None,
        keep_rejected: bool,
    ) -> None:
        """Open the sink's writer, counters, row store and publisher, then publish what was left from before."""
        self.format = format
        writer = make_writer(target, filesystem=filesystem, storage_options=storage_options, retry=retry)
        self._counters = Counters(writer)
        manifest = None
        if manifests:
            manifest = ManifestSpec(self._manifest_name, self._manifest_header(), self._manifest_time)
        store = self._open_store()
        try:
            dedupe = self._open_dedupe()
            self._publisher = Publisher(
                label=f"{type(self).__name__}({writer.url!r})",
                writer=writer,
                format=self.format,
                name_for=self._name_for,
                flush_interval=flush_interval,
                max_rows=max_rows,
                max_bytes=max_bytes,
                on_publish=on_publish,
                store=store,
                max_buffer_bytes=max_buffer_bytes,
                when_full=when_full,
                block_timeout=block_timeout,
                manifest=manifest,
                keep_rejected=keep_rejected,
                dedupe=dedupe,
                message_ids_of=self._message_ids_of,
            )
        except BaseException:
            self._close_store()  # lets go of the store's lock (a spool directory's, a state file's)
            raise
        self._resume()

    def _resume(self) -> None:
        """Once the publisher exists: publish the batches left from before a crash, under the names they were given."""
        if self._publisher.stats().batches_pending:
            self._publisher.publish_ready()

    # -- the row store ---------------------------------------------------------------------------------------------

    def _open_store(self) -> RowStore | None:
        """Where rows wait until they are published (``None``: in memory). Called once the writer is made."""
        return None

    def _close_store(self) -> None:
        """Let go of the row store (after :meth:`close`, or when opening the sink failed)."""

    def _open_dedupe(self) -> MessageIdWindow | None:
        """The dedupe window of ``messageId``\\ s (``None``: none). Called once the row store is open."""
        return None

    def _message_ids_of(self, batch: Batch) -> list[str]:
        """The ``messageId``\\ s of a batch's rows (those recovered from the spool, for the dedupe window)."""
        raise NotImplementedError(f"{type(self).__name__} cannot read the messageIds of its rows")

    # -- naming ----------------------------------------------------------------------------------------------------

    def _counter_key(self, table: str) -> str:
        """The durable counter whose values are ``table``'s positions."""
        raise NotImplementedError

    def _position_floor(self) -> int:
        """The least value a counter may give now (``at_least`` of :meth:`Counters.claim`)."""
        return 1

    def _file_name(self, table: str, position: int) -> str:
        """The name of ``table``'s file at ``position``."""
        raise NotImplementedError

    def _name_for(self, batch: Batch) -> str:
        """A new name for ``batch``'s file: the next position of its table's counter."""
        table = batch.table
        return self._file_name(table, self._counters.claim(self._counter_key(table), at_least=self._position_floor()))

    def _manifest_header(self) -> dict[str, Any]:
        """Fields about the sink written at the top of every manifest."""
        raise NotImplementedError

    def _manifest_counter(self) -> str:
        """The durable counter whose values number the sink's manifests."""
        raise NotImplementedError

    def _manifest_file(self, sequence: int) -> str:
        """The name (under the root) of the manifest numbered ``sequence``."""
        raise NotImplementedError

    def _manifest_name(self) -> str:
        return self._manifest_file(self._counters.claim(self._manifest_counter(), at_least=self._position_floor()))

    # -- intake ----------------------------------------------------------------------------------------------------

    def _parse(self, call: Any) -> Call:
        """``call`` validated by ``parse_call``; :class:`~cio_sync.InvalidCall` (counted as a rejection) if bad."""
        try:
            return parse_call(call)
        except InvalidCall as exc:
            self._publisher.reject(call, exc)
            raise

    def sync(self) -> None:
        """The durability barrier: return once every call that :meth:`write` or :meth:`write_many` accepted before
        this call is fsynced in the spool (see :meth:`cio_sync.buffer.spool.AvroSpool.sync`). Calls from many
        threads share fsyncs (group commit): use ``spool_sync="group"`` so that ``write`` itself never waits for
        the disk, and call ``sync()`` before telling a client its calls are safe.

        Raises :class:`~cio_sync.StorageError` if a call accepted before it cannot be made durable (an fsync of the
        spool failed): those calls are not durable, and are not lost either: their rows are published from memory
        with the next batch of their table, as after a failed fsync with ``spool_sync="interval"`` (a crash before
        that may lose them). Every ``sync()`` covering them raises until they are recorded or published, which a
        :meth:`flush` does. Without a spool (``spool_dir=None``) it returns at once: rows in memory only, no
        durability to wait for.
        """
        spool = getattr(self, "spool", None)
        if spool is None or self._publisher.inherited:
            return
        spool.sync()

    def close(self) -> list[WrittenFile]:
        if self._publisher.inherited:
            return []  # a child after fork: the buffers, the row store and its lock are the parent's
        files = self._publisher.close()
        self._close_store()
        return files


class BufferedSink(PublishingSink):
    """A sink built from the toolkit every built-in sink uses: subclass it, declare ``tables`` and ``layout``, and
    implement :meth:`route`::

        class OrdersSink(cio_sync.BufferedSink):
            tables = {"orders": pa.schema([("messageId", pa.string()), ("revenue", pa.float64())])}
            layout = "orders.{position}.{ext}"

            def route(self, call):
                if call.type == "track" and call.data.get("event") == "Order Completed":
                    yield "orders", {"messageId": call.message_id,
                                     "revenue": (call.data.get("properties") or {}).get("revenue")}

    ``tables`` maps each table name to its Arrow schema (or to a table spec object carrying one as ``.schema``).
    ``layout`` names the files, with the placeholders ``{table}``, ``{position}`` (required) and ``{ext}``; default
    ``"{table}.{position}.{ext}"``. Both are checked when the class is defined (and again when a sink is made):
    an unknown placeholder, a missing ``{position}``, a path separator or ``..`` raise
    :class:`~cio_sync.ConfigError`. Positions come from durable counters under ``_cio_sync/`` on the target, one
    per table, from 1 and never reused: a restart continues them and two processes on one prefix never collide.

    :meth:`route` gets each validated :class:`~cio_sync.Call` and yields ``(table, row)`` pairs, a row being a dict
    (column -> value, missing columns null) or a tuple in schema order; none to ignore the call. A row that does
    not fit its table (a wrong type, an unknown column, a wrong length, a null in a non-nullable column) makes
    :meth:`write` raise :class:`~cio_sync.InvalidCall` naming the table and column, and none of that call's rows
    is kept.

    The keywords mean what they mean for :class:`~cio_sync.AdvancedSink`: ``target`` with ``storage_options``,
    ``filesystem`` or ``retry``; ``format`` (parquet, csv or a Format); publishing on :meth:`flush`, on
    :meth:`close`, every ``flush_interval`` seconds and early at ``max_rows`` or ``max_bytes`` per table; the memory
    budget ``max_buffer_bytes`` with ``when_full`` and ``block_timeout``; the spool (``spool_dir``,
    ``spool_sync``, ``spool_sync_interval``), with which every accepted call's rows survive a crash and are
    published exactly once, and :meth:`sync`, the durability barrier; ``manifests`` (one per sync under
    ``_manifests/``, named after the class); ``on_publish``; ``keep_rejected``.
    """

    #: Table name -> Arrow schema (or an object with a ``schema`` attribute).
    tables: ClassVar[Mapping[str, Any]] = {}
    #: The file-name template; see the class docstring.
    layout: ClassVar[str] = DEFAULT_LAYOUT
    #: Placeholders of ``layout`` besides ``{table}``, ``{position}`` and ``{ext}`` that the sink fills in
    #: (:meth:`_name_fields`); for sinks that extend the toolkit, like the Advanced sink.
    layout_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.tables:  # a class that declares its tables is checked now, not at its first flush
            _layout(cls.__name__, cls.layout, _schemas(cls.__name__, cls.tables), cls.layout_fields)

    def __init__(
        self,
        target: str | Writer,
        *,
        format: str | Format = "parquet",
        storage_options: Mapping[str, Any] | None = None,
        filesystem: AbstractFileSystem | None = None,
        flush_interval: float | None = DEFAULT_FLUSH_INTERVAL,
        max_rows: int | None = DEFAULT_MAX_ROWS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        max_buffer_bytes: int | None = DEFAULT_MAX_BUFFER_BYTES,
        when_full: str | None = None,
        block_timeout: float | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_sync: str = "always",
        spool_sync_interval: float = 0.2,
        manifests: bool = True,
        retry: RetryPolicy | None = None,
        on_publish: Callable[[WrittenFile], None] | None = None,
        keep_rejected: bool = False,
        dedupe_window: float | timedelta | None = None,
    ) -> None:
        self._start(
            target, format=get_format(format), storage_options=storage_options, filesystem=filesystem,
            flush_interval=flush_interval, max_rows=max_rows, max_bytes=max_bytes,
            max_buffer_bytes=max_buffer_bytes, when_full=when_full, block_timeout=block_timeout,
            spool_dir=spool_dir, spool_sync=spool_sync, spool_sync_interval=spool_sync_interval,
            manifests=manifests, retry=retry, on_publish=on_publish, keep_rejected=keep_rejected,
            dedupe_window=dedupe_window,
        )

    def _start(
        self,
        target: str | Writer,
        *,
        spool_dir: str | os.PathLike[str] | None,
        spool_sync: str,
        spool_sync_interval: float,
        when_full: str | None,
        dedupe_window: float | timedelta | None = None,
        **options: Any,
    ) -> None:
        """Check the tables and the layout, then open the sink's writer, counters, spool and publisher (what every
        subclass's ``__init__`` ends with); ``options`` are the keywords of :meth:`PublishingSink._open`."""
        owner = type(self).__name__
        self._schemas: Mapping[str, pa.Schema] = MappingProxyType(_schemas(owner, self.tables))
        self._layout = _layout(owner, self.layout, self._schemas, self.layout_fields)
        self._fitters: dict[str, RowFitter] = {}
        self.spool: AvroSpool | None = None
        self._spool_options = (spool_dir, spool_sync, spool_sync_interval)
        self._dedupe_window = window_seconds(dedupe_window)
        self.dedupe: MessageIdWindow | None = None
        if self._dedupe_window is not None:
            lacking = [t for t in self._schemas if not self._reads_message_ids(t)]
            if lacking:
                raise ConfigError(f"{owner}: dedupe_window needs a message_id (or messageId) column in every table; "
                                  f"{', '.join(sorted(lacking))} {'has' if len(lacking) == 1 else 'have'} none")
        self._open(target, when_full=when_full or ("spill" if spool_dir is not None else "block"), **options)

    def _open_store(self) -> AvroSpool | None:
        spool_dir, sync, sync_interval = self._spool_options
        if spool_dir is None:
            return None
        codecs = {table: self._spool_codec(table) for table in self._schemas}
        self.spool = AvroSpool(
            spool_dir, schema_of=self._spool_schema, sync=sync, sync_interval=sync_interval,
            # Only tables with binary or decimal columns need one; the others take the spool's fast path.
            codec_of=codecs.get if any(codecs.values()) else None)
        return self.spool

    def _close_store(self) -> None:
        if self.spool is not None:
            self.spool.close()
        if self.dedupe is not None:
            self.dedupe.close()

    def _open_dedupe(self) -> MessageIdWindow | None:
        if self._dedupe_window is None:
            return None
        spool_dir = self._spool_options[0]
        path = Path(spool_dir) / SEEN_FILE if spool_dir is not None else None
        self.dedupe = MessageIdWindow(path, self._dedupe_window)
        return self.dedupe

    def prefetch_message_ids(self, message_ids: Iterable[str]) -> AbstractContextManager[None]:
        if self.dedupe is None:
            return super().prefetch_message_ids(message_ids)
        return self.dedupe.prefetched(message_ids)

    def _reads_message_ids(self, table: str) -> bool:
        """Whether :meth:`_message_ids_of` can read the ids of ``table``'s rows."""
        return any(name in _ID_COLUMNS for name in self._spool_schema(table).names)

    def _message_ids_of(self, batch: Batch) -> list[str]:
        assert batch.schema is not None
        assert batch.data is not None
        at = next(i for i, name in enumerate(batch.schema.names) if name in _ID_COLUMNS)
        return [str(row[at]) for row in batch.data if row[at] is not None]

    # -- what a subclass declares ----------------------------------------------------------------------------------

    def route(self, call: Call) -> Iterable[tuple[str, Any]]:
        """The ``(table, row)`` pairs ``call`` becomes (a row: a dict, or a tuple in schema order); none to ignore
        it. Subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement route(call)")

    # -- naming hooks ----------------------------------------------------------------------------------------------

    def _spool_schema(self, table: str) -> pa.Schema:
        """The schema of ``table``'s rows on the spool (KeyError for a folder that is not a table's)."""
        return self._schemas[table]

    def _spool_codec(self, table: str) -> RowCodec | None:
        return spool_codec(self._schemas[table])

    def _counter_key(self, table: str) -> str:
        return f"table.{table}"

    def _name_fields(self, table: str) -> dict[str, object]:
        """Values of the layout's extra placeholders (``layout_fields``) for ``table``'s files."""
        return {}

    def _file_name(self, table: str, position: int) -> str:
        return self._layout.name(table=table, position=position, ext=self.format.extension,
                                 **self._name_fields(table))

    def _manifest_label(self) -> str:
        return type(self).__name__

    def _manifest_header(self) -> dict[str, Any]:
        return {"mode": "custom", "sink": self._manifest_label(), "format": self.format.name}

    def _manifest_counter(self) -> str:
        return custom_manifest_counter(self._manifest_label())

    def _manifest_file(self, sequence: int) -> str:
        return custom_manifest_name(self._manifest_label(), sequence)

    # -- intake ----------------------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.writer.url!r}, tables={sorted(self._schemas)}, "
                f"format={self.format.name!r}, closed={self.closed})")

    def write(self, call: Any) -> str:
        """Validate one call (a dict, JSON str or JSON bytes), route it and buffer its rows; return its
        ``messageId``.

        Raises :class:`~cio_sync.InvalidCall` naming the field if the call is bad, or the table and column if a row
        :meth:`route` made does not fit; then nothing of the call is kept and the sink keeps working.
        """
        return self.write_call(self._parse(call))

    def write_call(self, parsed: Call) -> str:
        """Route and buffer a call already validated by ``parse_call``; return its ``messageId``."""
        self._publisher.add_call(self._rows_of(parsed), to_micros(parsed.received_at), message_id=parsed.message_id)
        return parsed.message_id

    def _fitter(self, table: str) -> RowFitter:
        fitter = self._fitters.get(table)
        if fitter is None:
            schema = self._schemas.get(table)
            if schema is None:
                raise InvalidCall(f"route() gave a row for table {table!r}, which is not one of this sink's "
                                  f"tables ({', '.join(self._schemas)})", field=str(table))
            fitter = self._fitters[table] = RowFitter(table, schema)
        return fitter

    def _rows_of(self, parsed: Call) -> list[tuple[str, pa.Schema, Row, int]]:
        """The rows ``parsed`` becomes, fitted to their tables; :class:`InvalidCall` (counted as a rejection) if one
        does not fit."""
        try:
            out = []
            for table, row in self.route(parsed) or ():
                fitter = self._fitter(table)
                fitted = fitter.fit(row)
                out.append((table, fitter.schema, fitted, row_size(fitted)))
                if len(out) > MAX_ROWS_PER_CALL:
                    raise InvalidCall(f"route() gave more than {MAX_ROWS_PER_CALL} rows for one call")
        except InvalidCall as exc:
            self._publisher.reject(parsed.data, exc)
            raise
        return out

    # -- composing sinks (Pipeline) --------------------------------------------------------------------------------

    def check_call(self, parsed: Call) -> None:
        for table, row in self.route(parsed) or ():
            self._fitter(table).fit(row)

    def holding(self, parsed: Call) -> AbstractContextManager[None]:
        return self._publisher.holding_call(self._rows_of(parsed), to_micros(parsed.received_at),
                                            message_id=parsed.message_id)
