"""The workspace state in PostgreSQL: ``StandardSink(..., state="postgresql://user@host:port/db")``.

The state's logic is :class:`~cio_sync.workspace.state.WorkspaceState`'s, unchanged (the write-behind staging, the
steps and their savepoints, the outbox, the journal that restores the open transaction after a failed write): this
module gives it a connection with the surface of ``sqlite3``'s, over psycopg 3 in autocommit mode, whose explicit
``BEGIN`` / ``SAVEPOINT`` / ``COMMIT`` are the state's own. Its statements are written for SQLite and translated
once each (placeholders, ``INSERT OR REPLACE`` as ``INSERT ... ON CONFLICT DO UPDATE``).

All the tables of one state are in one PostgreSQL schema (``?schema=NAME`` in the URL or ``state_schema=``; default
``cio_sync_<workspace_id>``), created with them if missing, so that many states (one per partition of a stream) live
in one database: their rows never meet, and their transactions never wait for one another (each state's commit
locks its own rows; the fencing row is per schema).

Faults: a lost connection or a failed statement is a :class:`~cio_sync.StorageError` naming the server as
``host:port/db`` (never the password). The open transaction is gone then; the state rolls back and replays its
journal into a new transaction on a new connection (as after SQLite rolled one back), so the failed step is undone
whole and the steps before it are kept; if the server cannot be reached yet, the changes since the last commit are
undone and the error says how many calls that was (none with ``commit_every=1``). The next call connects again.
A ``COMMIT`` whose answer was lost with the connection may have been applied or not; the outbox is correct either
way (its batches are named before their upload and cleared after it), but the calls of that step are reported as
failed, and a client that sends them again gets them applied twice unless ``dedupe_window`` is on.
"""

from __future__ import annotations

import contextlib
import re
import threading
import urllib.parse
from typing import Any, Final

from cio_sync._errors import ConfigError, MissingBackend, StateError
from cio_sync.schemas.tables import STANDARD_VERSION
from cio_sync.workspace.state import STATE_FORMAT, BackendError, WorkspaceState

try:
    import psycopg
    from psycopg import sql as pgsql
    from psycopg.pq import TransactionStatus
