"""Every local write point under injected faults: nothing accepted is lost, nothing refused lands, nothing twice.

A sweep, as issue 11 asks: for each write point (the Advanced spool, the Standard state, a local target without
and with a spool, and both modes through a Pipeline), a clean run counts the file operations there (creates,
writes, fsyncs, truncates, renames, links, unlinks); then trials fail the n-th of them — with ENOSPC that lasts
until the disk is freed (partial writes included), with a one-off EIO, or by SIGKILL right before or after it —
for n spread over the whole run. After each trial a new process opens the sink on the same spool, state and
prefix, writes more and closes, and the trial checks what a user would:

- every call whose ``write()`` returned is in exactly one published file (in both modes' files, for a Pipeline);
- no call that ``write()`` refused is published; a call in flight at a kill is published at most once;
- the sink works once the fault clears (every later write accepted, flush and close succeed);
- no temporary file is left in the spool, the state's folder or the prefix.

The default run samples a few write points per case (``CIO_SYNC_FAULT_POINTS``, default 3); ``nox -s crash``
sweeps many more. The figures of each case are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests import faults
from tests.fault_scenarios import read_log

POINTS = int(os.environ.get("CIO_SYNC_FAULT_POINTS", "3"))
WRITES = 12  # calls per write step

#: Where each case's sink writes; faultfs watches ``watch`` (a folder of ``paths``).
CASES: dict[str, tuple[str, str, bool]] = {
    # name: (mode, watched folder, spool)
    "advanced-spool": ("advanced", "spool", True),
    "advanced-target": ("advanced", "target", False),
    "advanced-target-with-spool": ("advanced", "target", True),
    "standard-state": ("standard", "state", False),
    "standard-target": ("standard", "target", False),
    "pipeline-local-state": ("pipeline", "local", True),
}


def _paths(root: Path, mode: str) -> dict[str, str]:
    local = root / "local"
    paths = {"local": str(local), "spool": str(local / "spool"), "state": str(local / "state" / "ws.sqlite"),
             "target": str(root / "target"), "advanced": str(root / "target" / "advanced"),
             "standard": str(root / "target" / "standard"), "log": str(root / "log.txt")}
    (local / "state").mkdir(parents=True, exist_ok=True)
    if mode == "pipeline":
        paths["target"] = str(root / "target")
    return paths


def _watched(paths: dict[str, str], watch: str) -> str:
    return paths[watch] if watch != "state" else os.path.dirname(paths["state"])


def _published(mode: str, paths: dict[str, str]) -> dict[str, Counter[str]]:
    """Per sink, how many times each call id was published."""
    found: dict[str, Counter[str]] = {}
    if mode in ("advanced", "pipeline"):
        found["advanced"] = faults.published_ids(Path(paths["advanced" if mode == "pipeline" else "target"]))
    if mode in ("standard", "pipeline"):
        folder = Path(paths["standard" if mode == "pipeline" else "target"])
        ids: Counter[str] = Counter()
        for path in sorted(folder.glob("attributes_*.parquet")) if folder.exists() else []:
            for row in pq.read_table(path, columns=["attribute_name", "attribute_value"]).to_pylist():
                if row["attribute_name"] == "n":
                    ids[str(row["attribute_value"])] += 1
        found["standard"] = ids
    return found


def _steps(arm: dict[str, Any], durable: bool) -> list[list[Any]]:
    """The trial's workload: calls and syncs before, during and after a fault that lasts until it is cleared. A
    sink that keeps accepted calls durably (a spool, the Standard state) then dies; one that keeps them in memory
    closes (a crash would lose its buffer by design)."""
    steps: list[list[Any]] = [["open"], ["write", WRITES], ["flush"], ["arm", arm]]
    steps += [["write", WRITES], ["flush"], ["write", WRITES], ["flush"], ["disarm"],
              ["write", WRITES], ["flush"], ["write", WRITES], ["exit" if durable else "close"]]
    return steps


@dataclass
class Tally:
    """What the trials of one case did, for the closing figures."""

    trials: int = 0
    faults: int = 0
    accepted: int = 0
    refused: int = 0
    lost: int = 0
    duplicated: int = 0
    lost_by_design: int = 0
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.trials} trials, {self.faults} faults injected, {self.accepted} calls accepted, "
                f"{self.refused} refused, {self.lost} lost, {self.duplicated} duplicated" +
                (f" ({self.lost_by_design} buffered in memory without a spool when the process was killed)"
                 if self.lost_by_design else ""))


def _sample(total: int, points: int) -> list[int]:
    """``points`` write points spread evenly over ``1..total``, the first and the last included."""
    if total <= points:
        return list(range(1, total + 1))
    if points == 1:
        return [1 + total // 2]
    return sorted({1 + round(i * (total - 1) / (points - 1)) for i in range(points)})


def _layout(root: Path, case: str) -> tuple[dict[str, str], str, bool]:
    """A trial's folders, the folder faultfs watches, and whether the sink keeps accepted calls durably."""
    mode, watch, spool = CASES[case]
    paths = _paths(root, mode)
    if not spool:
        paths.pop("spool")
    prefix = _watched(paths, watch)
    os.makedirs(prefix, exist_ok=True)
    return paths, prefix, spool or mode == "standard"


