"""What fault trials run inside a faultfs child (tests/faults.py): a sink driven step by step.

:func:`drive` opens a sink and follows a list of steps (write calls, arm or clear a fault, flush, close, die), and
reports which calls ``write()`` accepted and which it refused, with the errors. The parent test then reads the
published files and checks the contract: every accepted call in exactly one published file, nothing refused
published, no leftovers, the sink usable once the fault cleared.

Every call carries its own id: Advanced calls as ``messageId``; Standard identify calls as the value of the trait
``n``, so each accepted call makes exactly one ``attributes`` row with ``attribute_value`` = its id.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any

import cio_sync
from tests import faults as harness


def _call(mode: str, call_id: str, index: int) -> dict[str, Any]:
    if mode == "advanced":
        kind = ("track", "identify", "page")[index % 3]
        return {"type": kind, "userId": f"u{index % 17}", "event": "E", "messageId": call_id,
                "properties": {"i": index, "pad": "x" * (index % 40)}}
    return {"type": "identify", "userId": f"u{index % 13}", "messageId": call_id, "traits": {"n": call_id, "i": index}}


def _options(options: dict[str, Any]) -> dict[str, Any]:
    """Sink keywords from JSON: ``retry`` as the keywords of a RetryPolicy."""
    if "retry" in options:
        return {**options, "retry": cio_sync.RetryPolicy(**options["retry"])}
    return options


def _open(mode: str, paths: dict[str, str], options: dict[str, Any]) -> Any:
    options = _options(options)
    if mode == "advanced":
        return cio_sync.AdvancedSink(paths["target"], spool_dir=paths.get("spool"), flush_interval=None,
                                     **options)
    if mode == "standard":
        return cio_sync.StandardSink(paths["target"], workspace_id=7, state=paths["state"], flush_interval=None,
                                     **options)
    advanced = cio_sync.AdvancedSink(paths["advanced"], spool_dir=paths.get("spool"), flush_interval=None,
                                     **_options(options.get("advanced", {})))
    try:
        standard = cio_sync.StandardSink(paths["standard"], workspace_id=7, state=paths["state"],
                                         flush_interval=None, **_options(options.get("standard", {})))
    except BaseException:
        advanced.close()
        raise
    return cio_sync.Pipeline(advanced=advanced, standard=standard)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def drive(mode: str, paths: dict[str, str], steps: list[list[Any]], options: dict[str, Any] | None = None,
          tag: str = "c") -> dict[str, Any]:
    """Follow ``steps`` on a sink of ``mode`` ("advanced", "standard" or "pipeline"); see the module docstring.

    Steps: ``["open"]``, ``["write", n]``, ``["arm", {faultfs arm options}]``, ``["disarm"]``, ``["fill", leave]``
    / ``["free"]`` (a :class:`~tests.faults.SmallDisk` at ``paths["disk"]``), ``["flush"]``, ``["close"]``,
    ``["exit"]`` (die at once, as a crash: nothing flushed or closed). Returns ``accepted`` and ``refused`` call
    ids, ``errors`` (step, error) of steps other than writes, and ``refusals`` (id, error) of refused writes. With
    ``paths["log"]``, each write is also logged there as it happens (see :func:`read_log`), for children that get
    killed.
    """
    options = options or {}
    sink: Any = None
    accepted: list[str] = []
    refused: list[str] = []
    refusals: list[tuple[str, str]] = []
    errors: list[tuple[str, str]] = []
    injector = None
    index = 0
    filler = os.path.join(paths["disk"], ".filler") if "disk" in paths else None
    # A log that survives the process being killed: "?id" before a write, "+id" once accepted, "-id" if refused.
    log = os.open(paths["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT) if "log" in paths else None
    report = {"accepted": accepted, "refused": refused, "refusals": refusals, "errors": errors}
    for step in steps:
        what = step[0]
        try:
            if what == "open":
                sink = _open(mode, paths, options)
            elif what == "write":
                for _ in range(int(step[1])):
                    call_id = f"{tag}{index}"
                    if log is not None:
                        os.write(log, f"?{call_id}\n".encode())
                    try:
                        sink.write(_call("advanced" if mode == "advanced" else "standard", call_id, index))
                    except cio_sync.CioSyncError as exc:
                        refused.append(call_id)
                        refusals.append((call_id, _describe(exc)))
                        if log is not None:
                            os.write(log, f"-{call_id}\n".encode())
                    else:
                        accepted.append(call_id)
                        if log is not None:
                            os.write(log, f"+{call_id}\n".encode())
                    index += 1
            elif what == "arm":
                injector = injector or harness.faults()
                injector.arm(**step[1])
            elif what == "disarm":
                injector = injector or harness.faults()
                injector.disarm()
            elif what == "fill":
                assert filler is not None
                _fill(paths["disk"], filler, int(step[1]))
            elif what == "free":
                assert filler is not None
                if os.path.exists(filler):
                    os.unlink(filler)
            elif what in ("flush", "close"):
                sink.flush() if what == "flush" else sink.close()
                if log is not None:
                    os.write(log, b"!\n")  # everything accepted before this is published
            elif what == "exit":
                report["_exit"] = True
                return report
            else:
                raise ValueError(f"unknown step {step!r}")
        except Exception as exc:
            errors.append((what, _describe(exc)))
            if os.environ.get("FAULT_TRACEBACKS"):
                errors.append((what, traceback.format_exc()))
    return report


def _fill(disk: str, filler: str, leave: int) -> None:
    def available() -> int:
        stat = os.statvfs(disk)
        return stat.f_bavail * stat.f_frsize

    with open(filler, "ab") as f:
        while available() > leave:
            try:
                f.write(b"\0" * min(2**20, max(available() - leave, 1)))
                f.flush()
            except OSError:
                break


def harness_probe(inside: str, outside: str, arm: bool = True) -> dict[str, Any]:
    """Writes to a file under the prefix and one outside it, with (``arm``) the third write under the prefix
    failing partially and the fourth wholly; what each write did (for the harness's own test)."""
    injector = harness.faults()
    if arm:
        injector.arm("write", nth=3, count=2, partial=True)
    done: dict[str, Any] = {"inside": [], "outside": []}
    for path, key in ((inside, "inside"), (outside, "outside")):
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
        for _ in range(5):
            try:
                done[key].append(os.write(fd, b"0123456789"))
            except OSError as exc:
                done[key].append(exc.errno)
        os.close(fd)
    done["seen"], done["failures"], done["writes"] = injector.seen, injector.failures, injector.total("write")
    return done


@dataclass
class Log:
    """What a :func:`drive` log says: calls accepted, refused, in flight (started, never answered), and the calls
    accepted before the last flush or close that succeeded (published, whatever the sink keeps them in)."""

    accepted: set[str]
    refused: set[str]
    in_flight: set[str]
    flushed: set[str]


def read_log(path: str) -> Log:
    log = Log(set(), set(), set(), set())
    started: set[str] = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                mark, call_id = line[:1], line[1:].strip()
                if mark == "!":
                    log.flushed = set(log.accepted)
                else:
                    {"+": log.accepted, "-": log.refused}.get(mark, started).add(call_id)
    log.in_flight = started - log.accepted - log.refused
    return log
