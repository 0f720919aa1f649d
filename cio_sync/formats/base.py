"""What a file format is: it encodes one batch (an Arrow table under a fixed schema) into the bytes of
one file. A format knows no storage and no sink; it declares its name and extension and encodes."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc


@runtime_checkable
class Format(Protocol):
    """Encodes one batch into the bytes of one file."""

    @property
    def name(self) -> str:
        """Registered name, e.g. ``"parquet"``."""
        ...

    @property
    def extension(self) -> str:
        """File name extension without the dot, e.g. ``"parquet"``."""
        ...

    def encode(self, table: pa.Table) -> bytes:
        """The bytes of one file holding every row of ``table``."""
        ...


def timestamps_as_iso(table: pa.Table) -> pa.Table:
    """Timestamp columns as ISO-8601 UTC text, e.g. ``2024-05-01T12:00:00.000000Z``."""
    for i, field in enumerate(table.schema):
        if pa.types.is_timestamp(field.type):
            column = table.column(i)
            if field.type.tz is not None:
                column = column.cast(pa.timestamp(field.type.unit, tz="UTC"))
            text = pc.strftime(column, format="%Y-%m-%dT%H:%M:%SZ")
            table = table.set_column(i, pa.field(field.name, pa.string(), metadata=field.metadata), text)
    return table
