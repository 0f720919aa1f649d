"""The spool under real faults: full disks, failing writes and fsyncs, damaged files, a second owner.

Every test checks what a user sees: which calls ``write()`` accepted or refused, which are in the published files
(each accepted call in exactly one, nothing refused), the dead letters with their reasons, and that the sink starts
and goes on working once the fault clears. Faults come from the harness (tests/faults.py): faultfs fails or kills
at a chosen write, fsync, truncate, rename, create or unlink of the spool; SmallDisk is a real disk that fills up.

The sweep fails or kills each of the spool's write points of a clean run in turn (sampled evenly: 16 trials by
default, ``CIO_SYNC_SPOOL_TRIALS`` trials, or ``CIO_SYNC_CRASH_TRIALS`` as ``nox -s crash`` sets it; ``all`` for every
point), then restarts on the spool. Set ``CIO_SYNC_SWEEP_REPORT`` to a path to get its counts as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cio_sync
from cio_sync import FsspecWriter, RetryPolicy
from tests import faults
from tests.faults import EIO, ENOSPC, leftovers, published_ids
from tests.spool_scenarios import call, read_acks
from tests.test_writer import FlakyMemory

ROOT = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------------------------------


def paths_in(folder: Path) -> dict[str, str]:
    return {"target": str(folder / "target"), "spool": str(folder / "spool")}


def abandon(sink: cio_sync.AdvancedSink) -> None:
    """Drop a sink as if its process had been killed: no flush, its spool files left as they are, no lock held."""
    from cio_sync.publish.publisher import _OPEN

    _OPEN.discard(sink._publisher)
    spool = sink.spool
    assert spool is not None
    for segment in spool._open.values():
        os.close(segment.fd)
    spool._open.clear()
    if spool._lock_fd is not None:
        os.close(spool._lock_fd)
        spool._lock_fd = None


def restart(paths: dict[str, str], count: int = 2, tag: str = "r") -> list[str]:
    """Open a sink on the spool (recovering what it holds), write ``count`` calls, close it; their ids."""
    with cio_sync.AdvancedSink(paths["target"], spool_dir=paths["spool"], flush_interval=None) as sink:
        return [sink.write(call(f"{tag}{i}", i)) for i in range(count)]


def dead_letters(target: Path) -> list[list[dict[str, Any]]]:
    """Every dead-letter file under the target, as its JSON lines (the first line gives the reason)."""
    folder = target / "_cio_sync" / "dead_letters"
    return [[json.loads(line) for line in p.read_text().splitlines()] for p in sorted(folder.rglob("*.jsonl"))]


def spool_files(spool: Path) -> list[str]:
    """What is left in the spool besides its lock: segments, recorded names and files, temporary files."""
    return sorted(str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file() and p.name != ".lock")


def assert_exactly_once(target: Path, accepted: list[str], refused: list[str] | dict[str, str],
                        in_flight: str | None = None) -> Counter[str]:
    published = published_ids(target)
    assert {i: n for i, n in published.items() if n > 1} == {}, "published twice"
    assert [i for i in accepted if published[i] != 1] == [], "accepted but not published"
    assert [i for i in refused if published[i]] == [], "refused but published"
    assert set(published) <= {*accepted, *([in_flight] if in_flight else [])}, "published but never written"
    return published


def write_calls(sink: cio_sync.AdvancedSink, ids: list[str], start: int = 0) -> tuple[list[str], list[str]]:
    accepted, refused = [], []
    for i, call_id in enumerate(ids, start):
        try:
            sink.write(call(call_id, i))
        except cio_sync.StorageError:
            refused.append(call_id)
        else:
            accepted.append(call_id)
    return accepted, refused


# -- failed appends ------------------------------------------------------------------------------------------------


def test_a_write_that_fails_part_way_is_refused_and_the_calls_after_it_survive_a_crash(faultfs: Path,
                                                                                       tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    steps = [["open"], ["write", 10], ["arm", {"ops": "write", "nth": 1, "count": 2, "partial": True}], ["write", 1],
             ["disarm"], ["write", 10], ["exit"]]
    done = faults.run_child("drive", "advanced", paths, steps, prefix=paths["spool"])
    assert done.returncode == 0, done.stderr
    assert done.result["refused"] == ["c10"]
    assert "StorageError" in done.result["refusals"][0][1]
    assert paths["spool"] in done.result["refusals"][0][1]
    assert len(done.result["accepted"]) == 20
    restarted = restart(paths)
    assert_exactly_once(Path(paths["target"]), done.result["accepted"] + restarted, done.result["refused"])
    assert dead_letters(Path(paths["target"])) == []
    assert spool_files(Path(paths["spool"])) == []


def test_a_failed_fsync_refuses_the_call_and_its_row_is_never_published(faultfs: Path, tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    steps = [["open"], ["write", 5], ["arm", {"ops": "fsync", "nth": 1, "errno": EIO}], ["write", 1], ["disarm"],
             ["write", 5], ["exit"]]
    done = faults.run_child("drive", "advanced", paths, steps, prefix=paths["spool"])
    assert done.returncode == 0, done.stderr
    assert done.result["refused"] == ["c5"]
    restarted = restart(paths)
    assert_exactly_once(Path(paths["target"]), done.result["accepted"] + restarted, ["c5"])
    assert len(done.result["accepted"]) == 10


def test_a_torn_write_that_cannot_be_truncated_away_retires_its_segment(faultfs: Path, tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    # The write fails half-way, then so does the truncation meant to take its bytes back.
    steps = [["open"], ["write", 6], ["arm", {"ops": "write,truncate", "nth": 1, "count": 2, "partial": True}],
             ["write", 1], ["disarm"], ["write", 6], ["exit"]]
    done = faults.run_child("drive", "advanced", paths, steps, prefix=paths["spool"])
    assert done.returncode == 0, done.stderr
    assert done.result["refused"] == ["c6"]
    restarted = restart(paths)
    assert_exactly_once(Path(paths["target"]), done.result["accepted"] + restarted, ["c6"])
    assert len(done.result["accepted"]) == 12
    assert dead_letters(Path(paths["target"])) == []  # the torn block ends its segment: dropped, never accepted


def test_a_failed_fsync_whose_row_cannot_be_truncated_away_is_never_published(faultfs: Path, tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    # The row is written whole, its fsync fails, and so does the truncation meant to take it back.
    steps = [["open"], ["write", 5], ["arm", {"ops": "fsync,truncate", "nth": 1, "count": 2, "errno": EIO}],
             ["write", 1], ["disarm"], ["write", 5], ["exit"]]
    done = faults.run_child("drive", "advanced", paths, steps, prefix=paths["spool"])
    assert done.returncode == 0, done.stderr
    assert done.result["refused"] == ["c5"]
    restarted = restart(paths)
    assert_exactly_once(Path(paths["target"]), done.result["accepted"] + restarted, ["c5"])
    assert len(done.result["accepted"]) == 10
    assert spool_files(Path(paths["spool"])) == []


def test_a_full_disk_refuses_calls_and_the_sink_goes_on_when_space_returns(faultfs: Path,
                                                                           small_disk: faults.SmallDisk,
                                                                           tmp_path: Path) -> None:
    paths = {"target": str(tmp_path / "target"), "spool": str(small_disk.path / "spool"),
             "disk": str(small_disk.path)}
    # The calls written while the disk is full and after it has room again stay in the open segments until the
    # crash: the restarted sink reads them back from there.
    steps = [["open"], ["write", 30], ["flush"], ["write", 30], ["fill", 0], ["write", 30], ["free"], ["write", 30],
             ["exit"]]
    done = faults.run_child("drive", "advanced", paths, steps, prefix=small_disk.path)
    assert done.returncode == 0, done.stderr
    assert done.result["refused"], "the disk never filled up"
    assert all("StorageError" in error for _, error in done.result["refusals"])
    assert done.result["accepted"][-30:] == [f"c{i}" for i in range(90, 120)]  # space came back
    restarted = restart(paths)
    assert_exactly_once(Path(paths["target"]), done.result["accepted"] + restarted, done.result["refused"])
    assert dead_letters(Path(paths["target"])) == []
    assert spool_files(Path(paths["spool"])) == []


# -- naming a batch ------------------------------------------------------------------------------------------------


def test_a_name_that_could_not_be_recorded_is_never_published_twice(faultfs: Path, tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    # Recording the name fails (the spool's disk is full), the flush is retried, and the process is killed once the
    # file landed but before the spool let the batch go.
    steps = [["open"], ["write", 3], ["arm", {"ops": "create", "nth": 1, "count": 100}], ["flush"],
             ["arm", {"ops": "unlink", "nth": 1, "kill": "before"}], ["flush"]]
    done = faults.run_child("drive", "advanced", paths, steps, prefix=paths["spool"])
    assert done.killed, done.stderr
    restart(paths, count=0)
    published = published_ids(Path(paths["target"]))
    assert {i: n for i, n in published.items() if n != 1} == {}
    assert {"c0", "c1", "c2"} <= set(published)


def test_a_failure_recording_a_name_is_a_storage_error_naming_the_spool(faultfs: Path, tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    steps = [["open"], ["write", 2], ["arm", {"ops": "rename", "nth": 1, "errno": EIO}], ["flush"], ["disarm"],
             ["flush"], ["close"]]
    done = faults.run_child("drive", "advanced", paths, steps, prefix=paths["spool"])
    assert done.returncode == 0, done.stderr
    [(step, error)] = done.result["errors"]
    assert step == "flush"
    assert error.startswith("StorageError: ")
    assert paths["spool"] in error
    assert_exactly_once(Path(paths["target"]), done.result["accepted"], [])
    assert spool_files(Path(paths["spool"])) == []


# -- spilling while storage or the disk is down ---------------------------------------------------------------------


def test_spilled_batches_publish_once_the_spool_disk_has_room_again(small_disk: faults.SmallDisk,
                                                                     tmp_path: Path) -> None:
    target = tmp_path / "target"
    sink = cio_sync.AdvancedSink(str(target), spool_dir=small_disk.path / "spool", flush_interval=None,
                                 max_buffer_bytes=1)
    accepted, refused = write_calls(sink, ["c0", "c1", "c2"])
    small_disk.fill(leave=0)
    more, refused = write_calls(sink, ["c3", "c4"], start=3)  # the spill cannot record names: nothing lands
    with pytest.raises(cio_sync.StorageError, match=str(small_disk.path)):
        sink.flush()
    small_disk.free()
    sink.flush()
    sink.close()
    assert_exactly_once(target, accepted + more, refused)


def test_the_memory_budget_holds_through_spills_and_reads_back_while_storage_is_down(tmp_path: Path) -> None:
    fs = FlakyMemory(failures=["before"] * 100_000, skip_instance_cache=True)  # every publish fails, counters too
    writer = FsspecWriter(f"/down-{os.getpid()}-{tmp_path.name}", filesystem=fs,
                          retry=RetryPolicy(attempts=1, initial_delay=0))
    budget = 5_000
    sink = cio_sync.AdvancedSink(writer, flush_interval=None, max_buffer_bytes=budget, max_rows=10,
                                 spool_dir=tmp_path / "spool")
    held = []
    for i in range(300):
        sink.write({"type": "track", "userId": str(i), "event": "E", "properties": {"pad": "x" * 100}})
        if i % 50 == 49:
            with pytest.raises(cio_sync.StorageError):
                sink.flush()  # reads spilled batches back, fails, lets them go again
        held.append(sink.stats.bytes_in_memory)
    assert min(held) >= 0
    assert max(held) < budget + 2_000
    fs.failures.clear()
    assert sum(f.rows for f in sink.close()) == 300
    assert sink.stats.bytes_in_memory == 0


# -- recovery of damaged spools ------------------------------------------------------------------------------------


def spooled(tmp_path: Path, count: int, kind: str = "track") -> tuple[dict[str, str], list[str], Path]:
    """``count`` calls of one type accepted by a sink that then died: the paths, their ids, their segment."""
    paths = paths_in(tmp_path)
    sink = cio_sync.AdvancedSink(paths["target"], spool_dir=paths["spool"], flush_interval=None)
    ids = [sink.write({**call(f"c{i}", 0), "type": kind}) for i in range(count)]
    abandon(sink)
    [segment] = Path(paths["spool"]).rglob("*.avro")
    return paths, ids, segment


def blocks_of(segment: Path) -> tuple[bytes, list[int]]:
    """A segment's bytes and where each of its blocks ends (after its sync marker, which ends the file too)."""
    data = segment.read_bytes()
    sync = data[-16:]
    ends, at = [], data.find(sync) + 16  # the header ends with the marker as well
    while (found := data.find(sync, at)) >= 0:
        ends.append(found + 16)
        at = found + 16
    return data, ends


