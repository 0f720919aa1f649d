"""Functions run in separate processes by the tests (importable, so multiprocessing can spawn them)."""

from __future__ import annotations

from typing import Any

import cio_sync


def write_tagged_calls(url: str, storage_options: dict[str, Any], fmt: str, worker: int, count: int) -> int:
    """Write ``count`` track calls whose messageIds carry the worker's number, publishing often."""
    with cio_sync.AdvancedSink(url, format=fmt, storage_options=storage_options, destination_id=7,
                               flush_interval=None, max_rows=25) as sink:
        for i in range(count):
            sink.write({"type": "track", "userId": f"u{i}", "event": "E", "messageId": f"w{worker}-{i}"})
            if i % 40 == 0:
                sink.write({"type": "identify", "userId": f"u{i}", "messageId": f"w{worker}-id-{i}"})
    return count