except ImportError:  # pragma: no cover - the "postgres" extra is not installed
    psycopg = None  # type: ignore[assignment]

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS people (
    cio_id TEXT PRIMARY KEY, id TEXT, email TEXT, deleted INTEGER NOT NULL DEFAULT 0,
    suppressed INTEGER NOT NULL DEFAULT 0, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS people_by_id ON people (id) WHERE deleted = 0;
CREATE INDEX IF NOT EXISTS people_suppressed ON people (id) WHERE suppressed = 1;
CREATE TABLE IF NOT EXISTS person_attributes (cio_id TEXT PRIMARY KEY, attrs BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS anonymous (anonymous_id TEXT PRIMARY KEY, cio_id TEXT, traits TEXT);
CREATE TABLE IF NOT EXISTS definitions (
    kind TEXT NOT NULL, id BIGINT NOT NULL, digest TEXT NOT NULL, version INTEGER NOT NULL,
    created_at BIGINT NOT NULL, PRIMARY KEY (kind, id)
);
CREATE TABLE IF NOT EXISTS outbox (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tbl TEXT NOT NULL, row BYTEA NOT NULL,
    size BIGINT NOT NULL, at BIGINT, batch BIGINT, rows INTEGER, last_at BIGINT
);
CREATE INDEX IF NOT EXISTS outbox_by_batch ON outbox (batch, tbl);
CREATE TABLE IF NOT EXISTS batches (
    id BIGINT PRIMARY KEY, tbl TEXT NOT NULL, rows INTEGER NOT NULL, name TEXT, data BYTEA,
    nbytes BIGINT NOT NULL DEFAULT 0, first_at BIGINT, last_at BIGINT
);
CREATE TABLE IF NOT EXISTS message_ids (id BYTEA PRIMARY KEY, at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS message_ids_at ON message_ids (at);
CREATE TABLE IF NOT EXISTS owner (one INTEGER PRIMARY KEY CHECK (one = 1), epoch BIGINT NOT NULL,
    position BIGINT NOT NULL);
"""

#: The tables of a state (all in its schema).
_TABLES: Final = frozenset({"meta", "people", "person_attributes", "anonymous", "definitions", "outbox", "batches",
                            "message_ids", "owner"})

#: The primary key of each table the state writes with ``INSERT OR REPLACE``, and the columns of the one statement
#: that names none (``INSERT OR REPLACE INTO meta VALUES (?, ?)``).
_KEYS: Final = {"meta": ("key",), "person_attributes": ("cio_id",), "anonymous": ("anonymous_id",),
                "definitions": ("kind", "id"), "message_ids": ("id",)}
_COLUMNS: Final = {"meta": ("key", "value"), "message_ids": ("id", "at")}

#: A batch's id comes from a counter in ``meta`` (transactional, unlike a sequence), so that a transaction that is
#: replayed after a fault gives its batches the ids it gave them the first time (the journal holds them).
_NEW_BATCH: Final = ("WITH n AS (UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'batch_seq' "
                     "RETURNING value::bigint AS id) INSERT INTO batches (id, tbl, rows) SELECT id, %s, 0 FROM n "
                     "RETURNING id")

_REPLACE: Final = re.compile(r"INSERT OR REPLACE INTO (\w+)(?: \(([^)]*)\))? VALUES")

#: How long the server lets a state's connection sit in an open transaction with no statement before it ends the
#: session (and rolls the transaction back), unless the URL sets ``idle_in_transaction_session_timeout`` itself (as
#: ``options=-c idle_in_transaction_session_timeout=...``): a process that stopped (paused, or cut off from the
#: network) holds the row locks of its open transaction no longer than this, so a later owner of its state is not
#: kept waiting. A live sink whose transaction was ended this way refuses its next call with StorageError, after
#: which it goes on (its open transaction is written again into a new one).
IDLE_IN_TRANSACTION_MS: Final = 300_000

#: SQLSTATE classes that are faults of the server or the connection (try again), not of the state.
_STORAGE_CLASSES: Final = ("08", "40", "53", "55", "57", "58", "XX")


def _translate(statement: str) -> str | None:
    """The PostgreSQL form of one of the state's SQLite statements (``None``: nothing to run)."""
    if statement.startswith("PRAGMA"):
        return None
    if statement == "BEGIN IMMEDIATE":
        return "BEGIN"
    if statement == "INSERT INTO batches (tbl, rows) VALUES (?, 0)":
        return _NEW_BATCH
    replace = _REPLACE.match(statement)
    if replace is not None:
        table = replace.group(1)
        columns = tuple(c.strip() for c in replace.group(2).split(",")) if replace.group(2) else _COLUMNS[table]
        keys = _KEYS[table]
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c not in keys)
        statement = (f"INSERT INTO {table} ({', '.join(columns)}) VALUES{statement[replace.end():]} "
                     f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}")
    return statement.replace("?", "%s")


class _Cursor:
    """What the state reads of a cursor: rows, ``rowcount`` and ``lastrowid``."""

    __slots__ = ("_rows", "lastrowid", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int, lastrowid: int | None = None) -> None:
        self._rows = rows
        self.rowcount = rowcount
        self.lastrowid = lastrowid

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows

    def __iter__(self) -> Any:
        return iter(self._rows)


class PostgresConnection:
    """A psycopg connection with the surface of a ``sqlite3`` connection in autocommit mode (``isolation_level=None``):
    ``execute``, ``executemany``, ``in_transaction``, ``close``; errors are :class:`BackendError`.

    It connects on first use and again after the connection was lost, but never in the middle of a transaction: a
    transaction whose connection was lost stays open here (``in_transaction``) and every statement fails until the
    state rolls it back, so no statement of it can run alone, committed on a new connection. Thread-safe (the
    sink's publisher reads batches from its own thread)."""

    def __init__(self, conninfo: str, schema: str, where: str) -> None:
        self._conninfo = conninfo
        self._schema = schema
        self._where = where
        self._conn: Any = None
        self._open_tx = False
        self._closed = False
        self._lock = threading.RLock()
        self._translated: dict[str, str | None] = {}

    @property
    def in_transaction(self) -> bool:
        return self._open_tx

    def _connection(self) -> Any:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if self._closed:
            raise BackendError(f"the connection to {self._where} is closed", storage=False)
        if self._open_tx:
            raise BackendError(f"the connection to {self._where} was lost with the open transaction", storage=True)
        self._drop()
        try:
            named: dict[str, Any] = {} if "application_name" in self._conninfo else {
                "application_name": f"cio_sync {self._schema}"}
            conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10, **named)
        except psycopg.Error as exc:
            raise BackendError(f"cannot connect to {self._where}: {_detail(exc)}", storage=True) from exc
        try:
            conn.execute(pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(self._schema)))
            if "idle_in_transaction_session_timeout" not in self._conninfo:
                conn.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")
        except psycopg.Error as exc:
            conn.close()
            raise _backend_error(exc, self._where) from exc
        self._conn = conn
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def _sql(self, statement: str) -> str | None:
        try:
            return self._translated[statement]
        except KeyError:
            translated = self._translated[statement] = _translate(statement)
            return translated

    def execute(self, statement: str, params: Any = ()) -> _Cursor:
        with self._lock:
            query = self._sql(statement)
            if query is None:
                return _Cursor([], -1)
            if query == "ROLLBACK" or query.startswith("ROLLBACK"):
                return self._rollback(query)
            conn = self._connection()
            if query == "COMMIT" and conn.info.transaction_status == TransactionStatus.INERROR:
                # PostgreSQL would answer a COMMIT of a failed transaction by rolling it back, without an error.
                raise BackendError(f"{self._where}: the transaction failed before its commit", storage=True)
            outside = not self._open_tx  # a read or a BEGIN: nothing is lost if the connection was, try once more
            while True:
                try:
                    cursor = conn.execute(query, params or None)
                    rows = cursor.fetchall() if cursor.description is not None else []
                    break
                except psycopg.Error as exc:
                    if not conn.broken:
                        raise _backend_error(exc, self._where) from exc
                    self._drop()
                    if not outside:
                        raise _backend_error(exc, self._where) from exc
                    outside = False
                    conn = self._connection()  # the server ended an idle session (a restart, a failover)
            if query == "BEGIN":
                self._open_tx = True
            elif query == "COMMIT":
                self._open_tx = False
            lastrowid = int(rows[0][0]) if query is _NEW_BATCH and rows else None
            return _Cursor(rows, cursor.rowcount, lastrowid)

    def _rollback(self, query: str) -> _Cursor:
        conn = self._conn
        if query == "ROLLBACK":
            self._open_tx = False
            if conn is None or conn.closed or conn.broken:
                self._drop()  # the server rolled it back when the connection went
                return _Cursor([], -1)
        conn = self._connection()
        try:
            conn.execute(query)
        except psycopg.Error as exc:
            if conn.broken:
                self._drop()
            raise _backend_error(exc, self._where) from exc
        return _Cursor([], -1)

    def executemany(self, statement: str, params: Any) -> _Cursor:
        with self._lock:
            query = self._sql(statement)
            if query is None:
                return _Cursor([], -1)
            conn = self._connection()
            try:
                with conn.cursor() as cursor:
                    cursor.executemany(query, params)
                    return _Cursor([], cursor.rowcount)
            except psycopg.Error as exc:
                if conn.broken:
                    self._drop()
                raise _backend_error(exc, self._where) from exc

    def close(self) -> None:
        """Close the connection for good (the server rolls back an open transaction)."""
        with self._lock:
            self._open_tx = False
            self._closed = True
            self._drop()


