"""The last mile: load the files of a prefix into a warehouse, each exactly once, and build current-state views.

The loader reads files, not sinks: it knows the file names and schemas of both modes (shared/SCHEMAS.md), so it
also loads exports named the way Customer.io names its own. Each file is loaded in one transaction together with
its entry in the load-state table ``_cio_sync_loaded``, so a rerun loads nothing twice and a load killed midway
loses nothing; ``delete_after_load`` deletes a file only after its rows are committed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from cio_sync._calls import parse_time, to_micros
from cio_sync._errors import CioSyncError, ConfigError
from cio_sync._schemas import CALL_COLUMNS, CALL_SCHEMAS, EXTRA_COLUMN, STANDARD_SCHEMAS, Kind
from cio_sync._storage import display_url, redact, resolve

log = logging.getLogger("cio_sync.loader")

ADVANCED_NAME: Final = re.compile(
    r"^(?P<destination>\d+)\.(?P<action>\d+)\.(?P<position>\d+)\."
    r"(?P<type>identify|track|page|screen|group|alias)\.(?P<ext>parquet|csv|json)$"
)
STANDARD_NAME: Final = re.compile(
    r"^(?P<table>[a-z_]+)_v(?P<version>\d+)_(?P<workspace>\d+)_(?P<sequence>\d+)\.parquet$"
)
LOAD_STATE_TABLE: Final = "_cio_sync_loaded"
#: Data-set names of Customer.io's own exports that differ from the table names here.
_EXPORT_TABLES: Final = {"content": "delivery_contents", "contents": "delivery_contents"}
#: Current-state views over the change logs (name -> SQL), created when their tables exist.
VIEWS: Final[Mapping[str, tuple[str, str]]] = {
    "people_current": ("people", """
        SELECT * FROM people
        QUALIFY row_number() OVER (PARTITION BY internal_customer_id ORDER BY updated_at DESC) = 1"""),
    "attributes_current": ("attributes", """
        SELECT * FROM attributes
        QUALIFY row_number() OVER (PARTITION BY internal_customer_id, attribute_name ORDER BY timestamp DESC) = 1
            AND attribute_value IS NOT NULL"""),
    "deliveries_current": ("deliveries", """
        SELECT * FROM deliveries
        QUALIFY row_number() OVER (PARTITION BY delivery_id ORDER BY created_at DESC, seq_num DESC) = 1"""),
    "subjects_current": ("subjects", """
        SELECT * FROM subjects
        QUALIFY row_number() OVER (PARTITION BY subject_name ORDER BY created_at DESC, seq_num DESC) = 1"""),
    "metrics_unique": ("metrics", """
        SELECT * FROM metrics
        QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY created_at, seq_num) = 1"""),
}


@dataclass(frozen=True, order=True)
class SourceFile:
    """One loadable file of a prefix, with the table it goes to and its place in the load order."""

    order: tuple[Any, ...]
    name: str
    table: str
    mode: str
    ext: str


@dataclass
class LoadReport:
    """What a load did."""

    source: str
    target: str
    files_loaded: int = 0
    rows_loaded: int = 0
    files_already_loaded: int = 0
    files_waiting: int = 0
    files_deleted: int = 0
    tables: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        tables = ", ".join(f"{t} +{n:,}" for t, n in sorted(self.tables.items())) or "nothing new"
        return (f"loaded {self.files_loaded} files ({self.rows_loaded:,} rows) from {self.source} into "
                f"{self.target}: {tables}; {self.files_already_loaded} already loaded, {self.files_waiting} "
                f"waiting for their manifest, {self.files_deleted} deleted")


def classify(name: str) -> SourceFile | None:
    """The file a name denotes, or ``None`` if it is not a file of either mode."""
    match = ADVANCED_NAME.match(name)
    if match:
        order: tuple[Any, ...] = ("advanced", int(match["destination"]), int(match["action"]),
                                  int(match["position"]))
        return SourceFile(order, name, f"raw_{match['type']}", "advanced", match["ext"])
    match = STANDARD_NAME.match(name)
    if match:
        table = _EXPORT_TABLES.get(match["table"], match["table"])
        if table in STANDARD_SCHEMAS:
            order = ("standard", table, int(match["sequence"]))
            return SourceFile(order, name, table, "standard", "parquet")
    return None


def _advanced_row(doc: dict[str, Any], call_type: str) -> dict[str, Any]:
    """A call as sent (a JSON line) as a row of its type's columns."""
    row: dict[str, Any] = {}
    known = set()
    for name, kind in CALL_COLUMNS[call_type]:
        known.add(name)
        value = doc.get(name)
        if kind is Kind.EXTRA:
            continue
        if value is None:
            row[name] = None
        elif kind is Kind.OBJECT:
            row[name] = orjson.dumps(value).decode()
        elif kind is Kind.TIME:
            row[name] = to_micros(parse_time(value, name))
        elif kind is Kind.TEXT and not isinstance(value, str):
            row[name] = orjson.dumps(value).decode()
        else:
            row[name] = value
    extra = {k: v for k, v in doc.items() if k not in known}
    row[EXTRA_COLUMN] = orjson.dumps(extra).decode() if extra else None
    return row


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with the columns of ``schema`` first, in its types where they convert (a column missing from the
    file, e.g. in another schema version or export, is null); columns the schema does not know are kept after."""
    columns, fields = [], []
    for wanted in schema:
        if wanted.name in table.column_names:
            column = table.column(wanted.name)
            try:
                column = column.cast(wanted.type)
                fields.append(wanted)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                fields.append(pa.field(wanted.name, column.type))
        else:
            column = pa.nulls(table.num_rows, wanted.type)
            fields.append(wanted)
        columns.append(column)
    for name in table.column_names:
        if name not in schema.names:
            columns.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def read_file(data: bytes, source: SourceFile) -> pa.Table:
    """The rows of one file as an Arrow table under the table's fixed schema."""
    if source.mode == "standard":
        return conform(pq.read_table(pa.BufferReader(data)), STANDARD_SCHEMAS[source.table])
    call_type = source.table.removeprefix("raw_")
    schema = CALL_SCHEMAS[call_type]
    if source.ext == "parquet":
        table = pq.read_table(pa.BufferReader(data))
    elif source.ext == "csv":
        # Every column as text (an unquoted empty cell is null, a quoted one the empty string), then the
        # timestamps, written as ISO-8601 UTC text, back to instants.
        table = pacsv.read_csv(pa.BufferReader(data), convert_options=pacsv.ConvertOptions(
            column_types={f.name: pa.string() for f in schema}, strings_can_be_null=True,
            quoted_strings_can_be_null=False))
        for f in schema:
            if pa.types.is_timestamp(f.type) and f.name in table.column_names:
                index = table.column_names.index(f.name)
                moments = [None if v is None else to_micros(parse_time(v, f.name))
                           for v in table.column(index).to_pylist()]
                table = table.set_column(index, f, pa.array(moments, f.type))
    else:
        rows = [_advanced_row(orjson.loads(line), call_type) for line in data.splitlines() if line.strip()]
        table = pa.Table.from_pylist(rows, schema=schema)
    return conform(table, schema)


