"""The ``cio-sync`` command line (also ``python -m cio_sync``).

Every error ends the command with one line on stderr, ``cio-sync: error: <what, which file or URL, what to do>``
(with ``--debug``, after the traceback), never showing a credential. Exit codes: 0 success, 1 the work failed
(storage, data, a value such as a URL, a prefix or a storage option found wrong) or, for ``load``, files were
quarantined by this run, 2 the command line could not be parsed (an unknown option, a ``--storage-option`` without
``=``), 128 + the signal's number when ``replay`` or ``load`` was stopped by SIGTERM, SIGINT or SIGHUP (143, 130,
129) after finishing what it had accepted: ``replay`` publishes every call it accepted, ``load`` stops between two
files.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cio_sync._errors import CioSyncError, ConfigError, InvalidCall, InvalidCalls
from cio_sync._sample import sample_calls, sample_records
from cio_sync.loader.load import inspect_prefix, load
from cio_sync.sinks.advanced import AdvancedSink
from cio_sync.sinks.pipeline import Pipeline
from cio_sync.sinks.signals import close_on_signals
from cio_sync.sinks.standard import StandardSink
from cio_sync.storage.backends import is_secret_name, redact, secrets_in
from cio_sync.storage.writer import WrittenFile

FORMATS = ("parquet", "csv", "json")
_STORAGE_OPTION_HELP = ("an option for the storage backend (repeatable); VALUE is read as JSON when it is JSON, else "
                        "as text: endpoint_url=http://127.0.0.1:9000, anon=true, "
                        "'client_kwargs={\"region_name\": \"eu-west-1\"}'")
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
        print("\n(to load the files into DuckDB, install it: pip install -e '.[duckdb]' in the cio_sync "
              "checkout)", file=out)
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


class UsageError(Exception):
    """A command-line value that is wrong before any work starts (exit code 2)."""


def _value(key: str, text: str) -> Any:
    """``text`` as JSON when it is JSON (``true``, ``3``, ``{"endpoint_url": "..."}``), else as the plain string. A
    credential stays a string unless it is a JSON object: a numeric secret is still a secret."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if is_secret_name(key) and not isinstance(value, dict):
        return text
    return value


