"""JSON lines files: one JSON object per row, nulls left out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
import pyarrow as pa

from cio_sync.formats.base import timestamps_as_iso
from cio_sync.schemas.tables import is_document_schema, is_json_text


def _json_value_encoders(schema: pa.Schema) -> list[Callable[[Any], Any]]:
    def raw(value: Any) -> Any:
        return orjson.Fragment(value) if value is not None else None

    def plain(value: Any) -> Any:
        return value

    return [raw if is_json_text(f) else plain for f in schema]


@dataclass(frozen=True, kw_only=True)
class JsonLinesFormat:
    """Newline-delimited JSON, one object per row, nested objects kept as objects.

    A batch of pre-encoded documents (the Advanced sink's calls, kept as sent) is written line by line as is. Any
    other table is written one object per row: JSON-text columns embedded as JSON values, timestamps as ISO-8601
    UTC text, null columns left out.
    """

    name: ClassVar[str] = "json"
    extension: ClassVar[str] = "json"
    #: Sinks may hand this format pre-encoded documents (see :data:`~cio_sync.schemas.tables.DOCUMENT_SCHEMA`).
    accepts_documents: ClassVar[bool] = True

    def encode(self, table: pa.Table) -> bytes:
        if is_document_schema(table.schema):
            docs = table.column(0).to_pylist()
            return b"\n".join(docs) + b"\n" if docs else b""
        table = timestamps_as_iso(table)
        names = table.schema.names
        encoders = _json_value_encoders(table.schema)
        columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
        lines = []
        for values in zip(*columns, strict=True):
            obj = {n: enc(v) for n, enc, v in zip(names, encoders, values, strict=True) if v is not None}
            lines.append(orjson.dumps(obj))
        return b"\n".join(lines) + b"\n" if lines else b""