def test_a_flipped_byte_in_a_row_loses_only_that_row_and_is_a_dead_letter(tmp_path: Path) -> None:
    paths, ids, segment = spooled(tmp_path, 10)
    data = segment.read_bytes()
    at = data.index(b'"c4"') + 1
    segment.write_bytes(data[:at] + b"d" + data[at + 1:])  # still JSON: only a checksum tells
    restart(paths, count=0)
    assert_exactly_once(Path(paths["target"]), [i for i in ids if i != "c4"], ["c4"])
    [[header, letter]] = dead_letters(Path(paths["target"]))
    assert "damaged" in header["reason"]
    assert str(segment) in header["reason"]
    assert "CRC" in letter["reason"]
    assert '"d4"' in letter["text"]
    assert spool_files(Path(paths["spool"])) == []


def test_garbage_between_blocks_is_skipped_and_every_whole_row_kept(tmp_path: Path) -> None:
    paths, ids, segment = spooled(tmp_path, 10)
    data, ends = blocks_of(segment)
    segment.write_bytes(data[:ends[2]] + b"\x02\x90garbage\xff\x00" * 7 + data[ends[2]:])
    restart(paths, count=0)
    assert_exactly_once(Path(paths["target"]), ids, [])
    [[header, letter]] = dead_letters(Path(paths["target"]))
    assert "damaged" in header["reason"]
    assert letter["length"] == 11 * 7
    assert "garbage" in letter["text"]