def _options(pairs: list[str]) -> dict[str, Any]:
    """The storage options of ``--storage-option KEY=VALUE`` pairs, each VALUE as :func:`_value` reads it."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option takes KEY=VALUE (VALUE as JSON or plain text), got "
                             f"{pair.split('=', 1)[0]!r}")
        options[key.strip()] = _value(key.strip(), value)
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
            report = load(args.source, args.into, storage_options=args.options,
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
    found = inspect_prefix(args.prefix, storage_options=args.options)
    tables = found["tables"]
    for bad in found["unreadable"]:
        print(f"cio-sync: unreadable {found['source']}/{bad['name']}: {bad['reason']}", file=sys.stderr)
    if not tables:
        print(f"cio-sync: error: no readable files in {found['source']}: each of its {len(found['unreadable'])} "
              "cio_sync files is unreadable (see above); a load would quarantine them", file=sys.stderr)
        return 1
    print(f"{found['source']}:")
    for name, t in sorted(tables.items()):
        span = f"{t['first']:%Y-%m-%d %H:%M:%S} .. {t['last']:%Y-%m-%d %H:%M:%S} UTC" if t["first"] else "no rows"
        gaps = f"; gaps at {', '.join(t['gaps'][:5])}" if t["gaps"] else ""
        print(f"  {name:<20} {t['files']:>5} files {t['rows']:>10,} rows {t['bytes']:>12,} bytes  "
              f"{'/'.join(t['formats'])}  {span}{gaps}")
    return 0


def _write_keys(args: argparse.Namespace) -> list[str]:
    """The write keys of ``--write-key`` and of ``CIO_SYNC_WRITE_KEYS`` (comma-separated, out of process lists)."""
    import os

    keys = [k.strip() for k in args.write_key if k.strip()]
    keys += [k.strip() for k in os.environ.get("CIO_SYNC_WRITE_KEYS", "").split(",") if k.strip()]
    return keys


def serve_command(args: argparse.Namespace) -> int:
    """Run the HTTP intake for the real client libraries (docs/serve.md)."""
    from cio_sync.asgi import Limits, app
    from cio_sync.serve import run

    keys = _write_keys(args)
    if not keys:
        raise UsageError("give at least one write key: --write-key KEY, or CIO_SYNC_WRITE_KEYS=KEY1,KEY2")
    if args.nats:
        return _serve_to_nats(args, keys)
    if args.stream:
        raise UsageError("--stream goes with --nats URL (the NATS servers the intake publishes to)")
    if not args.advanced and not args.standard:
        raise UsageError("give --advanced URL, --standard URL, or both (or --nats URL --stream NAME)")
    if not args.spool_dir:
        raise UsageError("give --spool-dir DIR: where accepted calls are kept durable until they are published")
    if args.standard and (args.workspace_id is None or not args.state):
        raise UsageError("--standard needs --workspace-id N and --state PATH (the workspace state file)")
    for option, value in (("--body-timeout", args.body_timeout), ("--header-timeout", args.header_timeout)):
        if not value > 0:
            raise UsageError(f"{option} must be above 0 seconds, got {value:g}")
    if not args.dedupe_hours >= 0:
        raise UsageError(f"--dedupe-hours must be 0 (off) or more, got {args.dedupe_hours:g}")
    spool = Path(args.spool_dir)
    sinks: list[Any] = []
    try:
        advanced = standard = None
        if args.advanced:
            spool.mkdir(parents=True, exist_ok=True)
            advanced = AdvancedSink(args.advanced, format=args.format, storage_options=args.options,
                                    spool_dir=spool / "advanced", spool_sync=args.spool_sync,
                                    dedupe_window=args.dedupe_hours * 3600 or None, keep_rejected=True)
            sinks.append(advanced)
        if args.standard:
            standard = StandardSink(args.standard, workspace_id=args.workspace_id, state=args.state,
                                    storage_options=args.options, dedupe_window=args.dedupe_hours * 3600 or None,
                                    keep_rejected=True)
            sinks.append(standard)
    except BaseException:
        for opened in sinks:
            opened.close()
        raise
    target: Any = sinks[0] if len(sinks) == 1 else Pipeline(advanced=advanced, standard=standard)
    limits = Limits(body_timeout=args.body_timeout, header_timeout=args.header_timeout)
    return run(app(target, write_keys=keys, limits=limits), sinks, host=args.host, port=args.port)


def _check_positive(option: str, value: float) -> None:
    if not value > 0:
        raise UsageError(f"{option} must be above 0, got {value:g}")


def _serve_to_nats(args: argparse.Namespace, keys: list[str]) -> int:
    """``cio-sync serve --nats``: the intake publishes each call to a JetStream stream, for workers to consume."""
    from cio_sync.asgi import Limits, app
    from cio_sync.nats import Publisher
    from cio_sync.serve import run

    if args.advanced or args.standard or args.spool_dir:
        raise UsageError("--nats publishes to the stream: leave out --advanced, --standard and --spool-dir (the "
                         "workers write the files: cio-sync worker)")
    if not args.stream:
        raise UsageError("--nats needs --stream NAME (the JetStream stream the workers consume)")
    if args.partitions is not None and args.partitions < 1:
        raise UsageError(f"--partitions must be at least 1, got {args.partitions}")
    _check_positive("--connect-timeout", args.connect_timeout)
    publisher = Publisher(args.nats, stream=args.stream, replicas=args.replicas, connect_timeout=args.connect_timeout,
                          **({"partitions": args.partitions} if args.partitions is not None else {}))
    limits = Limits(body_timeout=args.body_timeout, header_timeout=args.header_timeout)
    return run(app(publisher, write_keys=keys, limits=limits), [publisher], host=args.host, port=args.port)


def worker_command(args: argparse.Namespace) -> int:
    """Consume a JetStream stream's partitions into Advanced files until SIGTERM/SIGINT (docs/scale-out.md)."""
    import signal
    import threading

    from cio_sync.nats import Worker

    for option, value in (("--flush-interval", args.flush_interval), ("--lease-seconds", args.lease_seconds),
                          ("--standard-flush-interval", args.standard_flush_interval),
                          ("--connect-timeout", args.connect_timeout)):
        _check_positive(option, value)
    if not args.advanced and not args.standard:
        raise UsageError("give --advanced URL, --standard URL, or both")
    if args.standard and (args.workspace_id is None or not args.state):
        raise UsageError("--standard needs --workspace-id N and --state postgresql://... (each partition's workspace "
                         "state is a schema of that database)")
    worker = Worker(args.nats, stream=args.stream, advanced=args.advanced, format=args.format,
                    standard=args.standard, workspace_id=args.workspace_id, state=args.state,
                    standard_flush_interval=args.standard_flush_interval,
                    destination_id=args.destination_id, storage_options=args.options,
                    flush_interval=args.flush_interval, lease_seconds=args.lease_seconds, worker_id=args.worker_id,
                    connect_timeout=args.connect_timeout)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    previous = {n: signal.signal(n, on_signal) for n in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.start()
        if args.metrics_port is not None:
            _serve_worker_metrics(worker, args.metrics_host, args.metrics_port)
        print(f"cio-sync worker: {worker.worker_id} consuming stream {args.stream} ({worker.partitions} partitions)",
              flush=True)
        stop.wait()
        name = signal.Signals(received[0]).name if received else "stop"
        print(f"cio-sync worker: {name}: publishing what was read, giving the partitions back", file=sys.stderr,
              flush=True)
    finally:
        worker.close()
        for n, handler in previous.items():
            signal.signal(n, handler)
    print("cio-sync worker: stopped; everything read is published", file=sys.stderr, flush=True)
    return 0


def _serve_worker_metrics(worker: Any, host: str, port: int) -> None:
    try:
        import prometheus_client as prom
    except ImportError as exc:
        raise UsageError("--metrics-port needs prometheus-client: pip install 'cio_sync[serve]'") from exc
    from cio_sync.nats.worker import metrics_collector

    registry = prom.CollectorRegistry()
    registry.register(metrics_collector(worker))
    prom.start_http_server(port, addr=host, registry=registry)


def replay_command(args: argparse.Namespace) -> int:
    """Replay a JSON-lines file of calls into a sink."""
    options = args.options
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


def _version() -> str:
    from cio_sync import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cio-sync",
        description="Write customer-data calls to storage buckets as immutable files (Customer.io's storage "
                    "integrations, as a library), and load them into DuckDB or PostgreSQL.",
        epilog="Commands: demo (try both modes locally), replay (a JSON-lines file of calls through a sink, to a "
               "folder or a bucket), load (a prefix into DuckDB or PostgreSQL, each file once), inspect (what a "
               "prefix holds). Every error is one line 'cio-sync: error: ...' (exit 1; 2 when the command "
               "line cannot be parsed); --debug adds the traceback. 'cio-sync COMMAND --help' for each.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    parser.add_argument("--debug", action="store_true", help="on an error, print its traceback too")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = commands.add_parser(
        "demo", help="try both modes on sample calls in a local folder, loaded into DuckDB",
        description="Generates CALLS realistic sample calls (identify, track, page, screen, group, alias from "
                    "CALLS/10 people) and writes them to FOLDER: through the Advanced sink as CSV and JSON lines "
                    "(FOLDER/advanced/csv, FOLDER/advanced/json), and through a Pipeline of both modes as "
                    "Advanced Parquet (FOLDER/advanced/parquet) and Standard files (FOLDER/standard: people, "
                    "attributes, campaigns, deliveries, metrics, with sample campaign records; the workspace state "
                    "in FOLDER/workspace.sqlite). Prints every file written; with DuckDB installed, loads "
                    "FOLDER/advanced/parquet and FOLDER/standard into FOLDER/warehouse.duckdb and prints a summary "
                    "of its current-state views. Run it again and positions and sequences continue, and only the "
                    "new files are loaded. Inspect or load one of those subfolders, not FOLDER itself.",
    )
    p.add_argument("folder", nargs="?", default="cio-sync-demo", help="where to write (default: ./cio-sync-demo)")
    p.add_argument("--calls", type=int, default=10_000, help="how many calls to write (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample traffic (default: 0)")
    p.add_argument("--destination-id", type=int, default=2184, help="destination id in file names (default 2184)")
    p.add_argument("--workspace-id", type=int, default=111528, help="workspace id of the Standard files")
    p.set_defaults(handler=demo)

    p = commands.add_parser(
        "load", help="load a prefix into DuckDB or PostgreSQL, each file once",
        description="Loads every file of SOURCE (written by either sink, or a Customer.io export) that was not "
                    "loaded before into the target (DuckDB or PostgreSQL), in position/sequence order, each file "
                    "in one transaction with its entry in _cio_sync_loaded; then builds the current-state views "
                    "(people_current, attributes_current, deliveries_current, subjects_current, metrics_unique, "
                    "raw_<type>_unique). "
                    "A file that cannot load is quarantined (one line on stderr with its name and the reason) and "
                    "the load goes on; later loads skip it unless --retry-quarantined is given. Exit code 1 when "
                    "this run quarantined a file or failed, 0 otherwise.",
    )
    p.add_argument("source", help="the prefix: s3://bucket/raw, gs://..., az://..., or a local folder")
    p.add_argument("--into", default="duckdb:///cio_sync.duckdb",
                   help="target: duckdb:///relative.duckdb, duckdb:////absolute.duckdb, or PostgreSQL as "
                        "postgresql://user:password@host:5432/database (default: duckdb:///cio_sync.duckdb)")
    p.add_argument("--delete-after-load", action="store_true",
                   help="delete each file once its rows are committed (and manifests whose files are all loaded); "
                        "the _cio_sync/ counters stay")
    p.add_argument("--retry-quarantined", action="store_true",
                   help="try again the files an earlier load quarantined (by default they are skipped)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help=_STORAGE_OPTION_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.set_defaults(handler=load_command)

    p = commands.add_parser(
        "inspect", help="show what a prefix holds",
        description="Lists the tables of PREFIX with their files, rows, bytes, formats, time range, and gaps in "
                    "positions.",
    )
    p.add_argument("prefix", help="the prefix: s3://bucket/raw, gs://..., az://..., or a local folder")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help=_STORAGE_OPTION_HELP)
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
    p.add_argument("--state", default=None,
                   help="Standard workspace state file (default: in memory), or a postgresql:// URL "
                   "(its schema: ?schema=NAME, default cio_sync_<workspace id>)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help=_STORAGE_OPTION_HELP)
    p.set_defaults(handler=replay_command)

    p = commands.add_parser(
        "serve", help="an HTTP intake the Segment and Customer.io client libraries send to (docs/serve.md)",
        description="Listens on HOST:PORT for calls as Segment's and Customer.io's client libraries send them "
                    "(POST /v1/batch, /v1/identify, ... and analytics.js's /v1/b, /v1/t, ...), authenticated by a "
                    "write key, and writes them to the Advanced sink, the Standard sink, or both. A call is "
                    "acknowledged (200) only once it is durable in the spool. SIGTERM or SIGINT: stop accepting, "
                    "answer the requests in flight, publish, exit 0. Write keys can come from CIO_SYNC_WRITE_KEYS "
                    "(comma-separated) to stay out of process listings.",
    )
    p.add_argument("--advanced", metavar="URL", help="where Advanced files go (s3://..., gs://..., az://..., a folder)")
    p.add_argument("--format", choices=FORMATS, default="parquet", help="Advanced file format (default parquet)")
    p.add_argument("--standard", metavar="URL", help="where Standard files go")
    p.add_argument("--workspace-id", type=int, default=None, help="the Standard workspace id")
    p.add_argument("--state", default=None, help="the Standard workspace state: a SQLite file, or a postgresql:// URL "
                   "(its schema: ?schema=NAME, default cio_sync_<workspace id>)")
    p.add_argument("--spool-dir", metavar="DIR",
                   help="where accepted calls are kept durable until they are published (not with --nats)")
    p.add_argument("--spool-sync", choices=("group", "always", "interval", "os"), default="group",
                   help="when the spool fsyncs (default group: before each answer, one fsync shared by the requests "
                        "in flight, so a 200 means the call survives a power loss; interval and os answer before "
                        "the fsync)")
    p.add_argument("--dedupe-hours", type=float, default=24.0, metavar="HOURS",
                   help="a call whose messageId was taken within this many hours is a client's retry and lands "
                        "once (default 24, kept in the spool directory across restarts; 0: off)")
    p.add_argument("--write-key", action="append", default=[], metavar="KEY",
                   help="a write key clients may send with (repeat for more)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0: any free port)")
    p.add_argument("--body-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long a request's body may take to arrive before a 408 frees the connection (default 10)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long a request's line and headers may take to arrive (from the connection, or from the "
                        "head's first byte on a kept-alive one) before the connection is closed (default 10)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help=_STORAGE_OPTION_HELP)
    p.add_argument("--nats", metavar="URL[,URL...]",
                   help="publish each call to a NATS JetStream stream instead (answered 200 once the stream acked "
                        "it), for cio-sync worker processes to write the files (docs/scale-out.md)")
    p.add_argument("--stream", metavar="NAME", help="the JetStream stream of --nats (created if missing)")
    p.add_argument("--partitions", type=int, default=None, metavar="N",
                   help="partitions of a new stream (default 16; an existing stream's must match)")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="copies of a new stream (default 3 on a cluster of 3 or more nodes, else 1)")
    p.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="with --nats: how long to wait for NATS at start (default 30)")
    p.set_defaults(handler=serve_command)

    p = commands.add_parser(
        "worker", help="consume a NATS JetStream stream of calls into Advanced files (docs/scale-out.md)",
        description="Takes a share of the stream's partitions (shared with the other workers of the stream through "
                    "JetStream's key-value store, no coordinator), reads their calls in order and publishes them to "
                    "Advanced files; a message is acked only once its call is in a published file. SIGTERM or "
                    "SIGINT: publish what was read, give the partitions back, exit 0.",
    )
    p.add_argument("--nats", required=True, metavar="URL[,URL...]", help="the NATS servers")
    p.add_argument("--stream", required=True, metavar="NAME", help="the JetStream stream the intakes publish to")
    p.add_argument("--advanced", metavar="URL",
                   help="where Advanced files go (s3://..., gs://..., az://..., a folder)")
    p.add_argument("--format", choices=FORMATS, default="parquet", help="Advanced file format (default parquet)")
    p.add_argument("--destination-id", type=int, default=1, help="the Advanced destination id (default 1)")
    p.add_argument("--standard", metavar="URL", help="where Standard files go")
    p.add_argument("--workspace-id", type=int, default=None, help="the Standard workspace id")
    p.add_argument("--state", default=None, metavar="postgresql://...",
                   help="the PostgreSQL database of the Standard workspace state (a schema per partition)")
    p.add_argument("--standard-flush-interval", type=float, default=900.0, metavar="SECONDS",
                   help="how often each partition's Standard files are published (default 900)")
    p.add_argument("--flush-interval", type=float, default=600.0, metavar="SECONDS",
                   help="how often each partition's calls are published (default 600)")
    p.add_argument("--lease-seconds", type=float, default=30.0, metavar="SECONDS",
                   help="how long a dead worker's partitions wait before others take them (default 30)")
    p.add_argument("--worker-id", default=None, metavar="ID",
                   help="this worker's name in the leases (default: host, pid and a random suffix)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics (partitions owned, publish lag, calls published) on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port (default 127.0.0.1)")
    p.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for NATS at start (default 30)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help=_STORAGE_OPTION_HELP)
    p.set_defaults(handler=worker_command)
    return parser


