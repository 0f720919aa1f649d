"""The loader: each file once, in order, with current-state views; reruns, deletes and kills."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cio_sync
from cio_sync._sample import sample_calls, sample_records
from tests.conftest import Storage

ROOT = Path(__file__).resolve().parents[1]


class Warehouse:
    """A load target for the tests: DuckDB in a file, or a fresh database on the test PostgreSQL server."""

    def __init__(self, into: str, kind: str) -> None:
        self.into = into
        self.kind = kind

    def rows(self, sql: str) -> list[tuple[object, ...]]:
        if self.kind == "duckdb":
            con = duckdb.connect(self.into.removeprefix("duckdb:///"), read_only=True)
            try:
                return [tuple(r) for r in con.execute(sql).fetchall()]
            finally:
                con.close()
        import psycopg

        with psycopg.connect(self.into) as con:
            return [tuple(r) for r in con.execute(sql.replace("::JSON::VARCHAR", "::JSON::TEXT")).fetchall()]

    def count(self, sql: str) -> int:
        [(n,)] = self.rows(sql)
        return int(n)  # type: ignore[call-overload]

    def execute(self, *statements: str) -> None:
        if self.kind == "duckdb":
            con = duckdb.connect(self.into.removeprefix("duckdb:///"))
            try:
                for sql in statements:
                    con.execute(sql)
            finally:
                con.close()
            return
        import psycopg

        with psycopg.connect(self.into, autocommit=True) as pg:
            for sql in statements:
                pg.execute(sql)  # type: ignore[arg-type]


def pg_warehouse(request: pytest.FixtureRequest) -> Warehouse:
    """A fresh database on the test PostgreSQL server."""
    import psycopg

    server = request.getfixturevalue("postgres_server")
    name = f"w_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.dsn, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    return Warehouse(server.dsn.rsplit("/", 1)[0] + f"/{name}", "postgres")


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path) -> Warehouse:
    if request.param == "duckdb":
        return Warehouse(f"duckdb:///{tmp_path}/warehouse.duckdb", "duckdb")
    return pg_warehouse(request)


#: The tests that load from every storage: each storage into DuckDB, and memory into PostgreSQL. The loader reads
#: a file through fsspec into an Arrow table (and deletes it, with delete_after_load) the same way whatever the
#: target, and a target sees only that table: S3 into PostgreSQL runs no code that S3 into DuckDB and memory into
#: PostgreSQL do not.
STORAGE_TARGETS = [
    *(pytest.param(kind, "duckdb", id=f"{kind}-duckdb") for kind in ("memory", "local")),
    *(pytest.param(kind, "duckdb", marks=mark, id=f"{kind}-duckdb")
      for kind, mark in (("s3", pytest.mark.s3), ("gcs", pytest.mark.gcs), ("azure", pytest.mark.azure))),
    pytest.param("memory", "postgres", marks=pytest.mark.postgres, id="memory-postgres"),
]


def count(db: Path, sql: str) -> int:
    return Warehouse(f"duckdb:///{db}", "duckdb").count(sql)


def write_both(storage: Storage, calls: int = 1_000) -> tuple[str, str, list[str]]:
    raw, ws = f"{storage.url}/raw", f"{storage.url}/ws"
    options = storage.storage_options
    advanced = cio_sync.AdvancedSink(raw, storage_options=options, flush_interval=None, max_rows=150)
    standard = cio_sync.StandardSink(ws, workspace_id=9, storage_options=options, flush_interval=None,
                                     max_rows=200, commit_every=100)
    sent = list(sample_calls(calls, seed=4, people=100))
    with cio_sync.Pipeline(advanced=advanced, standard=standard) as pipeline:
        ids = [pipeline.write(call) for call in sent]
        people = sorted({c["userId"] for c in sent if c["type"] == "identify" and c.get("userId")})
        for table, row in sample_records(people[:30]):
            standard.record(table, row)
    return raw, ws, ids


@pytest.mark.parametrize(("storage", "warehouse"), STORAGE_TARGETS, indirect=True)
def test_both_modes_load_once_into_tables_and_views(storage: Storage, warehouse: Warehouse) -> None:
    raw, ws, ids = write_both(storage)
    into = warehouse.into
    first = [cio_sync.load(p, into, storage_options=storage.storage_options) for p in (raw, ws)]
    assert first[0].rows_loaded == len(ids)
    again = [cio_sync.load(p, into, storage_options=storage.storage_options) for p in (raw, ws)]
    assert [r.files_loaded for r in again] == [0, 0]
    assert [r.files_already_loaded for r in again] == [r.files_loaded for r in first]
    count = warehouse.count
    raw_total = sum(count(f"SELECT count(*) FROM raw_{t}") for t in
                    ("identify", "track", "page", "screen", "group", "alias"))
    assert raw_total == len(ids)
    assert count('SELECT count(DISTINCT "messageId") FROM raw_track_unique') == count(
        "SELECT count(*) FROM raw_track_unique")
    assert count("SELECT count(*) FROM people_current") > 0
    assert count("SELECT count(*) FROM attributes_current WHERE attribute_value IS NULL") == 0
    assert count("SELECT count(*) FROM deliveries_current") == 30
    assert count("SELECT count(*) FROM metrics_unique") == count("SELECT count(DISTINCT event_id) FROM metrics")
    assert count("SELECT count(*) FROM _cio_sync_loaded") == sum(r.files_loaded for r in first)


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_csv_and_json_load_the_same_rows_as_parquet(memory_storage: Storage, tmp_path: Path, fmt: str) -> None:
    calls = list(sample_calls(400, seed=8))
    for f in ("parquet", fmt):
        with cio_sync.AdvancedSink(f"{memory_storage.url}/{f}", format=f, flush_interval=None) as sink:
            for call in calls:
                sink.write({**call, "messageId": call.get("messageId") or f"id-{id(call)}"})
        cio_sync.load(f"{memory_storage.url}/{f}", f"duckdb:///{tmp_path}/{f}.duckdb")
    query = ('SELECT "messageId", "userId", event, properties::JSON::VARCHAR, "timestamp", "sentAt" '
             'FROM raw_track ORDER BY "messageId"')
    left = duckdb.connect(f"{tmp_path}/parquet.duckdb", read_only=True).execute(query).fetchall()
    right = duckdb.connect(f"{tmp_path}/{fmt}.duckdb", read_only=True).execute(query).fetchall()
    assert left == right
    assert len(left) > 100


@pytest.mark.parametrize(("storage", "warehouse"), STORAGE_TARGETS, indirect=True)
def test_delete_after_load_empties_the_prefix_and_keeps_the_counters(storage: Storage,
                                                                    warehouse: Warehouse) -> None:
    raw, ws, ids = write_both(storage, calls=400)
    for prefix in (raw, ws):
        cio_sync.load(prefix, warehouse.into, storage_options=storage.storage_options, delete_after_load=True)
    fs = storage.fs
    for prefix in ("raw", "ws"):
        fs.invalidate_cache()
        left = [p for p in fs.find(f"{storage.root}/{prefix}") if "/_cio_sync/" not in p]
        assert left == []
    raw_total = sum(warehouse.count(f"SELECT count(*) FROM raw_{t}") for t in
                    ("identify", "track", "page", "screen", "group", "alias"))
    assert raw_total == len(ids)
    assert warehouse.count("SELECT count(*) FROM people_current") > 0
    # The writers' counters survive, so new files never reuse a loaded name.
    with cio_sync.AdvancedSink(raw, storage_options=storage.storage_options, flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "1", "event": "E"})
    report = cio_sync.load(raw, warehouse.into, storage_options=storage.storage_options)
    assert report.files_loaded == 1


def test_files_a_manifest_does_not_list_yet_wait(memory_storage: Storage, tmp_path: Path) -> None:
    with cio_sync.AdvancedSink(memory_storage.url, flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "1", "event": "E"})
    memory_storage.fs.pipe_file(f"{memory_storage.root}/1.2.99.track.parquet",
                                memory_storage.read("1.2.1.track.parquet"))
    report = cio_sync.load(memory_storage.url, f"duckdb:///{tmp_path}/w.duckdb")
    assert (report.files_loaded, report.files_waiting) == (1, 1)


def test_customer_io_exports_without_manifests_load(memory_storage: Storage, tmp_path: Path) -> None:
    with cio_sync.StandardSink(f"{memory_storage.url}/src", workspace_id=5, flush_interval=None,
                               manifests=False) as sink:
        sink.write({"type": "identify", "userId": "1", "traits": {"a": 1}})
    report = cio_sync.load(f"{memory_storage.url}/src", f"duckdb:///{tmp_path}/w.duckdb")
    assert report.tables == {"people": 1, "attributes": 1}


def test_a_file_that_does_not_match_its_manifest_is_quarantined_and_the_load_goes_on(memory_storage: Storage,
                                                                                    tmp_path: Path) -> None:
    with cio_sync.AdvancedSink(memory_storage.url, flush_interval=None, max_rows=1) as sink:
        for user in ("1", "2"):
            sink.write({"type": "track", "userId": user, "event": "E"})
        written = sorted(f.name for f in sink.flush())
    fs = memory_storage.fs
    path = f"{memory_storage.root}/{written[0]}"
    data = fs.cat_file(path)
    fs.rm_file(path)
    fs.pipe_file(path, data[:-1] + b"\0")
    report = cio_sync.load(memory_storage.url, f"duckdb:///{tmp_path}/w.duckdb")
    assert report.files_loaded == 1
    [bad] = report.quarantined
    assert bad.name == written[0]
    assert "checksum" in bad.reason
    assert "_manifests/advanced.1.1.json" in bad.reason


def test_a_load_killed_midway_and_rerun_loads_each_file_once(local_storage: Storage,
                                                            warehouse: Warehouse) -> None:
    with cio_sync.AdvancedSink(local_storage.url, flush_interval=None, max_rows=20) as sink:
        ids = [sink.write(c) for c in sample_calls(1_200, seed=2)]  # ~60 files: 20 loaded before the kill
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import cio_sync; "
            f"cio_sync.load({local_storage.url!r}, {warehouse.into!r}, "
            f"progress=lambda f, n: (print(f.name, flush=True), time.sleep(0.01)))")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert child.stdout is not None
    for _ in range(20):  # let it load some files, then kill it
        child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    time.sleep(0.1)
    partial = warehouse.count("SELECT count(*) FROM _cio_sync_loaded")
    assert 0 < partial < len(local_storage.data_files())
    cio_sync.load(local_storage.url, warehouse.into)
    loaded = sum(warehouse.count(f"SELECT count(*) FROM raw_{t}") for t in
                 ("identify", "track", "page", "screen", "group", "alias"))
    assert loaded == len(ids)
    distinct = sum(warehouse.count(f'SELECT count(DISTINCT "messageId") FROM raw_{t}') for t in
                   ("identify", "track", "page", "screen", "group", "alias"))
    assert distinct == len(ids)


def test_inspect_reports_tables_rows_and_gaps(memory_storage: Storage) -> None:
    with cio_sync.AdvancedSink(memory_storage.url, flush_interval=None, max_rows=10) as sink:
        for i in range(30):
            sink.write({"type": "track", "userId": str(i), "event": "E"})
    memory_storage.fs.rm_file(f"{memory_storage.root}/1.2.2.track.parquet")
    found = cio_sync.inspect_prefix(memory_storage.url)
    track = found["tables"]["raw_track"]
    assert (track["files"], track["rows"], track["gaps"]) == (2, 20, ["1.2.2"])


def test_the_load_and_inspect_commands(memory_storage: Storage, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from cio_sync.cli import main

    folder = tmp_path / "prefix"
    with cio_sync.AdvancedSink(str(folder), flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "1", "event": "E"})
    assert main(["load", str(folder), "--into", f"duckdb:///{tmp_path}/w.duckdb", "-q"]) == 0
    assert "loaded 1 files" in capsys.readouterr().out
    assert main(["inspect", str(folder)]) == 0
    assert "raw_track" in capsys.readouterr().out
    assert main(["load", str(folder), "--into", "mysql://nowhere"]) == 1
    assert "unknown load target" in capsys.readouterr().err
    assert main(["load", str(folder), "--into", "postgresql://me:s3cret@127.0.0.1:1/db"]) == 1
    err = capsys.readouterr().err
    assert "cannot connect to PostgreSQL" in err
    assert "s3cret" not in err


def test_customer_io_named_exports_of_other_versions_load(memory_storage: Storage, warehouse: Warehouse) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = memory_storage.fs
    root = memory_storage.root

    def put(name: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        fs.pipe_file(f"{root}/{name}", sink.getvalue().to_pybytes())

    # The export's "content" data set, and a v2 of deliveries with a column this contract does not have.
    put("content_v1_42_1700000000000001.parquet", pa.table({
        "workspace_id": [42], "delivery_id": ["d1"], "subject": ["Hi"], "created_at": pa.array([1], pa.int64())}))
    put("deliveries_v2_42_1700000000000002.parquet", pa.table({
        "workspace_id": [42], "delivery_id": ["d1"], "delivery_type": ["email"], "new_column": ["x"]}))
    report = cio_sync.load(memory_storage.url, warehouse.into)
    assert report.tables == {"delivery_contents": 1, "deliveries": 1}
    assert warehouse.rows("SELECT delivery_id, new_column FROM deliveries") == [("d1", "x")]
    assert warehouse.rows("SELECT subject FROM delivery_contents") == [("Hi",)]


# -- a hostile prefix: files that must never run SQL, stop a load, or change a table's types ------------------------

#: Column names that ran SQL in earlier loaders: each closes the quoted name in a statement that loader built from it
#: (DuckDB's ``SELECT typeof("...")``, PostgreSQL's ``CREATE TABLE ... ("..." TEXT)``) and drops the load state.
SQL_NAMES = {
    "duckdb": 'workspace_id") FROM incoming; DROP TABLE _cio_sync_loaded; COMMIT; SELECT typeof("workspace_id',
    "postgres": 'x" TEXT); DROP TABLE _cio_sync_loaded; COMMIT; --',
}


def put_parquet(storage: Storage, name: str, table: pa.Table) -> None:
    out = pa.BufferOutputStream()
    pq.write_table(table, out)
    storage.fs.pipe_file(f"{storage.root}/{name}", out.getvalue().to_pybytes())


def person(cio_id: str, **columns: object) -> pa.Table:
    at = pa.array([datetime(2026, 1, 1, tzinfo=UTC)], pa.timestamp("us", tz="UTC"))
    return pa.table({"workspace_id": [7], "internal_customer_id": [cio_id], "updated_at": at,
                     **{k: [v] for k, v in columns.items()}})


def people_file(sequence: int) -> str:
    return f"people_v1_7_{sequence}.parquet"


def column_type(warehouse: Warehouse, table: str, column: str) -> str:
    [(kind,)] = warehouse.rows(f"SELECT lower(data_type) FROM information_schema.columns WHERE table_name = "
                               f"'{table}' AND column_name = '{column}'")
    return str(kind)


def test_a_column_named_with_sql_never_runs_and_its_file_is_quarantined(memory_storage: Storage,
                                                                          warehouse: Warehouse) -> None:
    put_parquet(memory_storage, people_file(1), person("a"))
    assert cio_sync.load(memory_storage.url, warehouse.into).files_loaded == 1
    hostile = SQL_NAMES[warehouse.kind]
    put_parquet(memory_storage, people_file(2), person("b", **{hostile: "z"}))
    put_parquet(memory_storage, people_file(3), person("c"))
    report = cio_sync.load(memory_storage.url, warehouse.into)
    assert report.files_loaded == 1
    [bad] = report.quarantined
    assert bad.name == people_file(2)
    assert "not a plain name" in bad.reason
    assert warehouse.count("SELECT count(*) FROM _cio_sync_loaded") == 3
    again = cio_sync.load(memory_storage.url, warehouse.into)
    assert (again.files_loaded, again.files_already_loaded, again.files_still_quarantined) == (0, 2, 1)
    assert warehouse.rows("SELECT internal_customer_id FROM people ORDER BY 1") == [("a",), ("c",)]


def test_a_wrong_schema_file_first_is_quarantined_and_the_timestamp_column_stays_a_timestamp(
        memory_storage: Storage, warehouse: Warehouse) -> None:
    wrong = person("a").set_column(2, "updated_at", pa.array(["yesterday"]))
    put_parquet(memory_storage, people_file(1), wrong)
    put_parquet(memory_storage, people_file(2), person("b"))
    report = cio_sync.load(memory_storage.url, warehouse.into)
    [bad] = report.quarantined
    assert bad.name == people_file(1)
    assert "updated_at" in bad.reason
    assert report.tables == {"people": 1}
    assert column_type(warehouse, "people", "updated_at") == "timestamp with time zone"
    assert warehouse.rows("SELECT internal_customer_id FROM people") == [("b",)]


@pytest.mark.parametrize("damage", ["truncated", "not parquet"])
def test_a_file_that_is_not_whole_parquet_is_quarantined_and_the_next_files_load(
        memory_storage: Storage, warehouse: Warehouse, damage: str) -> None:
    with cio_sync.AdvancedSink(memory_storage.url, flush_interval=None, max_rows=10, manifests=False) as sink:
        for i in range(30):
            sink.write({"type": "track", "userId": str(i), "event": "E"})
    broken = "1.2.2.track.parquet"
    data = memory_storage.read(broken)
    memory_storage.fs.pipe_file(f"{memory_storage.root}/{broken}",
                                data[: len(data) // 2] if damage == "truncated" else b"<html>Access Denied</html>")
    report = cio_sync.load(memory_storage.url, warehouse.into)
    assert (report.files_loaded, report.rows_loaded) == (2, 20)
    [bad] = report.quarantined
    assert bad.name == broken
    assert "cannot be read as Parquet" in bad.reason


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_a_call_with_a_2_mib_property_written_by_our_sink_loads(memory_storage: Storage, warehouse: Warehouse,
                                                                fmt: str) -> None:
    big = "x" * (2 * 2**20)
    with cio_sync.AdvancedSink(memory_storage.url, format=fmt, flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "1", "event": "Big", "properties": {"blob": big}})
        sink.write({"type": "track", "userId": "2", "event": "Small", "properties": {"line": "a\nb"}})
    report = cio_sync.load(memory_storage.url, warehouse.into)
    assert report.files_loaded == 1
    assert warehouse.count("SELECT max(length(properties)) FROM raw_track") == len(big) + len('{"blob":""}')
    assert warehouse.count("SELECT count(*) FROM raw_track") == 2


def test_a_json_lines_file_with_a_line_that_is_not_a_call_is_quarantined(memory_storage: Storage,
                                                                         tmp_path: Path) -> None:
    memory_storage.fs.pipe_file(f"{memory_storage.root}/1.2.1.track.json",
                                b'{"type": "track", "userId": "1", "event": "E"}\n[1, 2]\n')
    memory_storage.fs.pipe_file(f"{memory_storage.root}/1.2.2.track.json",
                                b'{"type": "track", "userId": "2", "event": "E"}\n')
    report = cio_sync.load(memory_storage.url, f"duckdb:///{tmp_path}/w.duckdb")
    assert report.files_loaded == 1
    [bad] = report.quarantined
    assert (bad.name, bad.reason) == ("1.2.1.track.json", "line 2 is not a JSON object (a call)")


@pytest.mark.parametrize("document", [b"{not json", b"[]", b'{"files": {"name": "x"}}', b'{"files": [{"rows": 1}]}',
                                      b'{"files": [{"name": "1.2.2.track.parquet", "bytes": "12"}]}'])
def test_a_manifest_of_the_wrong_shape_is_quarantined_and_only_its_files_wait(memory_storage: Storage,
                                                                              tmp_path: Path,
                                                                              document: bytes) -> None:
    with cio_sync.AdvancedSink(memory_storage.url, flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "1", "event": "E"})
        sink.flush()
        sink.write({"type": "track", "userId": "2", "event": "E"})
    fs = memory_storage.fs
    manifest = f"{memory_storage.root}/_manifests/advanced.1.2.json"
    fs.rm_file(manifest)
    fs.pipe_file(manifest, document)
    into = f"duckdb:///{tmp_path}/w.duckdb"
    report = cio_sync.load(memory_storage.url, into)
    assert (report.files_loaded, report.files_waiting) == (1, 1)
    [bad] = report.quarantined
    assert bad.name == "_manifests/advanced.1.2.json"
    assert bad.reason.startswith("manifest ")
    again = cio_sync.load(memory_storage.url, into, delete_after_load=True)
    assert (again.files_still_quarantined, again.quarantined) == (1, [])
    assert fs.exists(manifest)


def test_a_quarantined_file_is_not_retried_until_the_load_is_asked_to(memory_storage: Storage,
                                                                        warehouse: Warehouse) -> None:
    memory_storage.fs.pipe_file(f"{memory_storage.root}/{people_file(1)}", b"PAR1 half a file")
    put_parquet(memory_storage, people_file(2), person("b"))
    first = cio_sync.load(memory_storage.url, warehouse.into)
    assert [q.name for q in first.quarantined] == [people_file(1)]
    # The user puts a good copy in its place: nothing tries it until asked.
    memory_storage.fs.rm_file(f"{memory_storage.root}/{people_file(1)}")
    put_parquet(memory_storage, people_file(1), person("a"))
    second = cio_sync.load(memory_storage.url, warehouse.into)
    assert (second.files_loaded, second.files_still_quarantined, second.quarantined) == (0, 1, [])
    third = cio_sync.load(memory_storage.url, warehouse.into, retry_quarantined=True)
    assert (third.files_loaded, third.files_still_quarantined, third.quarantined) == (1, 0, [])
    assert warehouse.rows("SELECT internal_customer_id FROM people ORDER BY 1") == [("a",), ("b",)]
    assert warehouse.rows("SELECT name, status, reason FROM _cio_sync_loaded ORDER BY name") == [
        (people_file(1), "loaded", None), (people_file(2), "loaded", None)]


def test_delete_after_load_never_deletes_a_quarantined_file_or_its_manifest(memory_storage: Storage,
                                                                            tmp_path: Path) -> None:
    with cio_sync.AdvancedSink(memory_storage.url, flush_interval=None, max_rows=1) as sink:
        for user in ("1", "2", "3"):
            sink.write({"type": "track", "userId": user, "event": "E"})
    fs = memory_storage.fs
    broken = f"{memory_storage.root}/1.2.2.track.parquet"
    data = fs.cat_file(broken)
    fs.rm_file(broken)
    fs.pipe_file(broken, data[:-1] + b"\0")
    for _ in range(2):
        cio_sync.load(memory_storage.url, f"duckdb:///{tmp_path}/w.duckdb", delete_after_load=True)
        assert memory_storage.data_files() == ["1.2.2.track.parquet"]
        fs.invalidate_cache()
        assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{memory_storage.root}/_manifests", detail=False)] == [
            "advanced.1.2.json"]


@pytest.mark.postgres
def test_rows_postgresql_refuses_roll_back_only_their_file(memory_storage: Storage,
                                                           request: pytest.FixtureRequest) -> None:
    warehouse = pg_warehouse(request)
    put_parquet(memory_storage, people_file(1), person("a\0b", note="x"))
    put_parquet(memory_storage, people_file(2), person("c"))
    report = cio_sync.load(memory_storage.url, warehouse.into)
    [bad] = report.quarantined
    assert bad.name == people_file(1)
    assert "NUL" in bad.reason
    assert warehouse.rows("SELECT internal_customer_id FROM people") == [("c",)]
    # The column that file would have added went with its transaction.
    assert warehouse.count("SELECT count(*) FROM information_schema.columns WHERE column_name = 'note'") == 0


def test_a_load_state_of_an_earlier_release_is_migrated_in_place(memory_storage: Storage,
                                                                 warehouse: Warehouse) -> None:
    warehouse.execute(
        "CREATE TABLE _cio_sync_loaded (source TEXT NOT NULL, name TEXT NOT NULL, table_name TEXT NOT NULL, "
        "rows BIGINT NOT NULL, loaded_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (source, name))",
        f"INSERT INTO _cio_sync_loaded VALUES ('{memory_storage.url}', '{people_file(1)}', "
        "'people', 1, now())")
    put_parquet(memory_storage, people_file(1), person("a"))
    memory_storage.fs.pipe_file(f"{memory_storage.root}/{people_file(2)}", b"not parquet")
    report = cio_sync.load(memory_storage.url, warehouse.into)
    assert (report.files_already_loaded, report.files_loaded) == (1, 0)
    assert [q.name for q in report.quarantined] == [people_file(2)]
    assert warehouse.rows("SELECT name, status FROM _cio_sync_loaded ORDER BY name") == [
        (people_file(1), "loaded"), (people_file(2), "quarantined")]


def test_inspect_lists_a_file_it_cannot_read_with_the_reason(memory_storage: Storage) -> None:
    put_parquet(memory_storage, people_file(1), person("a"))
    memory_storage.fs.pipe_file(f"{memory_storage.root}/{people_file(2)}", b"not parquet")
    found = cio_sync.inspect_prefix(memory_storage.url)
    assert found["tables"]["people"]["files"] == 1
    [bad] = found["unreadable"]
    assert bad["name"] == people_file(2)
    assert "cannot be read as Parquet" in bad["reason"]


def test_the_load_command_prints_each_quarantined_file_and_exits_1(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from cio_sync.cli import main

    folder = tmp_path / "prefix"
    folder.mkdir()
    (folder / people_file(1)).write_bytes(b"not parquet")
    pq.write_table(person("b"), folder / people_file(2))
    into = f"duckdb:///{tmp_path}/w.duckdb"
    assert main(["load", str(folder), "--into", into, "-q"]) == 1
    out, err = capsys.readouterr()
    assert "loaded 1 files" in out
    [line] = [x for x in err.splitlines() if "quarantined " in x and "cannot be read" in x]
    assert line.startswith(f"cio-sync: quarantined {folder}/{people_file(1)}: cannot be read as Parquet")
    assert "Traceback" not in err
    assert main(["load", str(folder), "--into", into, "-q"]) == 0
    assert "--retry-quarantined" in capsys.readouterr().err
    pq.write_table(person("a"), folder / people_file(1))
    assert main(["load", str(folder), "--into", into, "-q", "--retry-quarantined"]) == 0
    out, err = capsys.readouterr()
    assert "loaded 1 files" in out
    assert err == ""
