"""File formats: each encodes one batch (an Arrow table under a fixed schema) into the bytes of one file.

A format knows no storage and no sink. It declares its name and extension and encodes; that is all.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol, runtime_checkable

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cio_sync._errors import ConfigError
from cio_sync._schemas import is_document_schema, is_json_text


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


_PARQUET_CODECS: Final = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")


@dataclass(frozen=True, kw_only=True)
class ParquetFormat:
    """Apache Parquet; timestamps as UTC instants, nested objects as JSON text. Default codec: zstd."""

    compression: str = "zstd"
    compression_level: int | None = None
    #: Rows per row group; files stay readable with bounded memory.
    row_group_size: int = 128 * 1024

    name: ClassVar[str] = "parquet"
    extension: ClassVar[str] = "parquet"

    def __post_init__(self) -> None:
        if self.compression not in _PARQUET_CODECS:
            raise ConfigError(
                f"parquet compression must be one of {', '.join(_PARQUET_CODECS)}; got {self.compression!r}"
            )
        if isinstance(self.row_group_size, bool) or not isinstance(self.row_group_size, int) or self.row_group_size < 1:
            raise ConfigError(f"parquet row_group_size must be an integer of at least 1; got {self.row_group_size!r}")
        # Check the codec and level now, not at the first flush an hour from now.
        try:
            self.encode(pa.table({"probe": pa.array([1], pa.int64())}))
        except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"parquet compression {self.compression!r} with level {self.compression_level!r} does not work: {exc}"
            ) from None

    def encode(self, table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(
            table,
            sink,
            compression=self.compression,
            compression_level=self.compression_level,
            row_group_size=self.row_group_size,
            # Column statistics let warehouses prune; page indexes are cheap to write.
            write_statistics=True,
        )
        return bytes(sink.getvalue().to_pybytes())


def _timestamps_as_iso(table: pa.Table) -> pa.Table:
    """Timestamp columns as ISO-8601 UTC text, e.g. ``2024-05-01T12:00:00.000000Z``."""
    for i, field in enumerate(table.schema):
        if pa.types.is_timestamp(field.type):
            column = table.column(i)
            if field.type.tz is not None:
                column = column.cast(pa.timestamp(field.type.unit, tz="UTC"))
            text = pc.strftime(column, format="%Y-%m-%dT%H:%M:%SZ")
            table = table.set_column(i, pa.field(field.name, pa.string(), metadata=field.metadata), text)
    return table


#: Cells a spreadsheet would run as a formula start with one of these (OWASP "CSV injection").
_FORMULA_START: Final = r"^[=+\-@\t\r]"


def _neutralize_formulas(table: pa.Table) -> pa.Table:
    """String cells that start like a formula, prefixed with an apostrophe so spreadsheets show them as text."""
    for i, field in enumerate(table.schema):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            column = table.column(i)
            risky = pc.fill_null(pc.match_substring_regex(column, _FORMULA_START), False)
            if pc.any(risky).as_py():
                safe = pc.if_else(risky, pc.binary_join_element_wise("'", column, ""), column)
                table = table.set_column(i, field, safe)
    return table


@dataclass(frozen=True, kw_only=True)
class CsvFormat:
    """CSV: one header row, RFC 4180 quoting, UTF-8, an empty cell for null, timestamps as ISO-8601 UTC text.

    With ``neutralize_formulas``, a text cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
    return is written with a leading apostrophe, so a spreadsheet opening the file shows it instead of running it.
    This changes those cells: leave it off for files that only machines read.
    """

    neutralize_formulas: bool = False

    name: ClassVar[str] = "csv"
    extension: ClassVar[str] = "csv"

    def encode(self, table: pa.Table) -> bytes:
        out = io.BytesIO()
        table = _timestamps_as_iso(table)
        if self.neutralize_formulas:
            table = _neutralize_formulas(table)
        pacsv.write_csv(table, out, write_options=pacsv.WriteOptions(include_header=True))
        return out.getvalue()


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
    #: Sinks may hand this format pre-encoded documents (see :data:`~cio_sync._schemas.DOCUMENT_SCHEMA`).
    accepts_documents: ClassVar[bool] = True

    def encode(self, table: pa.Table) -> bytes:
        if is_document_schema(table.schema):
            docs = table.column(0).to_pylist()
            return b"\n".join(docs) + b"\n" if docs else b""
        table = _timestamps_as_iso(table)
        names = table.schema.names
        encoders = _json_value_encoders(table.schema)
        columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
        lines = []
        for values in zip(*columns, strict=True):
            obj = {n: enc(v) for n, enc, v in zip(names, encoders, values, strict=True) if v is not None}
            lines.append(orjson.dumps(obj))
        return b"\n".join(lines) + b"\n" if lines else b""


_REGISTRY: dict[str, Callable[..., Format]] = {
    "parquet": ParquetFormat,
    "csv": CsvFormat,
    "json": JsonLinesFormat,
    "jsonl": JsonLinesFormat,
    "ndjson": JsonLinesFormat,
}


def register_format(name: str, factory: Callable[..., Format]) -> None:
    """Make ``factory`` available by ``name`` wherever a sink takes ``format=``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"format name must be an identifier; got {name!r}")
    _REGISTRY[name.lower()] = factory


def get_format(spec: str | Format, **options: Any) -> Format:
    """A format by registered name (with its options), or ``spec`` itself when it already is a format."""
    if isinstance(spec, str):
        try:
            factory = _REGISTRY[spec.lower()]
        except KeyError:
            known = ", ".join(sorted(_REGISTRY))
            raise ConfigError(f"unknown format {spec!r}; known formats: {known}") from None
        try:
            return factory(**options)
        except TypeError as exc:
            raise ConfigError(f"format {spec!r} does not take these options: {exc}") from None
    if options:
        raise ConfigError("format options are given with a format name, not with a format object")
    if not isinstance(spec, Format):
        raise ConfigError(f"format must be a name or a Format; got {type(spec).__name__}")
    return spec
