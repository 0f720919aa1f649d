"""The last mile: load the files of a prefix into a warehouse, each exactly once, and build current-state views.

The loader reads files, not sinks: it knows the file names and schemas of both modes (shared/SCHEMAS.md), so it
also loads exports named the way Customer.io names its own. Each file is loaded in one transaction together with
its entry in the load-state table ``_cio_sync_loaded``, so a rerun loads nothing twice and a load killed midway
loses nothing; ``delete_after_load`` deletes a file only after its rows are committed.

Files come from a bucket, so they are untrusted: every file is checked against its table's known schema before a
row of it reaches the warehouse, warehouse tables are created from the known schemas (never from a file), and a name
taken from a file becomes a column only when it is a plain identifier, always quoted. A file that cannot load is
quarantined: recorded in the load state with the reason, reported, skipped by later loads until they are asked to
retry it; the load goes on with the next file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from cio_sync._errors import (
    CioSyncError,
    ConfigError,
    InvalidCall,
    InvalidFile,
    StorageError,
    library_error,
    make_error,
)
from cio_sync._time import to_micros
from cio_sync.intake.calls import parse_time
from cio_sync.publish.layout import parse_advanced, parse_standard
from cio_sync.schemas.tables import (
    ADVANCED_TABLES,
    CALL_COLUMNS,
    EXTRA_COLUMN,
    STANDARD_TABLES,
    TIMESTAMP,
    Kind,
    current_views,
    is_json_text,
    table_for_file_name,
)
from cio_sync.storage.backends import display_url, redact, resolve

log = logging.getLogger("cio_sync.loader")

LOAD_STATE_TABLE: Final = "_cio_sync_loaded"
#: Where manifests are, under a prefix; a quarantined manifest's entry in the load state is named under it.
MANIFESTS_FOLDER: Final = "_manifests"
#: ``status`` of a load-state entry: the file's rows are in the warehouse, or it could not load.
LOADED: Final = "loaded"
QUARANTINED: Final = "quarantined"
#: A name from a file becomes a column only if it is a plain identifier of at most 63 bytes (PostgreSQL cuts longer
#: ones, which could make two names one) that does not start like the loader's own names.
_PLAIN_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_OWN_PREFIX: Final = "_cio_sync"
#: Timestamps every target and Python's datetime can hold: years 1 to 9999, in microseconds since the epoch.
_FIRST_MICROS: Final = -62_135_596_800_000_000
_LAST_MICROS: Final = 253_402_300_799_999_999
_SHA256: Final = re.compile(r"[0-9a-fA-F]{64}")
_MAX_REASON: Final = 600
#: DuckDB database names that are no local file (``md:`` for MotherDuck, ...); a drive letter is one character.
_NOT_A_FILE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")
_FORMATS: Final = {"parquet": "Parquet", "csv": "CSV", "json": "JSON lines"}
_LIST_OF_TEXT: Final = pa.list_(pa.string())
#: The columns of a warehouse table: lower-case name -> (name, Arrow type, ``None`` for a type the loader does not
#: know).
Columns = dict[str, tuple[str, pa.DataType | None]]


@dataclass(frozen=True, order=True)
class SourceFile:
    """One loadable file of a prefix, with the table it goes to and its place in the load order."""

    order: tuple[Any, ...]
    name: str
    table: str
    mode: str
    ext: str


@dataclass(frozen=True)
class QuarantinedFile:
    """A file (or manifest) that could not load: its name under the prefix, its table, and why.

    A manifest's name is ``_manifests/<name>.json`` and its table ``_manifests``.
    """

    name: str
    table: str
    reason: str


@dataclass
class LoadReport:
    """What a load did.

    ``quarantined`` lists the files this load could not load (each recorded in the load state with its reason, and
    not tried again by later loads unless they pass ``retry_quarantined=True``); ``files_still_quarantined`` counts
    the files an earlier load quarantined, which this one skipped.
    """

    source: str
    target: str
    files_loaded: int = 0
    rows_loaded: int = 0
    files_already_loaded: int = 0
    files_waiting: int = 0
    files_deleted: int = 0
    files_still_quarantined: int = 0
    tables: dict[str, int] = field(default_factory=dict)
    quarantined: list[QuarantinedFile] = field(default_factory=list)

    @property
    def files_quarantined(self) -> int:
        """How many files (and manifests) this load quarantined."""
        return len(self.quarantined)

    def __str__(self) -> str:
        tables = ", ".join(f"{t} +{n:,}" for t, n in sorted(self.tables.items())) or "nothing new"
        text = (f"loaded {self.files_loaded} files ({self.rows_loaded:,} rows) from {self.source} into "
                f"{self.target}: {tables}; {self.files_already_loaded} already loaded, {self.files_waiting} "
                f"waiting for their manifest, {self.files_deleted} deleted")
        if self.quarantined:
            text += f", {self.files_quarantined} quarantined"
        if self.files_still_quarantined:
            text += f", {self.files_still_quarantined} still quarantined by an earlier load"
        return text


class _Unloadable(InvalidFile):
    """A file (or manifest) that cannot load as it is; ``reason`` is what the load state records."""

    def __init__(self, reason: str, *, name: str | None = None) -> None:
        # One line, of bounded length: the reason is printed once per file and stored in the load state.
        text = " ".join(reason.split())
        super().__init__(text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 1] + "…", name=name)


def classify(name: str) -> SourceFile | None:
    """The file a name denotes, or ``None`` if it is not a file of either mode."""
    advanced = parse_advanced(name)
    if advanced is not None:
        order: tuple[Any, ...] = ("advanced", advanced.destination, advanced.action, advanced.position)
        return SourceFile(order, name, f"raw_{advanced.type}", "advanced", advanced.ext)
    standard = parse_standard(name)
    if standard is not None:
        spec = table_for_file_name(standard.table)
        if spec is not None:
            order = ("standard", spec.name, standard.sequence)
            return SourceFile(order, name, spec.name, "standard", "parquet")
    return None


def known_schema(source: SourceFile) -> pa.Schema:
    """The schema the table of ``source`` has in the warehouse, before any extra column of other versions."""
    if source.mode == "standard":
        return STANDARD_TABLES[source.table].schema
    return ADVANCED_TABLES[source.table.removeprefix("raw_")].schema


def quote_identifier(name: str) -> str:
    """``name`` as a quoted SQL identifier for DuckDB and PostgreSQL, an embedded double quote doubled.

    Raises ``ValueError`` for a name holding a NUL character, which neither database can take.
    """
    if "\0" in name:
        raise ValueError(f"an identifier cannot hold a NUL character: {_shown(name)}")
    return '"' + name.replace('"', '""') + '"'


def _shown(name: str) -> str:
    """A name from a file as messages show it: quoted and escaped (no control characters reach a terminal), short."""
    return repr(name if len(name) <= 60 else name[:60] + "…")


def _plain(name: str) -> bool:
    return bool(_PLAIN_NAME.fullmatch(name)) and not name.lower().startswith(_OWN_PREFIX)


# -- reading a file and checking it against its table's known schema ---------------------------------------------


def _family(kind: pa.DataType) -> str:
    """The type family of an Arrow type, in the words messages use."""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return "text"
    if pa.types.is_integer(kind):
        return "integer"
    if pa.types.is_floating(kind):
        return "number"
    if pa.types.is_boolean(kind):
        return "boolean"
    if pa.types.is_timestamp(kind):
        return "timestamp"
    if pa.types.is_date(kind):
        return "date"
    if pa.types.is_null(kind):
        return "null"
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and _family(kind.value_type) == "text":
        return "list of text"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_struct(kind) or pa.types.is_map(kind):
        return "nested"
    return str(kind)


def _as_json_text(column: pa.ChunkedArray) -> pa.Array:
    return pa.array([None if v is None else orjson.dumps(v, default=str).decode() for v in column.to_pylist()],
                    pa.string())


def _convert(column: pa.ChunkedArray, target: pa.DataType, *,
             json_text: bool = False) -> pa.ChunkedArray | pa.Array | None:
    """``column`` in ``target``, or ``None`` if its type family is not one ``target`` takes; raises
    :class:`_Unloadable` (without the column's name, which the caller adds) when a value does not fit."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = kind.value_type
    have, want = _family(kind), _family(target)
    try:
        if have == "null":
            return pa.nulls(len(column), target)
        if have == want and want in ("text", "integer", "number", "boolean", "date", "list of text"):
            return column.cast(target)
        if want == "number" and have == "integer":
            return column.cast(target)
        if want == "text" and json_text and have in ("nested", "list of text"):
            return _as_json_text(column)
        if want == "timestamp" and have == "timestamp":
            if kind.tz != "UTC":  # naive instants are taken as UTC; another zone is the same instant
                column = column.cast(pa.timestamp(kind.unit, tz="UTC"))
            # Nanoseconds are cut to microseconds (the contract's precision); coarser units must not overflow.
            return column.cast(target, safe=kind.unit != "ns")
        if want == "timestamp" and have == "date":
            return column.cast(target)
        if want == "timestamp" and have == "integer":
            # Microseconds since the epoch, as some exports write them.
            return column.cast(pa.int64()).cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise _Unloadable(f"has values that do not fit {want}: {exc}") from exc
    return None


def _extra_type(kind: pa.DataType) -> pa.DataType | None:
    """The warehouse type of a new column of ``kind`` (a column of other versions), or ``None`` if none holds it."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    family = _family(kind)
    simple: dict[str, pa.DataType] = {"text": pa.string(), "null": pa.string(), "nested": pa.string(),
                                      "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_(),
                                      "timestamp": TIMESTAMP, "date": pa.date32(), "list of text": _LIST_OF_TEXT}
    return simple.get(family)


#: Warehouse column type (information_schema, lower case) -> the Arrow type a file's column is converted to.
_WAREHOUSE_TYPES: Final[Mapping[str, pa.DataType]] = {
    "varchar": pa.string(), "text": pa.string(), "character varying": pa.string(),
    "bigint": pa.int64(), "integer": pa.int64(), "smallint": pa.int64(),
    "double": pa.float64(), "double precision": pa.float64(), "real": pa.float64(), "float": pa.float64(),
    "boolean": pa.bool_(), "date": pa.date32(),
    "timestamp with time zone": TIMESTAMP, "timestamp": TIMESTAMP, "timestamp without time zone": TIMESTAMP,
    "varchar[]": _LIST_OF_TEXT, "_text": _LIST_OF_TEXT, "_varchar": _LIST_OF_TEXT,
}


def conform(table: pa.Table, schema: pa.Schema, *, table_name: str = "its table",
            existing: Mapping[str, tuple[str, pa.DataType | None]] | None = None) -> pa.Table:
    """``table`` checked against ``schema`` (the known schema of ``table_name``) and converted to it.

    The columns of ``schema`` come first, in its types (a column missing from the file, e.g. in another schema
    version or export, is null). A column the schema does not know is kept after them if its name is a plain
    identifier, in the type the warehouse table already has for it (``existing``: lower-case name -> (name, Arrow
    type, ``None`` if unknown)) or else in the nearest warehouse type. Raises :class:`_Unloadable` with the reason
    when a known column holds another type family, a value does not fit, a name is not plain or differs from a
    known one only in case, or a timestamp is outside years 1 to 9999.
    """
    existing = existing or {}
    seen: dict[str, str] = {}
    for name in table.column_names:
        if name.lower() in seen:
            raise _Unloadable(f"columns {_shown(seen[name.lower()])} and {_shown(name)} have one name")
        seen[name.lower()] = name
    known = {f.name.lower(): f.name for f in schema}
    columns: list[pa.ChunkedArray | pa.Array] = []
    fields: list[pa.Field] = []
    for wanted in schema:
        present = seen.get(wanted.name.lower())
        if present is None:
            columns.append(pa.nulls(table.num_rows, wanted.type))
        elif present != wanted.name:
            raise _Unloadable(f"column {_shown(present)} differs from {table_name}'s column {wanted.name!r} only "
                              "in case")
        else:
            column = table.column(present)
            try:
                converted = _convert(column, wanted.type, json_text=is_json_text(wanted))
            except _Unloadable as exc:
                raise _Unloadable(f"column {wanted.name!r} {exc.reason}") from exc
            if converted is None:
                raise _Unloadable(f"column {wanted.name!r} holds {_family(column.type)} ({column.type}), but "
                                  f"{table_name} has it as {_family(wanted.type)}")
            columns.append(converted)
        fields.append(wanted)
    for name in table.column_names:
        if name.lower() in known:
            continue
        if not _plain(name):
            raise _Unloadable(f"column {_shown(name)} is not a plain name (letters, digits and _, at most 63, not "
                              f"starting {_OWN_PREFIX}): the loader makes no column of it")
        stored_name, stored_type = existing.get(name.lower(), (name, None))
        if stored_name != name:
            raise _Unloadable(f"column {_shown(name)} differs from the warehouse's column {stored_name!r} only in "
                              "case")
        column = table.column(name)
        target = stored_type if stored_type is not None else _extra_type(column.type)
        if target is None:
            raise _Unloadable(f"column {name!r} holds {column.type}, which the loader cannot store")
        try:
            converted = _convert(column, target, json_text=_family(target) == "text")
        except _Unloadable as exc:
            raise _Unloadable(f"column {name!r} {exc.reason}") from exc
        if converted is None:
            raise _Unloadable(f"column {name!r} holds {_family(column.type)} ({column.type}), but the warehouse's "
                              f"{table_name} has it as {_family(target)}")
        columns.append(converted)
        fields.append(pa.field(name, target))
    result = pa.Table.from_arrays(columns, schema=pa.schema(fields))
    for f in result.schema:
        if pa.types.is_timestamp(f.type) and result.num_rows:
            low, high = pc.min_max(result.column(f.name).cast(pa.int64())).values()
            if (low.as_py() is not None and low.as_py() < _FIRST_MICROS) or (
                    high.as_py() is not None and high.as_py() > _LAST_MICROS):
                raise _Unloadable(f"column {f.name!r} has a timestamp outside the years 1 to 9999")
    try:
        result.validate(full=True)  # e.g. text that is not UTF-8, which no warehouse takes
    except pa.ArrowInvalid as exc:
        raise _Unloadable(f"its data is invalid: {exc}") from exc
    return result


def _advanced_row(doc: dict[str, Any], call_type: str) -> dict[str, Any]:
    """A call as sent (a JSON line) as a row of its type's columns."""
    row: dict[str, Any] = {}
    known = set()
    for name, kind in CALL_COLUMNS[call_type]:
        known.add(name)
        value = doc.get(name)
        if kind is Kind.EXTRA:
            continue
        if value is None:
            row[name] = None
        elif kind is Kind.OBJECT:
            row[name] = orjson.dumps(value).decode()
        elif kind is Kind.TIME:
            row[name] = to_micros(parse_time(value, name))
        elif kind is Kind.TEXT and not isinstance(value, str):
            row[name] = orjson.dumps(value).decode()
        else:
            row[name] = value
    extra = {k: v for k, v in doc.items() if k not in known}
    row[EXTRA_COLUMN] = orjson.dumps(extra).decode() if extra else None
    return row


def _read_csv(data: bytes, schema: pa.Schema) -> pa.Table:
    # Every known column as text (an unquoted empty cell is null, a quoted one the empty string), then the
    # timestamps, written as ISO-8601 UTC text, back to instants. A row may be as long as the file (a 2 MB property
    # is a legal call), and a quoted cell may hold line breaks.
    table = pacsv.read_csv(
        pa.BufferReader(data),
        read_options=pacsv.ReadOptions(block_size=min(max(len(data) + 1, 1 << 20), 2**31 - 1)),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={f.name: pa.string() for f in schema}, strings_can_be_null=True,
            quoted_strings_can_be_null=False))
    for f in schema:
        if pa.types.is_timestamp(f.type) and f.name in table.column_names:
            index = table.column_names.index(f.name)
            try:
                moments = [None if v is None else to_micros(parse_time(v, f.name))
                           for v in table.column(index).to_pylist()]
            except InvalidCall as exc:
                raise _Unloadable(f"column {f.name!r}: {exc.reason}") from exc
            table = table.set_column(index, f, pa.array(moments, f.type))
    return table


