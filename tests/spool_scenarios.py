"""What the spool's fault trials run inside a faultfs child (tests/faults.py, tests/test_spool_faults.py).

:func:`trial` writes calls through an Advanced sink with a spool, flushing now and then, and notes each call in an
acknowledgement file outside the spool before and after its ``write()`` (``try <id>``, then ``ok <id>`` or
``no <id>``), so that a child killed by faultfs still tells which calls were accepted, which refused, and which one
was in flight. It ends by dying without closing the sink, so the parent's restart has a spool to recover.
"""

from __future__ import annotations

import os
from typing import Any

import cio_sync
from tests import faults as harness

#: The calls of one trial, in steps: ("write", n) or ("flush",). Early cuts come from max_rows=4, so the run names,
#: uploads and deletes batches while it writes, as well as at each flush.
STEPS: tuple[tuple[Any, ...], ...] = (("write", 9), ("flush",), ("write", 6), ("flush",), ("write", 3), ("flush",),
                                      ("write", 2))


def call(call_id: str, index: int) -> dict[str, Any]:
    kind = ("track", "identify", "page")[index % 3]
    return {"type": kind, "userId": f"u{index % 7}", "event": "E", "name": "P", "messageId": call_id,
            "properties": {"i": index, "pad": "x" * (index % 50)}}


def trial(paths: dict[str, str], ack: str, options: dict[str, Any] | None = None, tag: str = "c") -> dict[str, Any]:
    """Run :data:`STEPS` on a sink over ``paths["spool"]`` and ``paths["target"]``; return what each step raised,
    the faultfs totals of the spool's operations, and ``_exit`` (die without closing: a crash)."""
    os.makedirs(os.path.dirname(ack), exist_ok=True)
    fd = os.open(ack, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    errors: list[tuple[str, str]] = []
    sink = None
    try:
        sink = cio_sync.AdvancedSink(paths["target"], spool_dir=paths["spool"], flush_interval=None, max_rows=4,
                                     **(options or {}))
    except cio_sync.CioSyncError as exc:
        errors.append(("open", f"{type(exc).__name__}: {exc}"))
    index = 0
    for step in STEPS if sink is not None else ():
        if step[0] == "flush":
            try:
                sink.flush()
            except cio_sync.CioSyncError as exc:
                errors.append(("flush", f"{type(exc).__name__}: {exc}"))
            continue
        for _ in range(step[1]):
            call_id = f"{tag}{index}"
            os.write(fd, f"try {call_id}\n".encode())
            try:
                sink.write(call(call_id, index))
            except cio_sync.CioSyncError as exc:
                os.write(fd, f"no {call_id} {type(exc).__name__}: {exc}\n".encode())
            else:
                os.write(fd, f"ok {call_id}\n".encode())
            index += 1
    injector = harness.faults()
    return {"errors": errors, "totals": injector.totals(), "failures": injector.failures, "_exit": True}


def read_acks(path: str) -> tuple[list[str], dict[str, str], str | None]:
    """The calls a trial's sink accepted, those it refused (with the error), and the one in flight when the child
    died (``None`` if none was)."""
    accepted: list[str] = []
    refused: dict[str, str] = {}
    in_flight = None
    if not os.path.exists(path):
        return accepted, refused, None
    with open(path) as f:
        for line in f:
            word, _, rest = line.rstrip("\n").partition(" ")
            call_id, _, error = rest.partition(" ")
            if word == "try":
                in_flight = call_id
            elif word == "ok":
                accepted.append(call_id)
                in_flight = None
            elif word == "no":
                refused[call_id] = error
                in_flight = None
    return accepted, refused, in_flight