#: Base classes of the storage backends' (and databases') own errors, which are not all OSErrors: (module, class).
#: Looked up only in modules already imported: a backend never imported raised nothing (and importing costs time).
_BACKEND_ERRORS = (
    ("botocore.exceptions", "BotoCoreError"),  # no credentials, an unreachable endpoint, a bad parameter
    ("botocore.exceptions", "ClientError"),  # an S3 error response: access denied, no such bucket
    ("aiohttp", "ClientError"),  # gcsfs and adlfs talk HTTP through aiohttp
    ("google.auth.exceptions", "GoogleAuthError"),
    ("google.api_core.exceptions", "GoogleAPIError"),
    ("azure.core.exceptions", "AzureError"),
    # The libraries of the load targets and the state, where an error of theirs escaped the library's own map.
    ("duckdb", "Error"),
    ("psycopg", "Error"),
    ("sqlite3", "Error"),
)


def _backend_errors() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [OSError, ImportError, ValueError, TypeError, LookupError]
    for module, name in _BACKEND_ERRORS:
        loaded = sys.modules.get(module)
        kind = getattr(loaded, name, None) if loaded is not None else None
        if isinstance(kind, type) and issubclass(kind, BaseException):
            kinds.append(kind)
    return tuple(kinds)


def _what_to_do(exc: BaseException) -> str:
    """What to try, for an error that does not say it itself (judged by it or, for a cio_sync error, its cause)."""
    if isinstance(exc, ConfigError | UsageError) or (isinstance(exc, CioSyncError) and "; " in str(exc)):
        return ""
    if isinstance(exc, CioSyncError):
        if exc.__cause__ is None:
            return "; run with --debug for details"
        exc = exc.__cause__
    name = type(exc).__name__
    if any(w in name for w in ("Credential", "Auth", "Signature", "AccessDenied")) or isinstance(exc,
                                                                                               PermissionError):
        return "; check the credentials (--storage-option key=... secret=..., or the environment) and their access"
    if "Endpoint" in name or "Connect" in name or isinstance(exc, ConnectionError | TimeoutError):
        return "; check that the endpoint is right and reachable (--storage-option endpoint_url=...)"
    return "; check the URL and the --storage-option values (run with --debug for the traceback)"