class _DuckDBTarget:
    """Loads into a DuckDB database file (or ``:memory:``)."""

    def __init__(self, path: str) -> None:
        try:
            import duckdb
        except ImportError as exc:
            raise ConfigError("loading into DuckDB needs the duckdb package: pip install 'cio_sync[duckdb]'") from exc
        self.path = path
        self.con = duckdb.connect(path)
        self.con.execute("SET TimeZone = 'UTC'")
        self.con.execute(
            f"CREATE TABLE IF NOT EXISTS {LOAD_STATE_TABLE} (source VARCHAR NOT NULL, name VARCHAR NOT NULL, "
            "table_name VARCHAR NOT NULL, rows BIGINT NOT NULL, loaded_at TIMESTAMPTZ NOT NULL, "
            "PRIMARY KEY (source, name))")

    def loaded(self, source: str) -> set[str]:
        return {r[0] for r in self.con.execute(f"SELECT name FROM {LOAD_STATE_TABLE} WHERE source = ?",
                                               [source]).fetchall()}

    def load(self, source: str, file: SourceFile, table: pa.Table) -> None:
        """The file's rows and its load-state entry, in one transaction."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            self.con.register("incoming", table)
            self.con.execute(f'CREATE TABLE IF NOT EXISTS "{file.table}" AS SELECT * FROM incoming LIMIT 0')
            have = {r[0] for r in self.con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [file.table]).fetchall()}
            for column in table.schema:
                if column.name not in have:
                    kind = self.con.execute(f'SELECT typeof("{column.name}") FROM incoming LIMIT 1').fetchall()
                    sql_type = kind[0][0] if kind and kind[0][0] != "NULL" else "VARCHAR"
                    self.con.execute(f'ALTER TABLE "{file.table}" ADD COLUMN "{column.name}" {sql_type}')
            self.con.execute(f'INSERT INTO "{file.table}" BY NAME SELECT * FROM incoming')
            self.con.execute(f"INSERT INTO {LOAD_STATE_TABLE} VALUES (?, ?, ?, ?, ?)",
                             [source, file.name, file.table, table.num_rows, datetime.now(UTC)])
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        finally:
            self.con.unregister("incoming")

    def build_views(self) -> list[str]:
        tables = {r[0] for r in self.con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'").fetchall()}
        made = []
        for view, (table, sql) in VIEWS.items():
            if table in tables:
                self.con.execute(f'CREATE OR REPLACE VIEW "{view}" AS {sql}')
                made.append(view)
        for table in sorted(t for t in tables if t.startswith("raw_")):
            self.con.execute(f'CREATE OR REPLACE VIEW "{table}_unique" AS SELECT * FROM "{table}" '
                             'QUALIFY row_number() OVER (PARTITION BY "messageId" ORDER BY "receivedAt") = 1')
            made.append(f"{table}_unique")
        return made

    def close(self) -> None:
        self.con.close()


_PG_TYPES: Final = {"string": "TEXT", "int64": "BIGINT", "bool": "BOOLEAN", "double": "DOUBLE PRECISION"}


def _pg_type(kind: pa.DataType) -> str:
    if pa.types.is_timestamp(kind):
        return "TIMESTAMPTZ"
    return _PG_TYPES.get(str(kind), "TEXT")


def _pg_view(sql: str) -> str:
    """A DuckDB QUALIFY view as PostgreSQL SQL (a window in a subquery)."""
    select, _, qualify = sql.partition("QUALIFY")
    window, _, rest = qualify.strip().partition(" = 1")
    table = select.split("FROM", 1)[1].strip()
    extra = rest.strip().removeprefix("AND").strip()
    condition = f" AND {extra}" if extra else ""
    return (f"SELECT * FROM (SELECT *, {window.strip()} AS _cio_sync_rank FROM {table}) ranked "
            f"WHERE _cio_sync_rank = 1{condition}")


class _PostgresTarget:
    """Loads into PostgreSQL (psycopg 3): each file with COPY, in one transaction with its load-state row."""

    def __init__(self, dsn: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise ConfigError("loading into PostgreSQL needs psycopg: pip install 'cio_sync[postgres]'") from exc
        self.path = dsn
        try:
            # Autocommit, so that each ``transaction()`` block is a real transaction of its own.
            self.con = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as exc:
            raise CioSyncError(f"cannot connect to PostgreSQL at {redact(dsn, ())}: "
                               f"{redact(str(exc).strip(), ())}") from exc
        with self.con.transaction():
            self.con.execute(
                f"CREATE TABLE IF NOT EXISTS {LOAD_STATE_TABLE} (source TEXT NOT NULL, name TEXT NOT NULL, "
                "table_name TEXT NOT NULL, rows BIGINT NOT NULL, loaded_at TIMESTAMPTZ NOT NULL, "
                "PRIMARY KEY (source, name))")

    def loaded(self, source: str) -> set[str]:
        rows = self.con.execute(f"SELECT name FROM {LOAD_STATE_TABLE} WHERE source = %s", [source]).fetchall()
        return {r[0] for r in rows}

    def load(self, source: str, file: SourceFile, table: pa.Table) -> None:
        columns = ", ".join(f'"{f.name}" {_pg_type(f.type)}' for f in table.schema)
        names = ", ".join(f'"{f.name}"' for f in table.schema)
        with self.con.transaction():
            self.con.execute(f'CREATE TABLE IF NOT EXISTS "{file.table}" ({columns})')
            for column in table.schema:
                self.con.execute(f'ALTER TABLE "{file.table}" ADD COLUMN IF NOT EXISTS "{column.name}" '
                                 f"{_pg_type(column.type)}")
            with self.con.cursor().copy(f'COPY "{file.table}" ({names}) FROM STDIN') as copy:
                for row in table.to_pylist():
                    copy.write_row(list(row.values()))
            self.con.execute(f"INSERT INTO {LOAD_STATE_TABLE} VALUES (%s, %s, %s, %s, %s)",
                             [source, file.name, file.table, table.num_rows, datetime.now(UTC)])

    def build_views(self) -> list[str]:
        tables = {r[0] for r in self.con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
            "AND table_type = 'BASE TABLE'").fetchall()}
        made = []
        with self.con.transaction():
            for view, (table, sql) in VIEWS.items():
                if table in tables:
                    self.con.execute(f'DROP VIEW IF EXISTS "{view}"')
                    self.con.execute(f'CREATE VIEW "{view}" AS {_pg_view(sql)}')
                    made.append(view)
            for table in sorted(t for t in tables if t.startswith("raw_")):
                self.con.execute(f'DROP VIEW IF EXISTS "{table}_unique"')
                self.con.execute(f'CREATE VIEW "{table}_unique" AS SELECT DISTINCT ON ("messageId") * FROM "{table}" '
                                 'ORDER BY "messageId", "receivedAt"')
                made.append(f"{table}_unique")
        return made

    def close(self) -> None:
        self.con.close()


def duckdb_path(into: str) -> str:
    """The database file a ``duckdb://`` URL names, as SQLAlchemy URLs do: ``duckdb:///relative.duckdb``,
    ``duckdb:////absolute/path.duckdb``, ``duckdb:///:memory:``. A plain path ending .duckdb or .db works too."""
    if into.startswith("duckdb:///"):
        path = into.removeprefix("duckdb:///")
        return path or ":memory:"
    if into.endswith((".duckdb", ".db")) and "://" not in into:
        return into
    raise ConfigError(f"unknown load target {redact(into, ())!r}; use duckdb:///relative.duckdb, "
                      "duckdb:////absolute.duckdb or postgresql://user@host/database")


