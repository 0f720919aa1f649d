"""Benchmarks: cio_sync against raw pyarrow on the same calls, measured in the same run.

Run with ``nox -s bench`` (or ``python bench/run.py --calls 200000 --repeat 5``). Prints calls/s (min / median /
max over the repetitions) and the ratio of each cio_sync path to the raw pyarrow baseline, and saves the figures as
JSON under bench/results/. These machines are shared and noisy: compare the ratios, not the absolute figures.

The baseline is what a careful user would write by hand: nested objects dumped to JSON text with orjson, then
``pa.Table.from_pylist`` + ``pq.write_table`` (zstd), one file, no validation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

import cio_sync
from cio_sync._sample import sample_calls

NESTED = ("traits", "properties", "context", "integrations")


def raw_pyarrow(calls: list[dict[str, Any]], folder: Path) -> None:
    rows = []
    for call in calls:
        row = dict(call)
        for key in NESTED:
            value = row.get(key)
            if value is not None:
                row[key] = orjson.dumps(value).decode()
        rows.append(row)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, folder / "raw.parquet", compression="zstd")


def sink_run(fmt: str, as_bytes: bool = False, spool: str | None = None) -> Callable[[list[Any], Path], None]:
    def run(calls: list[Any], folder: Path) -> None:
        spool_dir = folder / "spool" if spool else None
        with cio_sync.AdvancedSink(str(folder / "bucket"), format=fmt, flush_interval=None, max_rows=None,
                                   max_bytes=None, max_buffer_bytes=None, spool_dir=spool_dir,
                                   spool_sync=spool or "always") as sink:
            for call in calls:
                sink.write(call)

    run.__name__ = f"AdvancedSink {fmt}" + (" (JSON bytes in)" if as_bytes else "")
    return run


def standard_run(commit_every: int) -> Callable[[list[Any], Path], None]:
    def run(calls: list[Any], folder: Path) -> None:
        with cio_sync.StandardSink(str(folder / "bucket"), workspace_id=1, state=folder / "state.sqlite",
                                   flush_interval=None, max_rows=None, max_bytes=None,
                                   commit_every=commit_every) as sink:
            for call in calls:
                sink.write(call)

    return run


def identify_calls(count: int) -> list[dict[str, Any]]:
    """Identify calls from the sample traffic, about five per person, so many change something and many do not."""
    calls = []
    for call in sample_calls(count * 7, seed=43, people=max(1, count // 5)):
        if call["type"] == "identify":
            calls.append({**call, "userId": call.get("userId") or call["anonymousId"]})
            if len(calls) == count:
                break
    return calls


def measure(name: str, fn: Callable[[list[Any], Path], None], calls: list[Any], repeat: int) -> dict[str, Any]:
    rates = []
    for _ in range(repeat):
        folder = Path(tempfile.mkdtemp(prefix="cio-sync-bench-"))
        try:
            start = time.perf_counter()
            fn(calls, folder)
            elapsed = time.perf_counter() - start
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        rates.append(len(calls) / elapsed)
    return {"name": name, "calls": len(calls), "min": min(rates), "median": statistics.median(rates),
            "max": max(rates), "runs": rates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100_000, help="calls per run (default 100000)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each case (default 3)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the JSON")
    parser.add_argument("--identify-calls", type=int, default=20_000,
                        help="identify calls for the StandardSink cases (default 20000)")
    args = parser.parse_args(argv)

    calls = list(sample_calls(args.calls, seed=42))
    as_bytes = [orjson.dumps(c) for c in calls]
    cases: list[tuple[str, Callable[[list[Any], Path], None], list[Any]]] = [
        ("raw pyarrow (from_pylist + write_table)", raw_pyarrow, calls),
        ("AdvancedSink parquet, dicts in", sink_run("parquet"), calls),
        ("AdvancedSink parquet, JSON bytes in", sink_run("parquet", True), as_bytes),
        ("AdvancedSink csv, dicts in", sink_run("csv"), calls),
        ("AdvancedSink json, dicts in", sink_run("json"), calls),
        ("AdvancedSink parquet, spool (sync os)", sink_run("parquet", spool="os"), calls),
        ("AdvancedSink parquet, spool (sync interval)", sink_run("parquet", spool="interval"), calls),
        ("AdvancedSink parquet, spool (sync always)", sink_run("parquet", spool="always"), calls),
    ]
    identifies = identify_calls(args.identify_calls)
    standard_cases = [
        ("StandardSink identify, SQLite, commit_every=1", standard_run(1), identifies),
        ("StandardSink identify, SQLite, commit_every=1000", standard_run(1000), identifies),
    ]
    results = []
    # Interleave repetitions across cases so that a noisy moment hurts all of them alike.
    for round_ in range(args.repeat):
        for name, fn, data in cases:
            r = measure(name, fn, data, 1)
            if round_ == 0:
                results.append(r)
            else:
                existing = next(x for x in results if x["name"] == name)
                existing["runs"].extend(r["runs"])
    for r in results:
        r["min"], r["median"], r["max"] = min(r["runs"]), statistics.median(r["runs"]), max(r["runs"])
    baseline = results[0]["median"]
    print(f"{args.calls:,} sample calls, {args.repeat} runs each, local disk, Python {platform.python_version()}, "
          f"pyarrow {pa.__version__}")
    print(f"{'case':<48} {'min':>10} {'median':>10} {'max':>10}  {'ratio to raw pyarrow':>20}")
    for r in results:
        r["ratio_to_raw_pyarrow"] = r["median"] / baseline
        print(f"{r['name']:<48} {r['min']:>10,.0f} {r['median']:>10,.0f} {r['max']:>10,.0f}  "
              f"{r['ratio_to_raw_pyarrow']:>19.2f}x")
    standard = []
    for name, fn, data in standard_cases:
        standard.append(measure(name, fn, data, args.repeat))
    print(f"\n{len(identifies):,} identify calls for {max(1, len(identifies) // 5):,} people, SQLite state on local "
          f"disk (calls/s, no baseline)")
    for r in standard:
        print(f"{r['name']:<48} {r['min']:>10,.0f} {r['median']:>10,.0f} {r['max']:>10,.0f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = out / f"bench-{stamp}.json"
    path.write_text(json.dumps({"calls": args.calls, "repeat": args.repeat, "python": sys.version,
                                "machine": platform.machine(), "cpus": os.cpu_count(), "results": results,
                                "standard": standard},
                               indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
