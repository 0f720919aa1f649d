"""The workspace state on a full disk and under I/O errors: a write the state cannot make is refused whole with a
StorageError naming the file, nothing refused is ever published, nothing accepted is lost or published twice, and
the sink goes on as soon as the disk takes writes again. Also: an empty state file is not a new workspace, and a new
one is never left half-created.

The faults are real: a small tmpfs that fills up (tests/faults.py:SmallDisk) and faultfs failing SQLite's own
writes to the state's folder (its -wal and -shm included). Each call carries its own id as the value of its trait
``n`` (tests/state_scenarios.py), so every accepted call is one ``attributes`` row with that value.

``CIO_SYNC_CRASH_TRIALS`` (set by ``nox -s crash``) makes the sweeps fail every write point instead of a sample.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import cio_sync
from tests import faults, state_scenarios
from tests.faults import EIO, ENOSPC

WORKSPACE = state_scenarios.WORKSPACE
#: Write points failed per sweep in the default run (evenly spread over all of them); every one with the variable.
SAMPLE = 0 if os.environ.get("CIO_SYNC_CRASH_TRIALS") else 6
#: How a sweep's fault behaves: a disk that fills up (the first failing write writes half its bytes, and every
#: write fails until the fault clears), or a single I/O error.
FAULTS: dict[str, dict[str, Any]] = {
    "disk-full": {"errno": ENOSPC, "count": 10**6, "partial": True},
    "io-error": {"errno": EIO, "count": 1},
}


def sink_on(state: Path, target: Path, **options: Any) -> cio_sync.StandardSink:
    return cio_sync.StandardSink(str(target), workspace_id=WORKSPACE, state=state, flush_interval=None, **options)


def call(call_id: str, index: int) -> dict[str, Any]:
    return state_scenarios.call(call_id, index)


def changes(target: Path) -> Counter[str]:
    """How many times each call's change (the value of its trait ``n``) was published, over every data file."""
    found: Counter[str] = Counter()
    for path in sorted(target.glob("attributes_*.parquet")):
        for row in pq.read_table(path, columns=["attribute_name", "attribute_value"]).to_pylist():
            if row["attribute_name"] == "n":
                found[row["attribute_value"]] += 1
    return found


def restart(state: Path | str, target: Path | str) -> None:
    """What the next process does: open a sink on the same state (it publishes what the state holds) and close."""
    sink_on(Path(state), Path(target)).close()


def assert_kept_exactly(published: Counter[str], accepted: list[str], refused: list[str]) -> None:
    """Every accepted call's change in exactly one published file; nothing refused published; nothing twice."""
    assert {c: n for c, n in published.items() if n > 1} == {}, "published twice"
    assert [c for c in accepted if published[c] != 1] == [], "accepted but not published"
    assert [c for c in refused if published[c]] == [], "refused but published"


def assert_refused_by_the_state(report: dict[str, Any], state: str) -> None:
    """Every refusal and every failed step says StorageError and names the state file (never a raw sqlite3
    error); and once the fault cleared, every call (if any) was accepted and every step worked."""
    for call_id, error in report["refusals"]:
        assert error.startswith("StorageError: "), (call_id, error)
        assert state in error, (call_id, error)
    for _, step, error in report["errors"]:
        assert error.startswith("StorageError: "), (step, error)
        assert state in error, (step, error)
    assert report["disarmed_at"] is not None
    assert [c for c in report["after"] if c not in report["accepted"]] == [], "refused after the fault cleared"
    assert [e for e in report["errors"] if e[0] > report["disarmed_at"]] == [], "failed after the fault cleared"


# -- a real full disk ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("commit_every", [1, 5])
def test_a_write_on_a_full_disk_is_refused_naming_the_state_and_the_sink_goes_on_once_there_is_room(
        small_disk: faults.SmallDisk, tmp_path: Path, commit_every: int) -> None:
    state, target = small_disk.path / "ws.sqlite", tmp_path / "target"
    accepted: list[str] = []
    refused: list[str] = []
    sink = sink_on(state, target, commit_every=commit_every)
    errors: list[str] = []
    index = 0

    def write(n: int) -> None:
        nonlocal index
        for _ in range(n):
            call_id = f"c{index}"
            try:
                sink.write(call(call_id, index))
            except cio_sync.StorageError as exc:
                errors.append(str(exc))
                refused.append(call_id)
            else:
                accepted.append(call_id)
            index += 1

    write(5)
    small_disk.fill(leave=0)
    write(12)  # the state's next commit needs room: refused (with commit_every=5, the calls before it are kept)
    assert refused
    assert all(str(state) in error and "full" in error for error in errors)
    small_disk.free()
    write(8)
    assert accepted[-8:] == [f"c{i}" for i in range(index - 8, index)]
    sink.close()
    restart(state, target)
    assert_kept_exactly(changes(target), accepted, refused)


