"""Group commit: ``spool_sync="group"`` and the durability barrier ``sync()``.

What a user sees: calls whose ``sync()`` returned survive ``kill -9`` and are published exactly once; threads that
sync at once share fsyncs (the spool counts them); a failed fsync makes ``sync()`` raise ``StorageError`` and the
calls it covered are published once from memory (or, after a crash, at most once: they were never said to be
durable); the policy is accepted wherever a policy is, and a bad name is still a ``ConfigError``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

import cio_sync
from tests import faults
from tests.faults import EIO, ENOSPC, published_ids
from tests.spool_scenarios import call

ROOT = Path(__file__).resolve().parents[1]


def paths_in(folder: Path) -> dict[str, str]:
    return {"target": str(folder / "target"), "spool": str(folder / "spool")}


def restart(paths: dict[str, str]) -> None:
    """Open a sink on the spool (publishing what it recovers) and close it."""
    with cio_sync.AdvancedSink(paths["target"], spool_dir=paths["spool"], flush_interval=None):
        pass


class OrdersSink(cio_sync.BufferedSink):
    tables = {"orders": pa.schema([("messageId", pa.string()), ("event", pa.string())])}

    def route(self, parsed: cio_sync.Call):  # type: ignore[no-untyped-def]
        yield "orders", {"messageId": parsed.message_id, "event": parsed.data.get("event")}


# -- kill -9 -------------------------------------------------------------------------------------------------------


def test_calls_whose_sync_returned_survive_kill_9_and_are_published_once(tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    code = ("import sys\nfrom tests.group_scenarios import sync_forever\n"
            "sync_forever(sys.argv[1], sys.argv[2], 4, 100000)\n")
    child = subprocess.Popen([sys.executable, "-c", code, paths["target"], paths["spool"]], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    synced: list[str] = []
    try:
        assert child.stdout is not None
        while len(synced) < 300:
            line = child.stdout.readline()
            if not line:
                break
            synced.append(line.split()[1])
        child.send_signal(signal.SIGKILL)
        rest, errors = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    synced += [line.split()[1] for line in rest.splitlines() if line.startswith("synced ")]
    assert child.returncode == -signal.SIGKILL, errors
    assert len(synced) >= 300, errors
    restart(paths)
    published = published_ids(Path(paths["target"]))
    assert [i for i in synced if published[i] != 1] == [], "synced but not published exactly once"
    assert {i: n for i, n in published.items() if n > 1} == {}, "published twice"


# -- sharing fsyncs ------------------------------------------------------------------------------------------------


def test_eight_threads_syncing_at_once_share_fsyncs_and_every_call_is_published_once(tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    sink = cio_sync.AdvancedSink(paths["target"], spool_dir=paths["spool"], spool_sync="group", flush_interval=None,
                                 max_rows=64)
    assert sink.spool is not None
    ids: list[list[str]] = [[] for _ in range(8)]
    syncs = 8 * 100

    def run(n: int) -> None:
        for i in range(syncs // 8):
            ids[n].append(sink.write({"type": "track", "userId": f"u{n}", "event": "E", "messageId": f"{n}-{i}"}))
            sink.sync()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fsyncs = sink.spool.fsyncs  # every fsync of a segment: sync() rounds and the segments closed by cuts
    sink.close()
    assert 0 < fsyncs < syncs
    published = published_ids(Path(paths["target"]))
    assert published == Counter({i: 1 for thread_ids in ids for i in thread_ids})


def test_with_the_group_policy_write_never_fsyncs_and_sync_does(tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    with cio_sync.AdvancedSink(paths["target"], spool_dir=paths["spool"], spool_sync="group",
                               flush_interval=None) as sink, \
            cio_sync.AdvancedSink(str(tmp_path / "t2"), spool_dir=tmp_path / "s2", flush_interval=None) as always:
        assert sink.spool is not None
        assert always.spool is not None
        for i in range(10):
            sink.write(call(f"g{i}", 0))
            always.write(call(f"a{i}", 0))
        assert (sink.spool.fsyncs, always.spool.fsyncs) == (0, 10)
        sink.sync()
        sink.sync()  # nothing new: no fsync
        always.sync()  # "always" fsynced every row already
        assert (sink.spool.fsyncs, always.spool.fsyncs) == (1, 10)


def test_sync_without_a_spool_returns_at_once_and_the_calls_are_published(tmp_path: Path) -> None:
    with cio_sync.AdvancedSink(str(tmp_path / "t"), flush_interval=None) as sink:
        sink.write(call("c0", 0))
        sink.sync()
    assert published_ids(tmp_path / "t") == Counter({"c0": 1})


@pytest.mark.parametrize("policy", ["os", "interval"])
def test_sync_is_a_barrier_with_every_policy(tmp_path: Path, policy: str) -> None:
    paths = paths_in(tmp_path)
    with cio_sync.AdvancedSink(paths["target"], spool_dir=paths["spool"], spool_sync=policy,
                               spool_sync_interval=3600, flush_interval=None, max_rows=3) as sink:
        assert sink.spool is not None
        sink.write(call("c0", 0))  # "interval": the first row is fsynced, the next ones wait an hour
        before = sink.spool.fsyncs
        for i in range(1, 7):
            sink.write(call(f"c{i}", 0))  # one table; max_rows=3 cuts two batches
        sink.sync()
        assert sink.spool.fsyncs > before
    assert published_ids(Path(paths["target"])) == Counter({f"c{i}": 1 for i in range(7)})


# -- a failed fsync ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("errno", [EIO, ENOSPC], ids=["EIO", "ENOSPC"])
def test_a_failed_fsync_makes_sync_raise_until_the_calls_it_covered_are_published_once(
        faultfs: Path, tmp_path: Path, errno: int) -> None:
    paths = paths_in(tmp_path)
    done = faults.run_child("tests.group_scenarios:sync_through_a_failed_fsync", paths, errno, True,
                            prefix=paths["spool"])
    assert done.returncode == 0, done.stderr
    result = done.result
    assert result["fsync_failures"] == 1
    assert result["synced"] == ["c0", "c1", "c2", "c3", "c4", "c10", "c11", "c12", "c13", "c14"]
    assert result["not_synced"] == ["c5", "c6", "c7", "c8", "c9"]
    assert result["sticky"] == 2  # a sync() after the failure, before the flush, raised too
    assert all(e.startswith("StorageError: ") and paths["spool"] in e for e in result["errors"]), result["errors"]
    restart(paths)
    # The calls the failed sync() covered were published from memory by the flush; the last five by the restart.
    assert published_ids(Path(paths["target"])) == Counter({f"c{i}": 1 for i in range(15)})


def test_calls_a_failed_sync_covered_are_never_published_twice_after_a_crash(faultfs: Path, tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    done = faults.run_child("tests.group_scenarios:sync_through_a_failed_fsync", paths, EIO, False,
                            prefix=paths["spool"])
    assert done.returncode == 0, done.stderr
    assert done.result["not_synced"] == ["c5", "c6", "c7", "c8", "c9"]
    restart(paths)
    published = published_ids(Path(paths["target"]))
    assert {i: n for i, n in published.items() if n > 1} == {}, "published twice"
    assert [i for i in done.result["synced"] if published[i] != 1] == []
    assert set(published) <= {f"c{i}" for i in range(10)}


# -- the policy's name ---------------------------------------------------------------------------------------------


def test_the_group_policy_is_accepted_by_every_sink_with_a_spool(tmp_path: Path) -> None:
    with cio_sync.AdvancedSink(str(tmp_path / "a"), spool_dir=tmp_path / "sa", spool_sync="group",
                               flush_interval=None) as advanced:
        advanced.write(call("a0", 0))
        advanced.sync()
    with OrdersSink(str(tmp_path / "b"), spool_dir=tmp_path / "sb", spool_sync="group", flush_interval=None) as orders:
        orders.write({"type": "track", "userId": "u", "event": "E", "messageId": "b0"})
        orders.sync()
    pipeline_advanced = cio_sync.AdvancedSink(str(tmp_path / "c"), spool_dir=tmp_path / "sc", spool_sync="group",
                                              flush_interval=None)
    with cio_sync.Pipeline(advanced=pipeline_advanced) as pipeline:
        pipeline.write(call("c0", 0))
        pipeline.sync()
    assert published_ids(tmp_path / "a") == Counter({"a0": 1})
    assert published_ids(tmp_path / "b") == Counter({"b0": 1})
    assert published_ids(tmp_path / "c") == Counter({"c0": 1})
    assert "group" in cio_sync.buffer.spool.SYNC_POLICIES


@pytest.mark.parametrize("policy", ["Group", "groups", "", "fsync"])
def test_a_bad_policy_name_is_still_a_config_error(tmp_path: Path, policy: str) -> None:
    with pytest.raises(cio_sync.ConfigError, match="spool_sync must be one of always, interval, os, group"):
        cio_sync.AdvancedSink(str(tmp_path / "t"), spool_dir=tmp_path / "s", spool_sync=policy)
    with pytest.raises(cio_sync.ConfigError, match="spool_sync"):
        OrdersSink(str(tmp_path / "t"), spool_dir=tmp_path / "s", spool_sync=policy)
