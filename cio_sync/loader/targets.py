"""Warehouses the loader writes to: DuckDB (a file, made aside so it is never left unopenable) and
PostgreSQL, sharing their load-state statements; tables come from the known schemas, every identifier quoted."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol

import pyarrow as pa

from cio_sync._errors import (
    CioSyncError,
    ConfigError,
    StorageError,
    library_error,
    make_error,
)
from cio_sync.loader.files import (
    _WAREHOUSE_TYPES,
    SourceFile,
    _family,
    _shown,
    _Unloadable,
    known_schema,
    warehouse_schema,
)
from cio_sync.schemas.tables import (
    STANDARD_TABLES,
    current_views,
    latest_spec,
)
from cio_sync.storage.backends import redact

LOAD_STATE_TABLE: Final = "_cio_sync_loaded"

log = logging.getLogger("cio_sync.loader")

#: DuckDB database names that are no local file (``md:`` for MotherDuck, ...); a drive letter is one character.
_NOT_A_FILE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")



#: ``status`` of a load-state entry: the file's rows are in the warehouse, or it could not load.
LOADED: Final = "loaded"


QUARANTINED: Final = "quarantined"


#: The columns of a warehouse table: lower-case name -> (name, Arrow type, ``None`` for a type the loader does not
#: know).
Columns = dict[str, tuple[str, pa.DataType | None]]


def quote_identifier(name: str) -> str:
    """``name`` as a quoted SQL identifier for DuckDB and PostgreSQL, an embedded double quote doubled.

    Raises ``ValueError`` for a name holding a NUL character, which neither database can take.
    """
    if "\0" in name:
        raise ValueError(f"an identifier cannot hold a NUL character: {_shown(name)}")
    return '"' + name.replace('"', '""') + '"'


_STATE_COLUMNS: Final = "source, name, table_name, rows, loaded_at, status, reason"


def _sql_type(kind: pa.DataType, dialect: str) -> str:
    """The column type of the warehouse for an Arrow type of a known schema or a converted extra column."""
    duck = dialect == "duckdb"
    if pa.types.is_timestamp(kind):
        return "TIMESTAMPTZ"
    if _family(kind) == "list of text":
        return "VARCHAR[]" if duck else "TEXT[]"
    names = {"int64": "BIGINT", "bool": "BOOLEAN", "date32[day]": "DATE",
             "double": "DOUBLE" if duck else "DOUBLE PRECISION"}
    return names.get(str(kind), "VARCHAR" if duck else "TEXT")


def _create_table_sql(table: str, schema: pa.Schema, dialect: str) -> str:
    columns = ", ".join(f"{quote_identifier(f.name)} {_sql_type(f.type, dialect)}" for f in schema)
    return f"CREATE TABLE IF NOT EXISTS {quote_identifier(table)} ({columns})"


def _state_sql(dialect: str) -> str:
    text = "VARCHAR" if dialect == "duckdb" else "TEXT"
    return (f"CREATE TABLE IF NOT EXISTS {LOAD_STATE_TABLE} (source {text} NOT NULL, name {text} NOT NULL, "
            f"table_name {text} NOT NULL, rows BIGINT NOT NULL, loaded_at TIMESTAMPTZ NOT NULL, "
            f"status {text} NOT NULL DEFAULT '{LOADED}', reason {text}, PRIMARY KEY (source, name))")


def _migrations(have: set[str], dialect: str) -> list[str]:
    """What brings a load-state table of an earlier release (without ``status`` and ``reason``) up to date."""
    text = "VARCHAR" if dialect == "duckdb" else "TEXT"
    sql = []
    if "status" not in have:
        sql.append(f"ALTER TABLE {LOAD_STATE_TABLE} ADD COLUMN status {text} DEFAULT '{LOADED}'")
    if "reason" not in have:
        sql.append(f"ALTER TABLE {LOAD_STATE_TABLE} ADD COLUMN reason {text}")
    return sql


def _table_migrations(tables: dict[str, set[str]], dialect: str) -> list[str]:
    """What brings the Standard tables an earlier release loaded (``tables``: name -> lower-case column names) to
    the shape of the newest version: version-1 columns renamed to their version-4 names, then the columns version 4
    added (null in the rows already there). Nothing is dropped: a version-1 column without a version-4 name stays."""
    sql = []
    for name in STANDARD_TABLES:
        have = tables.get(name)
        if not have:
            continue
        table = quote_identifier(name)
        for old, new in latest_spec(name).renamed.items():
            if old in have and new.lower() not in have:
                sql.append(f"ALTER TABLE {table} RENAME COLUMN {quote_identifier(old)} TO {quote_identifier(new)}")
                have = (have - {old}) | {new.lower()}
        sql += [_add_column_sql(name, f, dialect) for f in warehouse_schema(name) if f.name.lower() not in have]
    return sql


def _standard_columns(rows: list[tuple[Any, ...]]) -> dict[str, set[str]]:
    """(table name, column name) rows as table -> lower-case column names, for the Standard tables only."""
    tables: dict[str, set[str]] = {}
    for table, column in rows:
        if str(table) in STANDARD_TABLES:
            tables.setdefault(str(table), set()).add(str(column).lower())
    return tables


#: The columns of every base table of the current schema, as (table, column) rows (``_standard_columns``).
_TABLE_COLUMNS_SQL: Final = ("SELECT c.table_name, c.column_name FROM information_schema.columns c JOIN "
                             "information_schema.tables t ON t.table_name = c.table_name AND t.table_schema = "
                             "c.table_schema WHERE t.table_type = 'BASE TABLE' AND c.table_schema = "
                             "current_schema()")


def _extras(table: pa.Table, source: SourceFile) -> list[pa.Field]:
    known = {f.name for f in known_schema(source)}
    return [f for f in table.schema if f.name not in known]


def _columns(rows: list[tuple[Any, ...]]) -> Columns:
    return {str(name).lower(): (str(name), _WAREHOUSE_TYPES.get(str(kind).lower())) for name, kind in rows}


def _ddl(have: Columns, file: SourceFile, table: pa.Table, dialect: str) -> list[str]:
    """What makes the warehouse table of ``file`` (whose columns are ``have``) hold every column of ``table``."""
    if not have:
        return [_create_table_sql(file.table, known_schema(file), dialect)] + [
            _add_column_sql(file.table, f, dialect) for f in _extras(table, file)]
    return [_add_column_sql(file.table, f, dialect) for f in [*known_schema(file), *_extras(table, file)]
            if f.name.lower() not in have]


def _add_column_sql(table: str, column: pa.Field, dialect: str) -> str:
    return (f"ALTER TABLE {quote_identifier(table)} ADD COLUMN IF NOT EXISTS {quote_identifier(column.name)} "
            f"{_sql_type(column.type, dialect)}")


def _grown(have: Columns, file: SourceFile, table: pa.Table) -> Columns:
    """The columns of the warehouse table once ``table`` was loaded into it."""
    grown = dict(have)
    for f in [*known_schema(file), *_extras(table, file)]:
        grown.setdefault(f.name.lower(), (f.name, f.type))
    return grown


class _Target(Protocol):
    """A warehouse the loader writes to. Failures of the warehouse itself raise :class:`StorageError` naming it; a
    file whose rows the warehouse refuses raises :class:`_Unloadable`."""

    name: str

    def state(self, source: str) -> dict[str, str]:
        """The load-state entries of ``source``: name -> status."""
        ...

    def columns(self, table: str) -> Columns:
        """The columns ``table`` has in the warehouse (lower-case name -> name, Arrow type); empty if none yet."""
        ...

    def load(self, source: str, file: SourceFile, table: pa.Table, *, replace: bool) -> None:
        """The file's rows and its load-state entry (replacing a quarantined one), in one transaction."""
        ...

    def record(self, source: str, name: str, table: str, reason: str, *, replace: bool) -> None:
        """A quarantine entry for ``name`` with ``reason`` (replacing the earlier one), in one transaction."""
        ...

    def forget(self, source: str, name: str) -> None:
        """Remove the entry of ``name`` (a quarantined manifest that reads well now)."""
        ...

    def build_views(self) -> list[str]:
        """(Re)build the current-state views over the tables that exist; returns their names."""
        ...

    def close(self) -> None:
        """Close the connection (never raises)."""
        ...


