"""Checking workspace records (campaigns, deliveries, metrics, ...) against their Standard table's fixed schema.

This module knows no sink and no state: it turns ``(table, row)`` into typed values in schema order, or raises
:class:`~cio_sync.InvalidRecord` naming the table and the column.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any, Final

import pyarrow as pa

from cio_sync._errors import InvalidCall, InvalidRecord
from cio_sync._time import to_micros
from cio_sync.intake.calls import dump_json, load_json, parse_time
from cio_sync.intake.values import MAX_DEPTH, printable, shown
from cio_sync.schemas.tables import SINK_COLUMNS, STANDARD_TABLES, TableSpec, is_json_text, record_tables

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
#: A lowercase word: what a ``TableSpec.words`` column takes.
_WORD: Final = re.compile(r"[a-z][a-z0-9_]*")
#: Version 1's name of the person's id in a row that names a person; version 4 resolves ``customer_id`` instead.
_V1_PERSON: Final = "external_customer_id"


def _type_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _convert(table: str, field: pa.Field, value: Any) -> Any:
    """``value`` as the column's type; :class:`InvalidRecord` if it is not one."""
    name, kind = field.name, field.type
    if value is None:
        return None
    if pa.types.is_int64(kind):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRecord(f"must be an integer, got {_type_of(value)} {shown(value)}", table=table, column=name)
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise InvalidRecord("is out of the 64-bit integer range", table=table, column=name)
        return value
    if pa.types.is_boolean(kind):
        if not isinstance(value, bool):
            raise InvalidRecord(f"must be true or false, got {_type_of(value)} {shown(value)}", table=table,
                                column=name)
        return value
    if pa.types.is_timestamp(kind):
        try:
            return to_micros(parse_time(value, name))
        except InvalidCall as exc:
            raise InvalidRecord(exc.reason, table=table, column=name) from None
    if pa.types.is_list(kind):
        if not isinstance(value, list | tuple):
            raise InvalidRecord(f"must be a list of strings, got {_type_of(value)} {shown(value)}", table=table,
                                column=name)
        for item in value:
            _text(table, name, item, "an item ")
        return list(value)
    if is_json_text(field):
        if isinstance(value, str):
            try:
                load_json(value, name, levels=MAX_DEPTH - 1)  # the row is the first level, as a call is
            except InvalidCall as exc:
                raise InvalidRecord(f"must be a JSON object or JSON text ({exc.reason})", table=table,
                                    column=name) from None
            return value
        try:
            return dump_json(value, name).decode()
        except InvalidCall as exc:
            raise InvalidRecord(exc.reason, table=table, column=name) from None
    return _text(table, name, value)


def _text(table: str, name: str, value: Any, what: str = "") -> str:
    if not isinstance(value, str):
        raise InvalidRecord(f"{what}must be a string, got {_type_of(value)} {shown(value)}", table=table, column=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRecord(f"{what}is not valid Unicode text", table=table, column=name) from None
    return value


def _deprecated(spec: TableSpec, column: str) -> str | None:
    """What version 1's ``column`` is now in ``spec``: its new name, ``""`` for a column version 4 has not, or
    ``None`` if it was never a column of the table."""
    if column in spec.renamed:
        return spec.renamed[column]
    if column == _V1_PERSON and "customer_id" in spec.resolved:
        return "customer_id"
    return "" if column in spec.dropped else None


def _current_names(table: str, spec: TableSpec, row: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """``row`` with version 1's column names replaced by version 4's (with a DeprecationWarning each; a column
    version 4 has not is dropped, with its warning). Raises :class:`InvalidRecord` if a row gives both names."""
    if not (spec.renamed or spec.dropped):
        return row
    renamed: dict[Any, Any] | None = None
    for column in row:
        new = _deprecated(spec, column) if isinstance(column, str) else None
        if new is None:
            continue
        if renamed is None:
            renamed = dict(row)
        value = renamed.pop(column)
        if new:
            if new in row:
                raise InvalidRecord(f"gives both {column} (version 1's name) and {new}; give {new} only",
                                    table=table, column=column)
            renamed[new] = value
            advice = f"version {spec.version} names it {new!r}"
        else:
            advice = f"version {spec.version} of {table} has no such column, and its value is not written"
        warnings.warn(f"record({table!r}): column {column!r} is version 1's; {advice} (version 1's names are "
                      f"accepted in this release only)", DeprecationWarning, stacklevel=4)
    return row if renamed is None else renamed


def check_record(table: Any, row: Any) -> dict[str, Any]:
    """The row's values converted to their column types, keyed by column, every column of the table present.

    Columns the sink resolves (``TableSpec.resolved``, e.g. ``customer_id``) are in it too when the table has them.
    Version 1's column names are taken with a DeprecationWarning (see :func:`_current_names`). A list column
    (``topic_names``) left out is an empty list.

    Raises :class:`InvalidRecord` for an unknown table, a row that is not a mapping, an unknown column, a column the
    sink owns (``workspace_id``, ``version``), a missing required column or a value of the wrong type.
    """
    spec = STANDARD_TABLES.get(table) if isinstance(table, str) else None
    if spec is None or not spec.recordable:
        raise InvalidRecord(f"unknown table {shown(table)}; records go to {', '.join(record_tables())}", table=None)
    if not isinstance(row, Mapping):
        raise InvalidRecord(f"a row must be a dict, got {type(row).__name__}", table=table)
    row = _current_names(table, spec, row)
    schema = spec.schema
    names = set(schema.names) | set(spec.resolved)
    own = [name for name in schema.names if name != "workspace_id"] + list(spec.resolved)
    for column in row:
        if column in SINK_COLUMNS:
            raise InvalidRecord("is set by the sink, not by the caller", table=table, column=str(column))
        if column not in names:
            raise InvalidRecord(f"is not a column of {table} (its columns: {', '.join(own)})",
                                table=table, column=printable(column))
    for column in spec.required:
        value = row.get(column)
        if value is None or value == "":
            raise InvalidRecord("is required", table=table, column=column)
    values = {field.name: _convert(table, field, row.get(field.name)) for field in schema if field.name not in
              SINK_COLUMNS}
    for column, allowed in spec.allowed.items():
        if values.get(column) is not None and values[column] not in allowed:
            raise InvalidRecord(f"must be one of {', '.join(sorted(allowed))}; got {shown(values[column])}",
                                table=table, column=column)
    for column in spec.words:
        value = values.get(column)
        if value is not None and not _WORD.fullmatch(value):
            raise InvalidRecord(f"must be a lowercase word (a letter, then letters, digits or _), got {shown(value)}",
                                table=table, column=column)
    for field in schema:
        if pa.types.is_list(field.type) and values.get(field.name) is None and field.name not in SINK_COLUMNS:
            values[field.name] = []
    for column in spec.resolved:
        value = row.get(column)
        values[column] = None if value is None else _text(table, column, value)
    return values
