"""Fitting a custom sink's rows to its tables' Arrow schemas: one converter per column, made once per schema.

A row is a dict (column -> value; missing columns are null) or a tuple in schema order. Each value is checked
against its column's type and turned into the form the buffers keep: timestamps as integers in the column's unit,
dates as days (or milliseconds for date64), everything else as given. A value that does not fit raises
:class:`~cio_sync.InvalidCall` naming the table and the column.
"""

from __future__ import annotations

import base64
import decimal
from collections.abc import Callable, Mapping
from datetime import date, datetime
from typing import Any, Final

import orjson
import pyarrow as pa

from cio_sync._errors import ConfigError, InvalidCall
from cio_sync._time import EPOCH, to_micros
from cio_sync.intake.calls import parse_time

#: Microseconds per unit of a timestamp column (the divisor from µs; nanoseconds multiply).
_PER_MICRO: Final = {"s": 1_000_000, "ms": 1_000, "us": 1}


class _Misfit(Exception):
    """A value that does not fit its column; the message says why."""


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _timestamp(unit: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value  # already in the column's unit
        if isinstance(value, str):
            try:
                value = parse_time(value, "timestamp")
            except InvalidCall as exc:
                raise _Misfit(exc.reason) from None
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise _Misfit("a datetime without a time zone; give an aware one (e.g. tzinfo=UTC)")
            micros = to_micros(value)
            return micros * 1000 if unit == "ns" else micros // _PER_MICRO[unit]
        raise _Misfit(f"expected a timestamp (an aware datetime, ISO-8601 text or an integer), got {_show(value)}")
    return convert


def _date(per_day: int) -> Callable[[Any], Any]:
    def convert(value: Any) -> int:
        if isinstance(value, datetime) or not isinstance(value, date):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise _Misfit(f"expected a date, got {_show(value)}")
        return (value - EPOCH.date()).days * per_day
    return convert


def _integer(bits: int, signed: bool) -> Callable[[Any], Any]:
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)

    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Misfit(f"expected an integer, got {_show(value)}")
        if not low <= value <= high:
            raise _Misfit(f"{value} is out of range for {'' if signed else 'u'}int{bits}")
        return value
    return convert