def test_a_damaged_block_in_the_middle_loses_only_its_row(tmp_path: Path) -> None:
    paths, ids, segment = spooled(tmp_path, 10)
    data, ends = blocks_of(segment)
    # The fifth block's sync marker is overwritten: that block can no longer be told whole.
    broken = data[:ends[4] - 16] + b"\xee" * 16 + data[ends[4]:]
    segment.write_bytes(broken)
    restart(paths, count=0)
    assert_exactly_once(Path(paths["target"]), [i for i in ids if i != "c4"], ["c4"])
    [[header, *letters]] = dead_letters(Path(paths["target"]))
    assert str(segment) in header["reason"]
    assert sum(letter["length"] for letter in letters) == ends[4] - ends[3]  # that block, and only it


def test_garbage_after_the_last_block_is_a_dead_letter_and_the_rows_are_kept(tmp_path: Path) -> None:
    paths, ids, segment = spooled(tmp_path, 5)
    with open(segment, "ab") as f:
        f.write(b"this is not an Avro block at all" * 3)
    restart(paths, count=0)
    assert_exactly_once(Path(paths["target"]), ids, [])
    [[_header, letter]] = dead_letters(Path(paths["target"]))
    assert "not a block" in letter["reason"]
    assert letter["length"] == 32 * 3


