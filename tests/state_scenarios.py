"""What the workspace-state fault trials run inside a faultfs child (tests/faults.py): a StandardSink driven step by
step while the state's writes fail (tests/test_state_faults.py).

:func:`drive` is :func:`tests.fault_scenarios.drive` for a StandardSink whose state lives under the faultfs prefix,
with a few more steps: ``["files"]`` notes the data files published so far, ``["seen"]`` the faultfs operations
counted since the last arm, and a failing ``flush``/``close`` is reported with the error's type, so that the parent
can tell a :class:`~cio_sync.StorageError` from a raw one. Every identify call carries its own id as the value of the
trait ``n``: each accepted call makes exactly one ``attributes`` row with ``attribute_value`` = its id.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import cio_sync
from tests import faults as harness

WORKSPACE = 7

#: Every sink a trial opened, kept until the child dies: a crash runs no destructor, and a sink the garbage collector
#: frees later would close its state (SQLite checkpoints it: writes under the watched folder) in the middle of
#: another trial's count, at a moment that depends on how many objects the whole library allocates.
_LEFT_OPEN: list[Any] = []


def call(call_id: str, index: int) -> dict[str, Any]:
    """An identify call whose trait ``n`` is ``call_id`` (a change every time: 13 people take turns)."""
    return {"type": "identify", "userId": f"u{index % 13}", "traits": {"n": call_id, "i": index}}


def open_sink(paths: dict[str, str], options: dict[str, Any] | None = None) -> cio_sync.StandardSink:
    return cio_sync.StandardSink(paths["target"], workspace_id=WORKSPACE, state=paths["state"], flush_interval=None,
                                 **(options or {}))


def data_files(target: str) -> list[str]:
    if not os.path.isdir(target):
        return []
    return sorted(n for n in os.listdir(target) if n.endswith(".parquet") and not n.startswith((".", "_")))


def drive(paths: dict[str, str], steps: list[list[Any]], options: dict[str, Any] | None = None,
          tag: str = "c") -> dict[str, Any]:
    """Follow ``steps`` on a StandardSink; returns ``accepted`` and ``refused`` call ids, ``refusals`` (id, error),
    ``errors`` (index of the step, step, error) of other steps, ``files`` (one list per ``["files"]`` step),
    ``seen`` (one count per ``["seen"]`` step) and ``after`` (the ids of the calls written after the last
    ``["disarm"]``).

    Steps: ``["open"]``, ``["write", n]``, ``["arm", {faultfs arm options}]``, ``["disarm"]``, ``["flush"]``,
    ``["commit"]``, ``["close"]``, ``["files"]``, ``["seen"]``, ``["delete", user_id]`` (a person who does not exist:
    a step that fails), ``["pragma", text]``, ``["exit"]`` (die at once, as a crash).
    """
    sink: Any = None
    accepted: list[str] = []
    refused: list[str] = []
    refusals: list[tuple[str, str]] = []
    errors: list[tuple[int, str, str]] = []
    files: list[list[str]] = []
    seen: list[int] = []
    after: list[str] = []
    report: dict[str, Any] = {"accepted": accepted, "refused": refused, "refusals": refusals, "errors": errors,
                              "files": files, "seen": seen, "after": after, "disarmed_at": None}
    injector = None
    index = 0
    for position, step in enumerate(steps):
        what = step[0]
        try:
            if what == "open":
                sink = open_sink(paths, options)
                _LEFT_OPEN.append(sink)
            elif what == "write":
                for _ in range(int(step[1])):
                    call_id = f"{tag}{index}"
                    if report["disarmed_at"] is not None:
                        after.append(call_id)
                    try:
                        sink.write(call(call_id, index))
                    except cio_sync.CioSyncError as exc:
                        refused.append(call_id)
                        refusals.append((call_id, f"{type(exc).__name__}: {exc}"))
                    else:
                        accepted.append(call_id)
                    index += 1
            elif what == "arm":
                injector = injector or harness.faults()
                injector.arm(**step[1])
            elif what == "disarm":
                injector = injector or harness.faults()
                injector.disarm()
                report["disarmed_at"] = position
                after.clear()
            elif what == "seen":
                injector = injector or harness.faults()
                seen.append(injector.seen)
            elif what == "flush":
                sink.flush()
            elif what == "commit":
                sink.commit()
            elif what == "close":
                sink.close()
            elif what == "delete":  # of someone unknown: a step that fails (UnknownPerson, expected)
                with contextlib.suppress(cio_sync.UnknownPerson):
                    sink.delete_person(step[1])
            elif what == "pragma":  # SQLite tuning of the state's connection, to make a fault reachable
                sink.state._db.execute(f"PRAGMA {step[1]}")
            elif what == "files":
                files.append(data_files(paths["target"]))
            elif what == "exit":
                report["_exit"] = True
                return report
            else:
                raise ValueError(f"unknown step {step!r}")
        except Exception as exc:  # reported, with the type, for the parent to judge
            errors.append((position, what, f"{type(exc).__name__}: {exc}"))
    return report


def open_state(paths: dict[str, str], arm: dict[str, Any] | None = None) -> dict[str, Any]:
    """Open a sink on ``paths["state"]`` (maybe new) and close it again, with faultfs armed as ``arm`` says from the
    start (to fail or kill the creation of a new state); the ops seen, and the error if opening failed."""
    injector = harness.faults()
    if arm:
        injector.arm(**arm)
    else:
        injector.arm("create,write,fsync,truncate,rename,link,unlink", nth=0)  # count only
    try:
        sink = open_sink(paths)
    except Exception as exc:
        return {"seen": injector.seen, "error": f"{type(exc).__name__}: {exc}"}
    seen = injector.seen
    injector.disarm()
    sink.close()
    return {"seen": seen, "error": None}


def trials(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Run several :func:`drive` trials one after another in this child (each on its own state and target, given
    as ``paths``, ``steps``, ``options`` and ``tag``), each sink left as a crash leaves it; the reports, with the
    faults each trial injected. The child then dies without closing anything (``_exit``)."""
    injector = harness.faults()
    reports = []
    for run in runs:
        report = drive(run["paths"], run["steps"], run.get("options"), run.get("tag", "c"))
        report["failures"] = injector.failures
        injector.disarm()
        reports.append(report)
    return {"reports": reports, "_exit": True}


