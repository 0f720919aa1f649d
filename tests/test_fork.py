"""A process that forks while a sink is open: the child never publishes, commits or unlocks what the parent holds.

Every test runs a parent in a fresh interpreter (tests/fork_scenarios.py) that opens a sink, buffers calls and
forks with ``os.fork()`` (or a multiprocessing pool with the fork start method, as a worker pool would); the child
exits normally (its atexit handlers run), or closes the sink, or writes to it; then the parent goes on and closes.
What must hold: every call the parent accepted is published exactly once, the child published nothing, and the
parent's spool and state files are the parent's alone.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests import fork_scenarios
from tests.faults import published_ids

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="os.fork() is POSIX only")


def _advanced(tmp_path: Path, action: str, *, spool: bool, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    report = tmp_path / "child.json"
    result = fork_scenarios.run("advanced", str(tmp_path / "bucket"), str(tmp_path / "spool") if spool else None,
                                action, str(report), *extra.values())
    assert result["child_exit"] == 0, result["stderr"]
    return result, json.loads(report.read_text())


def _exactly_once(tmp_path: Path, accepted: list[str]) -> None:
    published = published_ids(tmp_path / "bucket")
    assert published == Counter(accepted)


@pytest.mark.parametrize("spool", [False, True], ids=["memory", "spool"])
def test_a_child_that_exits_normally_publishes_none_of_the_parents_calls(tmp_path: Path, spool: bool) -> None:
    result, _ = _advanced(tmp_path, "exit", spool=spool)
    _exactly_once(tmp_path, result["accepted"])
    assert result["published_rows"] == len(result["accepted"])


@pytest.mark.parametrize("spool", [False, True], ids=["memory", "spool"])
def test_close_in_a_child_does_nothing_and_the_parent_publishes_everything_once(tmp_path: Path, spool: bool) -> None:
    result, child = _advanced(tmp_path, "close", spool=spool)
    assert child["close"] == "ok"
    assert child["closed_files"] == 0
    _exactly_once(tmp_path, result["accepted"])


@pytest.mark.parametrize("spool", [False, True], ids=["memory", "spool"])
def test_a_child_cannot_write_or_flush_the_parents_sink(tmp_path: Path, spool: bool) -> None:
    result, child = _advanced(tmp_path, "write", spool=spool)
    assert child["closed"] is True
    for what in ("write", "flush"):
        assert child[what]["error"] == "SinkClosed"
        assert "before a fork" in child[what]["message"]
        assert "open a new sink in the child" in child[what]["message"]
    _exactly_once(tmp_path, result["accepted"])
    assert "m-999999" not in published_ids(tmp_path / "bucket")


def test_a_with_block_in_a_child_refuses_the_call_and_publishes_nothing(tmp_path: Path) -> None:
    result, child = _advanced(tmp_path, "with", spool=False)
    assert child["with"]["error"] == "SinkClosed"
    _exactly_once(tmp_path, result["accepted"])


def test_a_child_can_open_a_sink_of_its_own(tmp_path: Path) -> None:
    own = {"root": str(tmp_path / "child-bucket"), "spool": str(tmp_path / "child-spool"), "calls": 7}
    result, child = _advanced(tmp_path, "own", spool=True, own=own)
    assert child["own"] == "ok"
    assert published_ids(tmp_path / "child-bucket") == Counter(f"m-{100_000 + n}" for n in range(7))
    _exactly_once(tmp_path, result["accepted"])


def test_the_spool_files_stay_the_parents_when_a_child_exits(tmp_path: Path) -> None:
    result, _ = _advanced(tmp_path, "exit", spool=True)
    _exactly_once(tmp_path, result["accepted"])
    # Everything the parent accepted was published by the parent, so its spool is empty afterwards, and nothing
    # was published under names the child claimed.
    assert not [p for p in (tmp_path / "spool").rglob("*") if p.is_file() and p.suffix in (".avro", ".data")]


def _standard(tmp_path: Path, action: str) -> tuple[dict[str, Any], dict[str, Any]]:
    report = tmp_path / "child.json"
    result = fork_scenarios.run("standard", str(tmp_path / "bucket"), str(tmp_path / "state.sqlite"), action,
                                str(report))
    assert result["child_exit"] == 0, result["stderr"]
    return result, json.loads(report.read_text())


def _people_published_once(tmp_path: Path, people: int) -> None:
    import pyarrow.parquet as pq

    published: Counter[str] = Counter()
    for path in (tmp_path / "bucket").glob("people_*.parquet"):
        published.update(pq.read_table(path).column("customer_id").to_pylist())
    assert published == Counter(f"person-{n}" for n in range(people))


def _state_intact(tmp_path: Path, people: int) -> None:
    db = sqlite3.connect(tmp_path / "state.sqlite")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
    finally:
        db.close()
    import cio_sync

    with cio_sync.StandardSink(str(tmp_path / "again"), workspace_id=1, state=tmp_path / "state.sqlite",
                               flush_interval=None) as sink:
        assert [sink.person(f"person-{n}")["attributes"]["n"] for n in range(people)] == [
            str(n) for n in range(people)]


@pytest.mark.parametrize("action", ["exit", "close", "write"])
def test_a_forked_child_leaves_the_parents_state_locked_intact_and_unpublished(tmp_path: Path, action: str) -> None:
    result, child = _standard(tmp_path, action)
    if action == "write":
        assert child["write"]["error"] == "SinkClosed"
        assert child["flush"]["error"] == "SinkClosed"
    assert result["locked_after_child"] is True
    _people_published_once(tmp_path, result["people"])
    _state_intact(tmp_path, result["people"])


@pytest.mark.parametrize("spool", [False, True], ids=["memory", "spool"])
def test_pool_workers_forked_with_a_sink_open_cannot_publish_the_parents_calls(tmp_path: Path, spool: bool) -> None:
    result = fork_scenarios.run("pool", str(tmp_path / "bucket"), str(tmp_path / "spool") if spool else None)
    for seen in result["workers"]:
        assert seen["write"]["error"] == "SinkClosed"
        assert seen["flush"]["error"] == "SinkClosed"
    published = published_ids(tmp_path / "bucket")
    assert published == Counter(result["accepted"])
    assert result["published_rows"] == len(result["accepted"])