def _floating(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Misfit(f"expected a number, got {_show(value)}")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Misfit(f"expected true or false, got {_show(value)}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Misfit(f"expected a string, got {_show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Misfit("the string is not valid Unicode (a lone surrogate)") from None
    return value


def _binary(value: Any) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise _Misfit(f"expected bytes, got {_show(value)}")
    return bytes(value)


def _checked_by_arrow(kind: pa.DataType) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        try:
            pa.array([value], type=kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError,
                OverflowError) as exc:
            raise _Misfit(f"does not fit {kind}: {exc}") from None
        return value
    return convert


def converter(kind: pa.DataType) -> Callable[[Any], Any]:
    """The function that checks a value for a column of type ``kind`` and returns it as the buffers keep it."""
    if pa.types.is_timestamp(kind):
        return _timestamp(kind.unit)
    if pa.types.is_date32(kind):
        return _date(1)
    if pa.types.is_date64(kind):
        return _date(86_400_000)
    if pa.types.is_integer(kind):
        return _integer(kind.bit_width, pa.types.is_signed_integer(kind))
    if pa.types.is_floating(kind):
        return _floating
    if pa.types.is_boolean(kind):
        return _boolean
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _text
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return _binary
    return _checked_by_arrow(kind)  # decimals, lists, structs, maps...: Arrow itself says whether it fits


def _spool_safe(kind: pa.DataType) -> bool:
    """Whether values of ``kind``, as kept, come back the same from JSON (the spool's encoding of rows)."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_decimal(kind):
        return False  # encoded by the spool codec below
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _json_like(kind.value_type)
    if pa.types.is_struct(kind):
        return all(_json_like(kind.field(i).type) for i in range(kind.num_fields))
    return True


def _json_like(kind: pa.DataType) -> bool:
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _json_like(kind.value_type)
    if pa.types.is_struct(kind):
        return all(_json_like(kind.field(i).type) for i in range(kind.num_fields))
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
                or pa.types.is_string(kind) or pa.types.is_large_string(kind))


class RowFitter:
    """Checks and converts the rows of one table (see the module docstring)."""

    __slots__ = ("columns", "convert", "index", "nullable", "schema", "table")

    def __init__(self, table: str, schema: pa.Schema) -> None:
        if not isinstance(schema, pa.Schema) or not len(schema):
            raise ConfigError(f"table {table!r}: expected an Arrow schema with at least one column; got {schema!r}")
        if len(set(schema.names)) != len(schema.names):
            raise ConfigError(f"table {table!r}: its schema names a column twice ({schema.names})")
        for field in schema:
            if not _spool_safe(field.type) and not (pa.types.is_binary(field.type) or pa.types.is_large_binary(
                    field.type) or pa.types.is_decimal(field.type)):
                raise ConfigError(f"table {table!r}: column {field.name!r} has type {field.type}, which a sink "
                                  "cannot keep on its spool; nested columns may hold numbers, booleans and text")
        self.table = table
        self.schema = schema
        self.columns = tuple(schema.names)
        self.index = {name: i for i, name in enumerate(self.columns)}
        self.convert = tuple(converter(f.type) for f in schema)
        self.nullable = tuple(f.nullable for f in schema)

    def _misfit(self, column: str, reason: str) -> InvalidCall:
        return InvalidCall(reason, field=f"{self.table}.{column}")

    def fit(self, row: Any) -> tuple[Any, ...]:
        """``row`` (a dict or a tuple in schema order) as a tuple of kept values; :class:`InvalidCall` if it does
        not fit."""
        columns = self.columns
        if isinstance(row, Mapping):
            unknown = [k for k in row if k not in self.index]
            if unknown:
                raise InvalidCall(f"the row has no column {unknown[0]!r} (columns: {', '.join(columns)})",
                                  field=f"{self.table}.{unknown[0]}")
            values: tuple[Any, ...] | list[Any] = [row.get(c) for c in columns]
        elif isinstance(row, tuple | list):
            if len(row) != len(columns):
                raise InvalidCall(f"a row of {len(row)} values for {len(columns)} columns ({', '.join(columns)})",
                                  field=self.table)
            values = row
        else:
            raise InvalidCall(f"a row is a dict or a tuple in column order; got {type(row).__name__}",
                              field=self.table)
        out: list[Any] = []
        for column, value, convert, nullable in zip(columns, values, self.convert, self.nullable, strict=True):
            if value is None:
                if not nullable:
                    raise self._misfit(column, "is null, and the column is not nullable")
                out.append(None)
                continue
            try:
                out.append(convert(value))
            except _Misfit as exc:
                raise self._misfit(column, str(exc)) from None
        return tuple(out)


def spool_codec(schema: pa.Schema) -> tuple[Callable[[tuple[Any, ...]], bytes],
                                            Callable[[bytes], tuple[Any, ...]]] | None:
    """How the spool writes and reads rows of ``schema`` when plain JSON would not bring them back the same
    (binary and decimal columns: as base64 and as text); ``None`` when it would."""
    special = {i: f.type for i, f in enumerate(schema)
               if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_decimal(f.type)}
    if not special:
        return None
    width = len(schema)

    def encode(row: tuple[Any, ...]) -> bytes:
        cells = list(row)
        for i, kind in special.items():
            value = cells[i]
            if value is not None:
                cells[i] = str(value) if pa.types.is_decimal(kind) else base64.b64encode(value).decode("ascii")
        return orjson.dumps(cells)

    def decode(data: bytes) -> tuple[Any, ...]:
        cells = orjson.loads(data)
        if not isinstance(cells, list) or len(cells) != width:
            raise ValueError(f"the record is not a row of {width} values")
        for i, kind in special.items():
            value = cells[i]
            if value is not None:
                cells[i] = decimal.Decimal(value) if pa.types.is_decimal(kind) else base64.b64decode(value)
        return tuple(cells)

    return encode, decode