def _remove_stale(path: str) -> None:
    """Remove the temporary databases that loads killed while creating ``path`` left beside it."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        candidates = list(Path(folder).glob(f".{name}.*.tmp"))
    except OSError:
        return
    for stale in candidates:
        pid = stale.name.removeprefix(f".{name}.").split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            for leftover in (stale, Path(f"{stale}.wal")):
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _SqlTarget:
    """What the two targets share: the load-state statements and the column cache, in the driver's parameter style
    (``P``), with its error class (``_error``)."""

    #: The driver's placeholder for a parameter.
    P: ClassVar[str]
    #: What :meth:`columns` asks for: a table's column names and types, the table's name as the one parameter.
    COLUMNS_SQL: ClassVar[str]
    _error: type[Exception]
    name: str
    path: str
    con: Any
    _tables: dict[str, Columns]

    def build_views(self) -> list[str]:  # pragma: no cover - each target has its own
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - each target has its own
        raise NotImplementedError

    def _failed(self, what: str, exc: BaseException) -> CioSyncError:
        # The one map of library errors (cio_sync._errors.LIBRARY_ERRORS); a warehouse failure is a StorageError.
        kind = library_error(exc) or StorageError
        return make_error(kind, f"{what}: {self.name} failed: {redact(' '.join(str(exc).split()), ())}",
                          path=self.path)

    def state(self, source: str) -> dict[str, str]:
        try:
            rows = self.con.execute(f"SELECT name, coalesce(status, '{LOADED}') FROM {LOAD_STATE_TABLE} "
                                    f"WHERE source = {self.P}", [source]).fetchall()
        except self._error as exc:
            raise self._failed(f"reading the load state of {source}", exc) from exc
        return {str(name): str(status) for name, status in rows}

    def columns(self, table: str) -> Columns:
        if table not in self._tables:
            try:
                self._tables[table] = _columns(self.con.execute(self.COLUMNS_SQL, [table]).fetchall())
            except self._error as exc:
                raise self._failed(f"reading the columns of {table}", exc) from exc
        return self._tables[table]

    def _entry(self, source: str, name: str, *, table: str, rows: int, status: str, reason: str | None,
               replace: bool) -> None:
        now, p = datetime.now(UTC), self.P
        if replace:
            self.con.execute(f"UPDATE {LOAD_STATE_TABLE} SET table_name = {p}, rows = {p}, loaded_at = {p}, "
                             f"status = {p}, reason = {p} WHERE source = {p} AND name = {p}",
                             [table, rows, now, status, reason, source, name])
        else:
            self.con.execute(f"INSERT INTO {LOAD_STATE_TABLE} ({_STATE_COLUMNS}) VALUES ({', '.join([p] * 7)})",
                             [source, name, table, rows, now, status, reason])

    def _prepare(self, dialect: str) -> list[str]:
        """Create the load-state table or bring it up to date; return the statements that upgrade the warehouse
        tables an earlier release made (v1 column names) to this one's, for the caller to run in one transaction."""
        self.con.execute(_state_sql(dialect))
        have = {r[0] for r in self.con.execute(
            f"SELECT column_name FROM information_schema.columns WHERE table_name = {self.P} "
            "AND table_schema = current_schema()", [LOAD_STATE_TABLE]).fetchall()}
        for sql in _migrations(have, dialect):
            self.con.execute(sql)
        return _table_migrations(_standard_columns(self.con.execute(_TABLE_COLUMNS_SQL).fetchall()), dialect)

    def _upgraded(self, upgrade: list[str]) -> None:
        """After an upgrade, rebuild the views (those of before name the old columns); close if that fails."""
        if upgrade:
            try:
                self.build_views()
            except CioSyncError:
                self.close()
                raise

    def forget(self, source: str, name: str) -> None:
        try:
            self.con.execute(f"DELETE FROM {LOAD_STATE_TABLE} WHERE source = {self.P} AND name = {self.P}",
                             [source, name])
        except self._error as exc:
            raise self._failed(f"releasing {source}/{name} from quarantine", exc) from exc