def _forked(function: Any, *args: Any) -> tuple[int, Any]:
    """Run ``function(*args)`` in a forked process (this one's modules already imported: fast); its exit code
    (negative: killed by that signal) and JSON result (``None`` if it was killed before returning)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            data = json.dumps(function(*args)).encode()
        except BaseException:
            data = json.dumps({"crashed": traceback.format_exc()}).encode()
        with os.fdopen(write, "wb") as out:
            out.write(data)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as result:
        data = result.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), (json.loads(data) if data else None)


def _run(mode: str, paths: dict[str, str], prefix: str, steps: list[list[Any]], tag: str) -> dict[str, Any]:
    from tests.fault_scenarios import drive

    faults.faults().set_prefix(prefix)
    # Storage errors are retried once, without a pause: the sweep is about what happens when retries run out.
    retry = {"retry": {"attempts": 2, "initial_delay": 0, "max_delay": 0}}
    report = drive(mode, paths, steps, {"advanced": retry, "standard": retry} if mode == "pipeline" else retry, tag)
    report["seen"] = faults.faults().seen
    return report


def sweep(case: str, kind: dict[str, Any], points: int, root: str) -> dict[str, Any]:
    """Run in a faultfs child (which imports everything once, then forks a process per run): a clean run that
    counts the operations of the fault window, then one trial per sampled write point — the faulty run, then a
    restart on its folders. Returns what the parent needs to check each trial's folders."""
    mode = CASES[case][0]
    paths, prefix, durable = _layout(Path(root) / "clean", case)
    clean_steps = _steps({"ops": kind.get("ops", ALL), "nth": 0}, True)
    clean_steps = clean_steps[:clean_steps.index(["disarm"])]
    code, clean = _forked(_run, mode, paths, prefix, clean_steps, "c")
    if code != 0 or clean is None or "crashed" in clean or clean["errors"]:
        return {"error": f"the clean run failed ({code}): {clean}"}
    trials = []
    for n in _sample(int(clean["seen"]), points):
        paths, prefix, durable = _layout(Path(root) / f"trial-{n}", case)
        code, first = _forked(_run, mode, paths, prefix, _steps({"ops": ALL, "nth": n, **kind}, durable), "c")
        again_code, again = _forked(_run, mode, {**paths, "log": paths["log"] + ".again"}, prefix,
                                    [["open"], ["write", 5], ["close"]], "r")
        trials.append({"n": n, "paths": paths, "durable": durable, "code": code, "first": first,
                       "again_code": again_code, "again": again})
    return {"operations": clean["seen"], "trials": trials}


