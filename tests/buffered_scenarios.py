"""A custom sink on the toolkit, and the child processes the BufferedSink tests kill (tests/test_buffered_sink.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

import cio_sync

ORDERS = pa.schema([("messageId", pa.string()), ("userId", pa.string()), ("revenue", pa.float64()),
                    ("receivedAt", pa.timestamp("us", tz="UTC"))])


class OrdersSink(cio_sync.BufferedSink):
    """Completed orders from track calls (the issue's example)."""

    tables = {"orders": ORDERS}
    layout = "orders.{position}.{ext}"

    def route(self, call: cio_sync.Call) -> Iterator[tuple[str, Any]]:
        if call.type == "track" and call.data.get("event") == "Order Completed":
            p = call.data.get("properties") or {}
            yield "orders", {"messageId": call.message_id, "userId": call.data.get("userId"),
                             "revenue": p.get("revenue"), "receivedAt": call.received_at}


def order(message_id: str, revenue: Any = 9.5, user: str = "u1") -> dict[str, Any]:
    return {"type": "track", "event": "Order Completed", "userId": user, "messageId": message_id,
            "properties": {"revenue": revenue}}


def crash_writer(url: str, storage_options_json: str, spool_dir: str, ack_path: str, first: int) -> None:
    """Write orders numbered from ``first`` forever, appending each messageId to ``ack_path`` once ``write()``
    returned; publish often. The test kills this process with SIGKILL at a random moment."""
    sink = OrdersSink(url, storage_options=json.loads(storage_options_json), spool_dir=spool_dir, spool_sync="os",
                      flush_interval=0.05, max_rows=40)
    fd = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    i = first
    while True:
        message_id = f"m{i}"
        sink.write(order(message_id, revenue=float(i)))
        os.write(fd, (message_id + "\n").encode())  # unbuffered: what is here was accepted
        i += 1
        if i % 97 == 0:
            sink.flush()


def recover(url: str, storage_options_json: str, spool_dir: str) -> None:
    """Open the sink on the spool (publishing what it recovers) and close it cleanly."""
    OrdersSink(url, storage_options=json.loads(storage_options_json), spool_dir=spool_dir,
               flush_interval=None).close()


class OrdersAndLines(cio_sync.BufferedSink):
    """Each order as a row of two tables: a call whose second row cannot be kept must leave no first row."""

    tables = {"orders": pa.schema([("messageId", pa.string())]), "lines": pa.schema([("messageId", pa.string())])}

    def route(self, call: cio_sync.Call) -> Iterator[tuple[str, Any]]:
        yield "orders", (call.message_id,)
        yield "lines", (call.message_id,)


def refused_second_row(target: str, spool_dir: str) -> dict[str, Any]:
    """Write a call whose second row the spool refuses (a full disk), then more; publish; write one more and
    stop as a crash would (no close). Returns what ``write()`` said about each call."""
    from tests.faults import faults

    sink = OrdersAndLines(target, spool_dir=spool_dir, flush_interval=None)
    sink.write(order("warm"))  # both tables' segments exist now: each row is one write
    said = {}
    with faults().failing("write", nth=2):
        try:
            sink.write(order("bad"))
            said["bad"] = "accepted"
        except cio_sync.StorageError:
            said["bad"] = "refused"
    sink.write(order("after"))
    sink.flush()
    sink.write(order("tail"))
    return {"said": said, "_exit": True}
