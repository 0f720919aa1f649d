"""What the local writer's fault tests run in child processes (tests/test_writer_faults.py).

Children run under faultfs (tests/faults.py, ``run_child("tests.writer_scenarios:...")``) so that a write, an
fsync or a link of the writer fails or kills the process for real, or (``publish_slowly``) hold a publish half done
while the parent looks at the prefix.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import cio_sync
from tests import faults as harness

NO_RETRY = cio_sync.RetryPolicy(attempts=1, initial_delay=0, max_delay=0)


def files_under(root: str | Path) -> list[str]:
    """Every file under ``root`` (relative paths, sorted): what a failed publish must not have added."""
    base = Path(root)
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()) if base.exists() else []


def publish_under_fault(root: str, name: str, size: int, arm: dict[str, Any]) -> dict[str, Any]:
    """Publish ``name`` once with the fault ``arm`` armed (no retries), then once more with the fault cleared.

    Returns the first publish's error, the files under ``root`` right after it, and the second outcome."""
    writer = cio_sync.FsspecWriter(root, retry=NO_RETRY)
    writer.publish("_cio_sync/ready", b"the folders exist", table="t", rows=0)  # the fault hits ``name`` only
    before = files_under(root)
    data = os.urandom(size)
    injector = harness.faults()
    injector.arm(**arm)
    try:
        writer.publish(name, data, table="t", rows=1)
    except Exception as exc:
        error: str | None = f"{type(exc).__name__}: {exc}"
    else:
        error = None
    injector.disarm()
    after_failure = [f for f in files_under(root) if f not in before]
    writer.publish(name, data, table="t", rows=1)
    return {"error": error, "failures": injector.failures, "added": after_failure,
            "published": (Path(root) / name).read_bytes() == data}


def sink_killed_mid_publish(root: str, spool: str | None, calls: int, arm: dict[str, Any]) -> dict[str, Any]:
    """Write ``calls`` track calls to an Advanced sink, arm ``arm`` (a kill) and flush: the process dies there."""
    sink = cio_sync.AdvancedSink(root, spool_dir=spool, flush_interval=None)
    for i in range(calls):
        sink.write({"type": "track", "userId": f"u{i}", "event": "E", "messageId": f"m{i}"})
    harness.faults().arm(**arm)
    sink.flush()
    return {"survived": True}


def publish_slowly(root: str, name: str, size: int) -> None:
    """Publish ``name`` with a disk so slow that its fsync waits for the parent: once the temporary file is written,
    print its path and wait for a line on stdin before going on; print "published" at the end."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isfile(f"/proc/self/fd/{fd}"):
            print(os.readlink(f"/proc/self/fd/{fd}"), flush=True)
            sys.stdin.readline()
            os.fsync = real_fsync
        real_fsync(fd)

    os.fsync = fsync
    data = bytes(range(256)) * (size // 256)
    cio_sync.FsspecWriter(root).publish(name, data, table="t", rows=1)
    print("published", flush=True)
