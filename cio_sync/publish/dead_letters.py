"""Dead letters: rows that could not be published and calls that were refused, kept with the reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from cio_sync._errors import CioSyncError
from cio_sync._time import EPOCH, ISO_MICROS
from cio_sync.intake.calls import TEXT_OVERHEAD, parse_time

#: Where rows that could not be encoded are kept, under the sink's root, with the reason.
DEAD_LETTERS_FOLDER = "_cio_sync/dead_letters"


#: Characters of one rejected call kept for the dead letters (its JSON text); the rest is cut off. Segment's own
#: limit for a call is 32 KB.
MAX_REJECTED_INPUT = 32 * 1024


def letter_time(value: Any) -> Any:
    """A timestamp cell of a dead letter in one form, ISO-8601 UTC (rows hold microseconds, the text as sent, or a
    datetime once in Arrow); text that does not read as a timestamp is kept as it is."""
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            moment = EPOCH + timedelta(microseconds=value)
        elif isinstance(value, str | datetime):
            moment = parse_time(value, "timestamp")
        else:
            return value
        return moment.strftime(ISO_MICROS)
    except (CioSyncError, OverflowError, ValueError):
        return value


def rejected_line(given: Any, error: BaseException) -> str:
    """The dead-letter line of a rejected call (ASCII JSON): the reason, when, and the input (a call as JSON, text
    or bytes as text) cut to :data:`MAX_REJECTED_INPUT` characters; an input JSON cannot hold is described."""
    head: dict[str, Any] = {"reason": str(error), "at": datetime.now(UTC).isoformat()}
    size = None
    if isinstance(given, bytes | bytearray | memoryview):
        data = memoryview(given).cast("B")
        size = data.nbytes
        given = bytes(data[:MAX_REJECTED_INPUT]).decode("utf-8", errors="backslashreplace")[:MAX_REJECTED_INPUT]
    elif isinstance(given, str):
        size = len(given)
        given = given[:MAX_REJECTED_INPUT]
    try:
        text = json.dumps(given, default=repr, ensure_ascii=True, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as exc:
        text = json.dumps(f"<a {type(given).__name__} that cannot be written as JSON: {type(exc).__name__}>")
    if not isinstance(given, str) and len(text) > MAX_REJECTED_INPUT:
        size = len(text)
        text = json.dumps(text[:MAX_REJECTED_INPUT])  # the start of its JSON text, as a string
    tail = {"input_truncated": True, "input_size": size} if size is not None and size > MAX_REJECTED_INPUT else {}
    # Written once, by hand around the input's JSON text: a large call is not written as JSON twice.
    return "".join((json.dumps(head, default=repr, ensure_ascii=True)[:-1], ', "input": ', text,
                    json.dumps(tail)[1:] if not tail else ", " + json.dumps(tail)[1:-1] + "}"))


def kept_size(line: str) -> int:
    """What one kept rejected call takes in memory (its line is ASCII)."""
    return len(line) + TEXT_OVERHEAD
