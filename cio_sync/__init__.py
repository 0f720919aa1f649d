"""cio_sync: customer-data calls and workspace records to storage buckets, as new immutable files at intervals.

Two modes, after Customer.io's two kinds of storage integration:

- :class:`AdvancedSink`: every incoming identify/track/page/screen/group/alias call, as sent, to Parquet, CSV or
  JSON files.
- :class:`StandardSink`: what the workspace made of the data (people and attribute changes, campaigns, deliveries,
  metrics), to Parquet.

Both publish through one :class:`Writer` over fsspec, so local disk, memory, S3, GCS and Azure all work.
"""

from cio_sync._advanced import AdvancedSink
from cio_sync._calls import Call, parse_call
from cio_sync._errors import (
    CioSyncError,
    ConfigError,
    InvalidCall,
    InvalidCalls,
    InvalidRecord,
    InvalidRecords,
    MissingBackend,
    PublishConflict,
    SinkClosed,
    StateError,
    StorageError,
    UnknownPerson,
)
from cio_sync._formats import CsvFormat, Format, JsonLinesFormat, ParquetFormat, get_format, register_format
from cio_sync._loader import LoadReport, QuarantinedFile, inspect_prefix, load
from cio_sync._pipeline import Pipeline
from cio_sync._publisher import BufferFull, SinkStats
from cio_sync._registry import open_sink, register_sink, sink_names
from cio_sync._signals import close_on_signals
from cio_sync._standard import StandardSink
from cio_sync._writer import FsspecWriter, RetryPolicy, Writer, WrittenFile

__version__ = "0.1.0"

__all__ = [
    "AdvancedSink",
    "BufferFull",
    "Call",
    "CioSyncError",
    "ConfigError",
    "CsvFormat",
    "Format",
    "FsspecWriter",
    "InvalidCall",
    "InvalidCalls",
    "InvalidRecord",
    "InvalidRecords",
    "JsonLinesFormat",
    "LoadReport",
    "MissingBackend",
    "ParquetFormat",
    "Pipeline",
    "PublishConflict",
    "QuarantinedFile",
    "RetryPolicy",
    "SinkClosed",
    "SinkStats",
    "StandardSink",
    "StateError",
    "StorageError",
    "UnknownPerson",
    "Writer",
    "WrittenFile",
    "__version__",
    "close_on_signals",
    "get_format",
    "inspect_prefix",
    "load",
    "open_sink",
    "parse_call",
    "register_format",
    "register_sink",
    "sink_names",
]
