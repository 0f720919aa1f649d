"""Version 4: the sink's Standard files are the files Customer.io's own exports are (shared/SCHEMAS.md, "Version 4").

For each table, the columns of SCHEMAS.md (written out in tests/test_standard.py, independently of the
implementation) are selected by name and in order from the sink's files in DuckDB, and read by position the way a
Redshift ``COPY ... FORMAT AS PARQUET`` into a table of those columns reads them; both give the rows recorded.
Also here: version 1's column names in ``record()`` (deprecated, for one release), ``customer_id`` resolution, the
open metric vocabulary, and sequences that continue above an earlier version's.
"""

from __future__ import annotations

import re
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

import cio_sync
from tests.conftest import Storage
from tests.test_standard import CONTRACT, NAME, VERSION, WORKSPACE, sink_for, tables

AT = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
LATER = datetime(2026, 11, 30, 10, 30, tzinfo=UTC)
#: Stands for a value the sink chose (a time it stamped, an internal id it made): compared as "not null".
SINK = object()

#: What each recordable table is given, and the row its file must then hold, column by column of SCHEMAS.md.
RECORDS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "campaigns": ({"campaign_id": 7, "name": "Onboarding", "created_at": AT, "updated_at": LATER,
                   "topic_names": ["product", "tips"]},
                  {"workspace_id": WORKSPACE, "campaign_id": 7, "name": "Onboarding", "created_at": AT,
                   "updated_at": LATER, "version": 1, "topic_names": ["product", "tips"]}),
    "actions": ({"action_id": 70, "campaign_id": 7, "action_type": "email", "name": "Welcome", "created_at": AT,
                 "updated_at": AT},
                {"workspace_id": WORKSPACE, "action_id": 70, "campaign_id": 7, "broadcast_id": None,
                 "action_type": "email", "name": "Welcome", "version": 1, "created_at": AT, "updated_at": AT}),
    "broadcasts": ({"broadcast_id": 3, "name": "News", "created_at": AT, "updated_at": AT},
                   {"workspace_id": WORKSPACE, "broadcast_id": 3, "name": "News", "created_at": AT,
                    "updated_at": AT, "topic_names": []}),
    "subjects": ({"subject_name": "s-ana-7", "customer_id": "ana-42", "campaign_type": "segment",
                  "campaign_id": 7, "event_id": "ev-1", "trigger_id": 5, "started_campaign_at": AT,
                  "created_at": AT, "seq_num": 11},
                 {"workspace_id": WORKSPACE, "subject_name": "s-ana-7", "internal_customer_id": SINK,
                  "campaign_type": "segment", "campaign_id": 7, "event_id": "ev-1", "trigger_id": 5,
                  "started_campaign_at": AT, "created_at": AT, "seq_num": 11}),
    "outputs": ({"output_id": "o-1", "subject_name": "s-ana-7", "output_type": "email", "action_id": 70,
                 "explanation": "sent", "delivery_id": "d-1", "draft": False, "link_tracked": True,
                 "split_test_index": 0, "delay_ends_at": LATER, "branch_index": 1, "manual_segment_id": 12,
                 "add_to_manual_segment": True, "created_at": AT, "seq_num": 12},
                {"workspace_id": WORKSPACE, "output_id": "o-1", "subject_name": "s-ana-7", "output_type": "email",
                 "action_id": 70, "explanation": "sent", "delivery_id": "d-1", "draft": False,
                 "link_tracked": True, "split_test_index": 0, "delay_ends_at": LATER, "branch_index": 1,
                 "manual_segment_id": 12, "add_to_manual_segment": True, "created_at": AT, "seq_num": 12}),
    "deliveries": ({"delivery_id": "d-1", "customer_id": "ana-42", "subject_id": "s-ana-7", "event_id": "ev-1",
                    "delivery_type": "email", "campaign_id": 7, "action_id": 70, "content_id": 2,
                    "trigger_id": 5, "created_at": AT, "transactional_message_id": 9, "seq_num": 13},
                   {"workspace_id": WORKSPACE, "delivery_id": "d-1", "internal_customer_id": SINK,
                    "subject_id": "s-ana-7", "event_id": "ev-1", "delivery_type": "email", "campaign_id": 7,
                    "action_id": 70, "newsletter_id": None, "content_id": 2, "trigger_id": 5, "created_at": AT,
                    "transactional_message_id": 9, "seq_num": 13}),
    "delivery_contents": ({"delivery_id": "d-1", "campaign_id": 7, "action_id": 70, "content_id": 2,
                           "from": "team@example.com", "reply_to": "help@example.com", "bcc": "audit@example.com",
                           "recipient": "ana@example.com", "subject": "Welcome, Ana", "body": "<p>Hi Ana!</p>",
                           "body_plain": "Hi Ana!", "preheader": "Start here", "headers": {"X-Campaign": "7"},
                           "type": "email"},
                          {"workspace_id": WORKSPACE, "delivery_id": "d-1", "campaign_id": 7, "action_id": 70,
                           "newsletter_id": None, "content_id": 2, "from": "team@example.com",
                           "reply_to": "help@example.com", "bcc": "audit@example.com",
                           "recipient": "ana@example.com", "subject": "Welcome, Ana", "body": "<p>Hi Ana!</p>",
                           "body_amp": None, "body_plain": "Hi Ana!", "preheader": "Start here", "url": None,
                           "method": None, "headers": '{"X-Campaign":"7"}', "type": "email"}),
    "metrics": ({"event_id": "m-1", "delivery_id": "d-1", "metric": "clicked", "created_at": LATER,
                 "link_id": 1, "link_url": "https://example.com/start", "seq_num": 14, "proxied": False,
                 "prefetched": False, "machine": False, "user_agent": "Mozilla/5.0", "email_client": "Gmail",
                 "inbox_domain": "example.com", "inbox_provider": "Google", "mx_host": "mx.example.com"},
                {"event_id": "m-1", "workspace_id": WORKSPACE, "delivery_id": "d-1", "metric": "clicked",
                 "created_at": LATER, "reason": None, "link_id": 1, "link_url": "https://example.com/start",
                 "seq_num": 14, "proxied": False, "prefetched": False, "machine": False,
                 "user_agent": "Mozilla/5.0", "email_client": "Gmail", "inbox_domain": "example.com",
                 "inbox_provider": "Google", "mx_host": "mx.example.com"}),
}


