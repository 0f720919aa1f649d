"""Intake of customer-data calls: parsing, validation and the rows the formats encode.

Validation follows the Segment-compatible source spec that Customer.io's libraries send: ``type`` is one of
identify, track, page, screen, group, alias; a call names ``userId`` or ``anonymousId`` (alias: ``userId`` and
``previousId``); track has ``event``; group has ``groupId``; id fields are strings; ``traits``, ``properties``,
``context`` and ``integrations`` are objects; timestamps are ISO-8601 with any offset (a timestamp without an offset
is taken as UTC). This module knows no sink: it turns one call into a validated :class:`Call`, and a ``Call`` into
the row of its fixed schema or into its JSON document.

Every value of a call, at any depth, must be one JSON text can hold (see :mod:`cio_sync.intake.values`): a value that
is not is refused with :class:`InvalidCall` naming the field and the key.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from operator import countOf
from typing import Any, Final

import msgspec
import orjson
import pyarrow as pa

from cio_sync._errors import InvalidCall
from cio_sync._time import to_micros
from cio_sync.intake.values import (
    MAX_DEPTH,
    ORJSON_STOPS_AT_MAX_DEPTH,
    call_error,
    faulty,
    json_text_refused,
    too_deep,
    value_error,
)
from cio_sync.schemas.tables import CALL_COLUMNS, CALL_TYPES, TIMESTAMP, Kind

#: orjson options for everything we serialise: naive datetimes are UTC, UTC is written "Z", and non-string keys
#: become strings (as the standard library's json module does).
JSON_OPTIONS: Final = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS

_TYPES: Final = frozenset(CALL_TYPES)
_OBJECT_FIELDS: Final = ("traits", "properties", "context", "integrations")
_TIME_FIELDS: Final = ("timestamp", "originalTimestamp", "sentAt")
#: Names that are columns of some call type; a key outside a call type's own columns goes to ``extra``.
_KNOWN: Final[dict[str, frozenset[str]]] = {
    t: frozenset(name for name, kind in cols if kind is not Kind.EXTRA) for t, cols in CALL_COLUMNS.items()
}
_MAX_SHOWN: Final = 80
#: Integers orjson would not read exactly: 20 digits or more, or a negative one of 19 (below -2**63).
_LONG_BYTES: Final = re.compile(rb"[0-9]{20}|-[0-9]{19}")
_LONG_TEXT: Final = re.compile(r"[0-9]{20}|-[0-9]{19}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def parse_time(value: Any, field: str) -> datetime:
    """An ISO-8601 timestamp (or a ``datetime``) as an aware UTC ``datetime``; naive values are taken as UTC."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidCall(f"not an ISO-8601 timestamp: {_show(value)}", field=field) from None
    elif isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        parsed = datetime(value.year, value.month, value.day)
    else:
        raise InvalidCall(f"must be an ISO-8601 timestamp string, got {_type_name(value)}", field=field)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise InvalidCall(f"timestamp out of range: {_show(value)}", field=field) from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is beyond the range of a double")
    return value


def load_json(payload: str | bytes | bytearray | memoryview, what: str = "call", levels: int | None = MAX_DEPTH,
              *, batch: bool = False) -> Any:
    """Parse JSON text with orjson, turning any failure into :class:`InvalidCall`.

    orjson reads an integer beyond 64 bits as a float, which would change the number; text with a run of 20 or more
    digits (19 after a minus) is read by the standard library instead, which keeps such integers exact (they are
    then refused when written, as JSON numbers beyond 64 bits are by every format here). Either way a number beyond
    a double's range (``1e999``) is refused, never read as infinity, and so is a lone surrogate escape
    (``"\\ud800"``, which no UTF-8 text can hold), and text nested deeper than ``levels``. A ``batch`` payload is
    refused for neither of the last two: its calls are checked one by one, each refused with its index.
    """
    long = (_LONG_BYTES.search(payload) if not isinstance(payload, str) else _LONG_TEXT.search(payload)) is not None
    try:
        value = _UNREAD
        if not long:
            try:
                value = orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                if not (batch and "surrogate" in str(exc)):
                    raise
        if value is _UNREAD:
            text = payload if isinstance(payload, str) else bytes(payload).decode("utf-8")
            value = json.loads(text, parse_constant=_no_constants, parse_float=_finite_float)
            if not batch:
                # orjson refuses lone surrogates; so does this reading (their JSON text cannot be UTF-8).
                json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise InvalidCall(f"{what} is nested {_too_deep_to_read(levels, batch)}") from None
    except (orjson.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, UnicodeEncodeError):
            raise InvalidCall(f"{what} is not valid JSON: a string holds a lone surrogate") from None
        if "depth limit exceeded" in str(exc):  # orjson's own limit, 1,024 levels
            raise InvalidCall(f"{what} is nested {_too_deep_to_read(levels, batch)}") from None
        raise InvalidCall(f"{what} is not valid JSON: {exc}") from None
    return _checked(value, payload, what, None if batch else levels)


