"""Advanced mode's tables: one per call type, its columns the call's fields as sent (shared/SCHEMAS.md).

Schemas are never inferred from a batch, so a trait that changes type between calls, or a batch in which a column
is null everywhere, always produces a file with the same columns and types.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Final

import pyarrow as pa

from cio_sync.schemas.spec import JSON_TEXT_META, STRING, TIMESTAMP, TableSpec


class Kind(Enum):
    """How a column's value is taken from a call."""

    STRING = "string"  # a string as sent
    ID = "id"  # a string identifier (userId, groupId, ...)
    TEXT = "text"  # a string, or a number kept as its JSON text (version, channel)
    OBJECT = "object"  # a JSON object, stored as JSON text
    TIME = "time"  # an ISO-8601 timestamp, stored as a UTC instant
    EXTRA = "extra"  # every top-level key the contract does not name, as one JSON object


CALL_TYPES: Final = ("identify", "track", "page", "screen", "group", "alias")

#: The column holding the top-level keys of a call that are not columns of their own.
EXTRA_COLUMN: Final = "extra"

_HEAD: Final = (("messageId", Kind.ID), ("type", Kind.STRING), ("userId", Kind.ID), ("anonymousId", Kind.ID))
_TAIL: Final = (
    ("context", Kind.OBJECT),
    ("integrations", Kind.OBJECT),
    ("timestamp", Kind.TIME),
    ("originalTimestamp", Kind.TIME),
    ("sentAt", Kind.TIME),
    ("receivedAt", Kind.TIME),
    ("version", Kind.TEXT),
    ("channel", Kind.TEXT),
    (EXTRA_COLUMN, Kind.EXTRA),
)
_SPECIFIC: Final[dict[str, tuple[tuple[str, Kind], ...]]] = {
    "identify": (("traits", Kind.OBJECT),),
    "track": (("event", Kind.STRING), ("properties", Kind.OBJECT)),
    "page": (("name", Kind.STRING), ("category", Kind.STRING), ("properties", Kind.OBJECT)),
    "screen": (("name", Kind.STRING), ("category", Kind.STRING), ("properties", Kind.OBJECT)),
    "group": (("groupId", Kind.ID), ("traits", Kind.OBJECT)),
    "alias": (("previousId", Kind.ID),),
}

#: For each call type, its columns in file order: (name, kind).
CALL_COLUMNS: Final[dict[str, tuple[tuple[str, Kind], ...]]] = {
    t: _HEAD + _SPECIFIC[t] + _TAIL for t in CALL_TYPES
}


def _arrow_field(name: str, kind: Kind) -> pa.Field:
    if kind is Kind.TIME:
        return pa.field(name, TIMESTAMP)
    if kind in (Kind.OBJECT, Kind.EXTRA):
        return pa.field(name, STRING, metadata=JSON_TEXT_META)
    return pa.field(name, STRING)


#: One table per call type, named by it (the loader's warehouse table is ``raw_<type>``). A call is identified by
#: its ``messageId``: the loader's ``raw_<type>_unique`` views keep the first received row of each.
ADVANCED_TABLES: Final[Mapping[str, TableSpec]] = {
    t: TableSpec(t, "advanced", 1, pa.schema([_arrow_field(n, k) for n, k in cols]), key=("messageId",))
    for t, cols in CALL_COLUMNS.items()
}

#: For each call type, the Arrow schema of its Parquet and CSV files.
CALL_SCHEMAS: Final[Mapping[str, pa.Schema]] = {t: spec.schema for t, spec in ADVANCED_TABLES.items()}
