"""The ``cio-sync`` command line (also ``python -m cio_sync``).

Exit codes: 0 success, 1 the work failed (storage, data) or, for ``load``, files were quarantined by this run,
2 the command line was wrong, 128 + the signal's number when ``replay`` or ``load`` was stopped by SIGTERM, SIGINT
or SIGHUP (143, 130, 129) after finishing what it had accepted: ``replay`` publishes every call it accepted,
``load`` stops between two files.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cio_sync._errors import CioSyncError, InvalidCall, InvalidCalls
from cio_sync._sample import sample_calls, sample_records
from cio_sync.loader.load import inspect_prefix, load
from cio_sync.sinks.advanced import AdvancedSink
from cio_sync.sinks.pipeline import Pipeline
from cio_sync.sinks.signals import close_on_signals
from cio_sync.sinks.standard import StandardSink
from cio_sync.storage.backends import redact
from cio_sync.storage.writer import WrittenFile

FORMATS = ("parquet", "csv", "json")
#: The signals that stop the long-running commands cleanly (SIGHUP: the terminal went away).
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s is not None)


def _print_files(files: list[WrittenFile], out: Any) -> None:
    for f in sorted(files, key=lambda f: f.name):
        print(f"  {f.name:<48} {f.rows:>7,} rows {f.bytes:>10,} bytes", file=out)


def _summary(database: Path, out: Any) -> None:
    import duckdb

    con = duckdb.connect(str(database), read_only=True)
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}

    def count(table: str) -> int:
        if table not in tables:
            return 0
        row = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()
        return int(row[0]) if row else 0

    print(f"\nIn DuckDB ({database}):", file=out)
    print(f"  people_current      {count('people_current'):>8,} people ({count('people'):,} change rows)", file=out)
    print(f"  attributes_current  {count('attributes_current'):>8,} values ({count('attributes'):,} change rows)",
          file=out)
    print(f"  deliveries_current  {count('deliveries_current'):>8,} messages", file=out)
    if "metrics_unique" in tables:
        metrics = con.execute("SELECT metric, count(*) FROM metrics_unique GROUP BY metric ORDER BY 2 DESC").fetchall()
        print("  metrics_unique      " + ", ".join(f"{m} {n:,}" for m, n in metrics), file=out)
    raw = sorted(t for t in tables if t.startswith("raw_") and not t.endswith("_unique"))
    print("  raw calls           " + ", ".join(f"{t.removeprefix('raw_')} {count(t):,}" for t in raw), file=out)
    if "attributes_current" in tables:
        plans = con.execute("SELECT attribute_value, count(*) FROM attributes_current WHERE attribute_name = 'plan' "
                            "GROUP BY 1 ORDER BY 2 DESC LIMIT 4").fetchall()
        print("  plans now           " + ", ".join(f"{p} {n:,}" for p, n in plans), file=out)
    con.close()


def demo(args: argparse.Namespace) -> int:
    """Both modes on sample traffic into a local folder, then loaded into DuckDB, with a summary."""
    folder = Path(args.folder).resolve()
    out = sys.stdout
    calls = list(sample_calls(args.calls, seed=args.seed, people=max(1, args.calls // 10)))
    print(f"Writing {len(calls):,} sample calls (identify, track, page, screen, group, alias) to {folder}", file=out)
    for fmt in FORMATS:
        if fmt == "parquet":
            continue
        with AdvancedSink(str(folder / "advanced" / fmt), format=fmt, destination_id=args.destination_id,
                          flush_interval=None) as sink:
            sink.write_many(calls)
            files = sink.flush()
        print(f"\nAdvanced, {fmt}: {len(files)} files in {folder / 'advanced' / fmt}", file=out)
        _print_files(files, out)
    advanced = AdvancedSink(str(folder / "advanced" / "parquet"), destination_id=args.destination_id,
                            flush_interval=None)
    standard = StandardSink(str(folder / "standard"), workspace_id=args.workspace_id,
                            state=folder / "workspace.sqlite", flush_interval=None, commit_every=1000)
    with Pipeline(advanced=advanced, standard=standard) as pipeline:
        pipeline.write_many(calls)
        people = sorted({c["userId"] for c in calls if c["type"] == "identify" and c.get("userId")})
        for table, row in sample_records(people[: max(1, len(people) // 2)], seed=args.seed):
            standard.record(table, row)
        files = pipeline.flush()
    print(f"\nBoth modes from one stream: Advanced Parquet in {folder / 'advanced' / 'parquet'}, Standard (the "
          f"workspace's changes and campaign data) in {folder / 'standard'}", file=out)
    _print_files(files, out)
    try:
        import duckdb  # noqa: F401
    except ImportError:
        print("\n(install 'cio_sync[duckdb]' to load the files into DuckDB)", file=out)
        return 0
    database = folder / "warehouse.duckdb"
    for prefix in (folder / "advanced" / "parquet", folder / "standard"):
        report = load(str(prefix), f"duckdb:///{database}")
        print(f"\n{report}", file=out)
    _summary(database, out)
    print(f"\nDone. Query it: duckdb {database}  (or python -c \"import duckdb; "
          f"print(duckdb.connect('{database}').sql('SELECT * FROM people_current LIMIT 5'))\")", file=out)
    print("Run it again and positions and sequences continue; loaded files are not loaded twice.", file=out)
    return 0


def _options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"cio-sync: error: --storage-option takes KEY=VALUE, got {pair!r}")
        options[key] = value
    return options


def load_command(args: argparse.Namespace) -> int:
    """Load a prefix into a warehouse; on SIGTERM, SIGINT or SIGHUP, stop between two files."""
    show = sys.stderr.isatty() and not args.quiet
    done = {"files": 0, "rows": 0}
    guard = close_on_signals(signals=STOP_SIGNALS)

    def progress(file: Any, rows: int) -> None:
        done["files"] += 1
        done["rows"] += rows
        if show:
            print(f"\r  loaded {file.name} ({rows:,} rows)\033[K", end="", file=sys.stderr, flush=True)
        guard.checkpoint()  # the file is committed: a signal that came meanwhile stops the load here

    source = redact(args.source.rstrip("/"), ())

    def quarantined(file: Any) -> None:
        # As it happens, so that a load a warehouse failure stops later still showed it.
        if show:
            print("\r\033[K", end="", file=sys.stderr)
        print(f"cio-sync: quarantined {source}/{file.name}: {file.reason}", file=sys.stderr, flush=True)
        guard.checkpoint()  # its entry is committed too

    try:
        with guard:
            report = load(args.source, args.into, storage_options=_options(args.storage_option),
                          delete_after_load=args.delete_after_load, retry_quarantined=args.retry_quarantined,
                          progress=progress, on_quarantine=quarantined)
            if show:
                print("\r\033[K", end="", file=sys.stderr)
            print(report)
    except SystemExit as exc:
        if guard.received is None:
            raise
        if show:
            print("\r\033[K", end="", file=sys.stderr)
        print(f"cio-sync: stopped by {signal.Signals(guard.received).name} after loading {done['files']:,} files "
              f"({done['rows']:,} rows); the next load goes on from there", file=sys.stderr)
        return int(exc.code or 0)
    if report.quarantined or report.files_still_quarantined:
        total = report.files_quarantined + report.files_still_quarantined
        print(f"cio-sync: {total} file(s) of {report.source} are quarantined (status 'quarantined' in "
              "_cio_sync_loaded, with the reason); fix or replace them, then load again with --retry-quarantined",
              file=sys.stderr)
    return 1 if report.quarantined else 0


def inspect_command(args: argparse.Namespace) -> int:
    """Describe a prefix."""
    found = inspect_prefix(args.prefix, storage_options=_options(args.storage_option))
    tables = found["tables"]
    for bad in found["unreadable"]:
        print(f"cio-sync: unreadable {found['source']}/{bad['name']}: {bad['reason']}", file=sys.stderr)
    if not tables:
        print(f"{found['source']}: no readable cio_sync or Customer.io files")
        return 0
    print(f"{found['source']}:")
    for name, t in sorted(tables.items()):
        span = f"{t['first']:%Y-%m-%d %H:%M:%S} .. {t['last']:%Y-%m-%d %H:%M:%S} UTC" if t["first"] else "no rows"
        gaps = f"; gaps at {', '.join(t['gaps'][:5])}" if t["gaps"] else ""
        print(f"  {name:<20} {t['files']:>5} files {t['rows']:>10,} rows {t['bytes']:>12,} bytes  "
              f"{'/'.join(t['formats'])}  {span}{gaps}")
    return 0


def replay_command(args: argparse.Namespace) -> int:
    """Replay a JSON-lines file of calls into a sink."""
    options = _options(args.storage_option)
    sinks: list[Any] = []
    if args.mode in ("advanced", "both"):
        target = args.to if args.mode == "advanced" else f"{args.to.rstrip('/')}/advanced"
        sinks.append(AdvancedSink(target, format=args.format, destination_id=args.destination_id,
                                  storage_options=options, flush_interval=None))
    if args.mode in ("standard", "both"):
        target = args.to if args.mode == "standard" else f"{args.to.rstrip('/')}/standard"
        sinks.append(StandardSink(target, workspace_id=args.workspace_id, state=args.state, storage_options=options,
                                  flush_interval=None, commit_every=1000))
    sink: Any = sinks[0] if len(sinks) == 1 else Pipeline(advanced=sinks[0], standard=sinks[1])
    accepted = rejected = 0
    shown = 0
    # SIGTERM, SIGINT or SIGHUP: publish every call accepted so far and stop (see close_on_signals).
    guard = close_on_signals(sink, signals=STOP_SIGNALS)
    source = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115 - closed below
    try:
        with guard, sink:
            for number, line in enumerate(source, 1):
                if not line.strip():
                    continue
                try:
                    accepted += sink.write_many([line]) if b'"batch"' not in line else sink.write_many(line)
                except InvalidCall as exc:
                    errors = exc.errors if isinstance(exc, InvalidCalls) else [exc]
                    accepted += exc.accepted if isinstance(exc, InvalidCalls) else 0
                    rejected += len(errors)
                    for error in errors:
                        if shown < 10:
                            print(f"line {number}: {str(error).replace('invalid call #0: ', '')}", file=sys.stderr)
                            shown += 1
            files = sink.flush()
    except SystemExit as exc:
        if guard.received is None:
            raise
        name = signal.Signals(guard.received).name
        taken = max(s.stats.calls_accepted for s in sinks)
        published = sum(s.stats.files_published for s in sinks)
        if sink.closed:
            print(f"cio-sync: stopped by {name} after {taken:,} calls ({rejected:,} rejected); every call accepted "
                  f"is published ({published} files)", file=sys.stderr)
        else:
            print(f"cio-sync: stopped by {name} after {taken:,} calls, but publishing failed (see above); what "
                  "the state or spool holds is published by the next run", file=sys.stderr)
        return int(exc.code or 0)
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    print(f"replayed {accepted:,} calls from {args.file} ({rejected:,} rejected); {len(files)} files published")
    return 1 if rejected else 0


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
    p.add_argument("--workspace-id", type=int, default=111528, help="workspace id of the Standard files")
    p.set_defaults(handler=demo)

    p = commands.add_parser(
        "load", help="load a prefix into a warehouse, each file once",
        description="Loads every file of SOURCE (written by either sink, or a Customer.io export) that was not "
                    "loaded before into the target, in position/sequence order, each file in one transaction with "
                    "its entry in _cio_sync_loaded; then builds the current-state views (people_current, "
                    "attributes_current, deliveries_current, subjects_current, metrics_unique, raw_<type>_unique). "
                    "A file that cannot load is quarantined (one line on stderr with its name and the reason) and "
                    "the load goes on; later loads skip it unless --retry-quarantined is given. Exit code 1 when "
                    "this run quarantined a file or failed, 0 otherwise.",
    )
    p.add_argument("source", help="the prefix: s3://bucket/raw, gs://..., az://..., or a local folder")
    p.add_argument("--into", default="duckdb:///cio_sync.duckdb",
                   help="target: duckdb:///relative.duckdb or duckdb:////absolute.duckdb (default: "
                        "duckdb:///cio_sync.duckdb)")
    p.add_argument("--delete-after-load", action="store_true",
                   help="delete each file once its rows are committed (and manifests whose files are all loaded); "
                        "the _cio_sync/ counters stay")
    p.add_argument("--retry-quarantined", action="store_true",
                   help="try again the files an earlier load quarantined (by default they are skipped)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for the storage backend, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.set_defaults(handler=load_command)

    p = commands.add_parser(
        "inspect", help="show what a prefix holds",
        description="Lists the tables of PREFIX with their files, rows, bytes, formats, time range, and gaps in "
                    "positions.",
    )
    p.add_argument("prefix", help="the prefix: s3://bucket/raw, gs://..., az://..., or a local folder")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for the storage backend (repeatable)")
    p.set_defaults(handler=inspect_command)

    p = commands.add_parser(
        "replay", help="write a JSON-lines file of calls through a sink",
        description="Reads FILE (JSON lines: one call per line, or Segment batch payloads; '-' for standard input) "
                    "and writes every call through the Advanced sink, the Standard sink, or both, then publishes. "
                    "Rejected lines are reported on stderr and make the exit code 1.",
    )
    p.add_argument("file", help="a JSON-lines file of calls, or - for standard input")
    p.add_argument("--to", required=True, help="where files go: s3://bucket/prefix, gs://..., az://..., a folder")
    p.add_argument("--mode", choices=("advanced", "standard", "both"), default="advanced",
                   help="which sink (both: <to>/advanced and <to>/standard; default: advanced)")
    p.add_argument("--format", choices=FORMATS, default="parquet", help="Advanced file format (default parquet)")
    p.add_argument("--destination-id", type=int, default=1, help="Advanced destination id (default 1)")
    p.add_argument("--workspace-id", type=int, default=1, help="Standard workspace id (default 1)")
    p.add_argument("--state", default=None, help="Standard workspace state file (default: in memory)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for the storage backend (repeatable)")
    p.set_defaults(handler=replay_command)
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
