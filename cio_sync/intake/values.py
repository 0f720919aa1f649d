"""What JSON text can hold: the checks every intake path makes on the values of a call or a record.

Every value of a call, at any depth, must be one that JSON text can hold, because every later stage (the files,
the spool, the Standard sink's state and outbox) keeps it as JSON or as UTF-8 text: a lone surrogate in a string or
a key, NaN or an infinity, an integer beyond 64 bits, bytes or an object of another type, or nesting deeper than
:data:`MAX_DEPTH` levels is refused. The checks are those of the C libraries that serialise the call: orjson
refuses lone surrogates, integers beyond 64 bits and unknown types; what it lets through silently is checked on its
output: NaN and infinities become ``null``, so only text with more ``null`` than the object has ``None`` values is
looked at, and only text long enough to nest that deep has its brackets counted. The Python walk over the values
(:func:`faulty`, :func:`value_error`) runs only once such a check has failed, to say where and why.
"""

from __future__ import annotations

import math
import re
import reprlib
import uuid
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from datetime import date, datetime, time
from enum import Enum
from operator import countOf
from typing import Any, Final

import orjson

from cio_sync._errors import InvalidCall

_MAX_SHOWN: Final = 80

#: How deeply a call may nest objects and arrays, the call object itself being the first level:
#: ``{"traits": {"address": {"city": "Lisboa"}}}`` is 3 levels deep (a record row counts the same way). Deeper calls
#: are refused on every path. 254 is the most orjson writes in one document (it refuses a 255th level), so a call
#: is never accepted on one path and refused on another; JSON readers read at least as deep (orjson 1,024 levels,
#: msgspec and the json module up to Python's recursion limit, DuckDB and PostgreSQL more). Checking a lower limit
#: would cost the intake of dicts ~10% (most nested objects would need their brackets counted).
MAX_DEPTH: Final = 254
#: Integers orjson writes: signed and unsigned 64-bit.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
#: A JSON string in text (its brackets do not nest), and a container with none inside it.
_JSON_STRING: Final = (re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S), re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S))
_INNERMOST: Final = (re.compile(rb"[\[{][^\[\]{}]*[\]}]"), re.compile(r"[\[{][^\[\]{}]*[\]}]"))
_OPENING: Final = (re.compile(rb"[\[{]"), re.compile(r"[\[{]"))
#: How a path into a field names its first key.
_NOUNS: Final = {"traits": "trait", "properties": "property"}
_SHORT: Final = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _MAX_SHOWN
_SHORT.maxlevel = 3


def shown(value: Any) -> str:
    """``value`` as a short repr for a message: some 80 characters at most, a lone surrogate shown as its escape, and
    a deeply nested value cut short (so showing it never raises RecursionError)."""
    return _SHORT.repr(value)


def printable(name: Any) -> str:
    """A key as a field name that can be printed and logged (a lone surrogate shown as its escape)."""
    return name.encode("utf-8", "backslashreplace").decode() if isinstance(name, str) else str(name)


def faulty(value: Any, level: int) -> bool:
    """Whether ``value`` (nested at ``level``) holds anything JSON text cannot (see :func:`_fault`)."""
    return _fault(value, level) is not None


def value_error(value: Any, field: str | None, level: int = 2, cause: Exception | None = None) -> InvalidCall:
    """The :class:`InvalidCall` for ``value`` of ``field`` (nested at ``level``), which some check refused: it
    names the key and says why. ``cause`` is the serialiser's own error, used if the walk finds nothing."""
    found = _fault(value, level)
    if found is None:
        return InvalidCall(f"cannot be written as JSON: {cause}", field=field)
    return InvalidCall(_say(field, found), field=field)


def call_error(data: Mapping[Any, Any], cause: Exception | None = None) -> InvalidCall:
    """The :class:`InvalidCall` for a call (or the keys of it outside the columns) that some check refused,
    naming the top-level field, the key inside it and the reason."""
    found = _fault(data, 1)
    if found is None or not found[0]:
        return InvalidCall(f"cannot be written as JSON: {cause}")
    path, why, of_name = found
    field = printable(path[0])
    return InvalidCall(_say(field, (path[1:], why, of_name)), field=field)


def json_text_refused(text: str | bytes, value: Any, level: int, nulls_known: int | None = None) -> bool:
    """Whether ``value`` (nested at ``level``), which orjson wrote as ``text``, holds what orjson lets through:
    NaN or an infinity (written as ``null``) or nesting beyond :data:`MAX_DEPTH`. Cheap unless the text has more
    ``null`` than the ``None`` values known (``nulls_known``; default: those at the top of ``value``), or is long
    enough to nest that deep; only then are the values walked or the brackets counted."""
    nulls = text.count("null") if isinstance(text, str) else text.count(b"null")
    if nulls:
        if nulls_known is None:
            nulls_known = countOf(value.values(), None) if isinstance(value, dict) else -1
        if nulls != nulls_known and _fault(value, level) is not None:
            return True
    return too_deep(text, MAX_DEPTH - level + 1)


