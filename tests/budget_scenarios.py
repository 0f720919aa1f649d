"""What tests/test_budget.py runs in a fresh interpreter, so that the peak RSS measured is this run's alone: a sink
whose storage is down for the whole run, written to until ``BufferFull`` (or for a number of calls with a spool).

Run as ``python -c`` through :func:`run`; the result is JSON: calls accepted, what ended the run, the most
``stats.bytes_in_memory`` said, and the RSS before the sink opened and at its peak (from /proc/self/status).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fsspec.implementations.memory import MemoryFileSystem

import cio_sync
from bench.cases import Unreachable  # the bench's outage cases and these tests take storage down alike

ROOT = Path(__file__).resolve().parent.parent


def run(function: str, *args: Any, timeout: float = 600) -> dict[str, Any]:
    """Run ``function(*args)`` of this module in a fresh Python process; its JSON result."""
    code = ("import json, sys\n"
            "from tests import budget_scenarios\n"
            f"result = budget_scenarios.{function}(*json.loads(sys.argv[1]))\n"
            "print('RESULT ' + json.dumps(result), flush=True)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    assert len(lines) == 1, done.stdout
    result: dict[str, Any] = json.loads(lines[0][len("RESULT "):])
    return result


def down_writer() -> tuple[cio_sync.FsspecWriter, Unreachable]:
    """A writer on storage that is down (one try per publish, no pauses), and its filesystem."""
    fs = Unreachable(skip_instance_cache=True)
    writer = cio_sync.FsspecWriter(f"/down-{secrets.token_hex(6)}", filesystem=fs,
                                   retry=cio_sync.RetryPolicy(attempts=1, initial_delay=0))
    return writer, fs


def small_calls(pad: int = 0) -> Iterator[dict[str, Any]]:
    """Small track calls without a messageId (the sink makes one), each a fresh dict; ``pad`` random hex
    characters in its properties, which no encoding compresses."""
    n = 0
    while True:
        call: dict[str, Any] = {"type": "track", "userId": f"user-{n % 1000}", "event": "Viewed"}
        if pad:
            call["properties"] = {"pad": secrets.token_hex(pad // 2)}
        yield call
        n += 1


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise LookupError(field)


def warm_up() -> None:
    """Publish a few calls once, so that the baseline holds what any process that used a sink holds: the code of
    pyarrow's Parquet writer and its compressor, loaded on first use."""
    fs = MemoryFileSystem(skip_instance_cache=True)
    with cio_sync.AdvancedSink(cio_sync.FsspecWriter(f"/warm-{secrets.token_hex(6)}", filesystem=fs),
                               flush_interval=None) as sink:
        for call, _ in zip(small_calls(64), range(100), strict=False):
            sink.write(call)


def outage(budget: int, pad: int, spool: str | None, calls: int | None) -> dict[str, Any]:
    """Write small calls to a sink with ``max_buffer_bytes=budget`` whose storage is down: without a spool until
    ``BufferFull`` (``block_timeout`` 0.1 s), with ``spool`` (spilling) for ``calls`` calls. Then storage comes back
    and the sink is closed."""
    writer, fs = down_writer()
    warm_up()
    baseline = _status_mib("VmRSS")
    sink = cio_sync.AdvancedSink(writer, flush_interval=None, max_buffer_bytes=budget, block_timeout=0.1,
                                 spool_dir=spool, spool_sync="os")
    accepted = most = 0
    stopped = None
    for call in small_calls(pad):
        if calls is not None and accepted >= calls:
            break
        try:
            sink.write(call)
        except cio_sync.BufferFull:
            stopped = "BufferFull"
            break
        accepted += 1
        if not accepted % 1000:
            most = max(most, sink.stats.bytes_in_memory)
    peak = _status_mib("VmHWM")
    most = max(most, sink.stats.bytes_in_memory)
    fs.down = False
    published = sum(f.rows for f in sink.close())
    return {"accepted": accepted, "stopped": stopped, "most_in_memory": most, "baseline_mib": baseline,
            "peak_mib": peak, "published": published}


def rejected(budget: int, calls: int, size: int) -> dict[str, Any]:
    """Give a sink with ``keep_rejected=True`` and ``max_buffer_bytes=budget`` ``calls`` invalid calls (a userId that
    is a number), each a new dict with ``size`` characters of properties, then flush."""
    import orjson

    writer, fs = down_writer()
    fs.down = False
    warm_up()
    baseline = _status_mib("VmRSS")
    sink = cio_sync.AdvancedSink(writer, flush_interval=None, max_buffer_bytes=budget, keep_rejected=True)
    refused = most = 0
    for n in range(calls):
        try:
            sink.write({"type": "track", "userId": n, "event": "Viewed", "properties": {"pad": "x" * size}})
        except cio_sync.InvalidCall:
            refused += 1
        if not n % 1000:
            most = max(most, sink.stats.bytes_in_memory)
    peak = _status_mib("VmHWM")
    most = max(most, sink.stats.bytes_in_memory)
    sink.flush()
    letters = [name for name in fs.find(writer.root) if "/dead_letters/rejected/" in name]
    lines = [orjson.loads(line) for name in letters for line in fs.cat_file(name).splitlines()]
    sink.close()
    return {"refused": refused, "rejected": sink.stats.calls_rejected, "most_in_memory": most,
            "baseline_mib": baseline, "peak_mib": peak, "kept": sum(1 for x in lines if x.get("input")),
            "not_kept": sum(x.get("not_kept", 0) for x in lines)}