def _error_line(exc: BaseException, secrets: list[str]) -> str:
    """The one line an error ends the command with: what, where, what to do; no credential, no newline."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, CioSyncError | UsageError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        cause = exc.__cause__ or exc.__context__
        if cause is not None and str(cause) and str(cause) not in text:
            text += f" ({type(cause).__name__}: {' '.join(str(cause).split())})"
    return redact(f"cio-sync: error: {text}{_what_to_do(exc)}", secrets)


class _OneLine(logging.Formatter):
    """Log records as one line each, credentials redacted; their tracebacks only with ``--debug``."""

    def __init__(self, *, debug: bool, secrets: list[str]) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.debug = debug
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        if not self.debug and record.exc_info:
            exc = record.exc_info[1]
            record = logging.makeLogRecord(record.__dict__)
            record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}: {exc}", None
            record.exc_info = record.exc_text = None
        text = super().format(record)
        return redact(text if self.debug else " ".join(text.split()), self.secrets)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cio-sync`` command with ``argv`` (default: the process's arguments); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    pairs = getattr(args, "storage_option", [])
    # The values of the pairs as given too, before JSON reading, so that none of them is ever printed.
    secrets = secrets_in({key: value for key, _, value in (p.partition("=") for p in pairs)})
    if getattr(args, "command", None) == "serve":
        secrets += _write_keys(args)  # never printed, in errors or logs
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLine(debug=args.debug, secrets=secrets))
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                        handlers=[handler])
    try:
        args.options = _options(pairs)
        secrets += secrets_in(args.options)
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("cio-sync: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, (CioSyncError, UsageError, *_backend_errors())):
            raise  # a bug of ours: its traceback is what to report
        if args.debug:
            # Redacted too: a traceback ends up in logs and issue reports.
            print(redact(traceback.format_exc().rstrip(), secrets), file=sys.stderr)
        print(_error_line(exc, secrets), file=sys.stderr)
        if not args.debug:
            # Said once: a sink whose publishing failed is tried once more at exit (nothing is dropped while it
            # may still publish), and that attempt's failure is the same error again.
            logging.getLogger("cio_sync").setLevel(logging.CRITICAL)
        # 2, as argparse, only for a command line that cannot be parsed; a value found wrong once used is 1.
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
