"""Dead letters: rows that could not be published and calls that were refused, kept with the reason."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from cio_sync._errors import CioSyncError
from cio_sync._time import EPOCH, ISO_MICROS
from cio_sync._types import Batch
from cio_sync.intake.calls import TEXT_OVERHEAD, parse_time
from cio_sync.schemas.tables import TIMESTAMP

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


def dead_letter_name(folder: str) -> str:
    """A new dead-letter file's name under ``_cio_sync/dead_letters/<folder>/`` (a table, or ``rejected``): the
    time, and a random part so that two sinks never make the same name."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{DEAD_LETTERS_FOLDER}/{folder}/{stamp}-{uuid.uuid4().hex[:12]}.jsonl"


def batch_letter(batch: Batch, reason: str, format_name: str) -> bytes:
    """The dead letter of a batch that could not be published: a line with the reason, then its rows as JSON
    objects (timestamps as ISO-8601 text)."""
    lines = [json.dumps({"reason": reason, "table": batch.table, "rows": batch.rows, "format": format_name})]
    names = batch.schema.names if batch.schema is not None else None
    times = {i for i, f in enumerate(batch.schema) if f.type == TIMESTAMP} if batch.schema is not None else set()
    data = batch.data
    if isinstance(data, pa.Table):
        data = list(zip(*(column.to_pylist() for column in data.columns), strict=True))
    for row in data or []:
        cells = [letter_time(v) if i in times else v for i, v in enumerate(row)]
        record = dict(zip(names, cells, strict=False)) if names else cells
        lines.append(json.dumps(record, default=str, ensure_ascii=True))
    return ("\n".join(lines) + "\n").encode()


def rejected_letter(rejected: list[str], dropped: int, max_kept: int) -> tuple[bytes, int]:
    """The dead-letter file of rejected calls (their lines, see :func:`rejected_line`) and how many lines it has;
    ``dropped`` calls that were counted but not kept get a line saying so."""
    lines = list(rejected)
    if dropped:
        lines.append(json.dumps({
            "reason": f"{dropped} more rejected calls were counted but not kept: keep_rejected holds at most "
                      f"{max_kept} calls, and a quarter of max_buffer_bytes, between two syncs",
            "at": datetime.now(UTC).isoformat(), "input": None, "not_kept": dropped}))
    return ("\n".join(lines) + "\n").encode(), len(lines)