def _check(case: str, arm: dict[str, Any], trial: dict[str, Any], tally: Tally) -> None:
    """The contract, on what one trial left: see the module docstring."""
    mode = CASES[case][0]
    paths, durable, first, again = trial["paths"], trial["durable"], trial["first"], trial["again"]
    killed = trial["code"] == -9
    where = f"{case} {arm} at operation {trial['n']}"
    problems = []
    if not killed and (trial["code"] != 0 or first is None or "crashed" in first):
        problems.append(f"{where}: the run ended badly ({trial['code']}): {first}")
        first = None
    log = read_log(paths["log"])
    accepted, refused, in_flight = log.accepted, log.refused, log.in_flight
    # What must be published: every accepted call if the sink keeps them durably, else what a flush published.
    required = accepted if durable else log.flushed
    tally.trials += 1
    tally.faults += 1
    tally.accepted += len(accepted)
    tally.refused += len(refused)
    if trial["again_code"] != 0 or again is None or "crashed" in again or again["errors"] or again["refused"]:
        problems.append(f"{where}: the restarted sink failed: {again}")
    if first is not None:
        after = first["accepted"][-2 * WRITES:]
        if len(after) != 2 * WRITES or int(after[0][1:]) < 3 * WRITES:
            problems.append(f"{where}: writes after the fault cleared were refused: {first['refusals'][-3:]}")
        late = [e for e in first["errors"] if e[0] != "flush"]
        if late:
            problems.append(f"{where}: errors: {late[:3]}")
    restarted = {f"r{i}" for i in range(5)}
    published = _published(mode, paths)
    for sink, counts in published.items():
        ids = set(counts)
        twice = sorted(i for i, n in counts.items() if n > 1)
        lost = sorted(required - ids)
        landed_refused = sorted(refused & ids)
        unknown = sorted(ids - accepted - in_flight - restarted)
        if not durable:
            tally.lost_by_design += len(accepted - required - ids)  # in memory when the process was killed
        tally.lost += len(lost)
        tally.duplicated += len(twice)
        if twice:
            problems.append(f"{where}: {sink}: {len(twice)} calls published twice, e.g. {twice[:3]}")
        if lost:
            problems.append(f"{where}: {sink}: {len(lost)} accepted calls lost, e.g. {lost[:3]}")
        if landed_refused:
            problems.append(f"{where}: {sink}: {len(landed_refused)} refused calls published: {landed_refused[:3]}")
        if unknown:
            problems.append(f"{where}: {sink}: calls published that no one wrote: {unknown[:3]}")
        if not restarted <= ids:
            problems.append(f"{where}: {sink}: calls of the restarted sink missing")
    if len(published) == 2:
        # A call in flight when the process was killed may have reached one sink only (write() never returned:
        # the caller sends it again, and the Standard sink's diff makes the retry change nothing there).
        only = (set(published["advanced"]) ^ set(published["standard"])) - in_flight
        if only:
            problems.append(f"{where}: calls in one mode's files only: {sorted(only)[:3]}")
    left = faults.leftovers(Path(paths["local"]), Path(paths["target"]))
    if left:
        problems.append(f"{where}: leftovers: {left[:3]}")
    tally.problems += problems


@pytest.fixture
def fast_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder in memory (/dev/shm) where there is one: the trials fsync a lot, and faultfs fails the calls
    whatever the filesystem, so a disk's fsync latency would only make the sweep slow."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="cio-sync-sweep-", dir=shm))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


#: Every file operation faultfs can fail.
ALL = "all"
#: What a full disk fails: what needs a block or an inode (creating, writing, syncing delayed writes, a rename or
#: link that needs a directory block); never a truncation or a removal, which give space back.
FILLING = "create,write,fsync,rename,link"

KINDS = [
    pytest.param({"ops": FILLING, "errno": faults.ENOSPC, "count": 10**9, "partial": True}, id="disk-full"),
    pytest.param({"errno": faults.EIO, "count": 1}, id="eio-once"),
    pytest.param({"kill": "before"}, id="kill-before"),
    pytest.param({"kill": "after"}, id="kill-after"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_nothing_accepted_is_lost_and_nothing_lands_twice_when_a_write_point_fails(
        faultfs: Path, fast_folder: Path, case: str, kind: dict[str, Any]) -> None:
    done = faults.run_child("tests.test_fault_sweep:sweep", case, kind, POINTS, str(fast_folder),
                            prefix=fast_folder)
    assert done.returncode == 0, done.stderr
    assert "error" not in done.result, done.result["error"]
    assert done.result["operations"] > 0, f"{case}: the workload made no file operation at its write point"
    tally = Tally()
    for trial in done.result["trials"]:
        _check(case, kind, trial, tally)
    print(f"{case} {kind}: {done.result['operations']} operations in the fault window; {tally}")
    assert not tally.problems, "\n".join(tally.problems[:20])
