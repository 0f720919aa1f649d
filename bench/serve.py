"""The HTTP intake of issue 14 under load: ``cio-sync serve`` beside a minimal ASGI app on the same server.

Run ``python -m bench.serve`` (or ``nox -s bench_serve``; ``--quick`` for a one-minute version). Each case starts
a fresh server process on 127.0.0.1 and loads it for ``--seconds`` (after a ``--warmup``) from a bounded load
generator in this process: ``--connections`` keep-alive connections, each sending its next request as soon as the
last one is answered (a closed loop), over raw asyncio sockets. The servers:

- ``minimal``: a raw ASGI app that reads the body and answers 200 ``{"success":true}``, under the very uvicorn
  configuration ``cio-sync serve`` uses (bench/minimal_app.py): the ceiling of this machine;
- ``cio-sync serve``, the real CLI: Advanced mode, parquet, to a local folder, with its spool (``--spool-sync
  group``, the default: a 200 after an fsync shared by the requests in flight; and ``always``: an fsync per call).

Two shapes of traffic, as the client libraries send them: batches of 100 calls to ``POST /v1/batch`` (the body
``{"batch": [...], "sentAt": ...}`` of the customerio-cdp-analytics Python client, its headers and Basic auth), and
one track call per request to ``POST /v1/track``. Every call has its own messageId.

It prints calls/s, requests/s, p50/p99 latency, the ratio to the minimal app, calls per server CPU-second (the
server process's own CPU time, from /proc), how busy the generator was, and whether the issue's aim holds (at least
20,000 calls/s per core in batches with p99 under 50 ms); and saves the figures as JSON under bench/results/.
After each ``cio-sync serve`` run the server is stopped (SIGTERM: it publishes) and the rows of the published files
are counted: every call that got a 200 must be there, once, or the case fails.

In a closed loop the latency is the connections divided by the requests/s (Little's law): more connections give
more throughput up to the ceiling, and more latency past it. These machines are shared and noisy: compare the
ratios within one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cio_sync
from bench.report import print_targets
from cio_sync._sample import sample_calls

ROOT = Path(__file__).resolve().parent.parent
WRITE_KEY = "wk_bench_serve"
#: Stands for the request number (8 hex digits) in every messageId of a request template: a body is its parts
#: joined by the number, one C call, so each call sent has a messageId of its own at no cost to the generator.
PLACEHOLDER = "@@@@@@@@"
CLIENT_VERSION = "1.1.0"
#: The issue's aim: calls per server CPU-second, batches of 100, p99 under this many milliseconds.
AIM_CALLS_PER_CORE, AIM_P99_MS = 20_000, 50.0
#: RudderStack's published figure: ~2,500 events/s on 8 cores.
RUDDERSTACK_EVENTS, RUDDERSTACK_CORES = 2_500, 8
#: The generator counts as not the bottleneck while it is busy less than this share of its wall time.
GENERATOR_BUSY_LIMIT = 0.85
#: A server process busy at least this share of one core counts as saturated (the minimal app's loop is one thread).
SATURATED = 0.9


@dataclass(frozen=True)
class Case:
    """One server and one shape of traffic."""

    key: str
    server: str  # "minimal" or "serve"
    shape: str  # "batch" or "track"
    spool_sync: str | None = None

    @property
    def label(self) -> str:
        what = "minimal ASGI app" if self.server == "minimal" else f"cio-sync serve, --spool-sync {self.spool_sync}"
        return f"{what}, {'batches of 100' if self.shape == 'batch' else 'one track call'}"


CASES = [
    Case("minimal-batch", "minimal", "batch"),
    Case("serve-batch-group", "serve", "batch", "group"),
    Case("serve-batch-always", "serve", "batch", "always"),
    Case("minimal-track", "minimal", "track"),
    Case("serve-track-group", "serve", "track", "group"),
    Case("serve-track-always", "serve", "track", "always"),
]


# -- traffic -----------------------------------------------------------------------------------------------------


def client_call(call: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A sample call as the customerio-cdp-analytics Python client sends it: its keys, ``anonymousId`` null when
    absent, its library in the context, a UUID-shaped messageId whose first group is the request number."""
    dressed = {k: v for k, v in call.items() if k != "sentAt"}
    dressed.setdefault("integrations", {})
    dressed.setdefault("anonymousId", None)
    dressed.setdefault("userId", None)
    dressed["context"] = {**call.get("context", {}), "library": {"name": "analytics-python",
                                                                 "version": CLIENT_VERSION}}
    tail = f"{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}-{rng.choice('89ab')}{rng.getrandbits(12):03x}-" \
           f"{rng.getrandbits(48):012x}"
    dressed["messageId"] = f"{PLACEHOLDER}-{tail}"
    return dressed