def test_a_segment_with_a_damaged_header_keeps_its_rows(tmp_path: Path) -> None:
    paths, ids, segment = spooled(tmp_path, 6)
    data = segment.read_bytes()
    at = data.index(b"avro.schema") + 20
    segment.write_bytes(data[:at] + b"\x00\x01\x02" + data[at + 3:])
    restart(paths, count=0)
    assert_exactly_once(Path(paths["target"]), ids, [])
    [[_header, letter]] = dead_letters(Path(paths["target"]))
    assert "header is damaged" in letter["reason"]


def test_empty_and_torn_segments_and_stray_files_never_stop_a_sink_from_starting(tmp_path: Path) -> None:
    paths, ids, segment = spooled(tmp_path, 4)
    spool = Path(paths["spool"])
    (spool / "track" / "000000000050.avro").write_bytes(b"")  # created, then the process died
    (spool / "track" / "000000000051.avro").write_bytes(segment.read_bytes()[:40])  # its header cut short
    (spool / "identify").mkdir()
    (spool / "identify" / "000000000003.avro").write_bytes(b"")
    junk = [spool / "notes.txt", spool / "track" / "README", spool / "track" / "000000000007.avro.bak",
            spool / "not_a_table" / "000000000001.avro", spool / "track" / "000000000009.name.tmp.keep"]
    for path in junk:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"someone else's file")
    restarted = restart(paths)
    assert_exactly_once(Path(paths["target"]), ids + restarted, [])
    assert dead_letters(Path(paths["target"])) == []
    assert spool_files(spool) == sorted(str(p.relative_to(spool)) for p in junk)  # left alone, and only they


