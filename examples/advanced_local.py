"""Write calls through the Advanced sink to a local folder in all three formats, then read them with DuckDB.

Run: python examples/advanced_local.py [FOLDER]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import cio_sync

folder = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CIO_SYNC_EXAMPLE_DIR") or tempfile.mkdtemp())
calls = [
    {"type": "identify", "userId": "42", "traits": {"email": "ana@example.com", "plan": "pro"}},
    {"type": "track", "userId": "42", "event": "Order Completed", "properties": {"revenue": 9.5, "currency": "EUR"},
     "timestamp": "2026-11-30T09:15:00+01:00"},
    '{"type": "page", "anonymousId": "a-1", "name": "Pricing", "properties": {"path": "/pricing"}}',
    b'{"type": "alias", "userId": "42", "previousId": "a-1"}',
]

for fmt in ("parquet", "csv", "json"):
    with cio_sync.AdvancedSink(str(folder / fmt), format=fmt, destination_id=2184) as sink:
        sink.write_many(calls)
        try:
            sink.write({"type": "track", "userId": 42})  # an id must be a string, and track needs an event
        except cio_sync.InvalidCall as exc:
            print(f"rejected as expected: {exc}")
        for written in sink.flush():
            print(f"{fmt:>7}: {written.name} ({written.rows} rows, {written.bytes} bytes)")

try:
    import duckdb
except ImportError:
    sys.exit(0)
rows = duckdb.sql(
    f"SELECT userId, event, json_extract(properties, '$.revenue')::DOUBLE AS revenue, timestamp "
    f"FROM read_parquet('{folder / 'parquet' / '*.track.parquet'}')"
).fetchall()
print("track calls in DuckDB:", rows)
if not rows or rows[0][0] != "42" or rows[0][2] != 9.5:
    sys.exit(f"unexpected rows: {rows}")