class _DuckDBTarget(_SqlTarget):
    """Loads into a DuckDB database file (or ``:memory:``)."""

    P = "?"
    COLUMNS_SQL = ("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                   "AND table_schema = current_schema()")

    def __init__(self, path: str) -> None:
        try:
            import duckdb
        except ImportError as exc:
            raise ConfigError("loading into DuckDB needs the duckdb package: pip install -e '.[duckdb]' in the "
                              "cio_sync checkout") from exc
        self._duckdb = duckdb
        self._error = duckdb.Error
        self.path = path
        self.name = f"the DuckDB database {path}"
        self.con: Any = None
        #: The columns of each warehouse table as this connection knows them (it is the only writer).
        self._tables: dict[str, Columns] = {}
        try:
            if path != ":memory:" and not _NOT_A_FILE.match(path):
                folder = os.path.dirname(path) or "."
                if not os.path.isdir(folder):  # say so, rather than DuckDB's error about a temporary file in it
                    raise FileNotFoundError(errno.ENOENT, "no such folder", folder)
                _remove_stale(path)
                if not os.path.exists(path):
                    self._create(path)
            self.con = duckdb.connect(path)
            self.con.execute("SET TimeZone = 'UTC'")
            upgrade = self._prepare("duckdb")
            if upgrade:
                # One transaction: a warehouse is upgraded whole or not at all. The views of before name the old
                # columns, so they are rebuilt with it.
                self.con.execute("BEGIN TRANSACTION")
                try:
                    for sql in upgrade:
                        self.con.execute(sql)
                    self.con.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
        except (duckdb.Error, OSError) as exc:
            self.close()
            raise StorageError(f"cannot open {self.name}: {' '.join(str(exc).split())}{_path_hint(path)}",
                               path=path) from exc
        self._upgraded(upgrade)

    def _create(self, path: str) -> None:
        """A new database, made whole under a temporary name and then linked into place.

        DuckDB writes a new file's header in several writes; a full disk or a kill between them would leave a file
        that no later load can open. Made aside, the database at ``path`` is either whole or absent; a temporary
        file left by a killed load is removed by the next one.
        """
        folder, name = os.path.split(os.path.abspath(path))
        temporary = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            con = self._duckdb.connect(temporary)
            try:
                con.execute(_state_sql("duckdb"))
                con.execute("CHECKPOINT")
            finally:
                con.close()
            with contextlib.suppress(FileExistsError):  # never replace a database another load made meanwhile
                os.link(temporary, path)
        finally:
            for leftover in (temporary, f"{temporary}.wal"):
                with contextlib.suppress(OSError):  # best effort: the next load removes what stays
                    Path(leftover).unlink(missing_ok=True)

    def _rollback(self) -> None:
        # A failed COMMIT has already ended the transaction; a database that a fatal error invalidated refuses.
        with contextlib.suppress(self._duckdb.Error):
            self.con.execute("ROLLBACK")

    def load(self, source: str, file: SourceFile, table: pa.Table, *, replace: bool) -> None:
        duckdb = self._duckdb
        target = quote_identifier(file.table)
        incoming = "_cio_sync_incoming"
        have = self.columns(file.table)
        try:
            self.con.execute("BEGIN TRANSACTION")
            try:
                for sql in _ddl(have, file, table, "duckdb"):
                    self.con.execute(sql)
                self.con.register(incoming, table)
                self.con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM {incoming}")
                self._entry(source, file.name, table=file.table, rows=table.num_rows, status=LOADED, reason=None,
                            replace=replace)
                self.con.execute("COMMIT")
            except BaseException:
                self._rollback()
                self._tables.pop(file.table, None)
                raise
            finally:
                with contextlib.suppress(duckdb.Error):
                    self.con.unregister(incoming)
            self._tables[file.table] = _grown(have, file, table)
        except duckdb.DataError as exc:
            raise _Unloadable(f"DuckDB refused its rows: {exc}") from exc
        except duckdb.Error as exc:
            raise self._failed(f"loading {source}/{file.name}", exc) from exc

    def record(self, source: str, name: str, table: str, reason: str, *, replace: bool) -> None:
        try:
            self.con.execute("BEGIN TRANSACTION")
            try:
                self._entry(source, name, table=table, rows=0, status=QUARANTINED, reason=reason, replace=replace)
                self.con.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except self._duckdb.Error as exc:
            raise self._failed(f"quarantining {source}/{name}", exc) from exc

    def build_views(self) -> list[str]:
        made = []
        try:
            tables = {r[0] for r in self.con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
                "AND table_schema = current_schema()").fetchall()}
            for view, table, sql in current_views():
                if table in tables:
                    self.con.execute(f"CREATE OR REPLACE VIEW {quote_identifier(view)} AS {sql}")
                    made.append(view)
            for table in sorted(t for t in tables if t.startswith("raw_")):
                self.con.execute(f"CREATE OR REPLACE VIEW {quote_identifier(table + '_unique')} AS SELECT * FROM "
                                 f'{quote_identifier(table)} QUALIFY row_number() OVER (PARTITION BY "messageId" '
                                 'ORDER BY "receivedAt") = 1')
                made.append(f"{table}_unique")
        except self._duckdb.Error as exc:
            raise self._failed("building the current-state views", exc) from exc
        return made

    def close(self) -> None:
        if self.con is not None:
            try:
                self.con.close()
            except self._duckdb.Error as exc:
                log.debug("closing %s: %s", self.name, exc)
            self.con = None


