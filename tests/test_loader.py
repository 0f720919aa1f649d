"""The loader: each file once, in order, with current-state views; reruns, deletes and kills."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import duckdb
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


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path) -> Warehouse:
    if request.param == "duckdb":
        return Warehouse(f"duckdb:///{tmp_path}/warehouse.duckdb", "duckdb")
    import psycopg

    server = request.getfixturevalue("postgres_server")
    name = f"w_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.dsn, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return Warehouse(server.dsn.rsplit("/", 1)[0] + f"/{name}", "postgres")


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


def test_a_manifest_checksum_mismatch_stops_the_load(memory_storage: Storage, tmp_path: Path) -> None:
    with cio_sync.AdvancedSink(memory_storage.url, flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "1", "event": "E"})
        [written] = sink.flush()
    fs = memory_storage.fs
    path = f"{memory_storage.root}/{written.name}"
    data = fs.cat_file(path)
    fs.rm_file(path)
    fs.pipe_file(path, data[:-1] + b"\0")
    with pytest.raises(cio_sync.CioSyncError, match="checksum"):
        cio_sync.load(memory_storage.url, f"duckdb:///{tmp_path}/w.duckdb")


def test_a_load_killed_midway_and_rerun_loads_each_file_once(local_storage: Storage,
                                                            warehouse: Warehouse) -> None:
    with cio_sync.AdvancedSink(local_storage.url, flush_interval=None, max_rows=20) as sink:
        ids = [sink.write(c) for c in sample_calls(3_000, seed=2)]
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
