"""The local writer under real faults: a full disk, failing writes, fsyncs and links, and writers killed mid-publish.

A failed publish leaves nothing behind (no temporary file, no half-published name), and what a killed writer left is
removed when a sink opens the prefix again, but never the temporary file of a writer that is still at work.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

import cio_sync
from tests import faults
from tests.faults import leftovers, published_ids
from tests.writer_scenarios import files_under

ROOT = Path(__file__).resolve().parents[1]
NO_WAIT = cio_sync.RetryPolicy(attempts=2, initial_delay=0, max_delay=0)


def test_a_publish_on_a_full_disk_fails_naming_the_file_leaves_nothing_and_works_once_space_returns(
    small_disk: faults.SmallDisk,
) -> None:
    root = small_disk.path / "prefix"
    writer = cio_sync.FsspecWriter(str(root), retry=NO_WAIT)
    writer.publish("1.2.1.track.parquet", b"small", table="track", rows=1)
    data = os.urandom(2**20)
    small_disk.fill(leave=0)
    with pytest.raises(cio_sync.StorageError, match=r"1\.2\.2\.track\.parquet.*No space left"):
        writer.publish("1.2.2.track.parquet", data, table="track", rows=1)
    assert files_under(root) == ["1.2.1.track.parquet"]
    small_disk.free()
    writer.publish("1.2.2.track.parquet", data, table="track", rows=1)
    assert (root / "1.2.2.track.parquet").read_bytes() == data
    assert leftovers(root) == []


def test_a_sink_on_a_full_disk_leaves_no_temporary_files_and_publishes_every_call_once_space_returns(
    small_disk: faults.SmallDisk,
) -> None:
    root = small_disk.path / "prefix"
    sink = cio_sync.AdvancedSink(str(root), flush_interval=None, retry=NO_WAIT)
    sink.write({"type": "track", "userId": "u", "event": "E", "messageId": "first"})
    sink.flush()
    for i in range(200):
        sink.write({"type": "track", "userId": "u", "event": "E", "messageId": f"m{i}", "properties": {"i": i}})
    small_disk.fill(leave=0)
    with pytest.raises(cio_sync.StorageError):
        sink.flush()
    assert leftovers(root) == []  # counter markers and manifests publish through the same writer
    small_disk.free()
    sink.close()
    assert published_ids(root) == {"first": 1, **{f"m{i}": 1 for i in range(200)}}
    assert leftovers(root) == []


FAULTS = {
    "write ENOSPC, half written": {"ops": "write", "errno": errno.ENOSPC, "partial": True, "count": 2},
    "write EIO": {"ops": "write", "errno": errno.EIO},
    "fsync ENOSPC": {"ops": "fsync", "errno": errno.ENOSPC},
    "fsync EIO": {"ops": "fsync", "errno": errno.EIO},
    "link ENOSPC": {"ops": "link", "errno": errno.ENOSPC},
    "link EIO": {"ops": "link", "errno": errno.EIO},
    "directory fsync EIO": {"ops": "fsync", "nth": 2, "errno": errno.EIO},
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_a_publish_that_fails_leaves_no_file_behind_and_the_next_one_works(
    faultfs: Path, tmp_path: Path, fault: dict[str, object]
) -> None:
    root = tmp_path / "prefix"
    done = faults.run_child("tests.writer_scenarios:publish_under_fault", str(root), "1.2.7.track.parquet", 300_000,
                            {"nth": 1, **fault}, prefix=root)
    assert done.returncode == 0, done.stderr
    assert done.result["failures"] >= 1
    assert done.result["error"].startswith("StorageError: ")
    assert str(root / "1.2.7.track.parquet") in done.result["error"]
    assert done.result["added"] == []  # neither a temporary file nor the name of a publish that raised
    assert done.result["published"]
    assert leftovers(root) == []


def test_a_temporary_file_that_could_not_be_removed_is_removed_when_the_prefix_is_opened_again(
    faultfs: Path, tmp_path: Path
) -> None:
    root = tmp_path / "prefix"
    # The link fails, and so does the removal of the temporary file after it.
    done = faults.run_child("tests.writer_scenarios:publish_under_fault", str(root), "1.2.7.track.parquet", 1000,
                            {"ops": "link,unlink", "count": 2, "errno": errno.EIO}, prefix=root)
    assert done.returncode == 0, done.stderr
    assert leftovers(root)
    cio_sync.AdvancedSink(str(root), flush_interval=None).close()
    assert leftovers(root) == []


KILLS = {
    "before the write": {"ops": "write", "kill": "before"},
    "after the write": {"ops": "write", "kill": "after"},
    "before the link": {"ops": "link", "kill": "before"},
    "after the link": {"ops": "link", "kill": "after"},
}


@pytest.mark.parametrize("kill", KILLS.values(), ids=KILLS.keys())
def test_what_a_writer_killed_mid_publish_left_is_removed_when_a_sink_opens_the_prefix(
    faultfs: Path, tmp_path: Path, kill: dict[str, object]
) -> None:
    root = tmp_path / "prefix"
    # The second write (and link) of the flush is the data file's (the first is its position's counter marker).
    done = faults.run_child("tests.writer_scenarios:sink_killed_mid_publish", str(root), None, 50,
                            {"nth": 2, **kill}, prefix=root)
    assert done.killed, done.stderr
    assert leftovers(root), "the kill left no temporary file: the test did not hit a publish"
    cio_sync.AdvancedSink(str(root), flush_interval=None).close()
    assert leftovers(root) == []


def test_after_a_publish_killed_before_its_link_a_warehouse_glob_of_the_prefix_counts_every_row_once(
    faultfs: Path, tmp_path: Path
) -> None:
    root, spool = tmp_path / "prefix", tmp_path / "spool"
    done = faults.run_child("tests.writer_scenarios:sink_killed_mid_publish", str(root), str(spool), 300,
                            {"ops": "link", "nth": 2, "kill": "before"}, prefix=root)
    assert done.killed, done.stderr
    # The restart publishes the spooled calls; a reader then globs every file of the prefix.
    cio_sync.AdvancedSink(str(root), spool_dir=str(spool), flush_interval=None).close()
    counted = duckdb.sql(f"SELECT count(*), count(DISTINCT \"messageId\") FROM read_parquet('{root}/*')").fetchall()
    assert counted == [(300, 300)]


def test_opening_a_prefix_removes_a_dead_writers_temporary_file_but_never_a_live_ones(
    faultfs: Path, tmp_path: Path
) -> None:
    root = tmp_path / "prefix"
    dead = faults.run_child("tests.writer_scenarios:sink_killed_mid_publish", str(root), None, 10,
                            {"ops": "link", "nth": 2, "kill": "before"}, prefix=root)
    assert dead.killed, dead.stderr
    [left] = leftovers(root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with subprocess.Popen(
        [sys.executable, "-c", "import sys; from tests.writer_scenarios import publish_slowly; "
                               "publish_slowly(sys.argv[1], '9.9.9.track.parquet', 1 << 20)", str(root)],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as live:
        assert live.stdout is not None
        assert live.stdin is not None
        try:
            writing = live.stdout.readline().strip()  # the live writer's temporary file, written, not published
            assert writing, "the live writer did not get to its fsync"
            assert Path(writing).exists()
            cio_sync.AdvancedSink(str(root), flush_interval=None).close()
            assert not Path(left).exists()
            assert Path(writing).exists()
            live.stdin.write("go on\n")
            live.stdin.flush()
            assert live.stdout.readline().strip() == "published"
        finally:
            if live.poll() is None:
                live.kill()
    assert (root / "9.9.9.track.parquet").read_bytes() == bytes(range(256)) * 4096
    assert leftovers(root) == []
