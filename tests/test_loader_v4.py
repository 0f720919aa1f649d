"""The loader and version 4: Customer.io-style ``_v4_`` exports load with the columns of shared/SCHEMAS.md, in its
order; version-1 files written by the sink and version-4 files of one table land in one table shaped as version 4;
a warehouse an earlier release loaded with version-1 tables is upgraded in place with nothing lost."""

from __future__ import annotations

import re
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cio_sync
from cio_sync.loader.targets import LOAD_STATE_TABLE, _create_table_sql, _pg_view
from cio_sync.schemas.standard import (
    STANDARD_TABLES,
    STANDARD_V1_TABLES,
    STANDARD_V4_TABLES,
    current_views,
    latest_spec,
    standard_spec,
)
from tests.conftest import Storage

S, N, B = pa.string(), pa.int64(), pa.bool_()
T = pa.timestamp("us", tz="UTC")
L = pa.list_(pa.string())

#: Version 4 as shared/SCHEMAS.md gives it, typed by the families it names (string, int64, bool, timestamp, list of
#: strings), written out here rather than taken from the specs so that the specs are checked against it.
V4: dict[str, list[tuple[str, pa.DataType]]] = {
    "people": [("workspace_id", N), ("customer_id", S), ("internal_customer_id", S), ("deleted", B),
               ("suppressed", B), ("created_at", T), ("updated_at", T), ("email_addr", S)],
    "attributes": [("workspace_id", N), ("internal_customer_id", S), ("attribute_name", S),
                   ("attribute_value", S), ("timestamp", T)],
    "subjects": [("workspace_id", N), ("subject_name", S), ("internal_customer_id", S), ("campaign_type", S),
                 ("campaign_id", N), ("event_id", S), ("trigger_id", N), ("started_campaign_at", T),
                 ("created_at", T), ("seq_num", N)],
    "outputs": [("workspace_id", N), ("output_id", S), ("subject_name", S), ("output_type", S), ("action_id", N),
                ("explanation", S), ("delivery_id", S), ("draft", B), ("link_tracked", B), ("split_test_index", N),
                ("delay_ends_at", T), ("branch_index", N), ("manual_segment_id", N), ("add_to_manual_segment", B),
                ("created_at", T), ("seq_num", N)],
    "deliveries": [("workspace_id", N), ("delivery_id", S), ("internal_customer_id", S), ("subject_id", S),
                   ("event_id", S), ("delivery_type", S), ("campaign_id", N), ("action_id", N),
                   ("newsletter_id", N), ("content_id", N), ("trigger_id", N), ("created_at", T),
                   ("transactional_message_id", N), ("seq_num", N)],
    "delivery_contents": [("workspace_id", N), ("delivery_id", S), ("campaign_id", N), ("action_id", N),
                          ("newsletter_id", N), ("content_id", N), ("from", S), ("reply_to", S), ("bcc", S),
                          ("recipient", S), ("subject", S), ("body", S), ("body_amp", S), ("body_plain", S),
                          ("preheader", S), ("url", S), ("method", S), ("headers", S), ("type", S)],
    "metrics": [("event_id", S), ("workspace_id", N), ("delivery_id", S), ("metric", S), ("created_at", T),
                ("reason", S), ("link_id", N), ("link_url", S), ("seq_num", N), ("proxied", B),
                ("prefetched", B), ("machine", B), ("user_agent", S), ("email_client", S), ("inbox_domain", S),
                ("inbox_provider", S), ("mx_host", S)],
    "campaigns": [("workspace_id", N), ("campaign_id", N), ("name", S), ("created_at", T), ("updated_at", T),
                  ("version", N), ("topic_names", L)],
    "broadcasts": [("workspace_id", N), ("broadcast_id", N), ("name", S), ("created_at", T), ("updated_at", T),
                   ("topic_names", L)],
}

#: Every v1 -> v4 difference, column by column: renamed columns and v1 columns with no v4 counterpart.
RENAMED = {"people": {"external_customer_id": "customer_id"}, "deliveries": {"subject_name": "subject_id"},
           "delivery_contents": {"recipients": "recipient", "delivery_type": "type"}}