def _detail(exc: BaseException) -> str:
    return str(exc).strip().replace("\n", "; ") or type(exc).__name__


def _backend_error(exc: Any, where: str) -> BackendError:
    """``exc`` (a psycopg error) as a :class:`BackendError`: a fault of the server or the connection, or not."""
    state = getattr(exc, "sqlstate", None) or ""
    storage = (isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
               or state[:2] in _STORAGE_CLASSES)
    code = f" (SQLSTATE {state})" if state else ""
    return BackendError(f"{where}: {_detail(exc)}{code}", storage=storage)


def server_of(url: str) -> tuple[str, str, str | None]:
    """``url`` split into the conninfo psycopg connects with (without our ``schema`` parameter), the server as
    ``host:port/db`` (never the password), and the ``schema`` parameter if the URL has one. Raises
    :class:`~cio_sync.ConfigError` for a URL psycopg cannot read."""
    if psycopg is None:
        raise MissingBackend("a PostgreSQL workspace state needs psycopg: pip install 'cio_sync[postgres]'")
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    rest = urllib.parse.urlencode([(key, value) for key, value in query if key != "schema"])
    conninfo = urllib.parse.urlunsplit(parts._replace(query=rest))
    shown = urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname or "", query=""))
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
        if params.get("port") is not None:
            for port in str(params["port"]).split(","):
                if not port.isdigit() or not 0 < int(port) < 65536:
                    raise ValueError(f"port {port!r} is not a port number")
    except (psycopg.Error, ValueError) as exc:
        raise ConfigError(f"workspace state {shown!r} is not a PostgreSQL URL psycopg can read: "
                          f"{_detail(exc)}") from None
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    where = f"{host}:{params.get('port') or 5432}/{params.get('dbname') or params.get('user') or ''}"
    return conninfo, where, (schemas[-1] if schemas else None)


