"""Benchmarks of issue 7: cio_sync against raw pyarrow, orjson JSON lines and dlt on the same calls, in one run.

Run with ``nox -s bench`` (or ``python -m bench``; ``--quick`` for a two-minute version). Every case runs in
a fresh process (so its peak RSS is its own), ``--repeat`` times, interleaved across cases so that a noisy moment
hurts all of them alike. Prints calls/s (min / median / max), the ratios to raw pyarrow and to dlt, peak RSS (and for
the storage-down cases, once each, peak RSS against max_buffer_bytes), which of the issue's targets this run meets,
and saves the figures as JSON and a PNG chart under bench/results/.

These machines are shared and noisy: compare the ratios within one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

import cio_sync
from bench import report, traffic
from bench.cases import CASES, Job

ROOT = Path(__file__).resolve().parent.parent
#: Cases fed the shared slice of mixed calls, in the order they are printed.
MIXED = ("raw-pyarrow", "orjson-lines", "parquet", "parquet-bytes", "csv", "json", "spool-os", "spool-interval",
         "spool-always")
GROUPS = {"raw-pyarrow": "baseline", "orjson-lines": "baseline", "dlt": "baseline", "s3-parquet": "s3",
          "standard-1": "standard", "standard-1000": "standard", "large-local": "large", "large-s3": "large",
          "memory": "memory", "outage-small": "outage", "outage-small-spool": "outage", "outage-mixed": "outage",
          "outage-mixed-spool": "outage"}
#: The outage cases, each run once: storage down for the whole run.
OUTAGE = ("outage-small", "outage-small-spool", "outage-mixed", "outage-mixed-spool")
#: The most calls a no-spool outage case may write before BufferFull ends it.
OUTAGE_CAP = 50_000_000


@dataclass
class Planned:
    """One case of the plan: how many calls of which traffic file it writes."""

    key: str
    calls: int
    traffic: Path
    s3: dict[str, Any] | None = None
    budget_mib: float | None = None


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, help="mixed calls per run (default 100000; 30000 with --quick)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each case (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: fewer calls, no memory-growth runs, no large-file case")
    parser.add_argument("--rss-calls", default="1000000,10000000",
                        help="stream sizes for the memory-growth runs, comma-separated (default 1000000,10000000; "
                             "'' for none)")
    parser.add_argument("--dlt-calls", type=int,
                        help="calls for dlt, which is slow (default min(calls, 50000); 10000 with --quick)")
    parser.add_argument("--always-calls", type=int,
                        help="calls for the spool with sync=always, an fsync per call (default min(calls, 2000); "
                             "500 with --quick)")
    parser.add_argument("--identify-calls", type=int,
                        help="identify calls for the Standard cases (default min(calls, 20000); 5000 with --quick)")
    parser.add_argument("--large-calls", type=int, default=500_000,
                        help="calls for the large-file cases, enough for a >100 MiB file (default 500000; 0 skips)")
    parser.add_argument("--outage-budget-mib", type=float,
                        help="max_buffer_bytes of the storage-down cases, in MiB (default 64; 16 with --quick)")
    parser.add_argument("--outage-calls", type=int,
                        help="calls the storage-down cases with a spool write (those without one stop at "
                             "BufferFull; default 2000000, 400000 with --quick; 0 skips the outage cases)")
    parser.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS S3 cases")
    parser.add_argument("--no-dlt", action="store_true", help="skip the dlt baseline")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON and the PNG")
    args = parser.parse_args(argv)
    args.calls = args.calls or (30_000 if args.quick else 100_000)
    args.dlt_calls = min(args.calls, args.dlt_calls or (10_000 if args.quick else 50_000))
    args.always_calls = min(args.calls, args.always_calls or (500 if args.quick else 2_000))
    args.identify_calls = args.identify_calls or min(args.calls, 5_000 if args.quick else 20_000)
    args.rss = [] if args.quick else [int(n) for n in args.rss_calls.replace("_", "").split(",") if n.strip()]
    args.outage_budget_mib = args.outage_budget_mib or (16.0 if args.quick else 64.0)
    if args.outage_calls is None:
        args.outage_calls = 400_000 if args.quick else 2_000_000
    if args.repeat < 1 or args.calls < 1:
        parser.error("--repeat and --calls must be at least 1")
    return args


@contextlib.contextmanager
def s3_server(enabled: bool) -> Iterator[dict[str, Any] | None]:
    """SeaweedFS S3 on 127.0.0.1 as the test suite starts it (stopped by its PID at the end), or None."""
    if not enabled:
        yield None
        return
    from tests import servers

    try:
        context = servers.seaweedfs()
        server = context.__enter__()
    except RuntimeError as exc:
        print(f"S3 cases skipped: {exc}", file=sys.stderr)
        yield None
        return
    try:
        yield server.storage_options
    finally:
        context.__exit__(None, None, None)


def run_child(planned: Planned, scratch: Path) -> dict[str, Any]:
    """Run one case once in a fresh interpreter; its result, or ``{"error": ...}``."""
    folder = Path(tempfile.mkdtemp(prefix=f"{planned.key}-", dir=scratch))
    job = Job(case=planned.key, traffic=str(planned.traffic), calls=planned.calls, folder=str(folder), s3=planned.s3,
              budget_mib=planned.budget_mib)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-m", "bench.child", json.dumps(job.__dict__)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=3600, check=False)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 3600 s"}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT "):])
            return result
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {done.returncode}: {tail}"}


def plan(args: argparse.Namespace, folder: Path, s3: dict[str, Any] | None) -> tuple[list[Planned], list[Planned]]:
    """The repeated cases, and the memory-growth and outage runs (once each), with their traffic written to
    ``folder``."""
    mixed = traffic.save(traffic.mixed_calls(args.calls), folder / "mixed.pickle")
    identifies = traffic.save(traffic.identify_calls(args.identify_calls), folder / "identify.pickle")
    cases = [Planned(key, args.always_calls if key == "spool-always" else args.calls, mixed) for key in MIXED]
    if not args.no_dlt:
        cases.insert(2, Planned("dlt", args.dlt_calls, mixed))
    if s3 is not None:
        cases.append(Planned("s3-parquet", args.calls, mixed, s3))
    cases += [Planned("standard-1", args.identify_calls, identifies),
              Planned("standard-1000", args.identify_calls, identifies)]
    if not args.quick and args.large_calls:
        cases.append(Planned("large-local", args.large_calls, mixed))
        if s3 is not None:
            cases.append(Planned("large-s3", args.large_calls, mixed, s3))
    once = [Planned("memory", n, mixed) for n in args.rss]
    if args.outage_calls:
        once += [Planned(key, args.outage_calls if key.endswith("-spool") else OUTAGE_CAP, mixed,
                         budget_mib=args.outage_budget_mib) for key in OUTAGE]
    return cases, once


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    began = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int], report.CaseResult] = {}
    scratch = Path(tempfile.mkdtemp(prefix="cio-sync-bench-"))
    try:
        with s3_server(not args.no_s3) as s3:
            cases, memory = plan(args, scratch, s3)
            described = traffic.describe(traffic.load(scratch / "mixed.pickle"))
            schedule = [(r, p) for r in range(args.repeat) for p in cases] + [(0, p) for p in memory]
            for n, (round_, planned) in enumerate(schedule, 1):
                label, _ = CASES[planned.key]
                result = results.setdefault((planned.key, planned.calls), report.CaseResult(
                    planned.key, label, GROUPS.get(planned.key, "advanced"), planned.calls))
                outcome = run_child(planned, scratch)
                if "error" in outcome:
                    result.errors.append(outcome["error"])
                    progress = f"FAILED: {outcome['error']}"
                else:
                    rate = outcome["calls"] / outcome["seconds"]
                    result.runs.append(rate)
                    result.peak_rss_mib.append(outcome["peak_rss_mib"])
                    if outcome["rss_start_mib"] is not None:
                        result.rss_start_mib.append(outcome["rss_start_mib"])
                    result.files = outcome["files"]
                    if outcome["accounted_peak_mib"] is not None:
                        result.accounted_peak_mib.append(outcome["accounted_peak_mib"])
                    result.outage = {k: outcome.get(k) for k in ("budget_mib", "stopped_by", "published_rows")}
                    if outcome.get("stopped_by") is not None:
                        result.calls = outcome["calls"]  # the calls accepted before BufferFull, or all of them
                        if outcome["published_rows"] != outcome["calls"]:
                            result.errors.append(f"{outcome['calls']:,} calls accepted but "
                                                 f"{outcome['published_rows']:,} rows published")
                    progress = f"{rate:,.0f} calls/s, peak RSS {outcome['peak_rss_mib']:,.0f} MiB"
                print(f"[{n}/{len(schedule)}] round {round_ + 1}, {label}, {planned.calls:,} calls: {progress}",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summarise(args, list(results.values()), described, time.monotonic() - began, out)


def summarise(args: argparse.Namespace, results: list[report.CaseResult], described: dict[str, Any],
              seconds: float, out: Path) -> int:
    """Print the table, the targets and the comparisons; save the JSON and the chart."""
    medians = {r.key: r.median for r in results}
    rows = [r.as_dict(medians.get("raw-pyarrow"), medians.get("dlt")) for r in results]
    by_key = {row["key"] if row["group"] != "memory" else f"memory-{row['calls']}": row for row in rows}
    found = report.targets(by_key)
    header = (f"cio_sync {cio_sync.__version__}, Python {platform.python_version()}, pyarrow {pa.__version__}, "
              f"{os.cpu_count()} CPUs; {args.calls:,} mixed calls per run ({described.get('mean_json_bytes')} bytes "
              f"of JSON each), {args.repeat} runs per case, interleaved")
    print("\n" + header)
    print(f"traffic: {described.get('types')}; {described.get('non_ascii_share', 0):.0%} of calls non-ASCII; type "
          f"drift in {', '.join(described.get('drifting_fields', [])) or 'nothing'}")
    notes = [f"dlt wrote the first {args.dlt_calls:,} calls only (it is slow); its calls/s is on that slice"
             if "dlt" in medians else "dlt skipped (--no-dlt)",
             f"spool sync=always wrote the first {args.always_calls:,} calls only (an fsync per call)",
             f"Standard cases: {args.identify_calls:,} identify calls for {max(1, args.identify_calls // 5):,} "
             "people (no baseline; ratios not applicable)"]
    if any(r.group == "large" for r in results):
        notes.append(f"large-file cases: {args.large_calls:,} calls streamed from the slice, json format, no "
                     "size/row cut, one file per call type")
    if any(r.group == "memory" for r in results):
        notes.append("memory-growth runs: parquet with default max_rows/max_bytes/max_buffer_bytes, calls streamed "
                     "lazily from the slice, once each")
    if any(r.group == "outage" for r in results):
        notes.append(f"storage-down runs: every upload fails for the whole run, max_buffer_bytes="
                     f"{args.outage_budget_mib:g} MiB, parquet; without a spool until BufferFull, with one "
                     f"(spool_sync=os) {args.outage_calls:,} calls; once each")
    for note in notes:
        print(f"  - {note}")
    print()
    print(report.table(rows))
    compared = report.comparisons(by_key)
    if compared:
        print("\n" + "\n".join(compared))
    report.print_targets('issue 7 targets', found)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    data = {
        "started": stamp, "seconds": round(seconds, 1), "argv": sys.argv[1:],
        "sizes": {"calls": args.calls, "repeat": args.repeat, "dlt_calls": args.dlt_calls,
                  "always_calls": args.always_calls, "identify_calls": args.identify_calls,
                  "large_calls": args.large_calls, "rss_calls": args.rss,
                  "outage_budget_mib": args.outage_budget_mib, "outage_calls": args.outage_calls},
        "python": sys.version, "pyarrow": pa.__version__, "cio_sync": cio_sync.__version__,
        "machine": platform.machine(), "cpus": os.cpu_count(), "traffic": described, "results": rows,
        "targets": found, "comparisons": compared,
    }
    path = out / f"bench-{stamp}.json"
    path.write_text(json.dumps(data, indent=2))
    print(f"\nsaved {path}")
    png = report.chart(rows, out / f"bench-{stamp}.png", header)
    print(f"saved {png}" if png else "no chart: matplotlib is not installed (pip install -e '.[bench]')")
    print(f"took {seconds:,.0f} s")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
