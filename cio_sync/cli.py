"""The ``cio-sync`` command line (also ``python -m cio_sync``).

Exit codes: 0 success, 1 the work failed (storage, data), 2 the command line was wrong.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cio_sync._advanced import AdvancedSink
from cio_sync._errors import CioSyncError
from cio_sync._sample import sample_calls
from cio_sync._writer import WrittenFile

FORMATS = ("parquet", "csv", "json")


def _print_files(files: list[WrittenFile], out: Any) -> None:
    for f in sorted(files, key=lambda f: f.name):
        print(f"  {f.name:<32} {f.rows:>7,} rows {f.bytes:>10,} bytes", file=out)


def _duckdb_summary(folder: Path, out: Any) -> None:
    try:
        import duckdb
    except ImportError:
        print("\n(install 'cio_sync[duckdb]' to see the files loaded into DuckDB)", file=out)
        return
    parquet = folder / "parquet"
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    print("\nLoaded into DuckDB (read_parquet over the Parquet files):", file=out)
    for call_type in ("identify", "track", "page", "screen", "group", "alias"):
        pattern = str(parquet / f"*.{call_type}.parquet")
        if not list(parquet.glob(f"*.{call_type}.parquet")):
            continue
        count, first, last = con.execute(
            f"SELECT count(*), min(receivedAt), max(receivedAt) FROM read_parquet('{pattern}')"
        ).fetchone() or (0, None, None)
        print(f"  {call_type:<9} {count:>7,} calls, received {first:%Y-%m-%d %H:%M:%S} .. {last:%H:%M:%S} UTC",
              file=out)
    top = con.execute(
        f"SELECT event, count(*) AS n FROM read_parquet('{parquet / '*.track.parquet'}') "
        "GROUP BY event ORDER BY n DESC, event LIMIT 3"
    ).fetchall()
    print("  top events: " + ", ".join(f"{event} ({n})" for event, n in top), file=out)


def demo(args: argparse.Namespace) -> int:
    """Write sample calls in every format to a local folder and print what was written."""
    folder = Path(args.folder).resolve()
    out = sys.stdout
    calls = list(sample_calls(args.calls, seed=args.seed))
    print(f"Writing {len(calls):,} sample calls (identify, track, page, screen, group, alias) to {folder}", file=out)
    for fmt in FORMATS:
        with AdvancedSink(str(folder / fmt), format=fmt, destination_id=args.destination_id,
                          flush_interval=None) as sink:
            sink.write_many(calls)
            files = sink.flush()
        print(f"\n{fmt}: {len(files)} files in {folder / fmt}", file=out)
        _print_files(files, out)
    _duckdb_summary(folder, out)
    print(f"\nDone. Run it again and the positions continue; delete the data files after loading them, but keep "
          f"{folder}/<format>/_cio_sync/ (the counters).", file=out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cio-sync",
        description="Write customer-data calls to storage buckets as immutable files (Customer.io's storage "
                    "integrations, as a library).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = commands.add_parser(
        "demo", help="write sample calls in Parquet, CSV and JSON to a local folder and show them",
        description="Writes realistic sample calls through the Advanced sink in all three formats to FOLDER "
                    "(one subfolder per format), prints every file written, and reads the Parquet files back "
                    "with DuckDB when it is installed.",
    )
    p.add_argument("folder", nargs="?", default="cio-sync-demo", help="where to write (default: ./cio-sync-demo)")
    p.add_argument("--calls", type=int, default=10_000, help="how many calls to write (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample traffic (default: 0)")
    p.add_argument("--destination-id", type=int, default=2184, help="destination id in file names (default 2184)")
    p.set_defaults(handler=demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except CioSyncError as exc:
        print(f"cio-sync: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cio-sync: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