def _target(into: str) -> _DuckDBTarget | _PostgresTarget:
    if into.startswith(("postgresql://", "postgres://")):
        return _PostgresTarget(into)
    return _DuckDBTarget(duckdb_path(into))


def list_files(fs: AbstractFileSystem, root: str) -> list[SourceFile]:
    """The loadable files directly under ``root``, in load order."""
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    files = [classify(str(e).rstrip("/").rsplit("/", 1)[-1]) for e in entries]
    return sorted(f for f in files if f is not None)


def manifests(fs: AbstractFileSystem, root: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every file listed by a manifest under ``root/_manifests`` (name -> entry), and the manifests' paths."""
    folder = f"{root}/_manifests"
    fs.invalidate_cache(folder)
    try:
        paths = sorted(str(p) for p in fs.ls(folder, detail=False) if str(p).endswith(".json"))
    except FileNotFoundError:
        return {}, []
    listed: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            document = orjson.loads(fs.cat_file(path))
        except (orjson.JSONDecodeError, OSError) as exc:
            log.warning("skipping unreadable manifest %s: %s", path, exc)
            continue
        for entry in document.get("files", []):
            listed[str(entry.get("name"))] = entry
    return listed, paths


def load(
    source: str,
    into: str = "duckdb:///cio_sync.duckdb",
    *,
    storage_options: Mapping[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
    delete_after_load: bool = False,
    progress: Callable[[SourceFile, int], None] | None = None,
) -> LoadReport:
    """Load every file of ``source`` not loaded before into ``into``; build the current-state views.

    ``source`` is a prefix written by either sink (or a Customer.io export), as a URL or a path; ``into`` is
    ``duckdb:///path.duckdb`` or ``postgresql://user:password@host:port/database``.
    Files load in position / sequence order, each in one transaction with its entry in
    ``_cio_sync_loaded``; a rerun loads nothing twice. Where the prefix has manifests (``_manifests/``), only
    files a manifest lists are loaded (the others belong to a sync still in progress) and their size and checksum
    are checked. With ``delete_after_load``, each file is deleted once its rows are committed, and each manifest
    once all its files are; ``_cio_sync/`` (the writers' counters) is never touched.
    """
    fs, root = resolve(source, filesystem=filesystem, storage_options=storage_options)
    where = display_url(fs, root)
    target = _target(into)
    report = LoadReport(where, redact(into, ()))
    try:
        listed, manifest_paths = manifests(fs, root)
        done = target.loaded(where)
        for file in list_files(fs, root):
            path = f"{root}/{file.name}"
            if file.name in done:
                report.files_already_loaded += 1
                if delete_after_load:
                    _delete(fs, path, report)
                continue
            entry = listed.get(file.name)
            if manifest_paths and entry is None:
                report.files_waiting += 1
                continue
            data = bytes(fs.cat_file(path))
            if entry is not None:
                _verify(file, data, entry)
            table = read_file(data, file)
            target.load(where, file, table)
            report.files_loaded += 1
            report.rows_loaded += table.num_rows
            report.tables[file.table] = report.tables.get(file.table, 0) + table.num_rows
            if progress is not None:
                progress(file, table.num_rows)
            if delete_after_load:
                _delete(fs, path, report)
        target.build_views()
        if delete_after_load:
            _delete_finished_manifests(fs, root, manifest_paths)
    finally:
        target.close()
    log.info("%s", report)
    return report


def _verify(file: SourceFile, data: bytes, entry: Mapping[str, Any]) -> None:
    import hashlib

    if entry.get("bytes") is not None and entry["bytes"] != len(data):
        raise CioSyncError(f"{file.name} has {len(data)} bytes but its manifest says {entry['bytes']}")
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CioSyncError(f"{file.name} does not match the checksum in its manifest")


def _delete(fs: AbstractFileSystem, path: str, report: LoadReport) -> None:
    try:
        fs.rm_file(path)
        report.files_deleted += 1
    except FileNotFoundError:
        pass


def _delete_finished_manifests(fs: AbstractFileSystem, root: str, paths: list[str]) -> None:
    remaining = {f.name for f in list_files(fs, root)}
    for path in paths:
        document = orjson.loads(fs.cat_file(path))
        if not any(str(e.get("name")) in remaining for e in document.get("files", [])):
            fs.rm_file(path)


def inspect_prefix(source: str, *, storage_options: Mapping[str, Any] | None = None,
                   filesystem: AbstractFileSystem | None = None) -> dict[str, Any]:
    """What a prefix holds: per table its files, rows, schema versions, time range, and gaps in the numbering."""
    fs, root = resolve(source, filesystem=filesystem, storage_options=storage_options)
    summary: dict[str, dict[str, Any]] = {}
    for file in list_files(fs, root):
        table = summary.setdefault(file.table, {"files": 0, "rows": 0, "bytes": 0, "numbers": [],
                                                "formats": set(), "first": None, "last": None})
        info = fs.info(f"{root}/{file.name}")
        table["files"] += 1
        table["bytes"] += int(info.get("size") or 0)
        table["formats"].add(file.ext)
        table["numbers"].append((file.order[:-1], file.order[-1]))
        data = bytes(fs.cat_file(f"{root}/{file.name}"))
        rows = read_file(data, file)
        table["rows"] += rows.num_rows
        column = "receivedAt" if file.mode == "advanced" else next(
            (c for c in ("updated_at", "timestamp", "created_at") if c in rows.column_names), None)
        if column is not None and rows.num_rows:
            import pyarrow.compute as pc

            low, high = pc.min(rows.column(column)).as_py(), pc.max(rows.column(column)).as_py()
            table["first"] = low if table["first"] is None or (low and low < table["first"]) else table["first"]
            table["last"] = high if table["last"] is None or (high and high > table["last"]) else table["last"]
    result = {}
    for name, table in summary.items():
        gaps = []
        by_run: dict[Any, list[int]] = {}
        for run, number in table["numbers"]:
            by_run.setdefault(run, []).append(number)
        for run, numbers in by_run.items():
            numbers.sort()
            if run[0] == "advanced":
                expected = set(range(numbers[0], numbers[-1] + 1))
                gaps += [f"{run[1]}.{run[2]}.{n}" for n in sorted(expected - set(numbers))]
        result[name] = {k: v for k, v in table.items() if k != "numbers"} | {
            "formats": sorted(table["formats"]), "gaps": gaps}
    return {"source": display_url(fs, root), "tables": result}

