"""Reading published files: what a name denotes, the table's known schema, and a file's rows checked and
conformed to that schema before any of them reaches a warehouse (a file is untrusted: it comes from a bucket)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cio_sync._errors import (
    InvalidCall,
    InvalidFile,
)
from cio_sync._time import to_micros
from cio_sync.intake.calls import parse_time
from cio_sync.publish.layout import parse_advanced, parse_standard
from cio_sync.schemas.tables import (
    ADVANCED_TABLES,
    CALL_COLUMNS,
    EXTRA_COLUMN,
    TIMESTAMP,
    Kind,
    is_json_text,
    latest_spec,
    standard_spec,
    table_for_file_name,
)

#: A name from a file becomes a column only if it is a plain identifier of at most 63 bytes (PostgreSQL cuts longer
#: ones, which could make two names one) that does not start like the loader's own names.
_PLAIN_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

_OWN_PREFIX: Final = "_cio_sync"



#: Timestamps every target and Python's datetime can hold: years 1 to 9999, in microseconds since the epoch.
_FIRST_MICROS: Final = -62_135_596_800_000_000


_LAST_MICROS: Final = 253_402_300_799_999_999


_MAX_REASON: Final = 600


_FORMATS: Final = {"parquet": "Parquet", "csv": "CSV", "json": "JSON lines"}


_LIST_OF_TEXT: Final = pa.list_(pa.string())


@dataclass(frozen=True, order=True)
class SourceFile:
    """One loadable file of a prefix, with the table it goes to and its place in the load order."""

    order: tuple[Any, ...]
    name: str
    table: str
    mode: str
    ext: str
    #: The schema version its name gives (Standard files; 0 for Advanced ones).
    version: int = 0


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
            return SourceFile(order, name, spec.name, "standard", "parquet", standard.version)
    return None


def warehouse_schema(table: str, version: int | None = None) -> pa.Schema:
    """The columns Standard table ``table`` has in the warehouse: those of the version the sink writes (version 4,
    as Customer.io's exports have them; ``actions`` has version 1 only), in that order. With ``version=1``, for a
    version-1 file: then the version-1 columns with no counterpart in it (``dropped``, in their version-1 types),
    which the table gains when the first version-1 file loads, and which version-4 rows leave null."""
    spec = latest_spec(table)
    first = standard_spec(table, 1)
    if version != 1 or first is None or first is spec:
        return spec.schema
    return pa.schema([*spec.schema, *(first.schema.field(name) for name in spec.dropped)])


def known_schema(source: SourceFile) -> pa.Schema:
    """The schema the table of ``source`` has in the warehouse once ``source`` is loaded, before any extra column
    of its own: a version-1 file brings its version's columns that version 4 has not."""
    if source.mode == "standard":
        return warehouse_schema(source.table, source.version)
    return ADVANCED_TABLES[source.table.removeprefix("raw_")].schema


def renamed(table: pa.Table, source: SourceFile) -> pa.Table:
    """``table`` (the rows of ``source``) with the columns of an earlier version under the newest version's names:
    a version-1 ``people`` file's ``external_customer_id`` becomes ``customer_id``, and so on (``TableSpec.renamed``).
    Only version-1 files are renamed: those names are cio_sync's own, and files of any other version (Customer.io's
    exports) already have Customer.io's names. Other files, and Advanced ones, are returned as they are."""
    if source.mode != "standard" or source.version != 1:
        return table
    spec = latest_spec(source.table)
    if spec.version == 1 or not spec.renamed:
        return table
    names = table.column_names
    lower = {n.lower() for n in names}
    for old, new in spec.renamed.items():
        if old in names and new.lower() in lower:
            raise _Unloadable(f"a version-{source.version} file with both {old!r} and {new!r}: {old!r} is what "
                              f"version {spec.version} names {new!r}")
    return table.rename_columns([spec.renamed.get(n, n) for n in names])


def _shown(name: str) -> str:
    """A name from a file as messages show it: quoted and escaped (no control characters reach a terminal), short."""
    return repr(name if len(name) <= 60 else name[:60] + "…")


def _plain(name: str) -> bool:
    return bool(_PLAIN_NAME.fullmatch(name)) and not name.lower().startswith(_OWN_PREFIX)


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
        return conform(renamed(table, source), schema, table_name=source.table, existing=existing)
    except _Unloadable as exc:
        exc.name = exc.name or source.name
        raise
