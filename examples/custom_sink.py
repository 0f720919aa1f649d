"""A custom sink: completed orders from track calls, as a compact Parquet table, published through any Writer.

It shows the extension points: validation with ``cio_sync.parse_call``, a fixed Arrow schema, a
``cio_sync.ParquetFormat`` to encode, a ``cio_sync.Writer`` to publish create-only, ``cio_sync.register_sink`` to
open it by name, and ``cio_sync.testing.SinkContract`` to test it (see tests/test_testing.py).

Run: python examples/custom_sink.py
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pyarrow as pa

import cio_sync
import cio_sync.testing

ORDERS = pa.schema([
    ("messageId", pa.string()), ("userId", pa.string()), ("revenue", pa.float64()), ("currency", pa.string()),
    ("receivedAt", pa.timestamp("us", tz="UTC")),
])


class OrdersSink:
    """Keeps ``Order Completed`` track calls as orders; every other valid call is accepted and ignored."""

    def __init__(self, target: str | cio_sync.Writer, **storage: Any) -> None:
        self.writer = target if isinstance(target, cio_sync.Writer) else cio_sync.FsspecWriter(target, **storage)
        self.format = cio_sync.ParquetFormat()
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._closed = False

    def write(self, call: Any) -> str:
        parsed = cio_sync.parse_call(call)  # raises cio_sync.InvalidCall for bad input
        if parsed.type == "track" and parsed.data.get("event") == "Order Completed":
            properties = parsed.data.get("properties") or {}
            revenue = properties.get("revenue")
            with self._lock:
                self._rows.append({
                    "messageId": parsed.message_id, "userId": parsed.data.get("userId"),
                    "revenue": float(revenue) if isinstance(revenue, int | float) else None,
                    "currency": properties.get("currency"), "receivedAt": parsed.received_at,
                })
        return parsed.message_id

    def flush(self) -> list[cio_sync.WrittenFile]:
        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return []
        data = self.format.encode(pa.Table.from_pylist(rows, schema=ORDERS))
        # A random name never repeats; the writer refuses to overwrite in any case.
        return [self.writer.publish(f"orders.{uuid.uuid4().hex}.parquet", data, table="orders", rows=len(rows))]

    def close(self) -> list[cio_sync.WrittenFile]:
        if self._closed:
            return []
        files = self.flush()
        self._closed = True
        return files


cio_sync.register_sink("orders", OrdersSink)

if __name__ == "__main__":
    import os
    import tempfile

    folder = os.environ.get("CIO_SYNC_EXAMPLE_DIR") or tempfile.mkdtemp()
    sink = cio_sync.open_sink("orders", os.path.join(folder, "orders"))
    for call in cio_sync.testing.sample_calls(2_000, seed=5):
        sink.write(call)
    [written] = sink.close()
    print(f"{written.rows} orders in {written.path}")