def _pg_view(sql: str) -> str:
    """A DuckDB QUALIFY view as PostgreSQL SQL (a window in a subquery)."""
    select, _, qualify = sql.partition("QUALIFY")
    window, _, rest = qualify.strip().partition(" = 1")
    table = select.split("FROM", 1)[1].strip()
    extra = rest.strip().removeprefix("AND").strip()
    condition = f" AND {extra}" if extra else ""
    return (f"SELECT * FROM (SELECT *, {window.strip()} AS _cio_sync_rank FROM {table}) ranked "
            f"WHERE _cio_sync_rank = 1{condition}")


class _PostgresTarget(_SqlTarget):
    """Loads into PostgreSQL (psycopg 3): each file with COPY, in one transaction with its load-state row."""

    P = "%s"
    COLUMNS_SQL = ("SELECT column_name, CASE WHEN data_type = 'ARRAY' THEN udt_name ELSE data_type END "
                   "FROM information_schema.columns WHERE table_name = %s AND table_schema = current_schema()")

    def __init__(self, dsn: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise ConfigError("loading into PostgreSQL needs psycopg: pip install -e '.[postgres]' in the "
                              "cio_sync checkout") from exc
        self._psycopg = psycopg
        self._error = psycopg.Error
        self.path = redact(dsn, ())
        self.name = f"PostgreSQL at {self.path}"
        #: The columns of each warehouse table as this connection knows them (a load is their only writer).
        self._tables: dict[str, Columns] = {}
        try:
            # Autocommit, so that each ``transaction()`` block is a real transaction of its own.
            self.con = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as exc:
            # Connecting, a ProgrammingError is a URL psycopg cannot parse; else the server is not reachable.
            kind = ConfigError if isinstance(exc, psycopg.ProgrammingError) else library_error(exc) or StorageError
            raise make_error(kind, f"cannot connect to PostgreSQL at {self.path}: "
                             f"{redact(' '.join(str(exc).split()), ())}; check the URL "
                             "(postgresql://user:password@host:port/database) and that the server runs",
                             path=self.path) from exc
        try:
            with self.con.transaction():
                upgrade = self._prepare("postgres")
                for sql in upgrade:
                    self.con.execute(sql)
        except psycopg.Error as exc:
            self.close()
            raise self._failed("preparing the load state", exc) from exc
        self._upgraded(upgrade)

    def load(self, source: str, file: SourceFile, table: pa.Table, *, replace: bool) -> None:
        psycopg = self._psycopg
        target = quote_identifier(file.table)
        names = ", ".join(quote_identifier(f.name) for f in table.schema)
        have = self.columns(file.table)
        try:
            with self.con.transaction():
                for sql in _ddl(have, file, table, "postgres"):
                    self.con.execute(sql)
                with self.con.cursor().copy(f"COPY {target} ({names}) FROM STDIN") as copy:
                    for row in table.to_pylist():
                        copy.write_row(list(row.values()))
                self._entry(source, file.name, table=file.table, rows=table.num_rows, status=LOADED, reason=None,
                            replace=replace)
        except BaseException as exc:
            self._tables.pop(file.table, None)
            if isinstance(exc, psycopg.DataError | ValueError | OverflowError):
                raise _Unloadable(f"PostgreSQL refused its rows: {redact(str(exc).strip(), ())}") from exc
            if isinstance(exc, psycopg.Error):
                raise self._failed(f"loading {source}/{file.name}", exc) from exc
            raise
        self._tables[file.table] = _grown(have, file, table)

    def record(self, source: str, name: str, table: str, reason: str, *, replace: bool) -> None:
        try:
            with self.con.transaction():
                self._entry(source, name, table=table, rows=0, status=QUARANTINED, reason=reason, replace=replace)
        except self._psycopg.Error as exc:
            raise self._failed(f"quarantining {source}/{name}", exc) from exc

    def build_views(self) -> list[str]:
        made = []
        try:
            tables = {r[0] for r in self.con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
                "AND table_type = 'BASE TABLE'").fetchall()}
            with self.con.transaction():
                for view, table, sql in current_views():
                    if table in tables:
                        self.con.execute(f"DROP VIEW IF EXISTS {quote_identifier(view)}")
                        self.con.execute(f"CREATE VIEW {quote_identifier(view)} AS {_pg_view(sql)}")
                        made.append(view)
                for table in sorted(t for t in tables if t.startswith("raw_")):
                    view = quote_identifier(f"{table}_unique")
                    self.con.execute(f"DROP VIEW IF EXISTS {view}")
                    self.con.execute(f'CREATE VIEW {view} AS SELECT DISTINCT ON ("messageId") * FROM '
                                     f'{quote_identifier(table)} ORDER BY "messageId", "receivedAt"')
                    made.append(f"{table}_unique")
        except self._psycopg.Error as exc:
            raise self._failed("building the current-state views", exc) from exc
        return made

    def close(self) -> None:
        try:
            self.con.close()
        except (AttributeError, self._psycopg.Error) as exc:
            log.debug("closing %s: %s", self.name, exc)


