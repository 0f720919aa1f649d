"""Upgrading from the release before version 4, with nothing lost.

tests/fixtures/v1_release/ holds a prefix and a workspace state made by that release's own code
(tests/fixtures/make_v1_release.py, run with commit 5d0ae22): `_v1_` files, manifests and counters, and rows its
sink accepted but never published (it was killed), still in the state's outbox. ``expected.json`` is what that
release publishes from it. Today's sink opens the state in place, publishes those rows as they were made, writes
version 4 after them with higher sequences, and the loader puts everything into one warehouse.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

import cio_sync
from cio_sync.schemas.standard import STANDARD_V4_TABLES
from tests.test_standard import NAME

FIXTURE = Path(__file__).parent / "fixtures" / "v1_release"
EXPECTED: dict[str, Any] = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
WORKSPACE = EXPECTED["workspace_id"]


@pytest.fixture
def release(tmp_path: Path) -> Path:
    copy = tmp_path / "v1_release"
    shutil.copytree(FIXTURE, copy)
    return copy


def _sink(root: Path) -> cio_sync.StandardSink:
    return cio_sync.StandardSink(str(root / "prefix"), workspace_id=WORKSPACE, state=root / "state.sqlite",
                                 flush_interval=None)


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _files(prefix: Path) -> list[tuple[str, str, int, Path]]:
    """(table, version, sequence, path) of every data file, in sequence order."""
    found = []
    for path in prefix.glob("*.parquet"):
        match = NAME.match(path.name)
        assert match, path.name
        found.append((match["table"], match["version"], int(match["sequence"]), path))
    return sorted(found, key=lambda f: f[2])


def _rows(prefix: Path, version: str) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for table, v, _, path in _files(prefix):
        if v == version:
            rows.setdefault(table, []).extend(
                {k: _plain(x) for k, x in r.items()} for r in pq.read_table(path).to_pylist())
    return rows


def test_the_fixture_is_what_that_release_left() -> None:
    # The state still holds unpublished rows, in version 1; the prefix has version-1 files only.
    db = sqlite3.connect(FIXTURE / "state.sqlite")
    try:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)
        assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] > 0
    finally:
        db.close()
    assert sorted(p.name for p in (FIXTURE / "prefix").glob("*.parquet")) == EXPECTED["published_before"]
    assert {v for _, v, _, _ in _files(FIXTURE / "prefix")} == {"1"}


def test_the_state_opens_in_place_and_publishes_the_rows_it_held_as_version_1(release: Path) -> None:
    with _sink(release) as sink:
        for uid, person in EXPECTED["people"].items():
            assert sink.person(uid) == person, uid  # ids, email and attributes kept
    # Every row that release would have published, as it would have: in version-1 files, nothing more or less.
    assert _rows(release / "prefix", "1") == EXPECTED["rows"]
    assert _rows(release / "prefix", "4") == {}
    db = sqlite3.connect(release / "state.sqlite")
    try:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("4",)
        assert db.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
    finally:
        db.close()
    # Opening it again publishes nothing twice.
    before = sorted(p.name for p in (release / "prefix").glob("*.parquet"))
    with _sink(release):
        pass
    assert sorted(p.name for p in (release / "prefix").glob("*.parquet")) == before


def test_after_the_upgrade_the_sink_writes_version_4_above_every_version_1_sequence(release: Path) -> None:
    with _sink(release) as sink:
        assert sink.write({"type": "identify", "userId": "ana", "traits": {"plan": "team"}}) == 1
        assert sink.write({"type": "identify", "userId": "gus", "traits": {"email": "gus@example.com"}}) == 2
        sink.record("campaigns", {"campaign_id": 2, "name": "Win-back", "topic_names": ["offers"]})
    files = _files(release / "prefix")
    last_v1 = max(s for _, v, s, _ in files if v == "1")
    first_v4 = min(s for _, v, s, _ in files if v == "4")
    assert first_v4 > last_v1
    assert {t for t, v, _, _ in files if v == "4"} == {"people", "attributes", "campaigns"}
    manifests = sorted((release / "prefix" / "_manifests").glob("manifest_v*.json"))
    v1 = [int(p.stem.rsplit("_", 1)[1]) for p in manifests if p.name.startswith("manifest_v1_")]
    v4 = [int(p.stem.rsplit("_", 1)[1]) for p in manifests if p.name.startswith("manifest_v4_")]
    assert v1
    assert v4
    assert min(v4) > max(v1)
    # The person keeps their internal id across the versions.
    [row] = [r for r in _rows(release / "prefix", "4")["people"] if r["customer_id"] == "gus"]
    ana = EXPECTED["people"]["ana"]["cio_id"]
    assert [r["internal_customer_id"] for r in _rows(release / "prefix", "4")["attributes"]
            if r["attribute_name"] == "plan" and r["attribute_value"] == "team"] == [ana]
    assert row["email_addr"] == "gus@example.com"


def test_a_person_that_release_suppressed_stays_blocked_until_unsuppressed(release: Path) -> None:
    with _sink(release) as sink:
        assert sink.write({"type": "identify", "userId": "cy", "traits": {"plan": "pro"}}) == 0
        assert sink.stats.calls_blocked == 1
        cio_id = sink.person("cy")["cio_id"]  # that release kept the suppressed profile
        assert sink.unsuppress_person("cy") == 1
        assert sink.write({"type": "identify", "userId": "cy", "traits": {"plan": "pro"}}) == 2
        assert sink.person("cy")["cio_id"] != cio_id
    people = [r for r in _rows(release / "prefix", "4")["people"] if r["customer_id"] == "cy"]
    assert [(r["internal_customer_id"] == cio_id, r["deleted"], r["suppressed"], r["email_addr"])
            for r in people] == [(True, True, False, None), (False, False, False, None)]


def test_everything_loads_into_one_warehouse_with_nothing_lost(release: Path, tmp_path: Path) -> None:
    with _sink(release) as sink:
        sink.write({"type": "identify", "userId": "ana", "traits": {"plan": "team"}})
        sink.record("metrics", {"event_id": "m-4", "delivery_id": "d-1", "metric": "deferred"})
    db = tmp_path / "w.duckdb"
    report = cio_sync.load(str(release / "prefix"), f"duckdb:///{db}")
    assert report.quarantined == []
    con = duckdb.connect(str(db))
    con.execute("SET TimeZone = 'UTC'")
    for table, rows in EXPECTED["rows"].items():
        spec = STANDARD_V4_TABLES.get(table)
        renamed = dict(spec.renamed) if spec is not None else {}
        for row in rows:
            # Each version-1 row is there under the version-4 names, its version-1-only columns kept.
            where = " AND ".join(f'"{renamed.get(c, c)}" IS NOT DISTINCT FROM ?' for c in row)
            values = [json.dumps(v) if isinstance(v, list) else v for v in row.values()]
            [(found,)] = con.execute(f'SELECT count(*) FROM "{table}" WHERE {where}', values).fetchall()
            assert found == 1, (table, row)
        [(total,)] = con.execute(f'SELECT count(*) FROM "{table}"').fetchall()
        added = {"attributes": 1, "people": 0, "metrics": 1}.get(table, 0)
        assert total == len(rows) + added, table
    ana = EXPECTED["people"]["ana"]
    assert con.execute("SELECT attribute_value FROM attributes_current WHERE internal_customer_id = ? AND "
                       "attribute_name = 'plan'", [ana["cio_id"]]).fetchall() == [("team",)]
    assert con.execute("SELECT customer_id, email_addr FROM people_current WHERE internal_customer_id = ?",
                       [ana["cio_id"]]).fetchall() == [("ana", "ana@example.com")]
    assert con.execute("SELECT metric FROM metrics_unique ORDER BY seq_num").fetchall() == [
        ("sent",), ("opened",), ("clicked",), ("deferred",)]


# -- the upgrade under faults ----------------------------------------------------------------------------------------


def open_and_close(root: str) -> dict[str, Any]:
    """In a faultfs child: open today's sink on the release's state (the upgrade, then publishing what it held) and
    close it; the error, if one was raised."""
    from tests import faults

    error = None
    try:
        _sink(Path(root)).close()
    except cio_sync.CioSyncError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"error": error, "failures": faults.faults().failures}


def count_upgrade_ops(root: str) -> dict[str, int]:
    from tests import faults

    injector = faults.faults()
    injector.reset_totals()
    open_and_close(root)
    totals = injector.totals()
    return {**totals, "all": sum(totals.values())}


def _points(total: int, wanted: int) -> list[int]:
    return sorted({1 + (total - 1) * k // (wanted - 1) for k in range(wanted)}) if wanted < total else \
        list(range(1, total + 1))


def test_the_upgrade_killed_or_failed_at_any_write_point_publishes_the_same_rows_once_restarted(
        faultfs: Path, tmp_path: Path) -> None:
    """kill -9, ENOSPC and EIO at write points of the upgrade and the publishing after it (every kind: the state's
    transaction, its WAL, the files, the counters, the manifest; ``CIO_SYNC_FAULT_POINTS`` of them, 3 by default and
    40 in ``nox -s crash``): the next start publishes every row that release held exactly once, in version 1, as a
    clean upgrade does."""
    import os

    from tests import faults

    def fresh(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(FIXTURE, copy)
        return copy

    counted = faults.run_child("tests.test_v1_release:count_upgrade_ops", str(fresh("probe")),
                               prefix=tmp_path / "probe")
    total = counted.result["all"]
    assert total > 20, counted.result
    wanted = int(os.environ.get("CIO_SYNC_FAULT_POINTS", "3"))
    outcomes = []
    for point in _points(total, wanted):
        for fault in ("kill", "ENOSPC", "EIO"):
            root = fresh(f"{fault}-{point}")
            arm: dict[str, Any] = {"kill": "before"} if fault == "kill" else {
                "errno": faults.ENOSPC if fault == "ENOSPC" else faults.EIO}
            done = faults.run_child("tests.test_v1_release:open_and_close", str(root), prefix=root, ops="all",
                                    nth=point, **arm)
            if fault == "kill":
                outcomes.append(done.killed)
            else:
                assert done.result is not None, done.stderr  # a clear error or a clean close, never a crash
                error = done.result["error"]
                assert error is None or "StorageError" in error or "StateError" in error, error
                outcomes.append(done.result["failures"] > 0)
            with _sink(root):  # the next start, with room again
                pass
            assert _rows(root / "prefix", "1") == EXPECTED["rows"], (fault, point)
            assert _rows(root / "prefix", "4") == {}
            names = [p.name for p in (root / "prefix").glob("*.parquet")]
            assert len(names) == len(set(names))
    assert sum(outcomes) >= len(outcomes) - 3  # the faults were real (the last point may be past the run)
