"""Follow one person through the Standard sink: three identify calls (one changes nothing), a campaign, an email,
an open and a click. Prints the rows each step produces, then rebuilds current state from the change logs with DuckDB.

Run: python examples/standard_one_person.py [FOLDER]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import cio_sync

folder = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CIO_SYNC_EXAMPLE_DIR") or tempfile.mkdtemp())
bucket = folder / "standard"

sink = cio_sync.StandardSink(str(bucket), workspace_id=111528, state=folder / "workspace.sqlite",
                             flush_interval=None)

steps = [
    ("identify: Ana signs up", lambda: sink.write(
        {"type": "identify", "userId": "ana-42", "traits": {"email": "ana@example.com", "plan": "trial"}})),
    ("identify again, nothing new", lambda: sink.write(
        {"type": "identify", "userId": "ana-42", "traits": {"email": "ana@example.com", "plan": "trial"}})),
    ("identify: Ana upgrades and sets her city", lambda: sink.write(
        {"type": "identify", "userId": "ana-42", "traits": {"plan": "pro", "city": "Lisboa"}})),
    ("the Onboarding campaign", lambda: sink.record(
        "campaigns", {"campaign_id": 7, "name": "Onboarding", "topic_names": ["product"]})),
    ("its welcome email action", lambda: sink.record(
        "actions", {"action_id": 70, "campaign_id": 7, "action_type": "email", "name": "Welcome"})),
    ("Ana enters the campaign", lambda: sink.record(
        "subjects", {"subject_name": "s-ana-7", "customer_id": "ana-42", "campaign_id": 7,
                     "campaign_type": "segment", "started_campaign_at": "2026-11-30T09:00:00Z"})),
    ("the journey reaches the email step", lambda: sink.record(
        "outputs", {"output_id": "o-1", "subject_name": "s-ana-7", "output_type": "email", "action_id": 70,
                    "delivery_id": "d-1", "draft": False, "link_tracked": True})),
    ("the email is sent", lambda: sink.record(
        "deliveries", {"delivery_id": "d-1", "customer_id": "ana-42", "subject_id": "s-ana-7",
                       "delivery_type": "email", "campaign_id": 7, "action_id": 70})),
    ("its rendered content", lambda: sink.record(
        "delivery_contents", {"delivery_id": "d-1", "type": "email", "campaign_id": 7, "action_id": 70,
                              "from": "team@example.com", "recipient": "ana@example.com",
                              "subject": "Welcome, Ana", "body_plain": "Hi Ana!"})),
    ("sent", lambda: sink.record("metrics", {"event_id": "m-1", "delivery_id": "d-1", "metric": "sent"})),
    ("opened", lambda: sink.record("metrics", {"event_id": "m-2", "delivery_id": "d-1", "metric": "opened"})),
    ("clicked", lambda: sink.record(
        "metrics", {"event_id": "m-3", "delivery_id": "d-1", "metric": "clicked", "link_url": "https://example.com/start"})),
]
for title, step in steps:
    print(f"{step():>2} row(s)  {title}")
files = sink.close()
print(f"\n{len(files)} files in {bucket}:")
for f in files:
    print(f"  {f.name} ({f.rows} rows)")

try:
    import duckdb
except ImportError:
    sys.exit(0)
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
for table in ("people", "attributes", "campaigns", "deliveries", "metrics"):
    con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{bucket}/{table}_v4_*.parquet')")

print("\nLatest person (the last row per internal_customer_id by updated_at):")
print(con.sql("""
    SELECT customer_id, internal_customer_id, email_addr, deleted, suppressed
    FROM people QUALIFY row_number() OVER (PARTITION BY internal_customer_id ORDER BY updated_at DESC) = 1
"""))
print("Current attributes (the last change per attribute; a null value means removed):")
current = con.sql("""
    SELECT p.customer_id, a.attribute_name, a.attribute_value
    FROM (SELECT * FROM attributes
          QUALIFY row_number() OVER (PARTITION BY internal_customer_id, attribute_name ORDER BY timestamp DESC) = 1)
         a
    JOIN (SELECT * FROM people
          QUALIFY row_number() OVER (PARTITION BY internal_customer_id ORDER BY updated_at DESC) = 1) p
      USING (internal_customer_id)
    WHERE a.attribute_value IS NOT NULL
    ORDER BY a.attribute_name
""")
print(current)
print("What happened to the email (metrics, deduplicated by event_id):")
print(con.sql("""
    SELECT d.delivery_id, p.customer_id, m.metric, m.link_url
    FROM (SELECT * FROM metrics QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY created_at) = 1) m
    JOIN deliveries d USING (delivery_id)
    JOIN (SELECT DISTINCT internal_customer_id, customer_id FROM people) p USING (internal_customer_id)
    ORDER BY m.seq_num
"""))
rows = {name: value for _, name, value in current.fetchall()}
if rows != {"city": "Lisboa", "email": "ana@example.com", "plan": "pro"}:
    sys.exit(f"unexpected current attributes: {rows}")
