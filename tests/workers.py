"""Functions run in separate processes by the tests (importable, so multiprocessing can spawn them)."""

from __future__ import annotations

from typing import Any

import cio_sync


def import_writer_modules() -> None:
    """Import what :func:`write_tagged_calls` uses (the Parquet writer, s3fs), as a pool's initializer."""
    import pyarrow.parquet  # noqa: F401
    import s3fs  # noqa: F401


def write_tagged_calls(url: str, storage_options: dict[str, Any], fmt: str, worker: int, count: int) -> int:
    """Write ``count`` track calls whose messageIds carry the worker's number, publishing often."""
    with cio_sync.AdvancedSink(url, format=fmt, storage_options=storage_options, destination_id=7,
                               flush_interval=None, max_rows=25) as sink:
        for i in range(count):
            sink.write({"type": "track", "userId": f"u{i}", "event": "E", "messageId": f"w{worker}-{i}"})
            if i % 40 == 0:
                sink.write({"type": "identify", "userId": f"u{i}", "messageId": f"w{worker}-id-{i}"})
    return count


def crash_writer(url: str, storage_options_json: str, spool_dir: str, ack_path: str, first: int) -> None:
    """Write track calls numbered from ``first`` forever, appending each messageId to ``ack_path`` once ``write()``
    returned; publish often. The test kills this process with SIGKILL at a random moment."""
    import json
    import os

    options = json.loads(storage_options_json)
    sink = cio_sync.AdvancedSink(url, storage_options=options, spool_dir=spool_dir, spool_sync="os",
                                 destination_id=9, flush_interval=0.05, max_rows=40)
    fd = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    i = first
    while True:
        message_id = f"m{i}"
        sink.write({"type": "track" if i % 5 else "identify", "userId": f"u{i}", "event": "E",
                    "messageId": message_id})
        os.write(fd, (message_id + "\n").encode())  # unbuffered: what is here was accepted
        i += 1
        if i % 97 == 0:
            sink.flush()


def recover(url: str, storage_options_json: str, spool_dir: str, fmt: str = "parquet") -> None:
    """Open the sink on the spool (publishing what it recovers) and close it cleanly."""
    import json

    sink = cio_sync.AdvancedSink(url, format=fmt, storage_options=json.loads(storage_options_json),
                                 spool_dir=spool_dir, destination_id=9, flush_interval=None)
    sink.close()
