"""Parquet files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

import pyarrow as pa
import pyarrow.parquet as pq

from cio_sync._errors import ConfigError

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