@dataclass
class Template:
    """A request with its messageIds left open: ``head`` (the request line and headers) and the body's ``parts``."""

    head: bytes
    parts: list[bytes]
    calls: int

    def request(self, number: int) -> bytes:
        return self.head + (b"%08x" % number).join(self.parts)


def templates(shape: str, count: int, batch_size: int, host: str, seed: int = 14) -> list[Template]:
    """``count`` distinct requests of ``shape``, encoded as the Python client encodes them (``json.dumps``)."""
    rng = random.Random(seed)
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    made = []
    if shape == "batch":
        pool = sample_calls(count * batch_size, seed=seed)
        bodies = [{"batch": [client_call(next(pool), rng) for _ in range(batch_size)],
                   "sentAt": "2026-11-01T12:00:00.000000+00:00"} for _ in range(count)]
        path, calls = "/v1/batch", batch_size
    else:
        tracks = (c for c in sample_calls(count * 10, seed=seed) if c["type"] == "track")
        bodies = [client_call(next(tracks), rng) for _ in range(count)]
        path, calls = "/v1/track", 1
    for body in bodies:
        text = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: analytics-python/{CLIENT_VERSION}\r\n"
                f"Accept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n"
                f"Content-Type: application/json\r\nAuthorization: Basic {auth}\r\n"
                f"Content-Length: {len(text)}\r\n\r\n").encode()
        made.append(Template(head, text.split(PLACEHOLDER.encode()), calls))
    return made


# -- the load generator ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the generator saw: requests and calls answered 200 in the measured window, their latencies, and over
    the whole run the calls acknowledged, the statuses, and the requests left without an answer."""

    window_requests: int = 0
    window_calls: int = 0
    latencies: list[float] = field(default_factory=list)
    acknowledged_calls: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    unanswered: int = 0
    sent: int = 0


class Load:
    """A fixed number of keep-alive connections, each sending the next request when its last one is answered."""

    def __init__(self, host: str, port: int, plans: list[Template], connections: int) -> None:
        self.host, self.port, self.plans, self.connections = host, port, plans, connections
        self.tally = Tally()
        self.sending = False
        self.measuring = False
        self.number = 0
        self.in_flight = 0
        self.idle: asyncio.Event | None = None
        self.open: list[_Connection] = []

    def next_request(self) -> tuple[bytes, int]:
        number = self.number
        self.number += 1
        plan = self.plans[number % len(self.plans)]
        return plan.request(number), plan.calls

    def answered(self, status: int, body: bytes, calls: int, began: float, now: float) -> None:
        tally = self.tally
        self.in_flight -= 1
        tally.statuses[status] = tally.statuses.get(status, 0) + 1
        if status == 200:
            if body != b'{"success":true}':
                calls = int(json.loads(body).get("accepted", calls))
            tally.acknowledged_calls += calls
            if self.measuring:
                tally.window_requests += 1
                tally.window_calls += calls
                tally.latencies.append(now - began)
        if not self.in_flight and self.idle is not None:
            self.idle.set()

    def lost(self, connection: _Connection, waiting: bool) -> None:
        if waiting:
            self.in_flight -= 1
            self.tally.unanswered += 1
            if not self.in_flight and self.idle is not None:
                self.idle.set()
        if connection in self.open:
            self.open.remove(connection)
        if self.sending:  # keep the number of connections fixed
            asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        self.open.append(connection)
        if self.sending:
            connection.send()

    async def run(self, warmup: float, seconds: float, window: Any) -> float:
        """Send for ``warmup`` then ``seconds`` (measured; ``window(start)`` is called at its start and its end),
        then wait for the answers in flight; the measured window's length."""
        self.sending = True
        await asyncio.gather(*(self.connect() for _ in range(self.connections)))
        await asyncio.sleep(warmup)
        window(True)
        self.measuring = True
        began = time.perf_counter()
        await asyncio.sleep(seconds)
        self.measuring = False
        took = time.perf_counter() - began
        window(False)
        self.sending = False
        if self.in_flight:
            self.idle = asyncio.Event()
            try:
                await asyncio.wait_for(self.idle.wait(), 60)
            except TimeoutError:
                self.tally.unanswered += self.in_flight
        for connection in list(self.open):
            connection.close()
        return took


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer parsed just enough (status, Content-Length)."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.end = -1  # where the head ends, once it has arrived
        self.need = 0  # the whole answer's length, once the head has arrived
        self.calls = 0
        self.began = 0.0
        self.waiting = False
        self.closing = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self) -> None:
        assert self.transport is not None
        request, self.calls = self.load.next_request()
        self.load.in_flight += 1
        self.load.tally.sent += 1
        self.waiting = True
        self.began = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.end < 0:
            self.end = buffer.find(b"\r\n\r\n")
            if self.end < 0:
                return
            head = bytes(buffer[:self.end]).lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
            self.need = self.end + 4 + length
        if len(buffer) < self.need:
            return
        now = time.perf_counter()
        status = int(buffer[9:12])
        body = bytes(buffer[self.end + 4:self.need])
        del buffer[:self.need]
        self.end, self.waiting = -1, False
        self.load.answered(status, body, self.calls, self.began, now)
        if self.load.sending and not self.closing:
            self.send()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.load.lost(self, self.waiting)