def expected(table: str, cio_id: str) -> tuple[Any, ...]:
    _, row = RECORDS[table]
    return tuple(cio_id if row[c] is SINK else row[c] for c, _ in CONTRACT[table])


def write_every_table(storage: Storage) -> str:
    """One person (identify), then one row of each recordable table; returns the person's internal id."""
    with sink_for(storage) as sink:
        sink.write({"type": "identify", "userId": "ana-42", "traits": {"email": "ana@example.com", "plan": "pro"}})
        cio_id = str(sink.person("ana-42")["cio_id"])
        for table, (given, _) in RECORDS.items():
            assert sink.record(table, given) == 1, table
    return cio_id


def duck_type(kind: pa.DataType) -> str:
    return {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.bool_(): "BOOLEAN",
            pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ", pa.list_(pa.string()): "VARCHAR[]"}[kind]


@pytest.fixture
def written(local_storage: Storage) -> tuple[Path, str]:
    cio_id = write_every_table(local_storage)
    return Path(local_storage.url), cio_id


def _files(root: Path, table: str) -> str:
    [path] = root.glob(f"{table}_v{VERSION[table]}_{WORKSPACE}_*.parquet")
    assert NAME.match(path.name), path.name
    return str(path)


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    return con


def _people_and_attributes(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple[Any, ...]]:
    # The sink stamps people's and attributes' times itself: compare them as present.
    return [tuple(SINK if isinstance(v, datetime) else v for v in row) for row in con.execute(sql).fetchall()]


@pytest.mark.parametrize("table", list(RECORDS))
def test_each_recorded_table_reads_by_the_contract_names_in_order(written: tuple[Path, str], table: str) -> None:
    root, cio_id = written
    columns = ", ".join(f'"{c}"' for c, _ in CONTRACT[table])
    con = _connect()
    rows = con.execute(f"SELECT {columns} FROM read_parquet('{_files(root, table)}')").fetchall()
    assert rows == [expected(table, cio_id)]
    # The file has exactly these columns, in this order: nothing before, between or after them.
    described = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{_files(root, table)}')").fetchall()
    assert [d[0] for d in described] == [c for c, _ in CONTRACT[table]]


@pytest.mark.parametrize("table", list(RECORDS))
def test_each_recorded_table_reads_by_position_as_a_redshift_copy_does(written: tuple[Path, str],
                                                                      table: str) -> None:
    # A table of the contract's columns under other names, filled by position: a file with a column more, less or
    # out of order fails or lands in the wrong column.
    root, cio_id = written
    con = _connect()
    columns = ", ".join(f"c{i} {duck_type(k)}" for i, (_, k) in enumerate(CONTRACT[table]))
    con.execute(f"CREATE TABLE target ({columns})")
    con.execute(f"INSERT INTO target SELECT * FROM read_parquet('{_files(root, table)}')")
    assert con.execute("SELECT * FROM target").fetchall() == [expected(table, cio_id)]


def test_people_and_attributes_read_by_name_and_by_position(written: tuple[Path, str]) -> None:
    root, cio_id = written
    con = _connect()
    people = ", ".join(c for c, _ in CONTRACT["people"])
    want = [(WORKSPACE, "ana-42", cio_id, False, False, SINK, SINK, "ana@example.com")]
    assert _people_and_attributes(con, f"SELECT {people} FROM read_parquet('{_files(root, 'people')}')") == want
    attributes = ", ".join(c for c, _ in CONTRACT["attributes"])
    got = _people_and_attributes(con, f"SELECT {attributes} FROM read_parquet('{_files(root, 'attributes')}') "
                                      "ORDER BY attribute_name")
    assert got == [(WORKSPACE, cio_id, "email", "ana@example.com", SINK), (WORKSPACE, cio_id, "plan", "pro", SINK)]
    for table, want_rows in (("people", want), ("attributes", got)):
        con.execute(f"CREATE TABLE {table}_target "
                    f"({', '.join(f'c{i} {duck_type(k)}' for i, (_, k) in enumerate(CONTRACT[table]))})")
        con.execute(f"INSERT INTO {table}_target SELECT * FROM read_parquet('{_files(root, table)}')")
        order = " ORDER BY c2" if table == "attributes" else ""
        assert _people_and_attributes(con, f"SELECT * FROM {table}_target{order}") == want_rows


def test_the_loaded_warehouse_has_the_contract_columns_and_the_views_work(local_storage: Storage,
                                                                          tmp_path: Path) -> None:
    cio_id = write_every_table(local_storage)
    db = tmp_path / "w.duckdb"
    report = cio_sync.load(local_storage.url, f"duckdb:///{db}")
    assert report.quarantined == []
    con = duckdb.connect(str(db))
    con.execute("SET TimeZone = 'UTC'")
    for table in RECORDS:
        columns = ", ".join(f'"{c}"' for c, _ in CONTRACT[table])
        assert con.execute(f'SELECT {columns} FROM "{table}"').fetchall() == [expected(table, cio_id)], table
        assert [d[0] for d in con.execute(f'DESCRIBE "{table}"').fetchall()] == [c for c, _ in CONTRACT[table]]
    assert con.execute("SELECT customer_id, email_addr FROM people_current").fetchall() == [
        ("ana-42", "ana@example.com")]
    assert con.execute("SELECT subject_id FROM deliveries_current").fetchall() == [("s-ana-7",)]
    assert con.execute("SELECT metric FROM metrics_unique").fetchall() == [("clicked",)]
    assert con.execute("SELECT count(*) FROM attributes_current").fetchall() == [(2,)]
    assert con.execute("SELECT internal_customer_id FROM subjects_current").fetchall() == [(cio_id,)]


# -- record() with version 1's names ---------------------------------------------------------------------------

@pytest.mark.parametrize(("table", "old", "new"), [
    ("deliveries", {"delivery_id": "d", "delivery_type": "email", "subject_name": "s1"}, {"subject_id": "s1"}),
    ("deliveries", {"delivery_id": "d", "delivery_type": "email", "external_customer_id": "ana-42"},
     {"internal_customer_id": SINK}),
    ("delivery_contents", {"delivery_id": "d", "delivery_type": "sms", "recipients": "+351900000000"},
     {"type": "sms", "recipient": "+351900000000"}),
    ("subjects", {"subject_name": "s", "campaign_id": 1, "external_customer_id": "ana-42"},
     {"internal_customer_id": SINK}),
])
def test_version_1_names_are_taken_with_a_deprecation_warning(memory_storage: Storage, scratch: Path, table: str,
                                                              old: dict[str, Any], new: dict[str, Any]) -> None:
    with sink_for(memory_storage) as sink:
        sink.write({"type": "identify", "userId": "ana-42"})
        cio_id = sink.person("ana-42")["cio_id"]
        with pytest.warns(DeprecationWarning, match=r"version 1's; version 4 names it") as caught:
            assert sink.record(table, old) == 1
        assert all(w.filename == __file__ for w in caught)  # the warning points at the caller's line
    [row] = tables(memory_storage, scratch)[table]
    assert {c: row[c] for c in new} == {c: cio_id if v is SINK else v for c, v in new.items()}
    assert set(row) == {c for c, _ in CONTRACT[table]}


@pytest.mark.parametrize(("table", "row", "column"), [
    ("campaigns", {"campaign_id": 1, "state": "running"}, "state"),
    ("broadcasts", {"broadcast_id": 1, "type": "newsletter"}, "type"),
    ("delivery_contents", {"delivery_id": "d", "created_at": "2026-11-30T09:00:00Z"}, "created_at"),
])
def test_version_1_columns_that_version_4_has_not_are_dropped_with_a_warning(memory_storage: Storage,
                                                                             scratch: Path, table: str,
                                                                             row: dict[str, Any],
                                                                             column: str) -> None:
    with sink_for(memory_storage) as sink, pytest.warns(DeprecationWarning, match=f"column '{column}'.*no such"):
        assert sink.record(table, row) == 1
    [written] = tables(memory_storage, scratch)[table]
    assert set(written) == {c for c, _ in CONTRACT[table]}


def test_a_row_with_both_names_of_a_column_is_refused(memory_storage: Storage) -> None:
    with sink_for(memory_storage) as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(cio_sync.InvalidRecord, match=r"both subject_name .* and subject_id") as caught:
            sink.record("deliveries", {"delivery_id": "d", "delivery_type": "email", "subject_name": "a",
                                       "subject_id": "b"})
        assert (caught.value.table, caught.value.column) == ("deliveries", "subject_name")


def test_customer_id_resolves_to_the_internal_id_and_must_agree_with_it(memory_storage: Storage,
                                                                        scratch: Path) -> None:
    with sink_for(memory_storage) as sink:
        sink.write({"type": "identify", "userId": "ana-42"})
        sink.write({"type": "identify", "userId": "bo-7"})
        ana, bo = sink.person("ana-42")["cio_id"], sink.person("bo-7")["cio_id"]
        assert sink.record("deliveries", {"delivery_id": "d1", "delivery_type": "email", "customer_id": "ana-42",
                                          "internal_customer_id": ana}) == 1
        with pytest.raises(cio_sync.InvalidRecord, match="not the row's internal_customer_id") as caught:
            sink.record("deliveries", {"delivery_id": "d2", "delivery_type": "email", "customer_id": "ana-42",
                                       "internal_customer_id": bo})
        assert caught.value.column == "customer_id"
        with pytest.raises(cio_sync.InvalidRecord, match="names no person"):
            sink.record("subjects", {"subject_name": "s", "campaign_id": 1, "customer_id": "nobody"})
        assert sink.stats.calls_rejected == 2
        # An internal id is written as given: the person may be one the workspace no longer knows.
        assert sink.record("subjects", {"subject_name": "s", "campaign_id": 1, "internal_customer_id": "gone"}) == 1
    found = tables(memory_storage, scratch)
    assert [r["internal_customer_id"] for r in found["deliveries"]] == [ana]
    assert [r["internal_customer_id"] for r in found["subjects"]] == ["gone"]


@pytest.mark.parametrize("metric", ["deferred", "suppressed", "human_opened", "webhook_clicked2", "sent"])
def test_metrics_take_any_lowercase_metric_word(memory_storage: Storage, scratch: Path, metric: str) -> None:
    with sink_for(memory_storage) as sink:
        assert sink.record("metrics", {"event_id": "e", "delivery_id": "d", "metric": metric}) == 1
    assert [r["metric"] for r in tables(memory_storage, scratch)["metrics"]] == [metric]


@pytest.mark.parametrize("metric", ["", "Opened", "2xx", "was opened", "opened!", "é"])
def test_metrics_refuse_what_is_not_a_lowercase_word(memory_storage: Storage, metric: str) -> None:
    with sink_for(memory_storage) as sink:
        with pytest.raises(cio_sync.InvalidRecord) as caught:
            sink.record("metrics", {"event_id": "e", "delivery_id": "d", "metric": metric})
        assert (caught.value.table, caught.value.column) == ("metrics", "metric")


def test_topic_names_are_a_list_of_strings_and_default_to_empty(memory_storage: Storage, scratch: Path) -> None:
    with sink_for(memory_storage) as sink:
        assert sink.record("campaigns", {"campaign_id": 1, "topic_names": ("news", "tips")}) == 1
        assert sink.record("campaigns", {"campaign_id": 1, "topic_names": ["news", "tips"]}) == 0  # no change
        assert sink.record("campaigns", {"campaign_id": 1}) == 1  # none now: a change, an empty list
        assert sink.record("broadcasts", {"broadcast_id": 1, "topic_names": None}) == 1
        with pytest.raises(cio_sync.InvalidRecord, match="an item is not valid Unicode text"):
            sink.record("broadcasts", {"broadcast_id": 2, "topic_names": ["\ud800"]})
    found = tables(memory_storage, scratch)
    assert [(r["topic_names"], r["version"]) for r in found["campaigns"]] == [(["news", "tips"], 1), ([], 2)]
    assert [r["topic_names"] for r in found["broadcasts"]] == [[]]


# -- sequences across versions ---------------------------------------------------------------------------------

def test_version_4_sequences_start_above_every_version_1_sequence(local_storage: Storage) -> None:
    # A prefix whose version-1 counters ran ahead of the clock (a writer whose clock was fast, or many files):
    # the first version-4 file and manifest still sort after every version-1 one.
    root = Path(local_storage.url)
    ahead = 9_000_000_000_000_000
    for key in (f"people_v1_{WORKSPACE}", f"attributes_v1_{WORKSPACE}", f"manifest_v1_{WORKSPACE}"):
        folder = root / "_cio_sync" / "counters" / key
        folder.mkdir(parents=True)
        (folder / f"{ahead:020d}").write_bytes(b'{"by": "the release before version 4"}')
    with sink_for(local_storage) as sink:
        sink.write({"type": "identify", "userId": "ana-42", "traits": {"plan": "pro"}})
    names = [p.name for p in root.glob("*.parquet")]
    assert sorted(re.sub(r"_\d+\.parquet$", "", n) for n in names) == [f"attributes_v4_{WORKSPACE}",
                                                                       f"people_v4_{WORKSPACE}"]
    assert all(int(NAME.match(n)["sequence"]) > ahead for n in names)  # type: ignore[index]
    [manifest] = (root / "_manifests").glob("manifest_v4_*.json")
    assert int(manifest.stem.rsplit("_", 1)[1]) > ahead