DROPPED = {"attributes": ("external_customer_id",), "subjects": ("external_customer_id",),
           "deliveries": ("external_customer_id",), "delivery_contents": ("created_at",),
           "campaigns": ("type", "state"), "broadcasts": ("type",)}

WORKSPACE = 111528
AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def sample(column: str, kind: pa.DataType, row: int) -> Any:
    """A value of ``kind`` for ``column`` in row ``row`` (0 or 1): distinct per row, never null."""
    if column == "workspace_id":
        return WORKSPACE
    if pa.types.is_timestamp(kind):
        return AT + timedelta(minutes=row, seconds=len(column))
    if pa.types.is_boolean(kind):
        return row == 1
    if pa.types.is_integer(kind):
        return 100 * row + len(column)
    if pa.types.is_list(kind):
        return [] if row == 0 else ["product", "news"]
    if column == "headers":
        return f'{{"X-Row": "{row}"}}'
    return f"{column}-{row}"


def expected(table: str) -> list[tuple[Any, ...]]:
    return [tuple(sample(c, k, row) for c, k in V4[table]) for row in (0, 1)]


def put(storage: Storage, name: str, table: pa.Table) -> None:
    out = pa.BufferOutputStream()
    pq.write_table(table, out)
    storage.fs.pipe_file(f"{storage.root}/{name}", out.getvalue().to_pybytes())


def v4_file(table: str, columns: list[tuple[str, pa.DataType]] | None = None) -> pa.Table:
    """Two rows of ``table`` as Customer.io writes them: the SCHEMAS.md columns, in its order."""
    columns = columns or V4[table]
    return pa.table({c: pa.array([sample(c, k, row) for row in (0, 1)], k) for c, k in columns},
                    schema=pa.schema([pa.field(c, k) for c, k in columns]))


def duck_rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        return [tuple(r) for r in con.execute(sql).fetchall()]
    finally:
        con.close()