class PostgresState(WorkspaceState):
    """:class:`~cio_sync.workspace.state.WorkspaceState` with its tables in one schema of a PostgreSQL database.

    ``url`` is a libpq URL (``postgresql://user[:password]@host[:port]/db``, any libpq parameter in the query) that
    may also hold ``schema=NAME``; ``schema`` (or that parameter) is the schema holding this state's tables, created
    if missing (default ``cio_sync_<workspace_id>``). A schema that holds another workspace's state raises
    :class:`~cio_sync.StateError`; a schema whose metadata is missing (a state whose content was lost) too, unless
    ``new_workspace``.
    """

    _FOR_UPDATE = " FOR UPDATE"

    def __init__(self, url: str, *, workspace_id: int, schema: str | None = None, cache_size: int = 200_000,
                 new_workspace: bool = False) -> None:
        conninfo, where, in_url = server_of(url)
        if schema is not None and in_url is not None and schema != in_url:
            raise ConfigError(f"workspace state {where}: the URL names schema {in_url!r} and state_schema "
                              f"{schema!r}; name it once")
        chosen = schema or in_url or f"cio_sync_{int(workspace_id)}"
        if not isinstance(chosen, str) or not 0 < len(chosen.encode()) <= 63 or "\x00" in chosen:
            raise ConfigError(f"state schema must be a name of 1 to 63 bytes, not {chosen!r}")
        self.schema = chosen
        #: The server as ``host:port/db``.
        self.server = where
        self._conninfo = conninfo
        super().__init__(f"{where} (schema {chosen})", workspace_id=workspace_id, cache_size=cache_size,
                         new_workspace=new_workspace)

    def _connect(self, new_workspace: bool) -> None:
        self._db = db = PostgresConnection(self._conninfo, self.schema, self.server)
        ident = pgsql.Identifier(self.schema)
        conn = db._connection()
        try:
            with conn.transaction():
                # One creator at a time (two states opening a new schema at once would both try to create it).
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"cio_sync state {self.schema}",))
                exists = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)).fetchone()
                present = {str(name) for (name,) in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = %s", (self.schema,))}
                if present and "meta" not in present:
                    raise StateError(f"workspace state {self.path}: schema {self.schema!r} holds tables but no "
                                     f"cio_sync state; choose another schema")
                # Only what is missing is created: a user who may not create schemas (or tables) can still open a
                # state made for them.
                if exists is None:
                    conn.execute(pgsql.SQL("CREATE SCHEMA {}").format(ident))
                if not present >= _TABLES:
                    conn.execute(_SCHEMA)
                fmt = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
                if fmt is None:
                    if "meta" in present:
                        if not new_workspace:
                            raise StateError(
                                f"workspace state {self.path} has its tables but no metadata: it may be a state "
                                f"whose content was lost, and starting a new workspace on it would give its people "
                                f"new internal ids; restore it, or pass new_workspace=True to start a new workspace "
                                f"there (what its tables hold is then emptied)")
                        conn.execute(pgsql.SQL("TRUNCATE {}").format(
                            pgsql.SQL(", ").join(pgsql.Identifier(t) for t in sorted(_TABLES))))
                    with conn.cursor() as cursor:
                        cursor.executemany("INSERT INTO meta VALUES (%s, %s)", [
                            ("format", str(STATE_FORMAT)), ("workspace_id", str(self.workspace_id)),
                            ("schema_version", str(STANDARD_VERSION)), ("seq_num", "0"), ("batch_seq", "0")])
        except psycopg.Error as exc:
            raise _backend_error(exc, self.server) from exc
        self._check_meta()

    def _check_meta(self) -> None:
        fmt = self._meta("format")
        if fmt != str(STATE_FORMAT):
            raise StateError(f"workspace state {self.path} has format {fmt}; this cio_sync reads {STATE_FORMAT}")
        stored = int(self._meta("workspace_id") or -1)
        if stored != self.workspace_id:
            raise StateError(f"workspace state {self.path} belongs to workspace {stored}, not {self.workspace_id}")
        tables = int(self._meta("schema_version") or 1)
        if tables != STANDARD_VERSION:
            raise StateError(f"workspace state {self.path} holds rows of Standard tables version {tables}; this "
                             f"cio_sync writes version {STANDARD_VERSION}: open it with the release that made it")

    def abandon(self) -> None:
        """Let the state go as a killed process does: the server rolls back what was not committed."""
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
