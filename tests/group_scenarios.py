"""What the group-commit tests (tests/test_spool_group.py) run in a child process: writers that call ``sync()``.

:func:`sync_forever` is killed with SIGKILL by its parent: it prints each call id only once the ``sync()`` that
followed its ``write()`` returned. :func:`sync_through_a_failed_fsync` runs inside a faultfs child
(tests/faults.py) and fails the spool's next fsync with EIO while a ``sync()`` makes it.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import cio_sync
from tests import faults as harness
from tests.spool_scenarios import call


def group_sink(paths: dict[str, str], **options: Any) -> cio_sync.AdvancedSink:
    return cio_sync.AdvancedSink(paths["target"], spool_dir=paths["spool"], spool_sync="group", flush_interval=None,
                                 **options)


def sync_forever(target: str, spool: str, threads: int, limit: int) -> None:
    """Write calls from ``threads`` threads, each writing one call and syncing, and print ``synced <id>`` once its
    ``sync()`` returned; batches are cut and published as it goes (``max_rows``). Stops after ``limit`` calls per
    thread (the parent kills it long before), without closing the sink."""
    sink = group_sink({"target": target, "spool": spool}, max_rows=5)
    out = threading.Lock()

    def run(n: int) -> None:
        for i in range(limit):
            call_id = f"t{n}-{i}"
            sink.write(call(call_id, i))
            sink.sync()
            with out:
                sys.stdout.write(f"synced {call_id}\n")
                sys.stdout.flush()

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def sync_through_a_failed_fsync(paths: dict[str, str], errno: int, recover: bool) -> dict[str, Any]:
    """Write and sync 5 calls; write 5 more and fail the fsync of the ``sync()`` that covers them; then (with
    ``recover``) see ``sync()`` still refuse until a ``flush()`` published them, and write and sync 5 more. Dies
    without closing the sink (``_exit``). Returns the ids by what ``sync()`` said of them, and its errors."""
    injector = harness.faults()
    sink = group_sink(paths)
    report: dict[str, Any] = {"synced": [], "not_synced": [], "errors": [], "_exit": True}

    def write(ids: list[str]) -> None:
        for call_id in ids:
            sink.write(call(call_id, int(call_id[1:])))

    def sync(ids: list[str]) -> None:
        try:
            sink.sync()
        except cio_sync.StorageError as exc:
            report["errors"].append(f"{type(exc).__name__}: {exc}")
            report["not_synced"] += ids
        else:
            report["synced"] += ids

    first, second, third = ([f"c{i}" for i in range(k, k + 5)] for k in (0, 5, 10))
    write(first)
    sync(first)
    write(second)
    with injector.failing("fsync", nth=1, errno=errno):
        sync(second)
        report["fsync_failures"] = injector.failures
    if recover:
        sync([])  # the second five are still not durable: it raises again
        report["sticky"] = len(report["errors"])
        sink.flush()  # publishes them from memory
        write(third)
        sync(third)
    return report
