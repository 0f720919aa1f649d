"""The loader's write points under real faults: the DuckDB database on a full disk, and faultfs failing or killing
at each write and fsync of the database. After each, a rerun loads every file exactly once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import duckdb
import pytest

import cio_sync
from cio_sync._sample import sample_calls
from tests import faults
from tests.faults import SmallDisk

#: Set (as ``nox -s crash`` does) to sweep every write and fsync of a load, up to this many points per kind of fault.
SWEEP = int(os.environ.get("CIO_SYNC_CRASH_TRIALS", "0"))
TYPES = ("identify", "track", "page", "screen", "group", "alias")


def count(database: Path, sql: str) -> int:
    con = duckdb.connect(str(database), read_only=True)
    try:
        row = con.execute(sql).fetchone()
        return int(row[0]) if row else 0
    finally:
        con.close()


def raw_rows(database: Path, distinct: bool = False) -> int:
    what = 'count(DISTINCT "messageId")' if distinct else "count(*)"
    con = duckdb.connect(str(database), read_only=True)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        return sum(int(con.execute(f"SELECT {what} FROM raw_{t}").fetchone()[0])  # type: ignore[index]
                   for t in TYPES if f"raw_{t}" in tables)
    finally:
        con.close()


def write_prefix(prefix: Path, calls: int, seed: int) -> list[str]:
    with cio_sync.AdvancedSink(str(prefix), flush_interval=None, max_rows=50) as sink:
        return [sink.write(c) for c in sample_calls(calls, seed=seed)]


def data_files(prefix: Path) -> int:
    return len([p for p in prefix.iterdir() if p.is_file()])


def test_the_duckdb_database_on_a_full_disk_fails_naming_it_and_a_rerun_loads_each_file_once(
        small_disk: SmallDisk, tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    ids = write_prefix(prefix, 600, seed=3)
    database = small_disk.path / "w.duckdb"
    into = f"duckdb:///{database}"
    cio_sync.load(str(prefix), into)  # creates the database; then the next files meet a full disk
    first = len(ids)
    ids += write_prefix(prefix, 600, seed=5)
    small_disk.fill(leave=64 * 1024)
    with pytest.raises(cio_sync.StorageError, match=str(database)) as raised:
        cio_sync.load(str(prefix), into)
    assert isinstance(raised.value, OSError)
    small_disk.free()
    # Every file the state says is loaded is in the tables, and no other.
    in_state = count(database, "SELECT coalesce(sum(rows), 0) FROM _cio_sync_loaded")
    assert in_state == raw_rows(database)
    assert first <= in_state < len(ids)
    report = cio_sync.load(str(prefix), into)
    assert report.quarantined == []
    assert raw_rows(database) == raw_rows(database, distinct=True) == len(ids)
    assert count(database, "SELECT count(*) FROM _cio_sync_loaded") == data_files(prefix)


def _trial(tmp_path: Path, prefix: Path, ids: list[str], name: str, **arm: Any) -> faults.ChildResult:
    """Load ``prefix`` into a new database in a child that faultfs fails (or kills) as ``arm`` says, then load again
    here; check that every call is in the warehouse exactly once and that the database folder holds no leftover."""
    folder = tmp_path / name
    folder.mkdir()
    database = folder / "w.duckdb"
    done = faults.run_child("tests.loader_scenarios:load", str(prefix), f"duckdb:///{database}", prefix=folder,
                            **arm)
    assert done.killed or done.returncode == 0, done.stderr
    if not done.killed and done.result["error"] is not None:
        assert done.result["type"] == "StorageError"
        assert str(database) in done.result["error"]
    report = cio_sync.load(str(prefix), f"duckdb:///{database}")
    assert report.quarantined == []
    assert raw_rows(database) == raw_rows(database, distinct=True) == len(ids), name
    assert count(database, "SELECT count(*) FROM _cio_sync_loaded WHERE status = 'loaded'") == data_files(prefix)
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == [], name
    return done


@pytest.mark.parametrize(("ops", "nth", "mode"), [
    ("write", 1, "eio"),  # the new database file's header
    ("write", 2, "kill"),
    ("write", 30, "eio"),  # a file's commit (the sweep covers every write and fsync)
])
def test_a_fault_at_a_write_of_the_duckdb_database_loses_no_file_and_loads_none_twice(
        faultfs: Path, tmp_path: Path, ops: str, nth: int, mode: str) -> None:
    prefix = tmp_path / "prefix"
    ids = write_prefix(prefix, 400, seed=3)
    arm: dict[str, Any] = {"ops": ops, "nth": nth}
    arm.update({"errno": faults.EIO} if mode == "eio" else {"kill": "after" if mode == "kill-after" else "before"})
    done = _trial(tmp_path, prefix, ids, "trial", **arm)
    assert done.killed or done.result["failures"] == 1, "the fault never hit"


@pytest.mark.skipif(not SWEEP, reason="a long sweep: set CIO_SYNC_CRASH_TRIALS (nox -s crash does)")
def test_every_write_point_of_the_duckdb_database_failed_or_killed_loses_no_file_and_loads_none_twice(
        faultfs: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    ids = write_prefix(prefix, 400, seed=3)
    clean = faults.run_child("tests.loader_scenarios:load", str(prefix), f"duckdb:///{tmp_path}/clean.duckdb",
                             prefix=tmp_path)
    totals = clean.result["totals"]
    trials = killed = failed = 0
    for ops in ("write", "fsync", "link", "create"):
        points = list(range(1, totals[ops] + 1))
        if len(points) > SWEEP:
            points = points[:: len(points) // SWEEP + 1]
        for nth in points:
            for mode in ("eio", "kill"):
                arm: dict[str, Any] = {"ops": ops, "nth": nth}
                arm.update({"errno": faults.EIO} if mode == "eio" else {
                    "kill": "after" if ops == "fsync" else "before"})
                done = _trial(tmp_path, prefix, ids, f"{ops}-{nth}-{mode}", **arm)
                trials += 1
                killed += done.killed
                failed += (not done.killed) and done.result["error"] is not None
    print(f"loader sweep: {trials} faults ({killed} kills, {failed} loads stopped with StorageError) over "
          f"{data_files(prefix)} files and {len(ids)} calls; each rerun loaded every call once")
