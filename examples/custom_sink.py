"""A custom sink: completed orders from track calls, as a compact Parquet table, built on ``cio_sync.BufferedSink``.

The sink declares its table and how a call becomes a row; the toolkit gives it everything else: validation, the
timer and ``max_rows``/``max_bytes`` rotation, the memory budget, the crash-safe spool (``spool_dir``), file names
from durable counters (``orders.1.parquet``, ``orders.2.parquet``, ... continuing across restarts), manifests, dead
letters and stats. ``cio_sync.register_sink`` opens it by name, and ``cio_sync.testing.SinkContract`` tests it (see
tests/test_testing.py).

Run: python examples/custom_sink.py
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

import cio_sync
import cio_sync.testing


class OrdersSink(cio_sync.BufferedSink):
    """Keeps ``Order Completed`` track calls as orders; every other valid call is accepted and ignored."""

    tables = {"orders": pa.schema([
        ("messageId", pa.string()), ("userId", pa.string()), ("revenue", pa.float64()), ("currency", pa.string()),
        ("receivedAt", pa.timestamp("us", tz="UTC")),
    ])}
    layout = "orders.{position}.{ext}"

    def route(self, call: cio_sync.Call) -> Iterator[tuple[str, Any]]:
        if call.type == "track" and call.data.get("event") == "Order Completed":
            properties = call.data.get("properties") or {}
            revenue = properties.get("revenue")
            currency = properties.get("currency")
            yield "orders", {
                "messageId": call.message_id, "userId": call.data.get("userId"),
                # Senders are loose about types; this sink keeps what fits and leaves the rest empty.
                "revenue": revenue if isinstance(revenue, int | float) and not isinstance(revenue, bool) else None,
                "currency": currency if isinstance(currency, str) else None,
                "receivedAt": call.received_at,
            }


cio_sync.register_sink("orders", OrdersSink)

if __name__ == "__main__":
    import os
    import tempfile

    folder = os.environ.get("CIO_SYNC_EXAMPLE_DIR") or tempfile.mkdtemp()
    with cio_sync.open_sink("orders", os.path.join(folder, "orders"), spool_dir=os.path.join(folder, "spool"),
                            flush_interval=60) as sink:
        for call in cio_sync.testing.sample_calls(2_000, seed=5):
            sink.write(call)
        [written] = sink.flush()
    print(f"{written.rows} orders in {written.path}")