# -- servers -----------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """User and system CPU time of process ``pid`` (all its threads), from /proc; None where there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class Server:
    """A server process on 127.0.0.1 (a free port), started for one run and stopped by its PID with SIGTERM."""

    def __init__(self, case: Case, work: Path) -> None:
        self.case, self.work = case, work
        self.target = work / "target"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if case.server == "minimal":
            command = [sys.executable, "-m", "bench.minimal_app"]
        else:
            env["CIO_SYNC_WRITE_KEYS"] = WRITE_KEY  # out of the process listing, as docs/serve.md advises
            command = [sys.executable, "-m", "cio_sync", "serve", "--advanced", str(self.target), "--format",
                       "parquet", "--spool-dir", str(work / "spool"), "--spool-sync", str(case.spool_sync),
                       "--host", "127.0.0.1", "--port", "0"]
        self.stderr = open(work / "server.stderr", "w+")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True)
        self.url = self._listening()

    def _listening(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the one line a server prints when it listens
        if "listening on http://" not in line:
            self.process.wait(30)
            raise RuntimeError(f"the server did not start: {self.tail() or line.strip() or 'no output'}")
        return line.rsplit(" ", 1)[1].strip()

    def tail(self) -> str:
        self.stderr.seek(0)
        lines = self.stderr.read().strip().splitlines()
        return lines[-1] if lines else ""

    def stop(self) -> int:
        """SIGTERM, then wait (a ``cio-sync serve`` publishes what it holds); the exit code."""
        try:
            self.process.send_signal(signal.SIGTERM)
            code = self.process.wait(300)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        finally:
            self.stderr.close()
        return code


def published(target: Path) -> tuple[int, int]:
    """Rows in the parquet files published under ``target``, and how many distinct messageIds they hold."""
    import pyarrow.parquet as pq

    rows, ids = 0, set()
    for path in sorted(target.glob("*.parquet")):
        table = pq.read_table(path, columns=["messageId"])
        rows += table.num_rows
        ids.update(table.column("messageId").to_pylist())
    return rows, len(ids)


# -- one run -----------------------------------------------------------------------------------------------------


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile of ``values`` (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def run_once(case: Case, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Start the case's server, load it, stop it, check what landed; the run's figures, or ``{"error": ...}``."""
    work = Path(tempfile.mkdtemp(prefix=f"{case.key}-", dir=scratch))
    try:
        server = Server(case, work)
    except RuntimeError as exc:
        shutil.rmtree(work, ignore_errors=True)
        return {"error": str(exc)}
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    plans = templates(case.shape, args.templates, args.batch_size, f"{host}:{port}")
    load = Load(host, int(port), plans, args.connections)
    marks: dict[bool, tuple[tuple[float, float] | None, float]] = {}

    def window(start: bool) -> None:
        marks[start] = (cpu_seconds(server.process.pid), time.process_time())

    try:
        took = _loop_run(load.run(args.warmup, args.seconds, window))
    except OSError as exc:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        return {"error": f"load generator: {exc}"}
    except BaseException:  # interrupted: the server goes with the bench, not left running
        server.stop()
        raise
    code = server.stop()
    tally = load.tally
    result: dict[str, Any] = {
        "seconds": round(took, 3), "requests": tally.window_requests, "calls": tally.window_calls,
        "requests_per_s": tally.window_requests / took, "calls_per_s": tally.window_calls / took,
        "p50_ms": percentile(tally.latencies, 0.50) * 1000 if tally.latencies else None,
        "p99_ms": percentile(tally.latencies, 0.99) * 1000 if tally.latencies else None,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())}, "unanswered": tally.unanswered,
        "sent": tally.sent, "acknowledged_calls": tally.acknowledged_calls, "exit_code": code,
        "generator_busy": (marks[False][1] - marks[True][1]) / took,
    }
    server_cpu = None
    before, after = marks[True][0], marks[False][0]
    if before is not None and after is not None:
        result["server_user_s"], result["server_system_s"] = after[0] - before[0], after[1] - before[1]
        server_cpu = result["server_user_s"] + result["server_system_s"]
    result["server_cpu_s"] = server_cpu
    result["server_busy"] = server_cpu / took if server_cpu is not None else None
    result["calls_per_cpu_s"] = tally.window_calls / server_cpu if server_cpu else None
    errors = []
    if code != 0:
        errors.append(f"the server exited {code}: {server.tail()}")
    if set(tally.statuses) - {200}:
        errors.append(f"answers other than 200: {result['statuses']}")
    if case.server == "serve":
        rows, distinct = published(server.target)
        result["published_rows"], result["distinct_message_ids"] = rows, distinct
        high = tally.acknowledged_calls + tally.unanswered * plans[0].calls  # an unanswered request may have landed
        if not tally.acknowledged_calls <= rows <= high:
            errors.append(f"{tally.acknowledged_calls:,} calls got a 200 but {rows:,} rows were published")
        if distinct != rows:
            errors.append(f"{rows - distinct:,} published rows repeat a messageId")
    if errors:
        result["error"] = "; ".join(errors)
    shutil.rmtree(work, ignore_errors=True)
    return result


def _loop_run(coroutine: Any) -> float:
    """Run the generator on uvloop where it is installed (uvicorn[standard], the serve extra, brings it): the
    cheaper loop leaves more of the machine to the server."""
    try:
        import uvloop
    except ImportError:
        return float(asyncio.run(coroutine))
    return float(uvloop.run(coroutine))


# -- the whole bench ---------------------------------------------------------------------------------------------


def filesystem(folder: Path) -> str:
    """The filesystem type ``folder`` is on (the spool's fsyncs cost what that filesystem makes them cost)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and str(folder.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, help="measured seconds per run (default 10; 3 with --quick)")
    parser.add_argument("--warmup", type=float, help="seconds of load before the measured window (default 2; 1 "
                                                     "with --quick)")
    parser.add_argument("--repeat", type=int, help="runs per case, interleaved (default 3; 1 with --quick)")
    parser.add_argument("--connections", type=int, default=8,
                        help="concurrent keep-alive connections (default 8)")
    parser.add_argument("--batch-size", type=int, default=100, help="calls per batch request (default 100)")
    parser.add_argument("--templates", type=int, default=64,
                        help="distinct request bodies, cycled, each call with its own messageId (default 64)")
    parser.add_argument("--cases", default=",".join(c.key for c in CASES),
                        help=f"cases to run, comma-separated (default all: {','.join(c.key for c in CASES)})")
    parser.add_argument("--quick", action="store_true", help="a short run: 1 s warm-up, 3 s measured, once")
    parser.add_argument("--folder", type=Path, help="where the spools and the published files go (default the "
                                                    "temp dir: put it on the disk you mean to measure)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.repeat = args.repeat or (1 if args.quick else 3)
    known = {c.key: c for c in CASES}
    unknown = [k for k in args.cases.split(",") if k.strip() and k.strip() not in known]
    if unknown:
        parser.error(f"unknown cases: {', '.join(unknown)}; choose from {', '.join(known)}")
    args.chosen = [known[k.strip()] for k in args.cases.split(",") if k.strip()]
    if args.connections < 1 or args.batch_size < 1 or args.templates < 1 or args.seconds <= 0:
        parser.error("--connections, --batch-size, --templates and --seconds must be above 0")
    return args


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summary(case: Case, runs: list[dict[str, Any]], errors: list[str]) -> dict[str, Any]:
    """A case's row: the medians over its runs (each figure's own median), min and max calls/s, every run."""
    rates = [r["calls_per_s"] for r in runs]
    row: dict[str, Any] = {"key": case.key, "label": case.label, "server": case.server, "shape": case.shape,
                           "spool_sync": case.spool_sync, "runs": runs, "errors": errors,
                           "min_calls_per_s": min(rates) if rates else None,
                           "max_calls_per_s": max(rates) if rates else None}
    for key in ("calls_per_s", "requests_per_s", "p50_ms", "p99_ms", "calls_per_cpu_s", "server_busy",
                "generator_busy"):
        row[key] = _median(runs, key)
    if case.server == "serve":
        row["landed"] = bool(runs) and not errors and all("published_rows" in r for r in runs)
    return row


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'case':<52} {'calls/s':>9} {'min-max':>15} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'x min':>6} {'calls/CPU-s':>11} {'srv CPU':>7} {'gen CPU':>7} {'landed':>6}")
    lines = [header, "-" * len(header)]
    for row in rows:
        spread = f"{_fmt(row['min_calls_per_s'], ',.0f')}-{_fmt(row['max_calls_per_s'], ',.0f')}"
        landed = ("yes" if row["landed"] else "NO") if row["server"] == "serve" else "n/a"
        lines.append(
            f"{row['label']:<52} {_fmt(row['calls_per_s'], ',.0f'):>9} {spread:>15} "
            f"{_fmt(row['requests_per_s'], ',.0f'):>8} {_fmt(row['p50_ms'], '.1f'):>7} {_fmt(row['p99_ms'], '.1f'):>7} "
            f"{_fmt(row.get('ratio_to_minimal'), '.2f'):>6} {_fmt(row['calls_per_cpu_s'], ',.0f'):>11} "
            f"{_fmt(row['server_busy'], '.0%'):>7} {_fmt(row['generator_busy'], '.0%'):>7} {landed:>6}")
        for error in row["errors"]:
            lines.append(f"    FAILED: {error}")
    return "\n".join(lines)


def verdicts(by_key: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The issue's aim (met / NOT met / not measured), and the comparisons: the generator, RudderStack's anchor."""
    aim = by_key.get("serve-batch-group")
    target = (f"cio-sync serve, batches of 100, --spool-sync group: at least {AIM_CALLS_PER_CORE:,} calls/s per core "
              f"(calls per server CPU-second) with p99 under {AIM_P99_MS:g} ms")
    if aim is None or aim["calls_per_cpu_s"] is None or aim["p99_ms"] is None:
        found = [{"target": target, "status": "not measured", "figures": ""}]
    else:
        met = aim["calls_per_cpu_s"] >= AIM_CALLS_PER_CORE and aim["p99_ms"] < AIM_P99_MS and aim.get("landed")
        found = [{"target": target, "status": "met" if met else "NOT met",
                  "figures": f"{aim['calls_per_cpu_s']:,.0f} calls per CPU-second, p99 {aim['p99_ms']:.1f} ms, "
                             f"{aim['calls_per_s']:,.0f} calls/s"}]
    notes = []
    busy = [r for r in by_key.values() if r["server"] == "minimal" and r["generator_busy"] is not None]
    if busy:
        ceiling = max(busy, key=lambda r: r["generator_busy"])
        most, server = ceiling["generator_busy"], ceiling["server_busy"] or 0.0
        if most >= GENERATOR_BUSY_LIMIT:
            verdict = "it may be the bottleneck: the minimal app's figures are a floor, not the ceiling"
        elif server >= SATURATED:
            verdict = ("not the bottleneck: the server's event loop (one thread) was saturated, the generator was "
                       "not")
        else:
            verdict = ("not the bottleneck, but neither had a full core: other work on this machine took the rest, "
                       "so this run's ceiling is below the machine's (compare the ratios)")
        notes.append(f"load generator: busy at most {most:.0%} of its wall time, against the {ceiling['label']}, whose "
                     f"server was busy {server:.0%}; {verdict}")
    per_core = RUDDERSTACK_EVENTS / RUDDERSTACK_CORES
    for key in ("serve-batch-group", "serve-track-group"):
        row = by_key.get(key)
        if row is None or row["calls_per_s"] is None:
            continue
        cores = os.cpu_count() or 1
        line = (f"RudderStack's anchor (~{RUDDERSTACK_EVENTS:,} events/s on {RUDDERSTACK_CORES} cores, "
                f"~{per_core:,.0f} per core) against {row['label']}: {row['calls_per_s']:,.0f} calls/s on {cores} "
                f"cores ({row['calls_per_s'] / RUDDERSTACK_EVENTS:.1f}x its total)")
        if row["calls_per_cpu_s"]:
            line += (f", {row['calls_per_cpu_s']:,.0f} per CPU-second "
                     f"({row['calls_per_cpu_s'] / per_core:.0f}x per core)")
        notes.append(line)
    return found, notes


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # SIGTERM as SIGINT: the bench unwinds, stopping the server of the run in progress and removing its folders.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    began = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = args.folder or Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="cio-sync-bench-serve-", dir=folder))
    runs: dict[str, list[dict[str, Any]]] = {c.key: [] for c in args.chosen}
    errors: dict[str, list[str]] = {c.key: [] for c in args.chosen}
    schedule = [(r, c) for r in range(args.repeat) for c in args.chosen]
    try:
        for n, (round_, case) in enumerate(schedule, 1):
            outcome = run_once(case, args, scratch)
            if "error" in outcome:
                errors[case.key].append(outcome["error"])
            if "calls_per_s" in outcome:
                runs[case.key].append(outcome)
            progress = (f"{outcome['calls_per_s']:,.0f} calls/s, p99 {_fmt(outcome['p99_ms'], '.1f')} ms"
                        if "calls_per_s" in outcome else "")
            if "error" in outcome:
                progress += f" FAILED: {outcome['error']}"
            print(f"[{n}/{len(schedule)}] round {round_ + 1}, {case.label}: {progress.strip()}", file=sys.stderr,
                  flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [summary(c, runs[c.key], errors[c.key]) for c in args.chosen]
    minimal = {r["shape"]: r["calls_per_s"] for r in rows if r["server"] == "minimal"}
    for row in rows:
        ceiling = minimal.get(row["shape"])
        row["ratio_to_minimal"] = row["calls_per_s"] / ceiling if ceiling and row["calls_per_s"] else None
    by_key = {r["key"]: r for r in rows}
    found, notes = verdicts(by_key)
    loop = "uvloop" if _has_uvloop() else "asyncio"
    header = (f"cio_sync {cio_sync.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs; "
              f"{args.connections} keep-alive connections, {args.warmup:g} s warm-up + {args.seconds:g} s measured, "
              f"{args.repeat} runs per case, interleaved; generator on {loop}; spool on {filesystem(folder)} "
              f"({folder})")
    print("\n" + header)
    print(f"  - batches: {args.batch_size} calls per POST /v1/batch ({_body_size('batch', args):,} bytes), as the "
          "customerio-cdp-analytics Python client sends them; one call: POST /v1/track "
          f"({_body_size('track', args):,} bytes); Basic auth; every call with its own messageId")
    print("  - calls/CPU-s: calls answered 200 per CPU-second of the server process (all its threads); srv CPU and "
          "gen CPU: the CPU time of the server and of the load generator over the measured window's length")
    print("  - x min: calls/s against the minimal ASGI app on the same server (the ceiling); landed: after SIGTERM "
          "every call that got a 200 was in the published files, once")
    print()
    print(table(rows))
    if notes:
        print("\n" + "\n".join(notes))
    print_targets('issue 14 aim', found)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    seconds = time.monotonic() - began
    data = {"started": stamp, "seconds": round(seconds, 1), "argv": sys.argv[1:] if argv is None else argv,
            "settings": {"connections": args.connections, "warmup": args.warmup, "seconds": args.seconds,
                         "repeat": args.repeat, "batch_size": args.batch_size, "templates": args.templates,
                         "loop": loop, "filesystem": filesystem(folder)},
            "python": sys.version, "cio_sync": cio_sync.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "results": rows, "targets": found, "comparisons": notes}
    path = out / f"serve-{stamp}.json"
    path.write_text(json.dumps(data, indent=2))
    print(f"\nsaved {path}")
    print(f"took {seconds:,.0f} s")
    return 1 if any(r["errors"] for r in rows) else 0


def _has_uvloop() -> bool:
    import importlib.util

    return importlib.util.find_spec("uvloop") is not None


def _body_size(shape: str, args: argparse.Namespace) -> int:
    plans = templates(shape, 1, args.batch_size, "127.0.0.1")
    return len(plans[0].request(0)) - len(plans[0].head)


if __name__ == "__main__":
    sys.exit(main())
