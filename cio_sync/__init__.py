"""cio_sync: customer-data calls and workspace records to storage buckets, as new immutable files at intervals.

Two modes, after Customer.io's two kinds of storage integration:

- :class:`AdvancedSink`: every incoming identify/track/page/screen/group/alias call, as sent, to Parquet, CSV or
  JSON files.
- :class:`StandardSink`: what the workspace made of the data (people and attribute changes, campaigns, deliveries,
  metrics), to Parquet.

Both publish through one :class:`Writer` over fsspec, so local disk, memory, S3, GCS and Azure all work.
"""

from cio_sync._errors import (
    BufferFull,
    CioSyncError,
    ConfigError,
    Fenced,
    InvalidCall,
    InvalidCalls,
    InvalidFile,
    InvalidRecord,
    InvalidRecords,
    MissingBackend,
    PublishConflict,
    SinkClosed,
    StateError,
    StorageError,
    UnknownPerson,
)
from cio_sync.formats.base import Format
from cio_sync.formats.csv import CsvFormat
from cio_sync.formats.jsonlines import JsonLinesFormat
from cio_sync.formats.parquet import ParquetFormat
from cio_sync.formats.registry import get_format, register_format
from cio_sync.intake.calls import Call, parse_call
from cio_sync.loader.load import LoadReport, QuarantinedFile, inspect_prefix, load
from cio_sync.publish.publisher import SinkStats
from cio_sync.sinks.advanced import AdvancedSink
from cio_sync.sinks.buffered import BufferedSink
from cio_sync.sinks.pipeline import Pipeline, PipelineStats
from cio_sync.sinks.registry import open_sink, register_sink, sink_names
from cio_sync.sinks.signals import close_on_signals
from cio_sync.sinks.standard import StandardSink
from cio_sync.storage.writer import FsspecWriter, RetryPolicy, Writer, WrittenFile

__version__ = "0.1.0"

__all__ = [
    "AdvancedSink",
    "BufferFull",
    "BufferedSink",
    "Call",
    "CioSyncError",
    "ConfigError",
    "CsvFormat",
    "Fenced",
    "Format",
    "FsspecWriter",
    "InvalidCall",
    "InvalidCalls",
    "InvalidFile",
    "InvalidRecord",
    "InvalidRecords",
    "JsonLinesFormat",
    "LoadReport",
    "MissingBackend",
    "ParquetFormat",
    "Pipeline",
    "PipelineStats",
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