_UNREAD: Final = object()


def _too_deep_to_read(levels: int | None, batch: bool) -> str:
    return f"deeper than {levels} levels" if levels is not None and not batch else "too deeply to be read"


def _checked(value: Any, payload: str | bytes | bytearray | memoryview, what: str, levels: int | None) -> Any:
    """``value``, read from ``payload``, unless the text nests deeper than ``levels``."""
    if levels is not None and too_deep(payload.tobytes() if isinstance(payload, memoryview) else payload, levels):
        raise InvalidCall(f"{what} is nested deeper than {levels} levels")
    return value


def dump_json(value: Any, field: str | None, level: int = 2) -> bytes:
    """``value`` (nested at ``level``, the call or record row being level 1) as compact JSON bytes; a value JSON
    cannot hold (see :mod:`cio_sync.intake.values`) raises :class:`InvalidCall` naming ``field`` and the key."""
    try:
        text = orjson.dumps(value, option=JSON_OPTIONS)
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise value_error(value, field, level, exc) from None
    if json_text_refused(text, value, level):
        raise value_error(value, field, level)
    return text


@dataclass(slots=True)
class Call:
    """One validated call.

    ``data`` is the call as sent (a shallow copy; the caller's object is never modified) with ``messageId`` set when
    the caller left it out and ``receivedAt`` set to the time the sink accepted it. ``times`` holds the call's
    timestamps parsed to UTC. ``row`` is the call as a row of its type's fixed schema, with ``size`` its approximate
    size in bytes, when it was asked for (``parse_call(..., row=True)``), else ``None``. ``document`` is the call as
    one line of JSON (see :func:`call_document`) when validation already wrote it, else ``None``.
    """

    type: str
    data: dict[str, Any]
    times: dict[str, datetime]
    row: tuple[Any, ...] | None = None
    size: int = 0
    document: bytes | None = None

    @property
    def message_id(self) -> str:
        return str(self.data["messageId"])

    @property
    def received_at(self) -> datetime:
        return self.times["receivedAt"]


# Column kinds as small ints: the scan below runs once per call and is the intake's hot path.
_STRING, _OBJECT, _TIME, _TEXT, _EXTRA, _RECEIVED = range(6)
_CODES: Final = {Kind.ID: _STRING, Kind.STRING: _STRING, Kind.OBJECT: _OBJECT, Kind.TIME: _TIME,
                 Kind.TEXT: _TEXT, Kind.EXTRA: _EXTRA}
_SPECS: Final[dict[str, tuple[tuple[str, int], ...]]] = {
    t: tuple((n, _RECEIVED if n == "receivedAt" else _CODES[k]) for n, k in cols) for t, cols in CALL_COLUMNS.items()
}
#: Object fields that are not columns of a call type (they go to ``extra``) but still have to be objects.
_OTHER_OBJECTS: Final[dict[str, tuple[str, ...]]] = {
    t: tuple(f for f in _OBJECT_FIELDS if f not in _KNOWN[t]) for t in CALL_TYPES
}