def too_deep(text: str | bytes | bytearray, levels: int) -> bool:
    """Whether JSON ``text`` nests more than ``levels`` deep; cheap (no scan) for text too short to, of
    ``2 * levels`` characters or less, and one count of its brackets for text with no more than ``levels``."""
    if len(text) <= 2 * levels:
        return False
    opening = text.count("{") + text.count("[") if isinstance(text, str) else text.count(b"{") + text.count(b"[")
    return opening > levels and nested_deeper(text, levels)


def nested_deeper(text: str | bytes | bytearray, levels: int) -> bool:
    """Whether JSON ``text`` nests objects and arrays more than ``levels`` deep (brackets in strings do not count):
    passes of regular expressions, in C, each removing the innermost containers. Called only for text long enough
    and with enough brackets to nest that deep."""
    if isinstance(text, str):
        rest = _JSON_STRING[1].sub("", text)
        for _ in range(levels):
            rest, found = _INNERMOST[1].subn("", rest)
            if not found:
                return False
        return _OPENING[1].search(rest) is not None
    data = _JSON_STRING[0].sub(b"", text)
    for _ in range(levels):
        data, found = _INNERMOST[0].subn(b"", data)
        if not found:
            return False
    return _OPENING[0].search(data) is not None


def _orjson_stops_at_max_depth() -> bool:
    """Whether orjson refuses, by itself, a document nested deeper than :data:`MAX_DEPTH` (it writes 254 levels at
    most), so that a whole call it wrote needs no depth check of ours."""
    value: Any = 0
    for _ in range(MAX_DEPTH + 1):
        value = [value]
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return True
    return False


ORJSON_STOPS_AT_MAX_DEPTH: Final = _orjson_stops_at_max_depth()


def _fault(value: Any, level: int) -> tuple[list[Any], str, bool] | None:
    """The first value in ``value`` (nested at ``level``, the call being level 1) that JSON text cannot hold, as
    (the keys and indices leading to it, why, whether it is the name of the last key that is wrong); ``None`` if
    there is none. Runs only once a check has failed or a text looked suspicious: it is the slow path that names
    what is wrong. It keeps its own stack and goes no deeper than MAX_DEPTH + 1, so neither a cycle nor a deep
    value can raise RecursionError."""
    top = _container(value)
    if top is None:
        while isinstance(value, Enum):
            value = value.value
        why = _leaf_fault(value)
        return None if why is None else ([], why, False)
    if level > MAX_DEPTH:
        return [], f"is nested deeper than {MAX_DEPTH} levels (counted from the call)", False
    path: list[Any] = []  # the keys and indices from ``value`` to the container on top of the stack
    stack = [iter(top.items() if isinstance(top, dict) else enumerate(top))]
    kinds = [isinstance(top, dict)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            kinds.pop()
            if path:
                path.pop()
            continue
        key, item = entry
        if kinds[-1]:
            why = _key_fault(key)
            if why is not None:
                return [*path, key], why, True
        inner = _container(item)
        if inner is None:
            while isinstance(item, Enum):
                item = item.value
            why = _leaf_fault(item)
            if why is not None:
                return [*path, key], why, False
            continue
        if level + len(stack) > MAX_DEPTH:
            return [*path, key], f"is nested deeper than {MAX_DEPTH} levels (counted from the call)", False
        path.append(key)
        stack.append(iter(inner.items() if isinstance(inner, dict) else enumerate(inner)))
        kinds.append(isinstance(inner, dict))
    return None


def _leaf_fault(value: Any) -> str | None:
    """Why a value that is not a container cannot be JSON; ``None`` if it can."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"is not valid Unicode text ({exc.reason} at position {exc.start})"
        return None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if _INT_MIN <= value <= _INT_MAX else "is an integer beyond 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"is {value!r}, which JSON cannot hold (it has no NaN or infinity)"
    if isinstance(value, datetime | date | time | uuid.UUID):
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return f"is {type(value).__name__}, which JSON cannot hold (send text, e.g. base64)"
    return f"is of type {type(value).__name__}, which JSON cannot hold"


def _key_fault(key: Any) -> str | None:
    """Why ``key`` cannot name a member of a JSON object; ``None`` if it can. orjson writes int, float, bool,
    None, datetime, date, time, enum and UUID keys as text, as the json module does, and such keys are kept so."""
    if isinstance(key, str | int | float) and not isinstance(key, bool):
        return _leaf_fault(key)
    if key is None or isinstance(key, bool | datetime | date | time | Enum | uuid.UUID):
        return None
    return f"is of type {type(key).__name__}, which cannot name a member of a JSON object"


def _container(value: Any) -> Any:
    """``value`` as the container orjson writes it as (a dataclass as its fields, an enum as its value), or
    ``None`` if it is not one."""
    while isinstance(value, Enum):
        value = value.value
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in fields(value)}
    return value if isinstance(value, dict | list | tuple) else None


def _say(field: str | None, found: tuple[list[Any], str, bool]) -> str:
    """What :func:`_fault` found, in words: ``trait 'address'['lines'][0] is not valid Unicode text (...)``."""
    path, why, of_name = found
    if not path:
        return f"the name of this field {why}" if of_name else why
    keys = [shown(k) for k in path[:8]] + (["..."] if len(path) > 8 else [])
    place = f"{_NOUNS.get(field or '', 'key')} {keys[0]}" + "".join(f"[{k}]" for k in keys[1:])
    return f"the name of {place} {why}" if of_name else f"{place} {why}"