def _read_json_lines(data: bytes, call_type: str, schema: pa.Schema) -> pa.Table:
    rows = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise _Unloadable(f"line {number} is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise _Unloadable(f"line {number} is not a JSON object (a call)")
        try:
            rows.append(_advanced_row(doc, call_type))
        except InvalidCall as exc:
            raise _Unloadable(f"line {number}: {exc.field}: {exc.reason}") from exc
    return pa.Table.from_pylist(rows, schema=schema)


def read_file(data: bytes, source: SourceFile,
              existing: Mapping[str, tuple[str, pa.DataType | None]] | None = None) -> pa.Table:
    """The rows of one file as an Arrow table under its table's known schema (see :func:`conform`).

    Raises :class:`~cio_sync.InvalidFile` naming the file, with the reason (which :func:`load` records when it
    quarantines the file), when the bytes are not a whole file of their format or the file does not fit the schema;
    the parser's own error is the ``__cause__``.
    """
    schema = known_schema(source)
    try:
        try:
            if source.ext == "parquet":
                table = pq.read_table(pa.BufferReader(data))
            elif source.ext == "csv":
                table = _read_csv(data, schema)
            else:
                table = _read_json_lines(data, source.table.removeprefix("raw_"), schema)
        except (_Unloadable, MemoryError):
            raise
        except Exception as exc:  # any failure to parse untrusted bytes is the file's, and is reported
            raise _Unloadable(f"cannot be read as {_FORMATS[source.ext]}: {exc}") from exc
        return conform(table, schema, table_name=source.table, existing=existing)
    except _Unloadable as exc:
        exc.name = exc.name or source.name
        raise


# -- targets -----------------------------------------------------------------------------------------------------

_STATE_COLUMNS: Final = "source, name, table_name, rows, loaded_at, status, reason"


def _sql_type(kind: pa.DataType, dialect: str) -> str:
    """The column type of the warehouse for an Arrow type of a known schema or a converted extra column."""
    duck = dialect == "duckdb"
    if pa.types.is_timestamp(kind):
        return "TIMESTAMPTZ"
    if _family(kind) == "list of text":
        return "VARCHAR[]" if duck else "TEXT[]"
    names = {"int64": "BIGINT", "bool": "BOOLEAN", "date32[day]": "DATE",
             "double": "DOUBLE" if duck else "DOUBLE PRECISION"}
    return names.get(str(kind), "VARCHAR" if duck else "TEXT")


def _create_table_sql(table: str, schema: pa.Schema, dialect: str) -> str:
    columns = ", ".join(f"{quote_identifier(f.name)} {_sql_type(f.type, dialect)}" for f in schema)
    return f"CREATE TABLE IF NOT EXISTS {quote_identifier(table)} ({columns})"


def _state_sql(dialect: str) -> str:
    text = "VARCHAR" if dialect == "duckdb" else "TEXT"
    return (f"CREATE TABLE IF NOT EXISTS {LOAD_STATE_TABLE} (source {text} NOT NULL, name {text} NOT NULL, "
            f"table_name {text} NOT NULL, rows BIGINT NOT NULL, loaded_at TIMESTAMPTZ NOT NULL, "
            f"status {text} NOT NULL DEFAULT '{LOADED}', reason {text}, PRIMARY KEY (source, name))")


def _migrations(have: set[str], dialect: str) -> list[str]:
    """What brings a load-state table of an earlier release (without ``status`` and ``reason``) up to date."""
    text = "VARCHAR" if dialect == "duckdb" else "TEXT"
    sql = []
    if "status" not in have:
        sql.append(f"ALTER TABLE {LOAD_STATE_TABLE} ADD COLUMN status {text} DEFAULT '{LOADED}'")
    if "reason" not in have:
        sql.append(f"ALTER TABLE {LOAD_STATE_TABLE} ADD COLUMN reason {text}")
    return sql


def _extras(table: pa.Table, source: SourceFile) -> list[pa.Field]:
    known = {f.name for f in known_schema(source)}
    return [f for f in table.schema if f.name not in known]


def _columns(rows: list[tuple[Any, ...]]) -> Columns:
    return {str(name).lower(): (str(name), _WAREHOUSE_TYPES.get(str(kind).lower())) for name, kind in rows}


def _ddl(have: Columns, file: SourceFile, table: pa.Table, dialect: str) -> list[str]:
    """What makes the warehouse table of ``file`` (whose columns are ``have``) hold every column of ``table``."""
    if not have:
        return [_create_table_sql(file.table, known_schema(file), dialect)] + [
            _add_column_sql(file.table, f, dialect) for f in _extras(table, file)]
    return [_add_column_sql(file.table, f, dialect) for f in [*known_schema(file), *_extras(table, file)]
            if f.name.lower() not in have]


def _add_column_sql(table: str, column: pa.Field, dialect: str) -> str:
    return (f"ALTER TABLE {quote_identifier(table)} ADD COLUMN IF NOT EXISTS {quote_identifier(column.name)} "
            f"{_sql_type(column.type, dialect)}")


def _grown(have: Columns, file: SourceFile, table: pa.Table) -> Columns:
    """The columns of the warehouse table once ``table`` was loaded into it."""
    grown = dict(have)
    for f in [*known_schema(file), *_extras(table, file)]:
        grown.setdefault(f.name.lower(), (f.name, f.type))
    return grown


class _Target(Protocol):
    """A warehouse the loader writes to. Failures of the warehouse itself raise :class:`StorageError` naming it; a
    file whose rows the warehouse refuses raises :class:`_Unloadable`."""

    name: str

    def state(self, source: str) -> dict[str, str]:
        """The load-state entries of ``source``: name -> status."""
        ...

    def columns(self, table: str) -> Columns:
        """The columns ``table`` has in the warehouse (lower-case name -> name, Arrow type); empty if none yet."""
        ...

    def load(self, source: str, file: SourceFile, table: pa.Table, *, replace: bool) -> None:
        """The file's rows and its load-state entry (replacing a quarantined one), in one transaction."""
        ...

    def record(self, source: str, name: str, table: str, reason: str, *, replace: bool) -> None:
        """A quarantine entry for ``name`` with ``reason`` (replacing the earlier one), in one transaction."""
        ...

    def forget(self, source: str, name: str) -> None:
        """Remove the entry of ``name`` (a quarantined manifest that reads well now)."""
        ...

    def build_views(self) -> list[str]:
        """(Re)build the current-state views over the tables that exist; returns their names."""
        ...

    def close(self) -> None:
        """Close the connection (never raises)."""
        ...


def _remove_stale(path: str) -> None:
    """Remove the temporary databases that loads killed while creating ``path`` left beside it."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        candidates = list(Path(folder).glob(f".{name}.*.tmp"))
    except OSError:
        return
    for stale in candidates:
        pid = stale.name.removeprefix(f".{name}.").split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            for leftover in (stale, Path(f"{stale}.wal")):
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _SqlTarget:
    """What the two targets share: the load-state statements and the column cache, in the driver's parameter style
    (``P``), with its error class (``_error``)."""

    #: The driver's placeholder for a parameter.
    P: ClassVar[str]
    #: What :meth:`columns` asks for: a table's column names and types, the table's name as the one parameter.
    COLUMNS_SQL: ClassVar[str]
    _error: type[Exception]
    name: str
    path: str
    con: Any
    _tables: dict[str, Columns]

    def _failed(self, what: str, exc: BaseException) -> CioSyncError:
        # The one map of library errors (cio_sync._errors.LIBRARY_ERRORS); a warehouse failure is a StorageError.
        kind = library_error(exc) or StorageError
        return make_error(kind, f"{what}: {self.name} failed: {redact(' '.join(str(exc).split()), ())}",
                          path=self.path)

    def state(self, source: str) -> dict[str, str]:
        try:
            rows = self.con.execute(f"SELECT name, coalesce(status, '{LOADED}') FROM {LOAD_STATE_TABLE} "
                                    f"WHERE source = {self.P}", [source]).fetchall()
        except self._error as exc:
            raise self._failed(f"reading the load state of {source}", exc) from exc
        return {str(name): str(status) for name, status in rows}

    def columns(self, table: str) -> Columns:
        if table not in self._tables:
            try:
                self._tables[table] = _columns(self.con.execute(self.COLUMNS_SQL, [table]).fetchall())
            except self._error as exc:
                raise self._failed(f"reading the columns of {table}", exc) from exc
        return self._tables[table]

    def _entry(self, source: str, name: str, *, table: str, rows: int, status: str, reason: str | None,
               replace: bool) -> None:
        now, p = datetime.now(UTC), self.P
        if replace:
            self.con.execute(f"UPDATE {LOAD_STATE_TABLE} SET table_name = {p}, rows = {p}, loaded_at = {p}, "
                             f"status = {p}, reason = {p} WHERE source = {p} AND name = {p}",
                             [table, rows, now, status, reason, source, name])
        else:
            self.con.execute(f"INSERT INTO {LOAD_STATE_TABLE} ({_STATE_COLUMNS}) VALUES ({', '.join([p] * 7)})",
                             [source, name, table, rows, now, status, reason])

    def forget(self, source: str, name: str) -> None:
        try:
            self.con.execute(f"DELETE FROM {LOAD_STATE_TABLE} WHERE source = {self.P} AND name = {self.P}",
                             [source, name])
        except self._error as exc:
            raise self._failed(f"releasing {source}/{name} from quarantine", exc) from exc


class _DuckDBTarget(_SqlTarget):
    """Loads into a DuckDB database file (or ``:memory:``)."""

    P = "?"
    COLUMNS_SQL = ("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                   "AND table_schema = current_schema()")

    def __init__(self, path: str) -> None:
        try:
            import duckdb
        except ImportError as exc:
            raise ConfigError("loading into DuckDB needs the duckdb package: pip install -e '.[duckdb]' in the "
                              "cio_sync checkout") from exc
        self._duckdb = duckdb
        self._error = duckdb.Error
        self.path = path
        self.name = f"the DuckDB database {path}"
        self.con: Any = None
        #: The columns of each warehouse table as this connection knows them (it is the only writer).
        self._tables: dict[str, Columns] = {}
        try:
            if path != ":memory:" and not _NOT_A_FILE.match(path):
                folder = os.path.dirname(path) or "."
                if not os.path.isdir(folder):  # say so, rather than DuckDB's error about a temporary file in it
                    raise FileNotFoundError(errno.ENOENT, "no such folder", folder)
                _remove_stale(path)
                if not os.path.exists(path):
                    self._create(path)
            self.con = duckdb.connect(path)
            self.con.execute("SET TimeZone = 'UTC'")
            self.con.execute(_state_sql("duckdb"))
            have = {r[0] for r in self.con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                "AND table_schema = current_schema()", [LOAD_STATE_TABLE]).fetchall()}
            for sql in _migrations(have, "duckdb"):
                self.con.execute(sql)
        except (duckdb.Error, OSError) as exc:
            self.close()
            raise StorageError(f"cannot open {self.name}: {' '.join(str(exc).split())}{_path_hint(path)}",
                               path=path) from exc

    def _create(self, path: str) -> None:
        """A new database, made whole under a temporary name and then linked into place.

        DuckDB writes a new file's header in several writes; a full disk or a kill between them would leave a file
        that no later load can open. Made aside, the database at ``path`` is either whole or absent; a temporary
        file left by a killed load is removed by the next one.
        """
        folder, name = os.path.split(os.path.abspath(path))
        temporary = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            con = self._duckdb.connect(temporary)
            try:
                con.execute(_state_sql("duckdb"))
                con.execute("CHECKPOINT")
            finally:
                con.close()
            with contextlib.suppress(FileExistsError):  # never replace a database another load made meanwhile
                os.link(temporary, path)
        finally:
            for leftover in (temporary, f"{temporary}.wal"):
                with contextlib.suppress(OSError):  # best effort: the next load removes what stays
                    Path(leftover).unlink(missing_ok=True)

    def _rollback(self) -> None:
        # A failed COMMIT has already ended the transaction; a database that a fatal error invalidated refuses.
        with contextlib.suppress(self._duckdb.Error):
            self.con.execute("ROLLBACK")

    def load(self, source: str, file: SourceFile, table: pa.Table, *, replace: bool) -> None:
        duckdb = self._duckdb
        target = quote_identifier(file.table)
        incoming = "_cio_sync_incoming"
        have = self.columns(file.table)
        try:
            self.con.execute("BEGIN TRANSACTION")
            try:
                for sql in _ddl(have, file, table, "duckdb"):
                    self.con.execute(sql)
                self.con.register(incoming, table)
                self.con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM {incoming}")
                self._entry(source, file.name, table=file.table, rows=table.num_rows, status=LOADED, reason=None,
                            replace=replace)
                self.con.execute("COMMIT")
            except BaseException:
                self._rollback()
                self._tables.pop(file.table, None)
                raise
            finally:
                with contextlib.suppress(duckdb.Error):
                    self.con.unregister(incoming)
            self._tables[file.table] = _grown(have, file, table)
        except duckdb.DataError as exc:
            raise _Unloadable(f"DuckDB refused its rows: {exc}") from exc
        except duckdb.Error as exc:
            raise self._failed(f"loading {source}/{file.name}", exc) from exc

    def record(self, source: str, name: str, table: str, reason: str, *, replace: bool) -> None:
        try:
            self.con.execute("BEGIN TRANSACTION")
            try:
                self._entry(source, name, table=table, rows=0, status=QUARANTINED, reason=reason, replace=replace)
                self.con.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except self._duckdb.Error as exc:
            raise self._failed(f"quarantining {source}/{name}", exc) from exc

    def build_views(self) -> list[str]:
        made = []
        try:
            tables = {r[0] for r in self.con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
                "AND table_schema = current_schema()").fetchall()}
            for view, table, sql in current_views():
                if table in tables:
                    self.con.execute(f"CREATE OR REPLACE VIEW {quote_identifier(view)} AS {sql}")
                    made.append(view)
            for table in sorted(t for t in tables if t.startswith("raw_")):
                self.con.execute(f"CREATE OR REPLACE VIEW {quote_identifier(table + '_unique')} AS SELECT * FROM "
                                 f'{quote_identifier(table)} QUALIFY row_number() OVER (PARTITION BY "messageId" '
                                 'ORDER BY "receivedAt") = 1')
                made.append(f"{table}_unique")
        except self._duckdb.Error as exc:
            raise self._failed("building the current-state views", exc) from exc
        return made

    def close(self) -> None:
        if self.con is not None:
            try:
                self.con.close()
            except self._duckdb.Error as exc:
                log.debug("closing %s: %s", self.name, exc)
            self.con = None


def _pg_view(sql: str) -> str:
    """A DuckDB QUALIFY view as PostgreSQL SQL (a window in a subquery)."""
    select, _, qualify = sql.partition("QUALIFY")
    window, _, rest = qualify.strip().partition(" = 1")
    table = select.split("FROM", 1)[1].strip()
    extra = rest.strip().removeprefix("AND").strip()
    condition = f" AND {extra}" if extra else ""
    return (f"SELECT * FROM (SELECT *, {window.strip()} AS _cio_sync_rank FROM {table}) ranked "
            f"WHERE _cio_sync_rank = 1{condition}")


class _PostgresTarget(_SqlTarget):
    """Loads into PostgreSQL (psycopg 3): each file with COPY, in one transaction with its load-state row."""

    P = "%s"
    COLUMNS_SQL = ("SELECT column_name, CASE WHEN data_type = 'ARRAY' THEN udt_name ELSE data_type END "
                   "FROM information_schema.columns WHERE table_name = %s AND table_schema = current_schema()")

    def __init__(self, dsn: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise ConfigError("loading into PostgreSQL needs psycopg: pip install -e '.[postgres]' in the "
                              "cio_sync checkout") from exc
        self._psycopg = psycopg
        self._error = psycopg.Error
        self.path = redact(dsn, ())
        self.name = f"PostgreSQL at {self.path}"
        #: The columns of each warehouse table as this connection knows them (a load is their only writer).
        self._tables: dict[str, Columns] = {}
        try:
            # Autocommit, so that each ``transaction()`` block is a real transaction of its own.
            self.con = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as exc:
            # Connecting, a ProgrammingError is a URL psycopg cannot parse; else the server is not reachable.
            kind = ConfigError if isinstance(exc, psycopg.ProgrammingError) else library_error(exc) or StorageError
            raise make_error(kind, f"cannot connect to PostgreSQL at {self.path}: "
                             f"{redact(' '.join(str(exc).split()), ())}; check the URL "
                             "(postgresql://user:password@host:port/database) and that the server runs",
                             path=self.path) from exc
        try:
            with self.con.transaction():
                self.con.execute(_state_sql("postgres"))
                have = {r[0] for r in self.con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                    "AND table_schema = current_schema()", [LOAD_STATE_TABLE]).fetchall()}
                for sql in _migrations(have, "postgres"):
                    self.con.execute(sql)
        except psycopg.Error as exc:
            self.close()
            raise self._failed("preparing the load state", exc) from exc

    def load(self, source: str, file: SourceFile, table: pa.Table, *, replace: bool) -> None:
        psycopg = self._psycopg
        target = quote_identifier(file.table)
        names = ", ".join(quote_identifier(f.name) for f in table.schema)
        have = self.columns(file.table)
        try:
            with self.con.transaction():
                for sql in _ddl(have, file, table, "postgres"):
                    self.con.execute(sql)
                with self.con.cursor().copy(f"COPY {target} ({names}) FROM STDIN") as copy:
                    for row in table.to_pylist():
                        copy.write_row(list(row.values()))
                self._entry(source, file.name, table=file.table, rows=table.num_rows, status=LOADED, reason=None,
                            replace=replace)
        except BaseException as exc:
            self._tables.pop(file.table, None)
            if isinstance(exc, psycopg.DataError | ValueError | OverflowError):
                raise _Unloadable(f"PostgreSQL refused its rows: {redact(str(exc).strip(), ())}") from exc
            if isinstance(exc, psycopg.Error):
                raise self._failed(f"loading {source}/{file.name}", exc) from exc
            raise
        self._tables[file.table] = _grown(have, file, table)

    def record(self, source: str, name: str, table: str, reason: str, *, replace: bool) -> None:
        try:
            with self.con.transaction():
                self._entry(source, name, table=table, rows=0, status=QUARANTINED, reason=reason, replace=replace)
        except self._psycopg.Error as exc:
            raise self._failed(f"quarantining {source}/{name}", exc) from exc

    def build_views(self) -> list[str]:
        made = []
        try:
            tables = {r[0] for r in self.con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
                "AND table_type = 'BASE TABLE'").fetchall()}
            with self.con.transaction():
                for view, table, sql in current_views():
                    if table in tables:
                        self.con.execute(f"DROP VIEW IF EXISTS {quote_identifier(view)}")
                        self.con.execute(f"CREATE VIEW {quote_identifier(view)} AS {_pg_view(sql)}")
                        made.append(view)
                for table in sorted(t for t in tables if t.startswith("raw_")):
                    view = quote_identifier(f"{table}_unique")
                    self.con.execute(f"DROP VIEW IF EXISTS {view}")
                    self.con.execute(f'CREATE VIEW {view} AS SELECT DISTINCT ON ("messageId") * FROM '
                                     f'{quote_identifier(table)} ORDER BY "messageId", "receivedAt"')
                    made.append(f"{table}_unique")
        except self._psycopg.Error as exc:
            raise self._failed("building the current-state views", exc) from exc
        return made

    def close(self) -> None:
        try:
            self.con.close()
        except (AttributeError, self._psycopg.Error) as exc:
            log.debug("closing %s: %s", self.name, exc)


def duckdb_path(into: str) -> str:
    """The database file a ``duckdb://`` URL names, as SQLAlchemy URLs do: ``duckdb:///relative.duckdb``,
    ``duckdb:////absolute/path.duckdb``, ``duckdb:///:memory:``. A plain path ending .duckdb or .db works too.
    Raises :class:`~cio_sync.ConfigError` for any other ``duckdb:`` URL (``duckdb:/x``, ``duckdb://host/x``)."""
    if into.startswith("duckdb:///"):
        path = into.removeprefix("duckdb:///")
        return path or ":memory:"
    if into.lower().startswith("duckdb:"):
        raise ConfigError(f"malformed DuckDB URL {redact(into, ())!r}: use duckdb:///relative/path.duckdb (three "
                          "slashes) or duckdb:////absolute/path.duckdb (four)")
    if into.endswith((".duckdb", ".db")) and "://" not in into:
        return into
    raise ConfigError(f"unknown load target {redact(into, ())!r}; use duckdb:///relative.duckdb, "
                      "duckdb:////absolute.duckdb or postgresql://user@host/database")


def _path_hint(path: str) -> str:
    """A hint for a DuckDB path that names a folder that does not exist: ``duckdb:///x`` is relative to the working
    directory, and the absolute path meant may need a fourth slash (or the other way round)."""
    if path == ":memory:" or _NOT_A_FILE.match(path):
        return ""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(folder):
        return ""
    if not os.path.isabs(path) and os.path.isdir(os.path.dirname("/" + path)):
        return (f"; the folder {folder!r} does not exist here ({os.getcwd()}): for the absolute path /{path} write "
                f"duckdb:////{path} (four slashes)")
    if os.path.isabs(path) and os.path.isdir(os.path.dirname(path.lstrip("/")) or "."):
        return (f"; the folder {folder} does not exist: for the path {path.lstrip('/')} relative to {os.getcwd()} "
                f"write duckdb:///{path.lstrip('/')} (three slashes)")
    return f"; the folder {folder} does not exist"


def _target(into: str) -> _Target:
    if into.startswith(("postgresql://", "postgres://")):
        return _PostgresTarget(into)
    return _DuckDBTarget(duckdb_path(into))


def _list(fs: AbstractFileSystem, folder: str) -> list[str]:
    """The entries of ``folder`` (none if it does not exist); raises :class:`StorageError` naming it."""
    fs.invalidate_cache(folder)
    try:
        return [str(e) for e in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []
    except OSError as exc:
        shown = display_url(fs, folder)
        raise StorageError(f"cannot list {shown}: {redact(str(exc), ())}", path=shown) from exc


def list_files(fs: AbstractFileSystem, root: str) -> list[SourceFile]:
    """The loadable files directly under ``root``, in load order; raises :class:`StorageError` if it cannot be
    listed."""
    entries = _list(fs, root)
    files = [classify(e.rstrip("/").rsplit("/", 1)[-1]) for e in entries]
    return sorted(f for f in files if f is not None)


def _holding(fs: AbstractFileSystem, entries: list[str]) -> bool:
    """Whether a folder with ``entries`` is a prefix of either sink (or an export): it holds a file of theirs, or
    the folders they keep (a prefix whose files were all loaded and deleted keeps its counters)."""
    names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
    return bool(names & {_OWN_PREFIX, MANIFESTS_FOLDER}) or any(classify(n) is not None for n in names)


def require_files(fs: AbstractFileSystem, root: str) -> None:
    """Raise :class:`~cio_sync.ConfigError` when ``root`` does not exist or holds no file of either sink, naming
    the subfolders that do (as the demo writes one prefix per format and mode under one folder)."""
    where = display_url(fs, root)
    entries = _list(fs, root)
    if _holding(fs, entries):
        return
    found: list[str] = []
    for entry in sorted(entries):
        if len(found) >= 6:
            break
        try:
            if not fs.isdir(entry):
                continue
            inner = _list(fs, entry)
            if _holding(fs, inner):
                found.append(entry)
            else:
                found += [e for e in sorted(inner) if fs.isdir(e) and _holding(fs, _list(fs, e))]
        except OSError:  # an entry that went away or cannot be looked into is no hint
            continue
    missing = not entries and not fs.exists(root)
    what = f"{where} does not exist" if missing else f"no cio_sync files in {where}"
    if found:
        shown = [display_url(fs, f.rstrip("/")) for f in found[:6]]
        raise ConfigError(f"{what}; try {', '.join(shown[:-1]) + ' or ' if len(shown) > 1 else ''}{shown[-1]}")
    if missing:
        raise ConfigError(f"{what}; check the prefix")
    raise ConfigError(f"{what}: it holds no file of either sink nor of a Customer.io export; check the prefix")


def _read(fs: AbstractFileSystem, path: str, shown: str) -> bytes:
    try:
        return bytes(fs.cat_file(path))
    except OSError as exc:
        raise StorageError(f"cannot read {shown}: {redact(str(exc), ())}", path=shown) from exc


def manifest_files(document: Any) -> list[dict[str, Any]]:
    """The file entries of a parsed manifest (docs/manifests.md); raises ``_Unloadable`` saying what is wrong with a
    document of another shape: not an object, ``files`` not a list, an entry without a name, a size or checksum that
    is not one."""
    if not isinstance(document, dict):
        raise _Unloadable(f"is not a JSON object but {type(document).__name__}")
    files = document.get("files")
    if not isinstance(files, list):
        raise _Unloadable(f'its "files" is {type(files).__name__ if files is not None else "missing"}, not a list')
    for number, entry in enumerate(files):
        if not isinstance(entry, dict):
            raise _Unloadable(f"files[{number}] is not an object")
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise _Unloadable(f'files[{number}] has no "name"')
        size = entry.get("bytes")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise _Unloadable(f'files[{number}] ({entry["name"]!r}) has a "bytes" that is not a size: {size!r}')
        digest = entry.get("sha256")
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise _Unloadable(f'files[{number}] ({entry["name"]!r}) has a "sha256" that is not a SHA-256')
    return files


@dataclass
class _Manifests:
    """The manifests of a prefix: which files they list (name -> entry, manifest), and which of them read well."""

    paths: list[str] = field(default_factory=list)
    listed: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)  # readable manifest path -> the names it lists


def _manifests(fs: AbstractFileSystem, root: str, *, where: str, target: _Target, state: Mapping[str, str],
               retry: bool, report: LoadReport, tell: Callable[[QuarantinedFile], None] | None) -> _Manifests:
    """Every manifest under ``root/_manifests``; one that is unreadable or of the wrong shape is quarantined (its
    files then wait: a file is loaded only when a readable manifest lists it)."""
    folder = f"{root}/{MANIFESTS_FOLDER}"
    found = _Manifests(paths=sorted(p for p in _list(fs, folder) if p.endswith(".json")))
    for path in found.paths:
        name = f"{MANIFESTS_FOLDER}/{path.rsplit('/', 1)[-1]}"
        status = state.get(name)
        if status == QUARANTINED and not retry:
            report.files_still_quarantined += 1
            continue
        try:
            data = _read(fs, path, f"{where}/{name}")
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                continue  # deleted since the listing: by another loader that loaded all it lists
            raise
        try:
            try:
                document = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise _Unloadable(f"is not JSON: {exc}") from exc
            entries = manifest_files(document)
        except _Unloadable as exc:
            _quarantine(target, report, name, table=MANIFESTS_FOLDER, reason=f"manifest {exc.reason}",
                        replace=status is not None, tell=tell)
            continue
        if status is not None:
            target.forget(where, name)
        found.files[path] = [e["name"] for e in entries]
        for entry in entries:
            found.listed[entry["name"]] = (entry, name)
    return found


def _quarantine(target: _Target, report: LoadReport, name: str, *, table: str, reason: str, replace: bool,
                tell: Callable[[QuarantinedFile], None] | None) -> None:
    target.record(report.source, name, table, reason, replace=replace)
    file = QuarantinedFile(name, table, reason)
    report.quarantined.append(file)
    # A caller that is told of each quarantined file reports it itself; otherwise the log does.
    log.log(logging.INFO if tell else logging.WARNING, "quarantined %s/%s: %s", report.source, name, reason)
    if tell is not None:
        tell(file)


def load(
    source: str,
    into: str = "duckdb:///cio_sync.duckdb",
    *,
    storage_options: Mapping[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
    delete_after_load: bool = False,
    retry_quarantined: bool = False,
    progress: Callable[[SourceFile, int], None] | None = None,
    on_quarantine: Callable[[QuarantinedFile], None] | None = None,
) -> LoadReport:
    """Load every file of ``source`` not loaded before into ``into``; build the current-state views.

    ``source`` is a prefix written by either sink (or a Customer.io export), as a URL or a path; ``into`` is
    ``duckdb:///path.duckdb`` or ``postgresql://user:password@host:port/database``.
    Files load in position / sequence order, each in one transaction with its entry in
    ``_cio_sync_loaded``; a rerun loads nothing twice. Where the prefix has manifests (``_manifests/``), only
    files a manifest lists are loaded (the others belong to a sync still in progress) and their size and checksum
    are checked. With ``delete_after_load``, each file is deleted once its rows are committed, and each manifest
    once all its files are; ``_cio_sync/`` (the writers' counters) is never touched.

    Each file is checked against its table's known schema first. A file that cannot load (not a whole file of its
    format, a known column of another type family, a column name that is not a plain identifier, a size or checksum
    its manifest does not list, rows the warehouse refuses) and a manifest of the wrong shape are quarantined: their
    entry in ``_cio_sync_loaded`` has status ``quarantined`` and the reason, the report lists them, and the load goes
    on. Later loads skip them (never deleting them) unless ``retry_quarantined`` is true. Each is logged as a warning,
    or, with ``on_quarantine``, given to it as soon as it is recorded (and logged at info level only).

    Raises :class:`StorageError` naming the file or the database when the prefix cannot be read or the warehouse
    fails (a full disk, a lost connection): the file being loaded is rolled back, every file before it stays loaded.
    Raises :class:`ConfigError` for an unknown or malformed target or a source that holds no file of either sink,
    :class:`StorageError` when PostgreSQL cannot be reached.
    """
    fs, root = resolve(source, filesystem=filesystem, storage_options=storage_options)
    where = display_url(fs, root)
    require_files(fs, root)
    target = _target(into)
    report = LoadReport(where, redact(into, ()))
    try:
        state = target.state(where)
        manifests = _manifests(fs, root, where=where, target=target, state=state, retry=retry_quarantined,
                               report=report, tell=on_quarantine)
        for file in list_files(fs, root):
            path = f"{root}/{file.name}"
            status = state.get(file.name)
            if status == LOADED:
                report.files_already_loaded += 1
                if delete_after_load:
                    _delete(fs, path, report)
                continue
            if status == QUARANTINED and not retry_quarantined:
                report.files_still_quarantined += 1
                continue
            listed = manifests.listed.get(file.name)
            if manifests.paths and listed is None:
                report.files_waiting += 1
                continue
            data = _read(fs, path, f"{where}/{file.name}")
            try:
                if listed is not None:
                    _verify(data, *listed)
                table = read_file(data, file, target.columns(file.table))
                target.load(where, file, table, replace=status is not None)
            except _Unloadable as exc:
                _quarantine(target, report, file.name, table=file.table, reason=exc.reason, replace=status is not None,
                            tell=on_quarantine)
                continue
            report.files_loaded += 1
            report.rows_loaded += table.num_rows
            report.tables[file.table] = report.tables.get(file.table, 0) + table.num_rows
            if progress is not None:
                progress(file, table.num_rows)
            if delete_after_load:
                _delete(fs, path, report)
        target.build_views()
        if delete_after_load:
            _delete_finished_manifests(fs, root, manifests)
    finally:
        target.close()
    log.info("%s", report)
    return report


def _verify(data: bytes, entry: Mapping[str, Any], manifest: str) -> None:
    if entry.get("bytes") is not None and entry["bytes"] != len(data):
        raise _Unloadable(f"has {len(data)} bytes but {manifest} says {entry['bytes']}")
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"].lower():
        raise _Unloadable(f"does not match its checksum in {manifest}")


def _delete(fs: AbstractFileSystem, path: str, report: LoadReport) -> None:
    try:
        fs.rm_file(path)
        report.files_deleted += 1
    except FileNotFoundError:
        pass


def _delete_finished_manifests(fs: AbstractFileSystem, root: str, manifests: _Manifests) -> None:
    """Delete each readable manifest none of whose files is left (a quarantined file stays, so its manifest does)."""
    remaining = {f.name for f in list_files(fs, root)}
    for path, names in manifests.files.items():
        if not any(name in remaining for name in names):
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)


def inspect_prefix(source: str, *, storage_options: Mapping[str, Any] | None = None,
                   filesystem: AbstractFileSystem | None = None) -> dict[str, Any]:
    """What a prefix holds: per table its files, rows, schema versions, time range, and gaps in the numbering.

    A file that cannot be read under its table's schema is listed under ``"unreadable"`` with the reason (the
    reason a load would quarantine it for) instead of being counted. Raises :class:`~cio_sync.ConfigError` when
    ``source`` does not exist or holds no file of either sink (naming the subfolders that do).
    """
    fs, root = resolve(source, filesystem=filesystem, storage_options=storage_options)
    where = display_url(fs, root)
    require_files(fs, root)
    summary: dict[str, dict[str, Any]] = {}
    unreadable: list[dict[str, str]] = []
    for file in list_files(fs, root):
        data = _read(fs, f"{root}/{file.name}", f"{where}/{file.name}")
        try:
            rows = read_file(data, file)
        except _Unloadable as exc:
            unreadable.append({"name": file.name, "table": file.table, "reason": exc.reason})
            continue
        table = summary.setdefault(file.table, {"files": 0, "rows": 0, "bytes": 0, "numbers": [],
                                                "formats": set(), "first": None, "last": None})
        table["files"] += 1
        table["bytes"] += len(data)
        table["formats"].add(file.ext)
        table["numbers"].append((file.order[:-1], file.order[-1]))
        table["rows"] += rows.num_rows
        column = "receivedAt" if file.mode == "advanced" else next(
            (c for c in ("updated_at", "timestamp", "created_at") if c in rows.column_names), None)
        if column is not None and rows.num_rows:
            low, high = pc.min(rows.column(column)).as_py(), pc.max(rows.column(column)).as_py()
            table["first"] = low if table["first"] is None or (low and low < table["first"]) else table["first"]
            table["last"] = high if table["last"] is None or (high and high > table["last"]) else table["last"]
    result = {}
    for name, table in summary.items():
        gaps = []
        by_run: dict[Any, list[int]] = {}
        for run, number in table["numbers"]:
            by_run.setdefault(run, []).append(number)
        for run, numbers in by_run.items():
            numbers.sort()
            if run[0] == "advanced":
                expected = set(range(numbers[0], numbers[-1] + 1))
                gaps += [f"{run[1]}.{run[2]}.{n}" for n in sorted(expected - set(numbers))]
        result[name] = {k: v for k, v in table.items() if k != "numbers"} | {
            "formats": sorted(table["formats"]), "gaps": gaps}
    return {"source": where, "tables": result, "unreadable": unreadable}
