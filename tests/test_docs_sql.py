"""The SQL of the docs runs: every ```sql block of docs/tables/*.md and docs/migrating.md, run in DuckDB against a
warehouse that ``cio_sync.load`` filled from a prefix of Customer.io-style version-4 exports (and cio_sync's own
``actions_v1_`` files), returns the rows it should: one row per key, the latest, and what the page says.

The exports hold, per table, an older row and a newer one of some keys (in two files, two syncs), a removed
attribute, a deleted person identified again (a new internal id), a suppressed person and a metric event exported
twice, so a query that does not take the latest row per key, or does not deduplicate, returns other rows.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cio_sync
from cio_sync.schemas.standard import current_views, latest_spec

ROOT = Path(__file__).resolve().parents[1]
WORKSPACE = 111528
#: Customer.io-style sequences (the one of SCHEMAS.md's example name, and the sync after it).
FIRST, SECOND = 241600000000311123, 241600000000311124
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


#: table -> (rows of the first sync, rows of the second); columns left out are null.
EXPORTS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "people": ([
        {"customer_id": "ana-42", "internal_customer_id": "cio-1", "deleted": False, "suppressed": False,
         "created_at": at(0), "updated_at": at(0), "email_addr": "ana@old.example"},
        {"customer_id": "bo-7", "internal_customer_id": "cio-2", "deleted": False, "suppressed": False,
         "created_at": at(0), "updated_at": at(1), "email_addr": "bo@example.com"},
        {"customer_id": "cy-9", "internal_customer_id": "cio-3", "deleted": False, "suppressed": False,
         "created_at": at(0), "updated_at": at(1), "email_addr": "cy@example.com"},
    ], [
        {"customer_id": "ana-42", "internal_customer_id": "cio-1", "deleted": False, "suppressed": False,
         "created_at": at(0), "updated_at": at(20), "email_addr": "ana@example.com"},
        # suppressed: the profile deleted, the identifier blocked, the email gone
        {"customer_id": "bo-7", "internal_customer_id": "cio-2", "deleted": True, "suppressed": True,
         "created_at": at(0), "updated_at": at(21), "email_addr": None},
        # deleted, then identified again: a new person with a new internal id
        {"customer_id": "cy-9", "internal_customer_id": "cio-3", "deleted": True, "suppressed": False,
         "created_at": at(0), "updated_at": at(22), "email_addr": None},
        {"customer_id": "cy-9", "internal_customer_id": "cio-4", "deleted": False, "suppressed": False,
         "created_at": at(23), "updated_at": at(23), "email_addr": "cy@new.example"},
    ]),
    "attributes": ([
        {"internal_customer_id": "cio-1", "attribute_name": "plan", "attribute_value": "trial", "timestamp": at(0)},
        {"internal_customer_id": "cio-1", "attribute_name": "city", "attribute_value": "Lisboa", "timestamp": at(0)},
        {"internal_customer_id": "cio-2", "attribute_name": "plan", "attribute_value": "pro", "timestamp": at(1)},
        {"internal_customer_id": "cio-3", "attribute_name": "plan", "attribute_value": "basic", "timestamp": at(1)},
    ], [
        {"internal_customer_id": "cio-1", "attribute_name": "plan", "attribute_value": "pro", "timestamp": at(20)},
        {"internal_customer_id": "cio-1", "attribute_name": "city", "attribute_value": None, "timestamp": at(20)},
        {"internal_customer_id": "cio-4", "attribute_name": "plan", "attribute_value": "basic", "timestamp": at(23)},
    ]),
    "campaigns": ([
        {"campaign_id": 7, "name": "Onboarding", "created_at": at(0), "updated_at": at(0), "version": 1,
         "topic_names": []},
    ], [
        {"campaign_id": 7, "name": "Onboarding v2", "created_at": at(0), "updated_at": at(20), "version": 2,
         "topic_names": ["product"]},
        {"campaign_id": 8, "name": "Winback", "created_at": at(20), "updated_at": at(20), "version": 1,
         "topic_names": []},
    ]),
    "broadcasts": ([
        {"broadcast_id": 3, "name": "News", "created_at": at(0), "updated_at": at(0), "topic_names": []},
    ], [
        {"broadcast_id": 3, "name": "News!", "created_at": at(0), "updated_at": at(20), "topic_names": ["news"]},
        {"broadcast_id": 4, "name": "Launch", "created_at": at(20), "updated_at": at(20), "topic_names": []},
    ]),
    "actions": ([
        {"action_id": 70, "campaign_id": 7, "action_type": "email", "name": "Welcome", "version": 1,
         "created_at": at(0), "updated_at": at(0)},
        {"action_id": 71, "campaign_id": 7, "action_type": "delay", "name": "Wait a day", "version": 1,
         "created_at": at(0), "updated_at": at(0)},
    ], [
        {"action_id": 70, "campaign_id": 7, "action_type": "email", "name": "Welcome!", "version": 2,
         "created_at": at(0), "updated_at": at(20)},
    ]),
    "subjects": ([
        {"subject_name": "s-1", "internal_customer_id": "cio-1", "campaign_type": "segment", "campaign_id": 7,
         "event_id": "ev-old", "created_at": at(2), "seq_num": 1},
    ], [
        {"subject_name": "s-1", "internal_customer_id": "cio-1", "campaign_type": "segment", "campaign_id": 7,
         "event_id": "ev-new", "created_at": at(24), "seq_num": 5},
        {"subject_name": "s-2", "internal_customer_id": "cio-4", "campaign_type": "event", "campaign_id": 8,
         "event_id": "ev-2", "created_at": at(24), "seq_num": 6},
    ]),
    "outputs": ([
        {"output_id": "o-1", "subject_name": "s-1", "output_type": "email", "action_id": 70, "delivery_id": "d-1",
         "explanation": "queued", "created_at": at(3), "seq_num": 2},
        {"output_id": "o-2", "subject_name": "s-1", "output_type": "delay", "action_id": 71, "created_at": at(3),
         "seq_num": 3},
    ], [
        {"output_id": "o-1", "subject_name": "s-1", "output_type": "email", "action_id": 70, "delivery_id": "d-1",
         "explanation": "sent", "created_at": at(25), "seq_num": 7},
        {"output_id": "o-3", "subject_name": "s-2", "output_type": "email", "delivery_id": "d-2",
         "created_at": at(25), "seq_num": 8},
    ]),
    "deliveries": ([
        {"delivery_id": "d-1", "internal_customer_id": "cio-1", "subject_id": "s-1", "delivery_type": "email",
         "campaign_id": 7, "action_id": 70, "content_id": 1, "created_at": at(3), "seq_num": 4},
    ], [
        {"delivery_id": "d-1", "internal_customer_id": "cio-1", "subject_id": "s-1", "delivery_type": "email",
         "campaign_id": 7, "action_id": 70, "content_id": 2, "created_at": at(25), "seq_num": 9},
        {"delivery_id": "d-2", "internal_customer_id": "cio-4", "subject_id": "s-2", "delivery_type": "email",
         "campaign_id": 8, "content_id": 3, "created_at": at(25), "seq_num": 10},
    ]),
    "delivery_contents": ([
        {"delivery_id": "d-1", "campaign_id": 7, "action_id": 70, "from": "team@example.com",
         "recipient": "ana@example.com", "subject": "Welcome", "body_plain": "Hi Ana!", "headers": "{}",
         "type": "email"},
    ], [
        {"delivery_id": "d-2", "campaign_id": 8, "from": "team@example.com", "recipient": "cy@new.example",
         "subject": "Come back", "headers": '{"X-Campaign": "8"}', "type": "email"},
    ]),
    "metrics": ([
        {"event_id": "m-1", "delivery_id": "d-1", "metric": "sent", "created_at": at(4), "seq_num": 11},
        {"event_id": "m-2", "delivery_id": "d-1", "metric": "opened", "created_at": at(5), "seq_num": 12},
    ], [
        # m-2 exported again (a retried sync): counted once
        {"event_id": "m-2", "delivery_id": "d-1", "metric": "opened", "created_at": at(5), "seq_num": 12},
        {"event_id": "m-3", "delivery_id": "d-1", "metric": "clicked", "created_at": at(6), "link_id": 1,
         "link_url": "https://example.com/start", "seq_num": 13, "proxied": False, "machine": False},
        {"event_id": "m-4", "delivery_id": "d-2", "metric": "sent", "created_at": at(26), "seq_num": 14},
        {"event_id": "m-5", "delivery_id": "d-2", "metric": "deferred", "created_at": at(27), "seq_num": 15,
         "reason": "mailbox busy"},
    ]),
}

#: The rows each DuckDB statement returns that returns rows, per page, in the order the page has them.
EXPECTED: dict[str, list[list[tuple[Any, ...]]]] = {
    "people": [
        [("ana-42", "cio-1", False, False, "ana@example.com"), ("bo-7", "cio-2", True, True, None),
         ("cy-9", "cio-3", True, False, None), ("cy-9", "cio-4", False, False, "cy@new.example")],
        [("ana-42", "cio-1", "ana@example.com"), ("cy-9", "cio-4", "cy@new.example")],
        [("bo-7",)],
    ],
    "attributes": [
        [("cio-1", "plan", "pro"), ("cio-2", "plan", "pro"), ("cio-3", "plan", "basic"), ("cio-4", "plan", "basic")],
        [("ana-42", "plan", "pro"), ("cy-9", "plan", "basic")],
    ],
    "campaigns": [[(7, "Onboarding v2", 2, ["product"]), (8, "Winback", 1, [])]],
    "broadcasts": [[(3, "News!", ["news"]), (4, "Launch", [])]],
    "actions": [[(70, 7, "email", "Welcome!", 2), (71, 7, "delay", "Wait a day", 1)]],
    "subjects": [
        [("s-1", "cio-1", 7, "ev-new"), ("s-2", "cio-4", 8, "ev-2")],
        [("s-1", "ana-42", 7), ("s-2", "cy-9", 8)],
    ],
    "outputs": [
        [("o-1", "s-1", "email", "d-1", "sent"), ("o-2", "s-1", "delay", None, None),
         ("o-3", "s-2", "email", "d-2", None)],
        [("s-1", 7, "o-2", "delay"), ("s-1", 7, "o-1", "email"), ("s-2", 8, "o-3", "email")],
    ],
    "deliveries": [
        [("d-1", "cio-1", "s-1", "email", 2), ("d-2", "cio-4", "s-2", "email", 3)],
        [("d-1", "ana-42", "clicked", 1), ("d-1", "ana-42", "opened", 1), ("d-1", "ana-42", "sent", 1),
         ("d-2", "cy-9", "deferred", 1), ("d-2", "cy-9", "sent", 1)],
    ],
    "delivery_contents": [
        [("d-1", "email", "team@example.com", "ana@example.com", "Welcome"),
         ("d-2", "email", "team@example.com", "cy@new.example", "Come back")],
    ],
    "metrics": [
        [("m-1", "d-1", "sent", None), ("m-2", "d-1", "opened", None),
         ("m-3", "d-1", "clicked", "https://example.com/start"), ("m-4", "d-2", "sent", None),
         ("m-5", "d-2", "deferred", None)],
        [("d-1", "clicked", 1), ("d-1", "opened", 1), ("d-1", "sent", 1), ("d-2", "deferred", 1),
         ("d-2", "sent", 1)],
    ],
}
#: migrating.md: the statements that return rows, in its order.
EXPECTED["migrating"] = [
    [("ana-42", "ana@example.com"), ("cy-9", "cy@new.example")],
    [(7,)],
    [("ana-42", "cio-1", False, False, "ana@example.com")],
]

PAGES = {name: ROOT / "docs" / "tables" / f"{name}.md" for name in EXPORTS} | {
    "migrating": ROOT / "docs" / "migrating.md"}
#: What the docs call the bucket; the test's prefix is put in its place.
BUCKET = "s3://bucket/ws"


def sql_blocks(page: Path) -> list[str]:
    """The ```sql blocks of a page, those indented in a list item too."""
    found = re.findall(r"^( *)```sql\n(.*?)^\1```", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    return [textwrap.dedent(block) for _, block in found]


def statements(block: str) -> list[str]:
    """The statements of a block: each ends with ``;`` at the end of a line (the docs keep ``;`` out of comments)."""
    return [s.strip() for s in re.split(r";[ \t]*$", block, flags=re.MULTILINE) if s.strip()
            and not all(line.lstrip().startswith("--") for line in s.strip().splitlines())]


def export_file(table: str, rows: list[dict[str, Any]]) -> pa.Table:
    schema = latest_spec(table).schema
    full = [{"workspace_id": WORKSPACE, **{c: None for c in schema.names if c != "workspace_id"}, **r} for r in rows]
    return pa.Table.from_pylist(full, schema=schema)


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the prefix of exports, the DuckDB warehouse ``cio_sync.load`` filled from it)."""
    base = tmp_path_factory.mktemp("docs_sql")
    prefix = base / "ws"
    prefix.mkdir()
    for table, syncs in EXPORTS.items():
        version = latest_spec(table).version
        for sequence, rows in zip((FIRST, SECOND), syncs, strict=True):
            pq.write_table(export_file(table, rows), prefix / f"{table}_v{version}_{WORKSPACE}_{sequence}.parquet")
    db = base / "warehouse.duckdb"
    report = cio_sync.load(str(prefix), f"duckdb:///{db}")
    assert not report.quarantined
    assert report.tables == {t: len(a) + len(b) for t, (a, b) in EXPORTS.items()}
    return prefix, db


def run_page(page: str, prefix: Path, db: Path, tmp_path: Path) -> list[tuple[str, list[str], list[tuple[Any, ...]]]]:
    """Run every statement of the page's sql blocks on a copy of the warehouse: (statement, columns, rows) of each
    statement that returns rows."""
    copy = tmp_path / "w.duckdb"
    shutil.copy(db, copy)
    con = duckdb.connect(str(copy))
    try:
        con.execute("SET TimeZone = 'UTC'")
        results = []
        for block in sql_blocks(PAGES[page]):
            for sql in statements(block.replace(BUCKET, str(prefix))):
                cursor = con.execute(sql)
                first = next(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
                if first.split()[0].upper() in ("SELECT", "WITH"):
                    rows = [tuple(r) for r in cursor.fetchall()]
                    results.append((sql, [d[0] for d in cursor.description], rows))
        return results
    finally:
        con.close()


def test_every_table_page_and_the_migration_page_have_sql() -> None:
    for page, path in PAGES.items():
        assert sql_blocks(path), page


@pytest.mark.parametrize("page", list(PAGES))
def test_the_sql_of_the_page_runs_and_returns_the_latest_row_per_key(page: str, warehouse: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    prefix, db = warehouse
    results = run_page(page, prefix, db, tmp_path)
    assert [rows for _, _, rows in results] == EXPECTED[page]


@pytest.mark.parametrize(("view", "table"), [(v, t) for v, t, _ in current_views()])
def test_the_first_query_of_a_table_page_is_the_loaders_current_state_view(view: str, table: str,
                                                                            warehouse: tuple[Path, Path],
                                                                            tmp_path: Path) -> None:
    prefix, db = warehouse
    _, columns, rows = run_page(table, prefix, db, tmp_path)[0]
    con = duckdb.connect(str(db), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        names = ", ".join(f'"{c}"' for c in columns)
        from_view = [tuple(r) for r in con.execute(f"SELECT {names} FROM {view}").fetchall()]
    finally:
        con.close()
    assert sorted(rows, key=repr) == sorted(from_view, key=repr)
    # One row per key: the view's key columns that the query shows never repeat.
    key = [c for c in latest_spec(table).key if c in columns]
    assert key, table
    keyed = [tuple(r[columns.index(c)] for c in key) for r in rows]
    assert len(keyed) == len(set(keyed))