@pytest.mark.parametrize("commit_every", [1, 1000])
def test_a_flush_on_a_full_disk_fails_whole_and_the_next_one_publishes_every_call_once(
        small_disk: faults.SmallDisk, tmp_path: Path, commit_every: int) -> None:
    state, target = small_disk.path / "ws.sqlite", tmp_path / "target"
    sink = sink_on(state, target, commit_every=commit_every)
    accepted = [f"c{i}" for i in range(30)]
    for i, call_id in enumerate(accepted):
        sink.write(call(call_id, i))
    small_disk.fill(leave=0)
    with pytest.raises(cio_sync.StorageError, match=str(state)):
        sink.flush()  # committing the calls, or naming the batches before their upload: no room
    with pytest.raises(cio_sync.StorageError, match=str(state)):
        sink.close()  # still full: close fails too, and keeps everything
    small_disk.free()
    sink.close()
    restart(state, target)
    assert_kept_exactly(changes(target), accepted, [])


# -- faultfs: SQLite's own writes fail -------------------------------------------------------------------------------


def run_trials(tmp_path: Path, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run :func:`tests.state_scenarios.trials` in one faultfs child watching ``tmp_path/"states"``."""
    done = faults.run_child("tests.state_scenarios:trials", runs, prefix=tmp_path / "states")
    assert done.result is not None, done.stderr
    reports: list[dict[str, Any]] = done.result["reports"]
    return reports


def trial_paths(tmp_path: Path, n: int = 0) -> dict[str, str]:
    (tmp_path / "states" / str(n)).mkdir(parents=True, exist_ok=True)
    return {"state": str(tmp_path / "states" / str(n) / "ws.sqlite"), "target": str(tmp_path / "targets" / str(n))}


@pytest.mark.parametrize("errno", [ENOSPC, EIO], ids=["ENOSPC", "EIO"])
def test_a_failed_commit_refuses_exactly_the_call_that_made_it(faultfs: Path, tmp_path: Path, errno: int) -> None:
    paths = trial_paths(tmp_path)
    # The next write to the state fails once: the commit of the fourth call, which is refused alone.
    [report] = run_trials(tmp_path, [{"paths": paths, "steps": [
        ["open"], ["write", 3], ["arm", {"ops": "write", "nth": 1, "errno": errno}], ["write", 1], ["disarm"],
        ["write", 3], ["exit"]]}])
    assert report["refused"] == ["c3"]
    assert_refused_by_the_state(report, paths["state"])
    assert ("I/O error" if errno == EIO else "full") in report["refusals"][0][1]
    restart(paths["state"], paths["target"])
    assert_kept_exactly(changes(Path(paths["target"])), report["accepted"], report["refused"])


def test_with_commit_every_a_failed_group_commit_refuses_its_call_and_keeps_the_calls_before_it(
        faultfs: Path, tmp_path: Path) -> None:
    paths = trial_paths(tmp_path)
    # commit_every=5: calls 5-8 are applied in memory, call 9's step includes the commit, whose first write fails.
    [report] = run_trials(tmp_path, [{"paths": paths, "options": {"commit_every": 5}, "steps": [
        ["open"], ["write", 5], ["arm", {"ops": "write", "nth": 1, "count": 10**6}], ["write", 5], ["write", 2],
        ["disarm"], ["write", 3], ["exit"]]}])  # c10 and c11 are refused too (each is the 5th since the commit)
    assert report["refused"] == ["c9", "c10", "c11"]
    assert_refused_by_the_state(report, paths["state"])
    # c5-c8 and c12 were committed by c13's commit (the group of five); c13 and c14 died uncommitted, as documented.
    restart(paths["state"], paths["target"])
    committed = [c for c in report["accepted"] if c not in ("c13", "c14")]
    assert_kept_exactly(changes(Path(paths["target"])), committed, report["refused"] + ["c13", "c14"])


def test_a_failure_after_a_batch_was_published_republishes_the_same_file_not_a_second_one(
        faultfs: Path, tmp_path: Path) -> None:
    """Clearing a published batch from the outbox fails (the file and its manifest landed): the batch keeps its
    name and bytes, and the next flush publishes it again as a resume, recognised as the file already there."""
    # Count the state's writes in a clean flush: the last ones are the commit that clears the last batch.
    [counted] = run_trials(tmp_path, [{"paths": trial_paths(tmp_path, 0), "steps": [
        ["open"], ["write", 10], ["arm", {"ops": "write", "nth": 0}], ["flush"], ["seen"]]}])
    last = counted["seen"][0]
    runs = [{"paths": trial_paths(tmp_path, n), "steps": [
        ["open"], ["write", 10], ["arm", {"ops": "write", "nth": point, "count": 10**6}], ["flush"], ["files"],
        ["disarm"], ["flush"], ["files"], ["exit"]]} for n, point in enumerate(range(last - 3, last + 1), start=1)]
    cleared = 0
    for run, report in zip(runs, run_trials(tmp_path, runs), strict=True):
        assert_refused_by_the_state(report, run["paths"]["state"])
        if not report["errors"]:
            continue  # this run wrote a little less than the count: the point was never reached
        [(_, step, error)] = report["errors"]
        assert step == "flush"
        if "clear a published batch" not in error:
            continue
        cleared += 1
        landed, after_retry = report["files"]
        assert len(landed) == 2
        assert after_retry == landed  # the same files, under the same names: no second one
        restart(run["paths"]["state"], run["paths"]["target"])
        assert state_scenarios.data_files(run["paths"]["target"]) == landed
        assert_kept_exactly(changes(Path(run["paths"]["target"])), report["accepted"], [])
    assert cleared, "no trial failed while clearing the published batches"


def test_when_even_the_open_transaction_cannot_be_restored_the_error_says_how_many_calls_were_undone(
        faultfs: Path, tmp_path: Path) -> None:
    """The one case where accepted calls are lost without a crash: with ``commit_every`` > 1, a commit fails and
    SQLite cannot even hold the uncommitted changes again, because holding them needs the disk too (here: a page
    cache of one page makes SQLite write them to the -wal at once, and writes keep failing). The calls since the
    last commit are then undone with their rows, as a crash would, and the error says how many: none of them is
    published, nothing else is lost, and the sink goes on once the fault clears."""
    paths = trial_paths(tmp_path)
    [report] = run_trials(tmp_path, [{"paths": paths, "options": {"commit_every": 100}, "steps": [
        ["open"], ["pragma", "cache_size=1"], ["write", 4], ["commit"],
        ["write", 5], ["delete", "nobody"],  # a failed step: the people written since the commit are not cached
        ["write", 1],  # looks a person up: the people of calls c4-c8 reach the database before the commit
        ["arm", {"ops": "write", "nth": 1, "count": 10**6, "errno": EIO}], ["flush"], ["disarm"],
        ["write", 3], ["flush"], ["exit"]]}])
    [(_, step, error)] = report["errors"]
    assert step == "flush"
    assert paths["state"] in error
    assert ("the 6 call(s) or record(s) accepted since its last commit (commit_every=100) were undone with their "
            "rows") in error
    restart(paths["state"], paths["target"])
    undone = [f"c{i}" for i in range(4, 10)]
    kept = [c for c in report["accepted"] if c not in undone]
    assert kept == ["c0", "c1", "c2", "c3", "c10", "c11", "c12"]
    assert_kept_exactly(changes(Path(paths["target"])), kept, undone)


@pytest.mark.parametrize("errno", [ENOSPC, EIO], ids=["ENOSPC", "EIO"])
def test_a_flush_failing_at_any_write_of_the_state_publishes_each_call_once(faultfs: Path, tmp_path: Path,
                                                                            errno: int) -> None:
    """Every write point of a flush (committing, cutting and naming the batches, clearing them once published)
    fails in turn; the flush raises StorageError, the next one publishes the rest, and a restart adds nothing."""
    probe = trial_paths(tmp_path, 0)
    [counted] = run_trials(tmp_path, [{"paths": probe, "steps": [
        ["open"], ["write", 10], ["arm", {"ops": "write", "nth": 0}], ["flush"], ["seen"]]}])
    total = counted["seen"][0]
    points = list(range(1, total + 1))
    if SAMPLE and total > SAMPLE:
        points = sorted({1 + round(i * (total - 1) / (SAMPLE - 1)) for i in range(SAMPLE)})
    runs = [{"paths": trial_paths(tmp_path, n), "steps": [
        ["open"], ["write", 10], ["arm", {"ops": "write", "nth": point, "count": 10**6, "errno": errno}],
        ["flush"], ["files"], ["disarm"], ["flush"], ["files"], ["exit"]]} for n, point in enumerate(points, 1)]
    republished = 0
    for run, report in zip(runs, run_trials(tmp_path, runs), strict=True):
        # (Runs differ by a few writes, as the encoded files do: a point past a run's last write fails nothing.)
        assert [step for _, step, _ in report["errors"]] == (["flush"] if report["failures"] else []), report
        assert_refused_by_the_state(report, run["paths"]["state"])
        landed, after_retry = report["files"]
        assert set(landed) <= set(after_retry)
        if landed and len(landed) == len(after_retry):
            republished += 1  # failed after the files landed: the retry published no other file
        restart(run["paths"]["state"], run["paths"]["target"])
        assert state_scenarios.data_files(run["paths"]["target"]) == after_retry
        assert_kept_exactly(changes(Path(run["paths"]["target"])), report["accepted"], [])
    assert republished, "no trial failed after the files landed"


@pytest.mark.parametrize(("commit_every", "pragmas"), [(1, []), (5, []), (1, ["wal_autocheckpoint=1"])],
                         ids=["commit_every=1", "commit_every=5", "checkpoint-each-commit"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_failing_each_write_point_of_the_state_loses_nothing_and_publishes_nothing_twice(
        faultfs: Path, tmp_path: Path, fault: str, commit_every: int, pragmas: list[str]) -> None:
    """The sweep: count the state's write points over calls, flushes (cuts, names, clears) and more calls on a
    clean run, then fail each in turn (a sample by default, all with CIO_SYNC_CRASH_TRIALS), end with a crash and
    restart. After each trial: every accepted call in exactly one published file, nothing refused published,
    every error a StorageError naming the state, and every call and flush after the fault cleared accepted. (The
    third case makes SQLite copy the -wal into the state file at every commit, so its writes, fsyncs and truncates
    are failed too.)"""
    done = faults.run_child("tests.state_scenarios:sweep", str(tmp_path), {"commit_every": commit_every},
                            FAULTS[fault], SAMPLE, pragmas, prefix=tmp_path / "states")
    assert done.result is not None, done.stderr
    assert done.result["total"] > 20  # the phase does write the state, many times
    reports = done.result["reports"]
    # Runs differ by a few writes (as the encoded files do): a point past a run's last write fails nothing.
    assert sum(1 for report in reports if report["failures"]) >= len(reports) - 1
    for paths, report in zip(done.result["paths"], reports, strict=True):
        assert report["after"]
        assert_refused_by_the_state(report, paths["state"])
        restart(paths["state"], paths["target"])
        assert_kept_exactly(changes(Path(paths["target"])), report["accepted"], report["refused"])


# -- an empty state file, and a new one ------------------------------------------------------------------------------


def test_an_empty_state_file_is_refused_naming_it_not_taken_for_a_new_workspace(tmp_path: Path) -> None:
    state, target = tmp_path / "ws.sqlite", tmp_path / "target"
    with sink_on(state, target) as sink:
        sink.write(call("c0", 0))
    state.write_bytes(b"")  # its content was lost
    with pytest.raises(cio_sync.StateError, match=f"{state} is empty.*new_workspace=True"):
        sink_on(state, target)
    assert state.stat().st_size == 0  # left as it was, for its owner to restore


def test_an_empty_state_file_starts_a_new_workspace_when_asked(tmp_path: Path) -> None:
    state, target = tmp_path / "ws.sqlite", tmp_path / "target"
    state.write_bytes(b"")
    with sink_on(state, target, new_workspace=True) as sink:
        assert sink.write(call("c0", 0)) == 3  # a new person: the person, n and i
    with sink_on(state, target) as again:  # a state now, opened as any other
        assert again.person("u0")["attributes"] == {"n": "c0", "i": "0"}


def test_a_process_killed_while_creating_a_new_state_leaves_nothing_the_next_start_refuses(
        faultfs: Path, tmp_path: Path) -> None:
    """Killed right after each operation that creating a new state does (a sample by default: the first few,
    which create the files, and an even spread), the next start opens the state (no new_workspace needed), there is
    never an empty state file, and nothing is left beside it."""
    paths = trial_paths(tmp_path)
    counted = faults.run_child("tests.state_scenarios:open_state", paths, prefix=tmp_path / "states")
    assert counted.result is not None, counted.stderr
    assert counted.result["error"] is None
    total = counted.result["seen"]
    points = list(range(1, total + 1))
    if SAMPLE and total > SAMPLE:
        points = sorted({1, 2, 3} | {1 + round(i * (total - 1) / (SAMPLE - 3)) for i in range(SAMPLE - 2)})
    for n, (point, kill) in enumerate([(1, "before")] + [(point, "after") for point in points], start=1):
        trial = trial_paths(tmp_path, n)
        state = Path(trial["state"])
        done = faults.run_child("tests.state_scenarios:open_state", trial, {
            "ops": "create,write,fsync,truncate,rename,link,unlink", "nth": point, "kill": kill},
            prefix=tmp_path / "states")
        assert done.killed, (point, kill, done.result, done.stderr)
        assert not state.exists() or state.stat().st_size > 0, (point, kill)
        with sink_on(state, Path(trial["target"])) as sink:
            sink.write(call("c0", 0))
        left = sorted(p.name for p in state.parent.iterdir())
        assert set(left) <= {"ws.sqlite", "ws.sqlite-wal", "ws.sqlite-shm", "ws.sqlite.lock"}, (point, kill, left)