def named_then_killed(tmp_path: Path) -> tuple[dict[str, str], list[str], str, Path]:
    """A batch named and uploaded by a sink that died before its spool let the batch go."""
    paths = paths_in(tmp_path)
    sink = cio_sync.AdvancedSink(paths["target"], spool_dir=paths["spool"], flush_interval=None)
    ids = [sink.write(call(f"c{i}", 0)) for i in range(5)]

    def die(batch: Any) -> None:
        raise KeyboardInterrupt("killed after the upload")

    sink.spool.published = die  # type: ignore[union-attr, method-assign]
    with pytest.raises(KeyboardInterrupt):
        sink.flush()
    abandon(sink)
    [name] = [p.name for p in Path(paths["target"]).iterdir() if p.is_file()]
    [segment] = Path(paths["spool"]).rglob("*.avro")
    return paths, ids, name, segment


def test_a_damaged_name_record_does_not_publish_the_batch_twice(tmp_path: Path) -> None:
    paths, ids, name, segment = named_then_killed(tmp_path)
    segment.with_suffix(".name").write_bytes(b'{"name": "1.2.')
    restart(paths, count=0)
    assert sorted(p.name for p in Path(paths["target"]).iterdir() if p.is_file()) == [name]
    assert_exactly_once(Path(paths["target"]), ids, [])
    assert spool_files(Path(paths["spool"])) == []


def test_a_damaged_recorded_file_is_encoded_again_under_its_name(tmp_path: Path) -> None:
    paths, ids, name, segment = named_then_killed(tmp_path)
    data_file = segment.with_suffix(".data")
    data = data_file.read_bytes()
    data_file.write_bytes(data[:100] + b"\x00" * 50 + data[150:])
    restart(paths, count=0)
    assert sorted(p.name for p in Path(paths["target"]).iterdir() if p.is_file()) == [name]
    assert_exactly_once(Path(paths["target"]), ids, [])


def test_segments_written_before_the_crc_field_are_read_and_resynchronised(tmp_path: Path) -> None:
    """A spool left by the previous version (records of row, size, time) is read, damage and all."""
    import fastavro
    import orjson
    from fastavro.write import Writer

    from cio_sync.intake.calls import call_to_row

    paths = paths_in(tmp_path)
    folder = Path(paths["spool"]) / "track"
    folder.mkdir(parents=True)
    schema = fastavro.parse_schema({"type": "record", "name": "SpooledRow", "namespace": "cio_sync", "fields": [
        {"name": "row", "type": "bytes"}, {"name": "size", "type": "long"},
        {"name": "time", "type": ["null", "long"]}]})
    segment = folder / "000000000001.avro"
    ids = [f"c{i}" for i in range(6)]
    with open(segment, "wb") as f:
        writer = Writer(f, schema)
        for i, call_id in enumerate(ids):
            _, row, size = call_to_row(call(call_id, 0), 1_796_010_578_000_000 + i)
            encoded = orjson.dumps(row, default=lambda v: v.decode())
            writer.write({"row": encoded, "size": size, "time": 1_796_010_578_000_000 + i})
            writer.flush()  # a block per row, as the spool wrote them
    data, ends = blocks_of(segment)
    segment.write_bytes(data[:ends[1]] + b"\x07" * 9 + data[ends[1]:])
    restart(paths, count=0)
    assert_exactly_once(Path(paths["target"]), ids, [])
    [[_header, letter]] = dead_letters(Path(paths["target"]))
    assert letter["length"] == 9


# -- one spool, one sink -------------------------------------------------------------------------------------------