#: The ops of the state that a sweep fails: everything SQLite does to write its files.
STATE_OPS = "write,fsync,truncate"


def sweep_steps(arm: dict[str, Any], pragmas: list[str]) -> list[list[Any]]:
    """One trial of the state sweep: calls committed, then (the phase under ``arm``) calls, flushes (cuts, names,
    publishes, clears) and more calls; then the fault clears, and calls and a flush must simply work; the end is a
    crash after a commit. ``pragmas`` tune SQLite first (e.g. a checkpoint at every commit)."""
    return [["open"], *(["pragma", pragma] for pragma in pragmas), ["write", 3], ["flush"],
            ["arm", arm], ["write", 6], ["flush"], ["write", 6], ["flush"], ["seen"], ["disarm"],
            ["write", 4], ["flush"], ["write", 2], ["commit"]]


def sweep(base: str, options: dict[str, Any], fault: dict[str, Any], sample: int,
          pragmas: list[str] | None = None) -> dict[str, Any]:
    """Count the state's write points in the sweep's phase on a clean run, then fail each of them in turn (or
    ``sample`` of them, evenly spread; 0: all) as ``fault`` says, each trial on its own state and target under
    ``base`` (the states under ``<base>/states``, the faultfs prefix; the targets under ``<base>/targets``)."""

    def paths(n: int) -> dict[str, str]:
        os.makedirs(os.path.join(base, "states", str(n)), exist_ok=True)
        return {"state": os.path.join(base, "states", str(n), "ws.sqlite"),
                "target": os.path.join(base, "targets", str(n))}

    probe = drive(paths(0), sweep_steps({"ops": STATE_OPS, "nth": 0}, pragmas or []), options)
    total = probe["seen"][0]
    if sample and total > sample:
        points = sorted({1 + round(i * (total - 1) / (sample - 1)) for i in range(sample)})
    else:
        points = list(range(1, total + 1))
    runs = [{"paths": paths(n), "steps": sweep_steps({"ops": STATE_OPS, "nth": point, **fault}, pragmas or []),
             "options": options} for n, point in enumerate(points, start=1)]
    result = trials(runs)
    result.update(total=total, points=points, probe=probe, paths=[run["paths"] for run in runs])
    return result