def _scan(data: dict[str, Any], call_type: str, times: dict[str, datetime]) -> None:
    """Check every column of ``call_type`` in ``data`` and fill ``times`` with its timestamps parsed to UTC."""
    for name, code in _SPECS[call_type]:
        value = data.get(name)
        if value is None or code in (_EXTRA, _RECEIVED):
            continue
        if code == _STRING:
            if not isinstance(value, str):
                raise InvalidCall(f"must be a string, got {_type_name(value)}", field=name)
            if not value.isascii():
                _check_utf8(value, name)
        elif code == _OBJECT:
            if not isinstance(value, dict):
                raise InvalidCall(f"must be an object, got {_type_name(value)}", field=name)
        elif code == _TIME:
            times[name] = parse_time(value, name)
        elif code == _TEXT:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise InvalidCall(f"must be a string or a number, got {_type_name(value)}", field=name)
            _text(value, name)
    for name in _OTHER_OBJECTS[call_type]:
        value = data.get(name)
        if value is not None and not isinstance(value, dict):
            raise InvalidCall(f"must be an object, got {_type_name(value)}", field=name)


# What a row costs in memory, as the memory budget (``max_buffer_bytes``) counts it. A row is first a tuple of
# Python objects, then (with 8,191 others) Arrow columns: the size given with each row is what its Python form
# takes, an upper bound of its Arrow form, and the buffer counts a chunk at its Arrow size once it is converted.

#: What a text cell costs besides its characters: a Python str's header (49 bytes), rounded up as the allocator
#: does. (In Arrow a text cell costs a 4-byte offset instead.)
TEXT_OVERHEAD: Final = 56
#: What a bytes cell costs besides its bytes: a Python bytes object's header (33 bytes), rounded up.
BYTES_OVERHEAD: Final = 40
#: What an integer or float cell costs: a Python int of up to 60 bits (a timestamp in microseconds) or a float.
NUMBER_SIZE: Final = 32


def row_overhead(columns: int) -> int:
    """What one row of ``columns`` cells costs besides its cells: the tuple (its header, its garbage-collector
    header and a pointer per cell) and its slot in the buffer's list. It is more than the row's fixed costs once in
    Arrow columns (a 4-byte offset per text cell, 8 bytes per timestamp or integer, a validity bit per cell)."""
    return 72 + 8 * columns


#: What a row of one JSON document (the JSON format's rows) costs besides the document's bytes.
DOCUMENT_ROW_OVERHEAD: Final = row_overhead(1) + BYTES_OVERHEAD


def text_size(value: str) -> int:
    """What a text cell costs: its characters, at most 4 bytes each when it is not ASCII (in UTF-8, as Arrow keeps
    it, or in Python's wider forms), and :data:`TEXT_OVERHEAD`."""
    return (len(value) if value.isascii() else 4 * len(value)) + TEXT_OVERHEAD


def cell_size(value: Any) -> int:
    """What one cell of a row costs (text, bytes, a number; ``None`` and booleans are shared objects: nothing)."""
    if value is None or value is True or value is False:
        return 0
    if isinstance(value, str):
        return text_size(value)
    if isinstance(value, bytes | bytearray):
        return len(value) + BYTES_OVERHEAD
    return NUMBER_SIZE


def row_size(row: tuple[Any, ...]) -> int:
    """What a row costs in memory (see :func:`row_overhead` and :func:`cell_size`): for rows made off the hot path
    (workspace changes and records); the call builders below count as they go."""
    return row_overhead(len(row)) + sum(map(cell_size, row))


# Row builders: one function per call type, generated from its columns (as ``dataclasses`` and ``namedtuple``
# generate theirs), so that checking and building a row is straight-line code with no loop over columns and no
# lookups of what kind a column is. Each returns ``(row, size)`` or raises :class:`InvalidCall`; ``size`` is what
# the row costs in memory (see above): a constant for the type, plus each cell's characters (a non-ASCII one counts
# 4 bytes a character). A raw builder leaves the characters out: the caller adds the length of the JSON text that
# was sent, which no cell's UTF-8 bytes exceed.