def test_a_spool_in_use_is_refused_to_a_second_sink_until_the_first_closes(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    first = cio_sync.AdvancedSink(str(tmp_path / "a"), spool_dir=spool, flush_interval=None)
    with pytest.raises(cio_sync.StateError, match=f"spool directory {spool} is in use"):
        cio_sync.AdvancedSink(str(tmp_path / "b"), spool_dir=spool, flush_interval=None)
    first.write(call("c0", 0))
    first.close()
    with pytest.raises(cio_sync.ConfigError):  # a sink that could not start keeps no lock
        cio_sync.AdvancedSink(str(tmp_path / "b"), spool_dir=spool, flush_interval=None, when_full="sometimes")
    with cio_sync.AdvancedSink(str(tmp_path / "b"), spool_dir=spool, flush_interval=None) as second:
        second.write(call("c1", 1))
    assert published_ids(tmp_path / "a") == Counter({"c0": 1})
    assert published_ids(tmp_path / "b") == Counter({"c1": 1})


def test_a_spool_in_use_is_refused_to_another_process(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    with cio_sync.AdvancedSink(str(tmp_path / "a"), spool_dir=spool, flush_interval=None) as sink:
        sink.write(call("c0", 0))
        code = ("import sys, cio_sync\n"
                "try:\n"
                f"    cio_sync.AdvancedSink({str(tmp_path / 'b')!r}, spool_dir={str(spool)!r})\n"
                "except cio_sync.StateError as exc:\n"
                "    print(exc)\n"
                "    sys.exit(3)\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                                                os.environ.get("PYTHONPATH", "")])})
        assert done.returncode == 3, done.stderr
        assert f"spool directory {spool} is in use" in done.stdout
    assert published_ids(tmp_path / "a") == Counter({"c0": 1})
    assert published_ids(tmp_path / "b") == Counter()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_closing_its_sink_never_unlocks_the_parents_spool(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    with cio_sync.AdvancedSink(str(tmp_path / "a"), spool_dir=spool, flush_interval=None) as sink:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                sink.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        with pytest.raises(cio_sync.StateError):
            cio_sync.AdvancedSink(str(tmp_path / "b"), spool_dir=spool, flush_interval=None)


# -- the sweep -----------------------------------------------------------------------------------------------------


def _modes(op: str) -> list[str]:
    """How each write point is tried: failed (a write half-way), failed and then the truncation that would take it
    back failing too (writes and fsyncs), the process killed just before or just after it."""
    return ["fail", "fail-truncate", "kill-before", "kill-after"] if op in ("write", "fsync") else \
        ["fail", "kill-before", "kill-after"]


def _arm(op: str, nth: int, mode: str) -> dict[str, Any]:
    if mode.startswith("kill"):
        return {"ops": op, "nth": nth, "kill": mode.removeprefix("kill-")}
    fault = {"errno": EIO if op == "fsync" else ENOSPC, "partial": op == "write"}
    if mode == "fail-truncate":  # a clean run truncates nothing: nth counts the op, the next counted is the truncate
        return {"ops": f"{op},truncate", "nth": nth, "count": 2, **fault}
    return {"ops": op, "nth": nth, "count": 1, **fault}


def _trials_wanted() -> int | None:
    wanted = os.environ.get("CIO_SYNC_SPOOL_TRIALS") or os.environ.get("CIO_SYNC_CRASH_TRIALS") or "16"
    return None if wanted == "all" else int(wanted)


def test_every_spool_write_point_failing_or_killed_loses_and_duplicates_nothing(faultfs: Path,
                                                                                tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    done = faults.run_child("tests.spool_scenarios:trial", paths_in(clean), str(clean / "ack"), prefix=clean / "spool")
    assert done.returncode == 0, done.stderr
    assert done.result["errors"] == []
    totals: dict[str, int] = done.result["totals"]
    assert sum(totals.values()) > 100
    combos = [(op, n, mode) for op in faults.OPS for n in range(1, totals[op] + 1) for mode in _modes(op)]
    wanted = _trials_wanted()
    if wanted is not None and wanted < len(combos):
        step = len(combos) / wanted
        combos = [combos[int(i * step + step / 2)] for i in range(wanted)]
    counts = Counter[str]()
    problems: list[str] = []
    for number, (op, nth, mode) in enumerate(combos):
        folder = tmp_path / f"t{number}"
        paths = paths_in(folder)
        ran = faults.run_child("tests.spool_scenarios:trial", paths, str(folder / "ack"), prefix=folder / "spool",
                               **_arm(op, nth, mode))
        accepted, refused, in_flight = read_acks(str(folder / "ack"))
        fired = ran.killed or (ran.result is not None and ran.result["failures"] > 0)
        if not ran.killed and ran.returncode != 0:
            problems.append(f"{op}#{nth} {mode}: the child failed: {ran.stderr[-1500:]}")
            continue
        counts["trials"] += 1
        counts["faults injected"] += fired
        counts["calls in flight when killed"] += in_flight is not None
        counts["calls accepted"] += len(accepted)
        counts["calls refused"] += len(refused)
        counts["killed"] += ran.killed
        try:
            restarted = restart(paths, tag="r")
        except Exception as exc:
            problems.append(f"{op}#{nth} {mode}: the restarted sink failed: {type(exc).__name__}: {exc}")
            continue
        published = published_ids(Path(paths["target"]))
        lost = [i for i in accepted + restarted if published[i] == 0]
        twice = [i for i, n in published.items() if n > 1]
        wrong = [i for i in refused if published[i]]
        stray = set(published) - {*accepted, *restarted, *([in_flight] if in_flight else [])}
        counts["calls lost"] += len(lost)
        counts["calls duplicated"] += len(twice)
        counts["refused but published"] += len(wrong)
        if mode == "fail" and len(refused) > 1:
            problems.append(f"{op}#{nth} {mode}: one fault refused {len(refused)} calls: {refused}")
        left = leftovers(Path(paths["spool"])) + spool_files(Path(paths["spool"]))
        letters = dead_letters(Path(paths["target"]))
        if lost or twice or wrong or stray or left or letters:
            problems.append(f"{op}#{nth} {mode}: lost {lost}, twice {twice}, refused yet published {wrong}, "
                            f"stray {sorted(stray)}, left in the spool {left}, dead letters {letters}")
    report = os.environ.get("CIO_SYNC_SWEEP_REPORT")
    if report:
        Path(report).write_text(json.dumps({"points": totals, "combinations": len(combos), **counts}, indent=2))
    assert problems == []
    assert counts["trials"] == len(combos)


# -- the reader, by property ---------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=12),
       damage=st.sampled_from(["flip", "insert", "cut", "overwrite"]), where=st.floats(0, 1),
       junk=st.binary(min_size=1, max_size=60))
def test_reading_a_damaged_segment_never_fails_and_keeps_every_block_the_damage_missed(
        rows: list[bytes], damage: str, where: float, junk: bytes) -> None:
    import io

    from fastavro.write import Writer

    from cio_sync.buffer.spool import _AVRO_SCHEMA, _block, _read_segment

    out = io.BytesIO()
    writer = Writer(out, _AVRO_SCHEMA)
    writer.flush()
    header = out.getvalue()
    sync = bytes(writer.sync_marker)  # type: ignore[attr-defined]
    blocks = [_block(row, len(row), i, sync) for i, row in enumerate(rows)]
    data = header + b"".join(blocks)
    at = len(header) + int(where * (len(data) - len(header) - 1))
    if damage == "flip":
        damaged = data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:]
        hit = (at, at + 1)
    elif damage == "insert":
        damaged, hit = data[:at] + junk + data[at:], (at, at)
    elif damage == "cut":
        damaged, hit = data[:at], (at, len(data))
    else:
        damaged = data[:at] + junk + data[at + len(junk):]
        hit = (at, at + len(junk))
    reading = _read_segment(damaged)
    got = [r[0] for r in reading.records]
    start = len(header)
    missed = []
    for row, block in zip(rows, blocks, strict=True):
        end = start + len(block)
        if end <= hit[0] or (start >= hit[1] and damage != "cut"):
            missed.append(row)
        start = end
    assert [r for r in missed if r not in got] == [], "a whole block that no damage touched was lost"
    assert set(got) <= set(rows)