def duckdb_path(into: str) -> str:
    """The database file a ``duckdb://`` URL names, as SQLAlchemy URLs do: ``duckdb:///relative.duckdb``,
    ``duckdb:////absolute/path.duckdb``, ``duckdb:///:memory:``. A plain path ending .duckdb or .db works too.
    Raises :class:`~cio_sync.ConfigError` for any other ``duckdb:`` URL (``duckdb:/x``, ``duckdb://host/x``)."""
    if into.startswith("duckdb:///"):
        path = into.removeprefix("duckdb:///")
        return path or ":memory:"
    if into.lower().startswith("duckdb:"):
        raise ConfigError(f"malformed DuckDB URL {redact(into, ())!r}: use duckdb:///relative/path.duckdb (three "
                          "slashes) or duckdb:////absolute/path.duckdb (four)")
    if into.endswith((".duckdb", ".db")) and "://" not in into:
        return into
    raise ConfigError(f"unknown load target {redact(into, ())!r}; use duckdb:///relative.duckdb, "
                      "duckdb:////absolute.duckdb or postgresql://user@host/database")


def _path_hint(path: str) -> str:
    """A hint for a DuckDB path that names a folder that does not exist: ``duckdb:///x`` is relative to the working
    directory, and the absolute path meant may need a fourth slash (or the other way round)."""
    if path == ":memory:" or _NOT_A_FILE.match(path):
        return ""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(folder):
        return ""
    if not os.path.isabs(path) and os.path.isdir(os.path.dirname("/" + path)):
        return (f"; the folder {folder!r} does not exist here ({os.getcwd()}): for the absolute path /{path} write "
                f"duckdb:////{path} (four slashes)")
    if os.path.isabs(path) and os.path.isdir(os.path.dirname(path.lstrip("/")) or "."):
        return (f"; the folder {folder} does not exist: for the path {path.lstrip('/')} relative to {os.getcwd()} "
                f"write duckdb:///{path.lstrip('/')} (three slashes)")
    return f"; the folder {folder} does not exist"


def _target(into: str) -> _Target:
    if into.startswith(("postgresql://", "postgres://")):
        return _PostgresTarget(into)
    return _DuckDBTarget(duckdb_path(into))