def _not_string(value: Any, field: str) -> str:
    if isinstance(value, str):
        return str(value)
    raise InvalidCall(f"must be a string, got {_type_name(value)}", field=field)


def _not_object(value: Any, field: str) -> None:
    if not isinstance(value, dict):
        raise InvalidCall(f"must be an object, got {_type_name(value)}", field=field)


def _bad_time(value: Any, field: str) -> InvalidCall:
    return InvalidCall(f"not an ISO-8601 timestamp: {_show(value)}", field=field)


def _text_cell(value: Any, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidCall(f"must be a string or a number, got {_type_name(value)}", field=field)
    return _text(value, field)


def _extra_text(data: Mapping[str, Any], known: frozenset[str]) -> str:
    extra = {k: v for k, v in data.items() if k not in known}
    try:
        text = orjson.dumps(extra, option=JSON_OPTIONS)
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise call_error(extra, exc) from None
    if json_text_refused(text, extra, 1):  # the keys are the call's own: their values are at level 2
        raise call_error(extra)
    return text.decode()


def _head_condition(call_type: str, local: dict[str, str]) -> str:
    """A Python expression true when :func:`check_head` would refuse the call (it is then called to say why)."""
    def missing(name: str) -> str:
        return f"{local[name]} is None or {local[name]} == ''"

    if call_type == "alias":
        parts = [missing("userId"), missing("previousId")]
    else:
        parts = [f"(not {local['userId']} and not {local['anonymousId']})"]
    if call_type == "track":
        parts.append(missing("event"))
    elif call_type == "group":
        parts.append(missing("groupId"))
    parts.append(f"{local['messageId']} == ''")
    return " or ".join(parts)


class _NotFast(Exception):
    """Raised by a raw builder when the call needs the full reading (to be refused with the precise reason)."""


#: Fields of the decoded structs: every column but ``type`` (the tag) and ``extra``, in column order.
def _struct_fields(call_type: str) -> list[tuple[str, Any, Any]]:
    kinds: dict[int, Any] = {_STRING: str | None, _TIME: str | None, _TEXT: str | int | float | None,
                             _OBJECT: msgspec.Raw, _RECEIVED: msgspec.Raw}
    return [(name, kinds[code], msgspec.Raw() if kinds[code] is msgspec.Raw else None)
            for name, code in _SPECS[call_type] if name != "type" and code != _EXTRA]


def _compile_builder(call_type: str, raw: bool = False) -> Callable[..., tuple[tuple[Any, ...], int]]:
    """The row builder of ``call_type``: from a dict (``build_<type>(data, received)``), or with ``raw`` from the
    struct :data:`_DECODER` made of JSON bytes (``raw_<type>(struct, received, extra)``), nested objects then kept
    as the JSON text that was sent and top-level fields already typed by the decoder."""
    specs = _SPECS[call_type]
    local = {name: f"v{i}" for i, (name, _) in enumerate(specs)}
    # What every row of the type costs whatever its values: the tuple, a string's header for each cell that may hold
    # text (or a timestamp), and receivedAt; the cells then add their characters (see text_size).
    base = row_overhead(len(specs)) + TEXT_OVERHEAD * (len(specs) - 1) + NUMBER_SIZE
    if raw:
        fields = [local[name] for name, _, _ in _struct_fields(call_type)]
        lines = [f"def raw_{call_type}(obj, received, extra):", f"    size = {base}",
                 f"    {', '.join(fields)}, = astuple(obj)", f"    {local['type']} = {call_type!r}",
                 f"    if {_head_condition(call_type, local)}:", "        raise NotFast"]
    else:
        fetched = [n for n, code in specs if code not in (_RECEIVED, _EXTRA)]
        lines = [f"def build_{call_type}(data, received):", "    get = data.get", f"    size = {base}",
                 f"    {', '.join(local[n] for n in fetched)}, = map(get, {tuple(fetched)!r})"]
        lines += [f"    if {_head_condition(call_type, local)}:", "        check_head(data)",
                  "        raise AssertionError(data)"]
    for name, code in specs:
        v = local[name]
        if code == _STRING and raw:  # the decoder checked the type and the text
            if name == "messageId":
                lines += [f"    if {v} is None:", f"        {v} = str(uuid4())", "        size += 36"]
        elif code == _STRING:
            lines += [f"    if {v} is not None:",
                      f"        if type({v}) is not str:", f"            {v} = _not_string({v}, {name!r})",
                      f"        if not {v}.isascii():", f"            _check_utf8({v}, {name!r})",
                      f"            size += 3 * len({v})",
                      f"        size += len({v})"]
            if name == "messageId":
                lines += ["    else:", f"        {v} = str(uuid4())", "        size += 36"]
        elif code == _OBJECT and raw:
            lines += [f"    if len({v}) == 0:", f"        {v} = None", "    else:",
                      f"        {v} = str({v}, 'utf-8')",
                      f"        if {v}[0] != '{{':",
                      f"            if {v} != 'null':", "                raise NotFast",
                      f"            {v} = None", "        else:",
                      f"            if len({v}) > {2 * (MAX_DEPTH - 1)} and too_deep({v}, {MAX_DEPTH - 1}):",
                      "                raise NotFast  # the full reading refuses it, saying why"]
        elif code == _OBJECT:
            # orjson refuses what JSON cannot hold but NaN and infinities (it writes them as null) and one level
            # beyond MAX_DEPTH (it writes 254 levels below the call): the values are walked only when the text has
            # more nulls than None values at its top, the brackets counted only in text long enough to nest so.
            lines += [f"    if {v} is not None:",
                      f"        if type({v}) is not dict:", f"            _not_object({v}, {name!r})",
                      "        try:", f"            text = dumps({v}, option=JSON_OPTIONS)",
                      "        except (JSONEncodeError, TypeError) as exc:",
                      f"            raise value_error({v}, {name!r}, 2, exc) from None",
                      "        size += len(text)",  # its UTF-8 bytes
                      "        text = text.decode()",
                      f"        if 'null' in text and text.count('null') != countOf({v}.values(), None) "
                      f"and faulty({v}, 2):",
                      f"            raise value_error({v}, {name!r})",
                      f"        if len(text) > {2 * (MAX_DEPTH - 1)} and too_deep(text, {MAX_DEPTH - 1}):",
                      f"            raise value_error({v}, {name!r})",
                      f"        {v} = text"]
        elif code == _TIME:
            lines += [f"    if {v} is not None:",
                      f"        if type({v}) is str:",
                      "            try:", f"                year = fromisoformat({v}).year",
                      "            except ValueError:", f"                raise _bad_time({v}, {name!r}) from None",
                      "            if year == 1 or year == 9999:",
                      f"                parse_time({v}, {name!r})",
                      "        else:", f"            {v} = to_micros(parse_time({v}, {name!r}))"]
            if not raw:
                lines += ["        size += 32"]  # the text of a timestamp, as sent
        elif code == _TEXT:
            lines += [f"    if {v} is not None:",
                      f"        if type({v}) is not str or not {v}.isascii():",
                      f"            {v} = _text_cell({v}, {name!r})"]
            if not raw:
                lines += [f"            size += 3 * len({v})", f"        size += len({v})"]
        elif code == _RECEIVED:
            lines += [f"    {v} = received"]
        elif code == _EXTRA and raw:
            lines += [f"    {v} = extra", "    if extra is not None:",
                      f"        if len(extra) > {2 * MAX_DEPTH} and too_deep(extra, {MAX_DEPTH}):",
                      "            raise NotFast"]
        elif code == _EXTRA:
            lines += ["    if data.keys() <= KNOWN:", f"        {v} = None", "    else:",
                      f"        {v} = _extra_text(data, KNOWN)",
                      f"        size += len({v}) if {v}.isascii() else 4 * len({v})"]
    if not raw:
        for name in _OTHER_OBJECTS[call_type]:
            lines += [f"    other = get({name!r})", "    if other is not None and type(other) is not dict:",
                      f"        _not_object(other, {name!r})"]
    lines.append(f"    return ({', '.join(local[n] for n, _ in specs)},), size")
    namespace: dict[str, Any] = {
        "check_head": check_head, "_not_string": _not_string, "_check_utf8": _check_utf8, "uuid4": uuid.uuid4,
        "_not_object": _not_object, "dumps": orjson.dumps, "JSON_OPTIONS": JSON_OPTIONS,
        "JSONEncodeError": orjson.JSONEncodeError, "value_error": value_error, "json_text_refused": json_text_refused,
        "too_deep": too_deep, "countOf": countOf, "faulty": faulty,
        "fromisoformat": datetime.fromisoformat, "_bad_time": _bad_time, "parse_time": parse_time,
        "to_micros": to_micros, "_text_cell": _text_cell, "_extra_text": _extra_text, "KNOWN": _KNOWN[call_type],
        "astuple": msgspec.structs.astuple, "NotFast": _NotFast,
    }
    exec("\n".join(lines), namespace)  # our own source, built from the fixed schemas above
    builder: Callable[..., tuple[tuple[Any, ...], int]] = namespace[f"{'raw' if raw else 'build'}_{call_type}"]
    return builder


def build_row(data: Mapping[str, Any], call_type: str, received: int) -> tuple[tuple[Any, ...], int]:
    """Validate ``data`` (a call of ``call_type``) and return its row and approximate size in bytes.

    The row holds the columns of ``call_type``'s schema in order: strings as sent, nested objects as compact JSON
    text, ``receivedAt`` as ``received`` (microseconds), other timestamps as sent (ISO-8601 text, checked here and
    converted column by column when the batch is encoded, see :func:`time_array`) or as microseconds when they were
    given as ``datetime``. A missing ``messageId`` gets a new UUID.
    """
    return _BUILDERS[call_type](data, received)


def time_array(values: list[Any] | tuple[Any, ...], name: str = "timestamp") -> pa.Array:
    """A column of timestamps as UTC microseconds: cells are microseconds, ``datetime``, ISO-8601 text or None.

    Text is converted by Arrow in one call; what Arrow does not read (no offset, week dates, ...) but Python's
    ``datetime.fromisoformat`` does is converted value by value, with the same result.
    """
    first = next((v for v in values if v is not None), None)
    try:
        if isinstance(first, str):
            return pa.array(values, pa.string()).cast(TIMESTAMP)
        return pa.array(values, TIMESTAMP)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    return pa.array([v if v is None or type(v) is int else to_micros(parse_time(v, name)) for v in values],
                    TIMESTAMP)


def _require_id(data: Mapping[str, Any], field: str, call_type: str) -> None:
    value = data.get(field)
    if value is None or value == "":
        raise InvalidCall(f"is required for a {call_type} call", field=field)


def _decoded(obj: Any) -> dict[str, Any]:
    if isinstance(obj, str | bytes | bytearray | memoryview):
        parsed = load_json(obj)
        if not isinstance(parsed, dict):
            raise InvalidCall(f"must be a JSON object, got {_type_name(parsed)}")
        return parsed
    raise InvalidCall(f"must be a dict, a JSON str or JSON bytes, got {type(obj).__name__}")


def check_head(data: Mapping[str, Any]) -> str:
    """Check what every call needs (its type, the ids its type requires, a non-empty messageId); return the type."""
    call_type = data.get("type")
    if not isinstance(call_type, str) or call_type not in _TYPES:
        if call_type is None:
            raise InvalidCall(f"is required (one of {', '.join(CALL_TYPES)})", field="type")
        if not isinstance(call_type, str):
            raise InvalidCall(f"must be a string, got {_type_name(call_type)}", field="type")
        raise InvalidCall(f"must be one of {', '.join(CALL_TYPES)}; got {_show(call_type)}", field="type")

    if call_type == "alias":
        _require_id(data, "userId", call_type)
        _require_id(data, "previousId", call_type)
    elif not data.get("userId") and not data.get("anonymousId"):
        user_id, anonymous_id = data.get("userId"), data.get("anonymousId")
        if user_id is not None and not isinstance(user_id, str):
            raise InvalidCall(f"must be a string, got {_type_name(user_id)}", field="userId")
        if anonymous_id is not None and not isinstance(anonymous_id, str):
            raise InvalidCall(f"must be a string, got {_type_name(anonymous_id)}", field="anonymousId")
        raise InvalidCall(f"userId or anonymousId is required for a {call_type} call", field="userId")
    if call_type == "track":
        _require_id(data, "event", call_type)
    elif call_type == "group":
        _require_id(data, "groupId", call_type)
    if data.get("messageId") == "":
        raise InvalidCall("must not be empty (leave it out and the sink sets one)", field="messageId")
    return call_type


def _raw_extra(payload: Any, call_type: str) -> str:
    """The top-level keys of a call sent as JSON that are not columns, as a JSON object of their values as sent."""
    known = _KNOWN[call_type]
    parts = []
    for key, value in _FIELDS_DECODER.decode(payload).items():
        if key not in known:
            text = str(value, "utf-8")
            if key in _OTHER_OBJECTS[call_type] and text[0] != "{" and text != "null":
                raise _NotFast  # e.g. "properties" on an identify must still be an object
            parts.append(f"{orjson.dumps(key).decode()}:{text}")
    return "{" + ",".join(parts) + "}"


def _call_to_row_fast(payload: Any, received: int) -> tuple[str, tuple[Any, ...], int] | None:
    """The row of a call sent as JSON, read by msgspec without building its nested objects; ``None`` when the
    call needs the full reading (anything unusual: the full reading then accepts it or says what is wrong).

    Nested objects are kept as the JSON text that was sent, so an integer beyond 64 bits inside one is kept
    exactly, digit for digit (a dict cannot carry one into JSON text: orjson refuses it, and so does the full
    reading, which builds dicts)."""
    try:
        try:
            struct = _DECODER.decode(payload)
            extra = None
        except msgspec.ValidationError as exc:
            if not str(exc).startswith("Object contains unknown field"):
                return None
            struct = _LENIENT_DECODER.decode(payload)
            extra = _raw_extra(payload, type(struct).__struct_config__.tag)
        call_type = type(struct).__struct_config__.tag
        row, size = _RAW_BUILDERS[call_type](struct, received, extra)
    except (msgspec.MsgspecError, _NotFast, UnicodeError, RecursionError):
        return None  # e.g. a str holding a lone surrogate (msgspec cannot encode it), or text that is not UTF-8
    # The raw builders count what a row costs besides the characters sent: add the JSON text's length, which no
    # cell's UTF-8 bytes (or Python form, for ASCII) exceed.
    if type(payload) is bytes:
        return call_type, row, size + len(payload)
    if isinstance(payload, str):
        return call_type, row, size + (len(payload) if payload.isascii() else 4 * len(payload))
    return call_type, row, size + memoryview(payload).nbytes


def call_to_row(obj: Any, received: int) -> tuple[str, tuple[Any, ...], int]:
    """Validate one call (dict, JSON str or bytes) straight into its row: ``(type, row, size)``.

    What :func:`parse_call` with ``row=True`` then :func:`call_row` give, without the :class:`Call` in between and
    without copying a dict (the caller's object is read, never modified). ``received`` is the acceptance time in
    microseconds. The Advanced sink's hot path. Calls sent as JSON keep their nested objects as the JSON text that
    was sent (the same JSON values a dict would give, spelled as the sender spelled them).
    """
    if isinstance(obj, dict):
        data = obj
    else:
        if isinstance(obj, str | bytes | bytearray | memoryview):
            fast = _call_to_row_fast(obj, received)
            if fast is not None:
                return fast
        data = _decoded(obj)
    call_type: Any = data.get("type")
    try:
        builder = _BUILDERS.get(call_type)
    except TypeError:  # an unhashable "type"
        builder = None
    if builder is None or type(call_type) is not str:
        call_type = check_head(data)
        builder = _BUILDERS[call_type]
    row, size = builder(data, received)
    return call_type, row, size


def parse_call(obj: Any, *, received_at: datetime | None = None, row: bool = False) -> Call:
    """Validate one call given as a dict, JSON ``str`` or JSON ``bytes``; raise :class:`InvalidCall` if it is bad,
    including when any value in it, at any depth, is one JSON text cannot hold (see :mod:`cio_sync.intake.values`).

    ``received_at`` is the acceptance time to record (default: now, UTC). A ``receivedAt`` sent by the caller is
    replaced, as a collecting server does. With ``row=True`` the call's row (see :func:`call_row`) is built in the
    same pass.
    """
    data = dict(obj) if isinstance(obj, dict) else _decoded(obj)
    call_type = check_head(data)
    message_id = data.get("messageId")
    if message_id is None:
        data["messageId"] = str(uuid.uuid4())
    received = received_at if received_at is not None else datetime.now(UTC)
    data["receivedAt"] = received
    times = {"receivedAt": received}
    if not row:
        _scan(data, call_type, times)
        return Call(call_type, data, times, document=_document(data))
    values, size = build_row(data, call_type, to_micros(received))  # checks every column, as _scan would
    for name in _TIME_FIELDS:
        value = data.get(name)
        if value is not None:
            times[name] = parse_time(value, name)
    return Call(call_type, data, times, values, size)


# ---------------------------------------------------------------------------------------------------------------
# Rows: what the formats encode.


def _check_utf8(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidCall(f"is not valid Unicode text ({exc.reason} at position {exc.start})", field=field) from None


def _text(value: str | float, field: str) -> str:
    if isinstance(value, str):
        if not value.isascii():
            _check_utf8(value, field)
        return value
    return dump_json(value, field, 1).decode()  # a number: one beyond 64 bits, NaN or an infinity is refused


def call_row(call: Call) -> tuple[tuple[Any, ...], int]:
    """The call as a row of its type's fixed schema (nested objects as JSON text), and its approximate size."""
    if call.row is not None:
        return call.row, call.size
    return build_row(call.data, call.type, to_micros(call.received_at))


def _document(data: dict[str, Any]) -> bytes:
    """The call as one line of JSON, every value checked (see :mod:`cio_sync.intake.values`); :class:`InvalidCall`
    names the field and key of a value JSON cannot hold. orjson itself refuses a call nested deeper than
    MAX_DEPTH."""
    try:
        document = orjson.dumps(data, option=JSON_OPTIONS)
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise call_error(data, exc) from None
    if b"null" in document:
        # NaN and infinities are written as null: look closer only if there are more nulls than None values in the
        # call and at the top of its objects (a trait set to null, to remove it, is common).
        nulls = countOf(data.values(), None)
        for name in _OBJECT_FIELDS:
            value = data.get(name)
            if type(value) is dict:
                nulls += countOf(value.values(), None)
        if document.count(b"null") != nulls and faulty(data, 1):
            raise call_error(data)
    if not ORJSON_STOPS_AT_MAX_DEPTH and too_deep(document, MAX_DEPTH):
        raise call_error(data)
    return document


def call_document(call: Call) -> bytes:
    """The call as one line of JSON: as sent, with ``messageId`` and ``receivedAt`` added."""
    if call.document is not None:
        return call.document
    return _document(call.data)


_BUILDERS: Final = {t: _compile_builder(t) for t in CALL_TYPES}
_RAW_BUILDERS: Final = {t: _compile_builder(t, raw=True) for t in CALL_TYPES}


def _structs(forbid_unknown: bool) -> Any:
    types = [msgspec.defstruct(f"{t.title()}Call{'Strict' if forbid_unknown else ''}", _struct_fields(t), tag=t,
                               tag_field="type", forbid_unknown_fields=forbid_unknown) for t in CALL_TYPES]
    union: Any = types[0]
    for struct in types[1:]:
        union = union | struct
    return union


#: Calls sent as JSON: top-level fields typed and checked in C, nested objects kept as their JSON text (``Raw``).
_DECODER: Final = msgspec.json.Decoder(_structs(forbid_unknown=True))
_LENIENT_DECODER: Final = msgspec.json.Decoder(_structs(forbid_unknown=False))
_FIELDS_DECODER: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