def duck_columns(db: Path, sql: str) -> list[str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return [d[0] for d in con.execute(sql).description]
    finally:
        con.close()


def quoted(names: list[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


# -- the specs ------------------------------------------------------------------------------------------------------

def test_the_v4_specs_are_schemas_md_version_4() -> None:
    assert list(STANDARD_V4_TABLES) == ["people", "attributes", "campaigns", "broadcasts", "subjects", "outputs",
                                        "deliveries", "delivery_contents", "metrics"]
    for name, columns in V4.items():
        spec = standard_spec(name, 4)
        assert spec is not None
        assert (spec.mode, spec.version) == ("standard", 4)
        assert [(f.name, f.type) for f in spec.schema] == columns, name
        assert dict(spec.renamed) == RENAMED.get(name, {}), name
        assert spec.dropped == DROPPED.get(name, ()), name
    assert standard_spec("actions", 4) is None
    assert latest_spec("actions") is STANDARD_TABLES["actions"]
    # What the sink writes: version 4, and actions (cio_sync's own table) in version 1.
    assert {n: s.version for n, s in STANDARD_TABLES.items()} == {n: 1 if n == "actions" else 4
                                                                 for n in STANDARD_TABLES}
    assert all(STANDARD_TABLES[n] is spec for n, spec in STANDARD_V4_TABLES.items())


def test_every_v1_column_is_in_v4_renamed_or_dropped_with_its_type() -> None:
    for name, v4 in STANDARD_V4_TABLES.items():
        v1 = STANDARD_V1_TABLES[name]
        for f in v1.schema:
            if f.name in v4.dropped:
                assert f.name not in v4.schema.names
                continue
            assert v4.schema.field(v4.renamed.get(f.name, f.name)).type == f.type, (name, f.name)


# -- Customer.io-style version 4 exports ----------------------------------------------------------------------------

@pytest.mark.parametrize("table", list(V4))
def test_a_v4_export_loads_with_the_schemas_md_columns_by_name_and_by_position(memory_storage: Storage,
                                                                               tmp_path: Path, table: str) -> None:
    put(memory_storage, f"{table}_v4_{WORKSPACE}_241600000000311123.parquet", v4_file(table))
    db = tmp_path / "w.duckdb"
    report = cio_sync.load(memory_storage.url, f"duckdb:///{db}")
    assert report.tables == {table: 2}
    assert not report.quarantined
    names = [c for c, _ in V4[table]]
    order = quoted([c for c in names if c in ("seq_num", "updated_at", "timestamp", "created_at")][:1] or names)
    assert duck_rows(db, f'SELECT {quoted(names)} FROM "{table}" ORDER BY {order}') == expected(table)
    # Positional: SELECT * gives the version-4 columns, in order, and nothing else (a warehouse gains version 1's
    # own columns only when it loads a version-1 file).
    assert duck_columns(db, f'SELECT * FROM "{table}"') == names
    assert duck_rows(db, f'SELECT * FROM "{table}" ORDER BY {order}') == expected(table)


def test_metrics_of_an_older_export_without_the_bot_columns_load_with_them_null(memory_storage: Storage,
                                                                                 tmp_path: Path) -> None:
    older = V4["metrics"][:9]
    put(memory_storage, f"metrics_v4_{WORKSPACE}_1.parquet", v4_file("metrics", older))
    put(memory_storage, f"metrics_v4_{WORKSPACE}_2.parquet", v4_file("metrics"))  # a newer export
    db = tmp_path / "w.duckdb"
    assert not cio_sync.load(memory_storage.url, f"duckdb:///{db}").quarantined
    bots = quoted([c for c, _ in V4["metrics"][9:]])
    rows = duck_rows(db, f"SELECT {bots} FROM metrics ORDER BY seq_num, proxied NULLS FIRST")
    assert rows == [(None,) * 8, expected("metrics")[0][9:], (None,) * 8, expected("metrics")[1][9:]]
    # metrics_unique keeps one row per event_id.
    assert duck_rows(db, "SELECT count(*) FROM metrics_unique") == [(2,)]


def test_topic_names_load_as_a_list_of_strings(memory_storage: Storage, tmp_path: Path) -> None:
    put(memory_storage, f"campaigns_v4_{WORKSPACE}_5.parquet", v4_file("campaigns"))
    put(memory_storage, f"broadcasts_v4_{WORKSPACE}_5.parquet", v4_file("broadcasts"))
    db = tmp_path / "w.duckdb"
    cio_sync.load(memory_storage.url, f"duckdb:///{db}")
    for table in ("campaigns", "broadcasts"):
        assert duck_rows(db, f"SELECT typeof(topic_names) FROM {table} LIMIT 1") == [("VARCHAR[]",)]
        assert duck_rows(db, f"SELECT topic_names FROM {table} ORDER BY created_at") == [
            ([],), (["product", "news"],)]


# -- version 1 from the sink and version 4 in one prefix ------------------------------------------------------------

class Target:
    """A load target: a DuckDB file, or a fresh database on the test PostgreSQL server."""

    def __init__(self, into: str, kind: str) -> None:
        self.into, self.kind = into, kind

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self.kind == "duckdb":
            return duck_rows(Path(self.into.removeprefix("duckdb:///")), sql)
        import psycopg

        with psycopg.connect(self.into) as con:
            return [tuple(r) for r in con.execute(sql).fetchall()]

    def run(self, sql: str, params: list[Any] | None = None) -> None:
        if self.kind == "duckdb":
            con = duckdb.connect(self.into.removeprefix("duckdb:///"))
            try:
                con.execute(sql, params or [])
            finally:
                con.close()
            return
        import psycopg

        with psycopg.connect(self.into, autocommit=True) as pg:
            pg.execute(sql, params)


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "duckdb":
        return Target(f"duckdb:///{tmp_path}/w.duckdb", "duckdb")
    import psycopg

    server = request.getfixturevalue("postgres_server")
    name = f"w_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.dsn, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return Target(server.dsn.rsplit("/", 1)[0] + f"/{name}", "postgres")


NAME = re.compile(r"(?P<table>[a-z_]+)_v(?P<version>\d+)_(?P<workspace>\d+)_(?P<sequence>\d+)\.parquet")


def sink_v1_files(storage: Storage) -> dict[str, int]:
    """Version-1 files of people, attributes, subjects and deliveries, as the release before version 4 wrote them
    (its column lists, in its order: STANDARD_V1_TABLES; tests/test_v1_release.py reads files that release itself
    made); returns the highest sequence of each table's files."""
    # Without manifests: the version-4 files the tests add beside them are exports, which come with none.
    at = datetime(2026, 1, 1, tzinfo=UTC)
    rows = {
        "people": [{"internal_customer_id": "c0ffee0000000001", "external_customer_id": "u1",
                    "email_addr": "old@example.com", "deleted": False, "suppressed": False, "created_at": at,
                    "updated_at": at}],
        "attributes": [{"internal_customer_id": "c0ffee0000000001", "external_customer_id": "u1",
                        "attribute_name": name, "attribute_value": value, "timestamp": at}
                       for name, value in (("email", "old@example.com"), ("plan", "free"))],
        "subjects": [{"subject_name": "s1", "internal_customer_id": "c0ffee0000000001",
                      "external_customer_id": "u1", "campaign_id": 1, "created_at": at, "seq_num": 1}],
        "deliveries": [{"delivery_id": "d1", "internal_customer_id": "c0ffee0000000001",
                        "external_customer_id": "u1", "subject_name": "s1", "delivery_type": "email",
                        "campaign_id": 1, "created_at": at, "seq_num": 2}],
    }
    last: dict[str, int] = {}
    for sequence, (table, found) in enumerate(rows.items(), start=1_767_225_600_000_000):
        schema = STANDARD_V1_TABLES[table].schema
        put(storage, f"{table}_v1_{WORKSPACE}_{sequence}.parquet", pa.Table.from_pylist(
            [{c: {"workspace_id": WORKSPACE, **row}.get(c) for c in schema.names} for row in found], schema=schema))
        last[table] = sequence
    return last


def test_v1_files_of_the_sink_and_v4_files_load_into_one_table_and_the_views_take_the_latest(
        memory_storage: Storage, target: Target) -> None:
    last = sink_v1_files(memory_storage)
    later = datetime.now(UTC) + timedelta(days=1)  # after the sink's rows, which it stamped when it made them
    # The person's cio_id, as the sink assigned it.
    first = cio_sync.load(memory_storage.url, target.into)
    assert not first.quarantined
    [(cio_id,)] = target.rows("SELECT internal_customer_id FROM people")

    def v4(table: str, row: dict[str, Any]) -> None:
        schema = pa.schema([pa.field(c, k) for c, k in V4[table]])
        put(memory_storage, f"{table}_v4_{WORKSPACE}_{last[table] + 1}.parquet",
            pa.Table.from_pylist([{c: row.get(c) for c in schema.names}], schema=schema))

    v4("people", {"workspace_id": WORKSPACE, "customer_id": "u1", "internal_customer_id": cio_id, "deleted": False,
                  "suppressed": False, "created_at": later, "updated_at": later, "email_addr": "new@example.com"})
    v4("attributes", {"workspace_id": WORKSPACE, "internal_customer_id": cio_id, "attribute_name": "plan",
                      "attribute_value": "pro", "timestamp": later})
    v4("subjects", {"workspace_id": WORKSPACE, "subject_name": "s1", "internal_customer_id": cio_id,
                    "campaign_id": 1, "campaign_type": "event", "created_at": later, "seq_num": 1})
    v4("deliveries", {"workspace_id": WORKSPACE, "delivery_id": "d1", "internal_customer_id": cio_id,
                      "subject_id": "s1", "delivery_type": "email", "campaign_id": 1, "created_at": later,
                      "seq_num": 1, "transactional_message_id": 9})
    second = cio_sync.load(memory_storage.url, target.into)
    assert (second.files_loaded, second.quarantined) == (4, [])
    # One table each: the v1 row under the v4 names, its v1-only column kept; the v4 row leaves that column null.
    assert target.rows("SELECT customer_id, email_addr FROM people ORDER BY updated_at") == [
        ("u1", "old@example.com"), ("u1", "new@example.com")]
    assert target.rows("SELECT subject_id, external_customer_id, transactional_message_id FROM deliveries "
                       "ORDER BY created_at") == [("s1", "u1", None), ("s1", None, 9)]
    assert target.rows("SELECT external_customer_id FROM subjects ORDER BY created_at") == [("u1",), (None,)]
    # The views give the latest row across both versions.
    assert target.rows("SELECT customer_id, email_addr FROM people_current") == [("u1", "new@example.com")]
    assert target.rows("SELECT attribute_value FROM attributes_current WHERE attribute_name = 'plan'") == [("pro",)]
    assert target.rows("SELECT campaign_type FROM subjects_current") == [("event",)]
    assert target.rows("SELECT transactional_message_id FROM deliveries_current") == [(9,)]
    # The warehouse tables have the v4 columns first, in order.
    for table in ("people", "deliveries"):
        names = [r[0] for r in target.rows(
            "SELECT column_name FROM information_schema.columns WHERE table_name = "
            f"'{table}' AND table_schema = current_schema() ORDER BY ordinal_position")]
        assert names == [c for c, _ in V4[table]] + list(DROPPED.get(table, ())), table


def test_a_v1_file_with_both_the_old_and_the_new_name_is_quarantined(memory_storage: Storage,
                                                                      tmp_path: Path) -> None:
    put(memory_storage, f"people_v1_{WORKSPACE}_1.parquet", pa.table({
        "workspace_id": [WORKSPACE], "internal_customer_id": ["c1"], "external_customer_id": ["u1"],
        "customer_id": ["u2"]}))
    report = cio_sync.load(memory_storage.url, f"duckdb:///{tmp_path}/w.duckdb")
    [bad] = report.quarantined
    assert "'external_customer_id'" in bad.reason
    assert "'customer_id'" in bad.reason


# -- a warehouse an earlier release loaded --------------------------------------------------------------------------

def old_warehouse(storage: Storage, target: Target) -> dict[str, int]:
    """The warehouse the loader of the previous release (main before version 4) made of the sink's version-1 files:
    each table created from its version-1 spec, the file's rows inserted by name, a load-state row per file and the
    views of then. Returns the rows per table."""
    sink_v1_files(storage)
    dialect = target.kind
    target.run(f"CREATE TABLE {LOAD_STATE_TABLE} (source TEXT NOT NULL, name TEXT NOT NULL, table_name TEXT NOT "
               "NULL, rows BIGINT NOT NULL, loaded_at TIMESTAMPTZ NOT NULL, status TEXT NOT NULL DEFAULT "
               "'loaded', reason TEXT, PRIMARY KEY (source, name))")
    counts: dict[str, int] = {}
    for path in sorted(storage.fs.ls(storage.root, detail=False)):
        name = str(path).rsplit("/", 1)[-1]
        match = NAME.fullmatch(name)
        if not match:
            continue
        table, spec = match["table"], STANDARD_V1_TABLES[match["table"]]
        rows = pq.read_table(storage.fs.open(path, "rb")).select(spec.schema.names)
        target.run(_create_table_sql(table, spec.schema, dialect))
        for row in rows.to_pylist():
            marks = ", ".join(["?" if dialect == "duckdb" else "%s"] * len(row))
            target.run(f'INSERT INTO "{table}" ({quoted(list(row))}) VALUES ({marks})', list(row.values()))
        counts[table] = counts.get(table, 0) + rows.num_rows
        mark = "?" if dialect == "duckdb" else "%s"
        target.run(f"INSERT INTO {LOAD_STATE_TABLE} VALUES ({mark}, {mark}, {mark}, {mark}, now(), 'loaded', NULL)",
                   [storage.url, name, table, rows.num_rows])
    for view, table, sql in current_views():  # the SQL of the views is unchanged from version 1
        if table in counts:
            target.run(f'CREATE VIEW "{view}" AS {sql if dialect == "duckdb" else _pg_view(sql)}')
    return counts


def table_columns(target: Target, table: str) -> list[str]:
    return [r[0] for r in target.rows(
        "SELECT column_name FROM information_schema.columns WHERE table_name = "
        f"'{table}' AND table_schema = current_schema() ORDER BY ordinal_position")]


def test_a_warehouse_of_the_previous_release_is_upgraded_in_place_with_nothing_lost(memory_storage: Storage,
                                                                                    target: Target) -> None:
    counts = old_warehouse(memory_storage, target)
    assert "external_customer_id" in table_columns(target, "people")
    before = {t: target.rows(f'SELECT * FROM "{t}"') for t in counts}
    [(files,)] = target.rows(f"SELECT count(*) FROM {LOAD_STATE_TABLE}")
    last = max(int(m["sequence"]) for p in memory_storage.fs.ls(memory_storage.root, detail=False)
               if (m := NAME.fullmatch(str(p).rsplit("/", 1)[-1])) and m["table"] == "people")
    [(cio_id,)] = target.rows("SELECT internal_customer_id FROM people")
    later = datetime.now(UTC) + timedelta(days=1)  # after the sink's rows, which it stamped when it made them
    schema = pa.schema([pa.field(c, k) for c, k in V4["people"]])
    put(memory_storage, f"people_v4_{WORKSPACE}_{last + 1}.parquet", pa.Table.from_pylist([{
        "workspace_id": WORKSPACE, "customer_id": "u1", "internal_customer_id": cio_id, "deleted": False,
        "suppressed": False, "created_at": later, "updated_at": later, "email_addr": "new@example.com"}],
        schema=schema))
    report = cio_sync.load(memory_storage.url, target.into)
    # The files of before are not loaded again; the new one is.
    assert (report.files_already_loaded, report.files_loaded, report.quarantined) == (files, 1, [])
    # Renamed in place, the v1-only columns kept, every row of before still there (under the v4 names).
    for table in counts:
        columns = table_columns(target, table)
        assert set(columns) >= {c for c, _ in V4[table]} | set(DROPPED.get(table, ())), table
        assert not set(RENAMED.get(table, {})) & set(columns), table
        old = latest_spec(table)
        renamed = [old.renamed.get(c, c) for c in STANDARD_V1_TABLES[table].schema.names]
        now = target.rows(f'SELECT {quoted(renamed)} FROM "{table}"')
        assert not Counter(before[table]) - Counter(now), table
    assert target.rows("SELECT customer_id, email_addr FROM people ORDER BY updated_at") == [
        ("u1", "old@example.com"), ("u1", "new@example.com")]
    assert target.rows("SELECT subject_id, external_customer_id FROM deliveries") == [("s1", "u1")]
    assert target.rows("SELECT customer_id, email_addr FROM people_current") == [("u1", "new@example.com")]
    assert target.rows("SELECT subject_id FROM deliveries_current") == [("s1",)]
    assert target.rows("SELECT count(*) FROM subjects_current") == [(1,)]
    assert target.rows("SELECT count(*) FROM attributes_current") == [(counts["attributes"],)]


def test_only_v1_files_are_renamed(memory_storage: Storage, tmp_path: Path) -> None:
    # A version-2 file has Customer.io's names; a column that is version 1's name stays a column of its own.
    put(memory_storage, f"people_v2_{WORKSPACE}_1.parquet", pa.table({
        "workspace_id": [WORKSPACE], "internal_customer_id": ["c1"], "external_customer_id": ["u1"]}))
    db = tmp_path / "w.duckdb"
    assert not cio_sync.load(memory_storage.url, f"duckdb:///{db}").quarantined
    assert duck_rows(db, "SELECT customer_id, external_customer_id FROM people") == [(None, "u1")]


#: A warehouse the loader of the previous release made of its sink's version-1 files (tests/fixtures/
#: make_v1_warehouse.py says how), exported as text.
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v1_warehouse"


def test_the_fixture_warehouse_of_the_previous_release_upgrades_in_place_with_nothing_lost(
        memory_storage: Storage, tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    con = duckdb.connect(str(db))
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute((FIXTURE / "schema.sql").read_text(encoding="utf-8"))
        con.execute((FIXTURE / "load.sql").read_text(encoding="utf-8").replace("@FIXTURE@", str(FIXTURE)))
    finally:
        con.close()
    tables = [t for t in STANDARD_TABLES if t != "actions"]
    before = {t: duck_rows(db, f'SELECT * FROM "{t}"') for t in [*tables, "actions"]}
    assert all(before.values())
    assert "external_customer_id" in duck_columns(db, "SELECT * FROM people")
    state = duck_rows(db, f"SELECT source, name, table_name, rows, status FROM {LOAD_STATE_TABLE}")
    [(cio_id, external)] = duck_rows(db, "SELECT internal_customer_id, external_customer_id FROM people_current "
                                         "WHERE email_addr IS NOT NULL ORDER BY 1 LIMIT 1")
    later = datetime.now(UTC) + timedelta(days=1)

    def add(table: str, row: dict[str, Any]) -> None:
        schema = pa.schema([pa.field(c, k) for c, k in V4[table]])
        put(memory_storage, f"{table}_v4_{WORKSPACE}_1.parquet",
            pa.Table.from_pylist([{c: row.get(c) for c in schema.names}], schema=schema))

    add("people", {"workspace_id": WORKSPACE, "customer_id": external, "internal_customer_id": cio_id,
                   "deleted": False, "suppressed": False, "created_at": later, "updated_at": later,
                   "email_addr": "moved@example.com"})
    add("metrics", {"event_id": "e-new", "workspace_id": WORKSPACE, "delivery_id": "d-new", "metric": "deferred",
                    "created_at": later, "seq_num": 1, "proxied": True})
    add("campaigns", {"workspace_id": WORKSPACE, "campaign_id": 3, "name": "New", "created_at": later,
                      "updated_at": later, "version": 1, "topic_names": ["news"]})
    report = cio_sync.load(memory_storage.url, f"duckdb:///{db}")
    assert (report.files_loaded, report.quarantined) == (3, [])
    added = {"people": 1, "metrics": 1, "campaigns": 1}
    for table in [*tables, "actions"]:
        spec, columns = latest_spec(table), duck_columns(db, f'SELECT * FROM "{table}"')
        # Renamed in place, the version-4 columns added, the version-1-only columns kept ...
        assert set(columns) == set(spec.schema.names) | set(spec.dropped), table
        # ... and every row of before still there, under the version-4 names.
        names = [spec.renamed.get(c, c) for c in STANDARD_V1_TABLES[table].schema.names]
        now = duck_rows(db, f'SELECT {quoted(names)} FROM "{table}"')
        assert not Counter(before[table]) - Counter(now), table
        assert len(now) == len(before[table]) + added.get(table, 0), table
    # The load state of before is untouched; the views work over the upgraded tables.
    assert set(state) <= set(duck_rows(db, f"SELECT source, name, table_name, rows, status FROM {LOAD_STATE_TABLE}"))
    assert duck_rows(db, f"SELECT customer_id, email_addr FROM people_current WHERE internal_customer_id = "
                         f"'{cio_id}'") == [(external, "moved@example.com")]
    assert duck_rows(db, "SELECT count(*) FROM people_current") == duck_rows(
        db, "SELECT count(DISTINCT internal_customer_id) FROM people")
    assert duck_rows(db, "SELECT proxied FROM metrics_unique WHERE event_id = 'e-new'") == [(True,)]
    assert duck_rows(db, "SELECT count(*) FROM metrics_unique WHERE proxied IS NULL") == duck_rows(
        db, "SELECT count(DISTINCT event_id) FROM metrics WHERE event_id <> 'e-new'")
    assert duck_rows(db, "SELECT count(*) FROM deliveries_current WHERE subject_id IS NOT NULL") == [
        (len(before["deliveries"]),)]
    assert duck_rows(db, "SELECT topic_names FROM campaigns WHERE campaign_id = 3") == [(["news"],)]
