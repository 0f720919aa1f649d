"""Processes that tests/test_signals.py stops with real signals: services writing calls, with and without the
``close_on_signals`` helper. Each call's ``messageId`` is appended to an acknowledgement file once ``write()``
returned, unbuffered, as tests/workers.py:crash_writer does: what is there was accepted."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import threading
from typing import Any

import cio_sync


def call(tag: str, i: int) -> dict[str, Any]:
    """Call number ``i``: every field can be checked against its messageId after publishing."""
    return {"type": ("track", "identify", "page")[i % 3], "userId": f"u{i}", "event": "E", "messageId": f"{tag}{i}",
            "properties": {"i": i, "pad": "x" * (i % 50)}}


def service(root: str, ack_path: str, guarded: str) -> None:
    """Write calls forever through an Advanced sink without a spool, acknowledging each. ``guarded``: "no" (plain),
    "yes" (the loop under ``close_on_signals(sink)``) or "hold" (and each write with its acknowledgement in a
    ``hold()`` block)."""
    sink = cio_sync.AdvancedSink(root, flush_interval=None)
    fd = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def loop(step: Any = contextlib.nullcontext) -> None:
        i = 0
        while True:
            with step():
                sink.write(call("m", i))
                os.write(fd, f"m{i}\n".encode())
            i += 1

    if guarded == "no":
        loop()
    with cio_sync.close_on_signals(sink) as guard:
        loop(guard.hold if guarded == "hold" else contextlib.nullcontext)


def pipeline_service(root: str, state: str, ack_path: str) -> None:
    """Write calls forever through a Pipeline (Advanced + Standard, no spool) under ``close_on_signals()`` given no
    sink: the stop must publish every open sink."""
    sink = cio_sync.Pipeline(advanced=cio_sync.AdvancedSink(f"{root}/advanced", flush_interval=None),
                             standard=cio_sync.StandardSink(f"{root}/standard", workspace_id=1, state=state,
                                                            flush_interval=None))
    fd = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with cio_sync.close_on_signals():
        i = 0
        while True:
            sink.write(call("m", i))
            os.write(fd, f"m{i}\n".encode())
            i += 1


def rounds(root: str, count: str, seed: str) -> None:
    """``count`` rounds in one process, each a fresh sink on ``<root>/<round>`` under ``close_on_signals``, stopped by
    a SIGTERM that lands while the main thread is inside ``write()``: sent from inside the sink's own publishing
    (``on_publish``, during an early publish that a write triggered) or from a thread at a random moment. Each
    round's ``SystemExit`` is caught so the next can start; prints one JSON line: the acknowledged ids and the exit
    codes of every round."""
    rng = random.Random(int(seed))
    report: dict[str, Any] = {"acked": [], "codes": []}
    for n in range(int(count)):
        acked: list[str] = []
        trigger = {"publishes": rng.randint(1, 4)} if n % 2 == 0 else {}

        def published(_: cio_sync.WrittenFile, trigger: dict[str, int] = trigger) -> None:
            if "publishes" in trigger:
                trigger["publishes"] -= 1
                if trigger["publishes"] == 0:
                    os.kill(os.getpid(), signal.SIGTERM)

        sink = cio_sync.AdvancedSink(f"{root}/{n}", flush_interval=None, max_rows=rng.randint(3, 9),
                                     on_publish=published)
        try:
            with cio_sync.close_on_signals(sink):
                if not trigger:
                    threading.Timer(rng.uniform(0.0, 0.05), os.kill, (os.getpid(), signal.SIGTERM)).start()
                i = 0
                while True:
                    sink.write(call(f"r{n}-", i))
                    acked.append(f"r{n}-{i}")
                    i += 1
        except SystemExit as exc:
            report["codes"].append(exc.code)
        report["acked"].append(acked)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
