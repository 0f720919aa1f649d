"""Fixed schemas of the files cio_sync writes (shared/SCHEMAS.md). A leaf module: it imports nothing of ours.

Schemas are never inferred from a batch, so a trait that changes type between calls, or a batch in which a column
is null everywhere, always produces a file with the same columns and types.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

import pyarrow as pa

#: Arrow type of every timestamp column: UTC instants with microsecond precision.
TIMESTAMP: Final = pa.timestamp("us", tz="UTC")

#: Field metadata marking a string column that holds JSON text (a nested object kept whole).
JSON_TEXT_META: Final = {b"cio_sync.json": b"1"}


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
        return pa.field(name, pa.string(), metadata=JSON_TEXT_META)
    return pa.field(name, pa.string())


#: For each call type, the Arrow schema of its Parquet and CSV files.
CALL_SCHEMAS: Final[dict[str, pa.Schema]] = {
    t: pa.schema([_arrow_field(n, k) for n, k in cols]) for t, cols in CALL_COLUMNS.items()
}

#: Schema of a batch of pre-encoded JSON documents (one call per row), as the JSON format writes them.
DOCUMENT_SCHEMA: Final = pa.schema([pa.field("document", pa.binary(), metadata={b"cio_sync.document": b"1"})])


def is_json_text(field: pa.Field) -> bool:
    """Whether ``field`` holds JSON text that a JSON writer should embed as a value, not as a string."""
    return bool(field.metadata and field.metadata.get(b"cio_sync.json") == b"1")


def is_document_schema(schema: pa.Schema) -> bool:
    """Whether a batch holds pre-encoded JSON documents rather than columns."""
    return bool(schema.equals(DOCUMENT_SCHEMA, check_metadata=True))


# ---------------------------------------------------------------------------------------------------------------
# Standard mode: what the workspace made of the data. Every table has ``workspace_id int64``.

STRING: Final = pa.string()
INT: Final = pa.int64()
BOOL: Final = pa.bool_()

#: Schema version of every Standard table; a new column means a new version.
STANDARD_VERSION: Final = 1


def _standard(*columns: tuple[str, pa.DataType] | pa.Field) -> pa.Schema:
    fields = [c if isinstance(c, pa.Field) else pa.field(c[0], c[1]) for c in columns]
    return pa.schema([pa.field("workspace_id", INT), *fields])


STANDARD_SCHEMAS: Final[dict[str, pa.Schema]] = {
    "people": _standard(
        ("internal_customer_id", STRING), ("external_customer_id", STRING), ("email_addr", STRING),
        ("deleted", BOOL), ("suppressed", BOOL), ("created_at", TIMESTAMP), ("updated_at", TIMESTAMP),
    ),
    "attributes": _standard(
        ("internal_customer_id", STRING), ("external_customer_id", STRING), ("attribute_name", STRING),
        ("attribute_value", STRING), ("timestamp", TIMESTAMP),
    ),
    "campaigns": _standard(
        ("campaign_id", INT), ("name", STRING), ("type", STRING), ("state", STRING), ("version", INT),
        ("created_at", TIMESTAMP), ("updated_at", TIMESTAMP),
    ),
    "actions": _standard(
        ("action_id", INT), ("campaign_id", INT), ("broadcast_id", INT), ("action_type", STRING), ("name", STRING),
        ("version", INT), ("created_at", TIMESTAMP), ("updated_at", TIMESTAMP),
    ),
    "broadcasts": _standard(
        ("broadcast_id", INT), ("name", STRING), ("type", STRING), ("created_at", TIMESTAMP),
        ("updated_at", TIMESTAMP),
    ),
    "subjects": _standard(
        ("subject_name", STRING), ("internal_customer_id", STRING), ("external_customer_id", STRING),
        ("campaign_type", STRING), ("campaign_id", INT), ("event_id", STRING), ("trigger_id", INT),
        ("started_campaign_at", TIMESTAMP), ("created_at", TIMESTAMP), ("seq_num", INT),
    ),
    "outputs": _standard(
        ("output_id", STRING), ("subject_name", STRING), ("output_type", STRING), ("action_id", INT),
        ("explanation", STRING), ("delivery_id", STRING), ("draft", BOOL), ("link_tracked", BOOL),
        ("split_test_index", INT), ("delay_ends_at", TIMESTAMP), ("branch_index", INT), ("manual_segment_id", INT),
        ("add_to_manual_segment", BOOL), ("created_at", TIMESTAMP), ("seq_num", INT),
    ),
    "deliveries": _standard(
        ("delivery_id", STRING), ("internal_customer_id", STRING), ("external_customer_id", STRING),
        ("subject_name", STRING), ("event_id", STRING), ("delivery_type", STRING), ("campaign_id", INT),
        ("action_id", INT), ("newsletter_id", INT), ("content_id", INT), ("trigger_id", INT),
        ("transactional_message_id", INT), ("created_at", TIMESTAMP), ("seq_num", INT),
    ),
    "delivery_contents": _standard(
        ("delivery_id", STRING), ("delivery_type", STRING), ("campaign_id", INT), ("action_id", INT),
        ("newsletter_id", INT), ("content_id", INT), ("from", STRING), ("reply_to", STRING), ("bcc", STRING),
        ("recipients", STRING), ("subject", STRING), ("body", STRING), ("body_amp", STRING), ("body_plain", STRING),
        ("preheader", STRING), ("url", STRING), ("method", STRING),
        pa.field("headers", STRING, metadata=JSON_TEXT_META), ("created_at", TIMESTAMP),
    ),
    "metrics": _standard(
        ("event_id", STRING), ("delivery_id", STRING), ("metric", STRING), ("reason", STRING), ("link_id", INT),
        ("link_url", STRING), ("created_at", TIMESTAMP), ("seq_num", INT),
    ),
}
