"""The tables cio_sync writes, as the other layers import them (shared/SCHEMAS.md).

Each table is one :class:`~cio_sync.schemas.spec.TableSpec`: the six call tables of Advanced mode are in
:mod:`cio_sync.schemas.advanced`, the workspace tables of Standard mode in :mod:`cio_sync.schemas.standard`. This
module gathers them with the column vocabulary both use, and holds the schema of pre-encoded JSON documents.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import pyarrow as pa

from cio_sync.schemas.advanced import ADVANCED_TABLES, CALL_COLUMNS, CALL_SCHEMAS, CALL_TYPES, EXTRA_COLUMN, Kind
from cio_sync.schemas.spec import TIMESTAMP, CurrentView, TableSpec, is_json_text
from cio_sync.schemas.standard import (
    SINK_COLUMNS,
    STANDARD_SCHEMAS,
    STANDARD_TABLES,
    STANDARD_V1_TABLES,
    STANDARD_V4_TABLES,
    STANDARD_VERSION,
    STANDARD_VERSIONS,
    current_views,
    latest_spec,
    record_tables,
    standard_spec,
    table_for_file_name,
)

__all__ = [
    "ADVANCED_TABLES",
    "CALL_COLUMNS",
    "CALL_SCHEMAS",
    "CALL_TYPES",
    "DOCUMENT_SCHEMA",
    "EXTRA_COLUMN",
    "SINK_COLUMNS",
    "STANDARD_SCHEMAS",
    "STANDARD_TABLES",
    "STANDARD_V1_TABLES",
    "STANDARD_V4_TABLES",
    "STANDARD_VERSION",
    "STANDARD_VERSIONS",
    "TABLES",
    "TIMESTAMP",
    "CurrentView",
    "Kind",
    "TableSpec",
    "current_views",
    "is_document_schema",
    "is_json_text",
    "latest_spec",
    "record_tables",
    "standard_spec",
    "table_for_file_name",
]

#: Every table spec, by mode and then by table name.
TABLES: Final[Mapping[str, Mapping[str, TableSpec]]] = {"advanced": ADVANCED_TABLES, "standard": STANDARD_TABLES}

#: Schema of a batch of pre-encoded JSON documents (one call per row), as the JSON format writes them.
DOCUMENT_SCHEMA: Final = pa.schema([pa.field("document", pa.binary(), metadata={b"cio_sync.document": b"1"})])


def is_document_schema(schema: pa.Schema) -> bool:
    """Whether a batch holds pre-encoded JSON documents rather than columns."""
    return bool(schema.equals(DOCUMENT_SCHEMA, check_metadata=True))
