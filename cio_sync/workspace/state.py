"""Workspace state for the Standard sink: people, their attributes, definitions, and the outbox of rows to publish.

The embedded default is one SQLite file (``state="workspace.sqlite"``); ``state=None`` keeps the same tables in an
in-memory SQLite database, for notebooks and tests. State knows no storage: it never touches a bucket.

Consistency: a change to the state and the rows it produces are written in one SQLite transaction (a transactional
outbox). Rows leave the outbox only after their file is published; a batch's file name and bytes are committed
before the upload, so after a crash the same file is published again under the same name (and recognised if it had
landed). A crash therefore loses neither a change nor its rows, and never emits a change twice; what it can lose is
the tail of calls not yet committed (``commit_every``), and then it loses their state change and their rows
together.

Write-behind: a step's statements are staged in Python lists and reach SQLite with ``executemany``, at commit or just
before a read of the table they change (a read never misses a staged change). A step whose statements had to reach
SQLite before it ended runs under a savepoint, so a failing step is still undone whole: its staged statements are
dropped, and the in-memory cache with them.

Attributes: each person's attributes are one row (a JSON object of name -> value text), so the rules compare a call's
traits with a dict and a commit writes one row per changed person, not one per attribute. The dicts of the people a
step changed are kept in memory until the commit (so evicting a person from the cache never loses them), and each
step keeps a copy of a dict before it first changes it, so that a failing step puts it back.

Outbox: rows are staged as Python tuples and packed into one JSON entry per table (zstd-compressed when large) when
the staging is applied. The rows written since the table's last cut are also kept in memory, so cutting a batch does
not decode them back from SQLite (it does when they are not all there: after a restart, or after a transaction was
rolled back).

Faults (a full disk, an I/O error): SQLite may roll the whole open transaction back by itself when a write or a
commit fails (it does on SQLITE_FULL and SQLITE_IOERR), and an ``executemany`` that fails part-way leaves its first
rows applied. So every write statement of the open transaction is also kept in a journal (the statement and its
parameters, which exist anyway), and a failed write is handled the same way wherever it happens: the failing
operation (a step, a cut, naming a batch, clearing a published one) is dropped from the journal, the transaction
is rolled back whole and the journal replayed into a new one, so the database holds exactly what it held before
that operation, and the in-memory views match it again. If even the replay fails, everything since the last commit
is forgotten, in memory too (:attr:`WorkspaceState.on_recover` tells the sink, which says so in the error). The
error raised is a :class:`~cio_sync.StorageError` naming the state file (:class:`~cio_sync.StateError` for a state
that cannot be used), never a raw ``sqlite3`` error. None of this costs anything until a write fails, but keeping
the journal's references until the commit.

A new state is created whole under a temporary name and moved into place, so a process killed while creating it
never leaves an empty state file; an empty one found at open is refused (it could be a lost state) unless
``new_workspace`` allows it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any, Final

import orjson
import pyarrow as pa

from cio_sync._errors import CioSyncError, ConfigError, Fenced, StateError, StorageError, library_error
from cio_sync._time import now_micros
from cio_sync.schemas.tables import STANDARD_VERSION

STATE_FORMAT: Final = 3


class BackendError(Exception):
    """A failed statement of a state backend other than SQLite (its driver's error is the ``__cause__``):
    ``storage`` says whether it is a fault of the server or the connection (a :class:`~cio_sync.StorageError`),
    else the state cannot be used (a :class:`~cio_sync.StateError`)."""

    def __init__(self, message: str, *, storage: bool) -> None:
        super().__init__(message)
        self.storage = storage


#: The errors of a state's database that its code recovers from (the sink catches these around reads, too).
DB_ERRORS: Final = (sqlite3.Error, BackendError)


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS people (
    cio_id TEXT PRIMARY KEY,
    id TEXT,
    email TEXT,
    deleted INTEGER NOT NULL DEFAULT 0,
    suppressed INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS people_by_id ON people (id) WHERE deleted = 0;
CREATE INDEX IF NOT EXISTS people_suppressed ON people (id) WHERE suppressed = 1;
CREATE TABLE IF NOT EXISTS person_attributes (cio_id TEXT PRIMARY KEY, attrs BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS anonymous (
    anonymous_id TEXT PRIMARY KEY, cio_id TEXT, traits TEXT
);
CREATE TABLE IF NOT EXISTS definitions (
    kind TEXT NOT NULL, id INTEGER NOT NULL, digest TEXT NOT NULL, version INTEGER NOT NULL,
    created_at INTEGER NOT NULL, PRIMARY KEY (kind, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, row BLOB NOT NULL, size INTEGER NOT NULL,
    at INTEGER, batch INTEGER, rows INTEGER, last_at INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_by_batch ON outbox (batch, tbl);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, rows INTEGER NOT NULL, name TEXT, data BLOB,
    nbytes INTEGER NOT NULL DEFAULT 0, first_at INTEGER, last_at INTEGER
);
CREATE TABLE IF NOT EXISTS message_ids (id BLOB PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS message_ids_at ON message_ids (at);
CREATE TABLE IF NOT EXISTS owner (one INTEGER PRIMARY KEY CHECK (one = 1), epoch INTEGER NOT NULL,
    position INTEGER NOT NULL);
"""


#: Indices of the per-table staging lists; statements on different tables never constrain each other. (Attributes
#: are not staged as statements: see _commit_tail.)
_PEOPLE, _ANONYMOUS, _DEFINITIONS, _OUTBOX, _MESSAGE_IDS, _EXPIRED_IDS = range(6)


_TABLES: Final = 6

#: The connection of a state that is not open yet.
_NOT_OPEN: Any = None

#: The dedupe window's ids (digests, see cio_sync.buffer.seen), kept in the step of the call that brought them.
_SAVE_MESSAGE_ID: Final = "INSERT OR REPLACE INTO message_ids VALUES (?, ?)"
_EXPIRE_MESSAGE_IDS: Final = "DELETE FROM message_ids WHERE at < ?"


_TAKE_OWNERSHIP: Final = ("INSERT INTO owner (one, epoch, position) VALUES (1, ?, 0) "
                          "ON CONFLICT (one) DO UPDATE SET epoch = excluded.epoch")


_SET_POSITION: Final = ("INSERT INTO owner (one, epoch, position) VALUES (1, 0, ?) "
                        "ON CONFLICT (one) DO UPDATE SET position = excluded.position")


_INSERT_PERSON: Final = ("INSERT INTO people (cio_id, id, email, deleted, suppressed, created_at, updated_at) "
                         "VALUES (?, ?, ?, 0, 0, ?, ?)")


_INSERT_PERSON_ROW: Final = ("INSERT INTO people (cio_id, id, email, deleted, suppressed, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)")


_FORGET_PERSON_ID: Final = "UPDATE people SET id = NULL WHERE cio_id = ?"


_UPDATE_PERSON: Final = ("UPDATE people SET id = ?, email = ?, deleted = ?, suppressed = ?, updated_at = ? "
                         "WHERE cio_id = ?")


_PERSON_BY_ID: Final = ("SELECT cio_id, id, email, deleted, suppressed, created_at, updated_at FROM people "
                        "WHERE id = ? AND deleted = 0")


_SET_ATTRIBUTES: Final = "INSERT OR REPLACE INTO person_attributes (cio_id, attrs) VALUES (?, ?)"


_REMOVE_ATTRIBUTES: Final = "DELETE FROM person_attributes WHERE cio_id = ?"


_ATTRIBUTES_OF: Final = "SELECT attrs FROM person_attributes WHERE cio_id = ?"


_SAVE_ANONYMOUS: Final = "INSERT OR REPLACE INTO anonymous (anonymous_id, cio_id, traits) VALUES (?, ?, ?)"


_SAVE_DEFINITION: Final = ("INSERT OR REPLACE INTO definitions (kind, id, digest, version, created_at) "
                           "VALUES (?, ?, ?, ?, ?)")


_ADD_ROWS: Final = "INSERT INTO outbox (tbl, row, size, at, last_at, rows) VALUES (?, ?, ?, ?, ?, ?)"


_BATCH_ENTRIES: Final = "SELECT row, rows FROM outbox WHERE batch = ? ORDER BY seq"


#: A packed outbox entry of at least this many bytes of JSON is stored compressed: most of what a commit writes is
#: outbox rows, and zstd at level 1 shrinks them ~8x for ~2 ms per MB, less than writing the difference to SQLite's
#: WAL and checkpointing it. Smaller entries (a commit per call) stay plain JSON.
_COMPRESS_AT: Final = 16 * 1024


#: A compressed entry: this marker (a JSON array starts with "["), the JSON's length (8 bytes, big-endian), the
#: zstd frame.
_COMPRESSED: Final = b"zstd"


_ZSTD: Final = pa.Codec("zstd", compression_level=1)


def _pack(rows: list[Any]) -> bytes:
    """An outbox entry holding ``rows``: their JSON array, compressed when it is large."""
    data = orjson.dumps(rows)
    if len(data) < _COMPRESS_AT:
        return data
    compressed: bytes = _ZSTD.compress(data, asbytes=True)
    return _COMPRESSED + len(data).to_bytes(8, "big") + compressed


def _unpack(entries: Iterable[tuple[bytes, int | None]]) -> list[Any]:
    """The rows of outbox entries, in order: an entry is one row (``rows`` null, format 1) or an array of rows
    (JSON, or JSON compressed by :func:`_pack`)."""
    found: list[Any] = []
    for data, count in entries:
        if count is None:
            found.append(orjson.loads(data))
        elif data[:4] == _COMPRESSED:
            found.extend(orjson.loads(_ZSTD.decompress(data[12:], int.from_bytes(data[4:12], "big"), asbytes=True)))
        else:
            found.extend(orjson.loads(data))
    return found


@dataclass(slots=True)
class Person:
    """One person of the workspace. ``attrs`` (name -> value text) is loaded on first use."""

    cio_id: str
    id: str | None
    email: str | None
    deleted: bool
    suppressed: bool
    created_at: int
    updated_at: int
    attrs: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Definition:
    digest: str
    version: int
    created_at: int


#: Where a new state file is created before it is moved into place (beside it, so the move is a rename).
_CREATING: Final = ".creating"


#: SQLite's primary result codes that mean a fault of the storage (a StorageError, else a StateError) are in
#: cio_sync._errors, with the map of every library's errors.


_FULL: Final = 13


#: Where the current step's statements are in the database (WorkspaceState._step_db).
_UNDER_SAVEPOINT: Final = 1


_OWNS_TX: Final = 2


log = logging.getLogger("cio_sync.state")


def _nonempty(path: str) -> bool:
    try:
        return os.stat(path).st_size > 0
    except FileNotFoundError:
        return False


def _create_state(temporary: str, path: str, workspace_id: int) -> None:
    """Create a new state at ``path`` whole: its schema and metadata are written and synced under ``temporary``,
    which is then renamed to ``path``; on any failure the temporary file is removed and ``path`` is left as it
    was."""
    try:
        db = sqlite3.connect(temporary, isolation_level=None)
        try:
            # One transaction in the default rollback journal with synchronous=FULL: the file holds everything (no
            # -wal beside it) and is on disk when COMMIT returns.
            db.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} INSERT INTO meta VALUES ('format', '{int(STATE_FORMAT)}'), "
                f"('workspace_id', '{int(workspace_id)}'), ('schema_version', '{int(STANDARD_VERSION)}'), "
                f"('seq_num', '0'); COMMIT;")
        finally:
            db.close()
        for stale in (path + "-wal", path + "-shm"):  # beside an empty file being replaced: empty or stale
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        os.replace(temporary, path)
    except BaseException:
        for leftover in (temporary, temporary + "-journal"):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        raise
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash of the machine
    finally:
        os.close(folder)


class WorkspaceState:
    """People, attributes, definitions and the outbox, in SQLite. Not thread-safe: the sink serialises calls.

    ``path`` is the state file (``None``: in memory). A missing file starts a new workspace; an empty file (zero
    bytes) raises :class:`~cio_sync.StateError` unless ``new_workspace`` is true, as it may be a state whose
    content was lost. Raises :class:`~cio_sync.StateError` for a file that is in use or belongs to another workspace
    and :class:`~cio_sync.StorageError` when the file cannot be created or read.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, workspace_id: int, cache_size: int = 200_000,
                 new_workspace: bool = False) -> None:
        self.path = None if path is None else os.fspath(path)
        self.workspace_id = workspace_id
        #: Called after a failed write was rolled back, with whether everything since the last commit was lost
        #: (see :meth:`_recover`); returns words to add to the error. The sink sets it.
        self.on_recover: Callable[[bool], str] | None = None
        self._lock_file: IO[str] | None = None
        #: The database connection: sqlite3's, or one with the same surface (cio_sync.workspace.postgres).
        self._db: Any = _NOT_OPEN
        self._in_tx = False
        # Fencing (take_ownership): the epoch this state owns (None: it never took ownership), the higher epoch a
        # commit found stored (then the state is fenced: it writes nothing more), and the position stored with the
        # commits (set_position stages it until the next one).
        self._epoch: int | None = None
        self._fenced_by: int | None = None
        self._position = 0
        self._position_dirty = False
        # Every write statement of the open transaction, in order: (sql, parameters, executemany), to replay it
        # into a new transaction after SQLite rolled it back by itself (see _recover).
        self._journal: list[tuple[str, Any, bool]] = []
        self._recovering = False
        try:
            self._connect(new_workspace)
        except DB_ERRORS as exc:
            self.close()
            raise self._error(exc, "open it") from exc
        except OSError as exc:
            self.close()
            if isinstance(exc, CioSyncError):
                raise
            raise StorageError(f"cannot open workspace state {self.path}: {exc}", path=self.path) from exc
        except BaseException:
            self.close()
            raise
        self._cache: dict[str, Person] = {}
        #: The cached people by internal id; an entry counts only while its person is still in ``_cache``.
        self._by_cio: dict[str, Person] = {}
        self._cache_size = cache_size
        # Write-behind: the statements of the steps since the last commit, per table, in order; applied with
        # executemany before anything reads that table and at commit (see _apply_staged).
        # (The outbox's list holds (table, row, size, time) entries: see outbox_staged.)
        self._staged: tuple[list[Any], ...] = tuple([] for _ in range(_TABLES))
        #: Rows for the outbox, staged as (table, row, size, change time): SqliteOutbox appends to this list.
        self.outbox_staged: list[tuple[str, tuple[Any, ...], int, int | None]] = self._staged[_OUTBOX]
        self._marks: list[int] | None = None  # where the current step's statements start, per table
        # Where the current step's statements are in the database: 0 not there yet, _UNDER_SAVEPOINT (a savepoint
        # "step"), _OWNS_TX (the step began the transaction: undoing it is a rollback); and where the step's
        # entries of the journal begin.
        self._step_db = 0
        self._step_mark = 0
        # What the staged statements touch, so that a read of the database can tell whether it must apply them
        # first: people with staged changes (by cio_id) and whether each of them is in the cache under its current
        # id; people with staged attribute changes; anonymous ids with their staged value.
        self._staged_people: set[str] = set()
        self._people_cached = True
        self._staged_anonymous: dict[str, tuple[str | None, dict[str, Any]]] = {}
        # Attributes changed since the last commit: cio_id -> the person's attribute dict (the same object as
        # Person.attrs), written at commit; and, within a step, the dicts as they were before the step first changed
        # them (cio_id, dict, copy, whether it was already changed), to put back if the step fails.
        self._changed_attrs: dict[str, dict[str, str]] = {}
        self._step_attrs: list[tuple[str, dict[str, str], dict[str, str], bool]] = []
        # Outbox rows written to the database since each table's last cut, when all of them are known here (None:
        # read them from the database at the cut).
        self._open_rows: dict[str, list[Any] | None] = {}
        try:
            self._open_rows = {
                table: None for (table,) in self._db.execute("SELECT DISTINCT tbl FROM outbox WHERE batch IS NULL")}
            self._seq_num = int(self._meta("seq_num") or 0)
            self._earlier_batches = int(self._meta("earlier_batches") or 0)
            self._earlier_version = int(self._meta("earlier_version") or 1)
            #: Every id that may be blocked (a suppressed person's): a call naming one of them asks the database.
            self._maybe_blocked: set[str] = {
                i for (i,) in self._db.execute("SELECT id FROM people WHERE suppressed = 1 AND id IS NOT NULL")}
            owner = self._db.execute("SELECT epoch, position FROM owner WHERE one = 1").fetchone()
        except DB_ERRORS as exc:
            self.close()
            raise self._error(exc, "open it") from exc
        self._seq_dirty = False
        self._clock = 0
        self._position = int(owner[1]) if owner is not None else 0

    # -- lifecycle -----------------------------------------------------------------------------------------------

    #: Appended to the SELECT that a commit of an owning state reads its epoch with (a row lock where the database
    #: has them; SQLite's write transaction already excludes every other writer).
    _FOR_UPDATE: str = ""

    def _connect(self, new_workspace: bool) -> None:
        """Open the database as ``self._db`` (a missing state is created), with its tables, and check its metadata."""
        if self.path is not None:
            self._lock_file = self._take_lock(self.path)
            self._prepare(self.path, new_workspace, self.workspace_id)
        self._db = sqlite3.connect(self.path or ":memory:", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a crash of the process; the OS crashing may lose the last ones.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._check_meta()

    @staticmethod
    def _prepare(path: str, new_workspace: bool, workspace_id: int) -> None:
        """Make sure ``path`` is a whole state file before SQLite opens it (called with the lock held): create a
        missing one under a temporary name and move it into place, so that no crash leaves an empty file behind;
        refuse an empty one unless ``new_workspace``."""
        creating = path + _CREATING
        for leftover in (creating, creating + "-journal"):  # a creation that was interrupted (we hold the lock)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = None
        if size is not None and (size > 0 or _nonempty(path + "-wal")):
            return
        if size == 0 and not new_workspace:
            raise StateError(
                f"workspace state {path} is empty (0 bytes): it may be a state whose content was lost, and starting "
                f"a new workspace on it would give its people new internal ids; restore it from a backup, or pass "
                f"new_workspace=True to start a new workspace there")
        _create_state(creating, path, workspace_id)

    @staticmethod
    def _take_lock(path: str) -> IO[str]:
        lock = open(path + ".lock", "a+")  # noqa: SIM115 - held open for the state's life
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise StateError(
                f"workspace state {path} is in use by another sink or process; one state file serves one sink"
            ) from None
        return lock

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _check_meta(self) -> None:
        fmt = self._meta("format")
        if fmt is None:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("format", str(STATE_FORMAT)), ("workspace_id", str(self.workspace_id)),
                ("schema_version", str(STANDARD_VERSION)), ("seq_num", "0"),
            ])
            self._db.execute("COMMIT")
            return
        if int(fmt) in (1, 2):
            self._upgrade(int(fmt))
            fmt = str(STATE_FORMAT)
        if int(fmt) != STATE_FORMAT:
            raise StateError(f"workspace state {self.path} has format {fmt}; this cio_sync reads {STATE_FORMAT}")
        stored = int(self._meta("workspace_id") or -1)
        if stored != self.workspace_id:
            raise StateError(f"workspace state {self.path} belongs to workspace {stored}, not {self.workspace_id}")
        tables = int(self._meta("schema_version") or 1)
        if tables > STANDARD_VERSION:
            raise StateError(f"workspace state {self.path} holds rows of Standard tables version {tables}; this "
                             f"cio_sync writes version {STANDARD_VERSION}: open it with the release that made it")
        if tables < STANDARD_VERSION:
            self._upgrade_tables(tables)

    def _upgrade_tables(self, version: int) -> None:
        """Bring a state whose outbox holds rows of Standard tables ``version`` (an earlier release's) to this
        release's, in one transaction: the open rows are cut into batches of their own, which are published in
        that version (:meth:`row_version`), under that version's names; everything after them is this version's."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for (table,) in db.execute("SELECT DISTINCT tbl FROM outbox WHERE batch IS NULL").fetchall():
                batch_id = db.execute("INSERT INTO batches (tbl, rows) VALUES (?, 0)", (table,)).lastrowid
                db.execute("UPDATE outbox SET batch = ? WHERE batch IS NULL AND tbl = ?", (batch_id, table))
                db.execute(
                    "UPDATE batches SET (rows, nbytes, first_at, last_at) = (SELECT sum(coalesce(rows, 1)), "
                    "sum(size), min(at), max(coalesce(last_at, at)) FROM outbox WHERE batch = ?) WHERE id = ?",
                    (batch_id, batch_id))
            last, held = db.execute("SELECT coalesce(max(id), 0), count(*) FROM batches").fetchone()
            earlier = int(self._meta("earlier_batches") or 0)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('earlier_batches', ?)", (str(max(last, earlier)),))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('earlier_version', ?)", (str(version),))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(STANDARD_VERSION),))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        log.info("workspace state %s: upgraded from Standard tables version %d to %d; the %d batch(es) it held "
                 "are published in version %d", self.path, version, STANDARD_VERSION, held, version)

    def row_version(self, batch_id: int) -> int:
        """The version of the Standard tables that the rows of outbox batch ``batch_id`` are in: an earlier
        release's for the batches a state upgrade found (:meth:`_upgrade_tables`), else this release's."""
        return self._earlier_version if batch_id <= self._earlier_batches else STANDARD_VERSION

    def _upgrade(self, fmt: int) -> None:
        """Bring a state of an earlier format to this one, in one transaction (a crash leaves it as it was)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if fmt == 1:
                # Format 2 packs many rows of one table into one outbox entry (``rows`` of them, changed from ``at``
                # to ``last_at``); format 1 entries (one row each, ``rows`` null) stay readable as they are.
                db.execute("ALTER TABLE outbox ADD COLUMN rows INTEGER")
                db.execute("ALTER TABLE outbox ADD COLUMN last_at INTEGER")
            # Format 3 keeps each person's attributes as one JSON object instead of one row per attribute.
            people: dict[str, dict[str, str]] = {}
            for cio_id, name, value in db.execute("SELECT cio_id, name, value FROM attributes ORDER BY cio_id, name"):
                people.setdefault(cio_id, {})[name] = value
            db.executemany(_SET_ATTRIBUTES, [(cio_id, orjson.dumps(attrs)) for cio_id, attrs in people.items()])
            db.execute("DROP TABLE attributes")
            db.execute("UPDATE meta SET value = ? WHERE key = 'format'", (str(STATE_FORMAT),))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db: Any = getattr(self, "_db", None)
        if db is not None:
            with contextlib.suppress(Exception):
                self.commit()
        self.abandon()

    def abandon(self) -> None:
        """Let the state go as a killed process does: what was not committed is lost (SQLite rolls it back), the
        file and its lock are released. For tests of crashes (``cio_sync.testing.abandon``)."""
        db: Any = getattr(self, "_db", None)
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- transactions --------------------------------------------------------------------------------------------

    def _tx(self) -> Any:
        if self._fenced_by is not None:
            raise self._fenced(self._fenced_by)
        if not self._in_tx:
            self._db.execute("BEGIN IMMEDIATE")
            self._in_tx = True
        elif not self._db.in_transaction:
            # SQLite rolled the transaction back on an error that was not seen here: never go on in autocommit (each
            # statement would commit alone). The caller recovers from this as from any failed write.
            lost = sqlite3.OperationalError("SQLite rolled the open transaction back after an I/O error")
            lost.sqlite_errorcode, lost.sqlite_errorname = 10, "SQLITE_IOERR"
            raise lost
        return self._db

    def _execute(self, sql: str, params: tuple[Any, ...]) -> Any:
        """Run one write statement in the transaction, and journal it."""
        cursor = self._tx().execute(sql, params)
        self._journal.append((sql, params, False))
        return cursor

    def _stage(self, table: int, sql: str, params: tuple[Any, ...]) -> None:
        self._staged[table].append((sql, params))

    def _run(self, db: Any, table: int, statements: list[Any]) -> None:
        """Apply staged statements of one table with a few executemany calls, to the same end as running them in
        order."""
        if not statements:
            return
        if table == _PEOPLE:
            # Each person's final row. People already stored first lose their external id, so that no
            # intermediate state can hold one id twice among live people (the unique index), then get their final
            # row; new people are inserted last. The final state holds each live id once, as the steps left it.
            new: dict[str, list[Any]] = {}
            changed: dict[str, tuple[Any, ...]] = {}
            for sql, params in statements:
                if sql is _INSERT_PERSON:
                    cio_id, external_id, at = params[0], params[1], params[3]
                    new[cio_id] = [cio_id, external_id, None, 0, 0, at, at]
                else:
                    cio_id = params[5]
                    row = new.get(cio_id)
                    if row is None:
                        changed[cio_id] = params
                    else:
                        row[1], row[2], row[3], row[4], row[6] = params[:5]
            if changed:
                self._many(db, _FORGET_PERSON_ID, [(cio_id,) for cio_id in changed])
                self._many(db, _UPDATE_PERSON, list(changed.values()))
            self._many(db, _INSERT_PERSON_ROW, list(new.values()))
        elif table == _OUTBOX:
            # One entry per table holding all its rows, in order, encoded with one orjson call: a few inserts
            # instead of one per row.
            by_table: dict[str, list[tuple[str, tuple[Any, ...], int, int | None]]] = {}
            for entry in statements:
                entries = by_table.get(entry[0])
                if entries is None:
                    by_table[entry[0]] = [entry]
                else:
                    entries.append(entry)
            packs = []
            written = []
            for name, entries in by_table.items():
                rows = [entry[1] for entry in entries]
                times = [entry[3] for entry in entries if entry[3] is not None]
                packs.append((name, _pack(rows), sum([entry[2] for entry in entries]),
                              min(times, default=None), max(times, default=None), len(rows)))
                written.append((name, rows))
            db.executemany(_ADD_ROWS, packs)
            self._journal.append((_ADD_ROWS, packs, True))
            for name, rows in written:  # only once they are in the database
                known = self._open_rows.setdefault(name, [])
                if known is not None:
                    known.extend(rows)
        else:
            sql, params = statements[0][0], [params for _, params in statements]
            db.executemany(sql, params)
            self._journal.append((sql, params, True))

    def _many(self, db: Any, sql: str, params: list[Any]) -> None:
        db.executemany(sql, params)
        self._journal.append((sql, params, True))

    def _apply_staged(self, table: int | None = None) -> None:
        """Write the staged statements of ``table`` (or of all tables) to the database, inside the transaction.

        Within a step, the step's own statements are marked where they begin (after every earlier step's
        statements are written, the first time they are needed), so that failing the step can still undo them.
        Raises :class:`~cio_sync.StorageError` or :class:`~cio_sync.StateError` if a write fails (see
        :meth:`_recover`).
        """
        tables = range(_TABLES) if table is None else (table,)
        if not any(self._staged[t] for t in tables):
            return
        try:
            self._write_staged(tables)
        except DB_ERRORS as exc:
            raise self._recover(exc, "write its changes", self._keep()) from exc

    def _write_staged(self, tables: Iterable[int]) -> None:
        marks = self._marks
        journal = self._journal
        if marks is not None and not self._step_db:
            if not self._in_tx and not any(marks):
                # Every staged statement is the step's, and the transaction will hold this step alone: undoing it
                # is a rollback (no savepoint to pay for).
                self._tx()
                self._step_db = _OWNS_TX
                self._step_mark = 0
            elif any(len(self._staged[t]) > marks[t] for t in tables):
                # The step's statements must reach the database: first every earlier step's, then a savepoint.
                self._write_earlier(marks)
                self._db.execute("SAVEPOINT step")
                self._step_db = _UNDER_SAVEPOINT
                self._step_mark = len(journal)
        db = self._tx()
        start = len(journal)
        try:
            for t in tables:
                statements = self._staged[t]
                if statements:
                    start = len(journal)
                    self._run(db, t, statements)
                    statements.clear()
                    if marks is not None:
                        marks[t] = 0
                self._forget_staged(t)
        except BaseException:
            del journal[start:]  # a statement of the run failed: none of the run counts (it stays staged)
            raise

    def _write_earlier(self, marks: list[int]) -> None:
        """Write the statements of the steps before the current one (those before ``marks``)."""
        db = self._tx()
        journal = self._journal
        for t in range(_TABLES):
            earlier = self._staged[t][:marks[t]]
            if earlier:
                start = len(journal)
                try:
                    self._run(db, t, earlier)
                except BaseException:
                    del journal[start:]
                    raise
                del self._staged[t][:marks[t]]
                marks[t] = 0

    def _forget_staged(self, table: int) -> None:
        if table == _PEOPLE:
            self._staged_people.clear()
            self._people_cached = True
        elif table == _ANONYMOUS:
            self._staged_anonymous.clear()

    def _reindex_staged(self) -> None:
        """Rebuild what the staged statements touch from the statements themselves (after some were dropped); the
        cache is empty, so the people they change are not in it."""
        self._staged_people = {params[0] if sql is _INSERT_PERSON else params[5]
                               for sql, params in self._staged[_PEOPLE]}
        self._people_cached = not self._staged_people
        self._staged_anonymous = {params[0]: (params[1], orjson.loads(params[2]) if params[2] else {})
                                  for _, params in self._staged[_ANONYMOUS]}

    def _invalidate_open_rows(self) -> None:
        """Outbox rows were undone in the database: read each table's open rows from it at its next cut."""
        for table in self._open_rows:
            self._open_rows[table] = None

    def commit(self) -> None:
        """Make every change so far durable, with the rows it produced. Within a step (the sink's last step before
        its ``commit_every``), the step is included, and if the commit fails the step can still be undone alone.

        Raises :class:`~cio_sync.StorageError` (or :class:`~cio_sync.StateError`) if it fails: then nothing was
        committed and the changes are still applied, to be committed next time (but see :meth:`_recover`);
        :class:`~cio_sync.Fenced` if a later owner took the state: then nothing since the last commit is kept.
        """
        if self._fenced_by is not None:
            raise self._fenced(self._fenced_by)
        self._apply_staged()
        try:
            self._commit_tail()
        except DB_ERRORS as exc:
            raise self._recover(exc, "commit", self._keep()) from exc

    def _commit_tail(self) -> None:
        """Write the attributes of the people changed since the last commit (one row per person) and the sequence
        number, then commit. These writes are not journaled: until the commit succeeds, ``_changed_attrs`` and
        ``_seq_dirty`` keep what they write, to write it again next time."""
        changed = self._changed_attrs
        if changed:
            db = self._tx()
            db.executemany(_SET_ATTRIBUTES, [(cio_id, orjson.dumps(attrs)) for cio_id, attrs in changed.items()
                                             if attrs])
            removed = [(cio_id,) for cio_id, attrs in changed.items() if not attrs]
            if removed:
                db.executemany(_REMOVE_ATTRIBUTES, removed)
        if self._seq_dirty:
            self._tx().execute("UPDATE meta SET value = ? WHERE key = 'seq_num'", (str(self._seq_num),))
        if self._position_dirty:
            self._tx().execute(_SET_POSITION, (self._position,))
        if self._in_tx:
            if self._epoch is not None:
                self._check_epoch()
            self._tx().execute("COMMIT")
            self._in_tx = False
        self._journal.clear()
        changed.clear()
        self._seq_dirty = self._position_dirty = False
        self._step_db = 0  # a step being committed can no longer be undone

    # -- fencing: one owner at a time ----------------------------------------------------------------------------

    def take_ownership(self, epoch: int) -> None:
        """Make this state the owner of its workspace state with ``epoch``, in a transaction of its own: the stored
        epoch becomes ``epoch`` if it is lower (the same epoch is taken again, as after a restart). From then on
        every commit checks, in its own transaction, that the stored epoch is still ``epoch``; if a later owner took
        a higher one, the commit is rolled back and raises :class:`~cio_sync.Fenced` (and so does every write after
        it). Raises :class:`~cio_sync.Fenced` at once if a higher epoch is stored, and
        :class:`~cio_sync.StateError` if changes are not committed yet (take ownership first, or commit)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be an integer >= 0, not {epoch!r}")
        if self._fenced_by is not None:
            raise self._fenced(self._fenced_by)
        if self._in_tx or any(self._staged) or self._changed_attrs or self._seq_dirty or self._position_dirty:
            raise StateError(f"workspace state {self.path}: take ownership before applying changes, or commit "
                             f"them first")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT epoch, position FROM owner WHERE one = 1" + self._FOR_UPDATE)\
                    .fetchone()
                stored = int(row[0]) if row is not None else 0
                if stored > epoch:
                    self._db.execute("ROLLBACK")
                    raise self._fenced(stored, epoch)
                self._db.execute(_TAKE_OWNERSHIP, (epoch,))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    with contextlib.suppress(*DB_ERRORS):
                        self._db.execute("ROLLBACK")
                raise
        except DB_ERRORS as exc:
            raise self._error(exc, "take ownership") from exc
        self._epoch = epoch
        self._position = int(row[1]) if row is not None else 0

    @property
    def epoch(self) -> int | None:
        """The epoch this state owns (:meth:`take_ownership`), or ``None``."""
        return self._epoch

    @property
    def position(self) -> int:
        """The position stored with the state (its last commit's, or the one :meth:`set_position` staged): for a
        worker, the last sequence of its stream whose calls are durable here. 0 when none was ever set."""
        return self._position

    def set_position(self, position: int) -> None:
        """Store ``position`` with the next commit, in its transaction: it is durable exactly when the changes
        before it are."""
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ConfigError(f"position must be an integer >= 0, not {position!r}")
        self._position = position
        self._position_dirty = True

    def _check_epoch(self) -> None:
        """Within the commit's transaction: lock the owner row and check that its epoch is still ours; else roll
        everything since the last commit back, fence the state and raise :class:`~cio_sync.Fenced`."""
        row = self._db.execute("SELECT epoch FROM owner WHERE one = 1" + self._FOR_UPDATE).fetchone()
        stored = int(row[0]) if row is not None else 0
        if stored == self._epoch:
            return
        log.warning("workspace state %s: epoch %s was taken by a later owner (stored: %d); this state's changes "
                    "since its last commit are rolled back", self.path, self._epoch, stored)
        self._forget_transaction()
        self._fenced_by = stored
        if self.on_recover is not None:
            with contextlib.suppress(CioSyncError):
                self.on_recover(True)
        raise self._fenced(stored)

    def _fenced(self, stored: int, epoch: int | None = None) -> Fenced:
        mine = self._epoch if epoch is None else epoch
        return Fenced(f"workspace state {self.path}: owned by epoch {stored}, not {mine}: a later owner took it, "
                      f"and this one may not write it any more")

    def savepoint(self) -> None:
        """Start one step (a call or a record) that is kept whole or undone whole. Raises
        :class:`~cio_sync.Fenced` if a later owner took the state (:meth:`take_ownership`)."""
        if self._fenced_by is not None:
            raise self._fenced(self._fenced_by)
        self._marks = [len(statements) for statements in self._staged]
        self._step_db = 0
        self._step_attrs.clear()

    def release_savepoint(self) -> None:
        """End the current step, keeping it. Raises like :meth:`commit`; then undo the step
        (:meth:`rollback_savepoint`)."""
        if self._step_db == _UNDER_SAVEPOINT:
            try:
                self._db.execute("RELEASE step")
            except DB_ERRORS as exc:
                raise self._recover(exc, "end a step", self._step_mark) from exc
        self._marks = None
        self._step_db = 0
        self._step_attrs.clear()

    def rollback_savepoint(self, exc: BaseException | None = None) -> CioSyncError | None:
        """Undo the current step, which failed with ``exc``; the in-memory view is dropped and reread from the
        database. Returns the error to raise instead when ``exc`` is a raw SQLite error (the state then recovered
        as :meth:`_recover` says), else ``None``."""
        error = None
        if isinstance(exc, DB_ERRORS):
            error = self._recover(exc, "apply a step", self._keep())
        elif self._step_db:
            try:
                if self._step_db == _UNDER_SAVEPOINT:
                    self._db.execute("ROLLBACK TO step")
                    self._db.execute("RELEASE step")
                else:
                    self._db.execute("ROLLBACK")
                    self._in_tx = False
                del self._journal[self._step_mark:]
            except DB_ERRORS as failed:
                error = self._recover(failed, "undo a failed step", self._step_mark)
            self._invalidate_open_rows()
        for cio_id, attrs, before, was_changed in reversed(self._step_attrs):
            attrs.clear()
            attrs.update(before)
            if not was_changed:
                self._changed_attrs.pop(cio_id, None)
        self._step_attrs.clear()
        if self._marks is not None:
            for statements, mark in zip(self._staged, self._marks, strict=True):
                del statements[mark:]
        self._marks = None
        self._step_db = 0
        # The people the step changed may be cached as it left them: read them again (with the earlier steps'
        # staged changes, which the indexes now name alone).
        self._cache.clear()
        self._by_cio.clear()
        self._reindex_staged()
        return error

    # -- faults --------------------------------------------------------------------------------------------------

    def _keep(self) -> int:
        """How much of the journal a failed write keeps: all of it, but within a step the step's own part (a write
        failing within a step fails the step)."""
        return self._step_mark if self._marks is not None and self._step_db else len(self._journal)

    def _recover(self, exc: Exception, doing: str, keep: int) -> CioSyncError:
        """After ``exc`` from a write, put the database back as the first ``keep`` entries of the journal left it,
        and return the error to raise (naming the state file).

        SQLite may have rolled the transaction back by itself (it does on a full disk and on I/O errors), or kept it
        with part of a statement applied: either way it is rolled back whole and the kept journal is replayed into
        a new transaction, so the failed operation is undone and everything before it is as it was, in the database
        and in memory. A step's savepoint is gone with it: the step, which fails with this error, is undone in memory
        (:meth:`rollback_savepoint`). If the replay fails too, the database is left as of the last commit and
        everything since is forgotten in memory as well; :attr:`on_recover` is told which of the two happened.
        """
        if self._recovering:  # a read made while recovering (on_recover counting the outbox) failed too
            return self._error(exc, doing)
        del self._journal[keep:]
        self._step_db = 0
        lost = not self._restore()
        self._recovering = True
        try:
            note = self.on_recover(lost) if self.on_recover is not None else ""
            if self._in_tx and not self._db.in_transaction:
                # Reading (to count the outbox again) failed as well, and SQLite dropped the restored transaction.
                self._forget_transaction()
                note = self.on_recover(True) if self.on_recover is not None else ""
        finally:
            self._recovering = False
        return self._error(exc, doing, note)

    def _restore(self) -> bool:
        """Roll the transaction back and replay the journal into a new one; else (False) forget everything since
        the last commit. The in-memory views are made to match either way."""
        self._in_tx = False
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if self._journal:
                self._db.execute("BEGIN IMMEDIATE")
                self._in_tx = True
                for sql, params, many in self._journal:
                    if many:
                        self._db.executemany(sql, params)
                    else:
                        self._db.execute(sql, params)
        except DB_ERRORS as again:
            log.warning("workspace state %s: could not restore the open transaction (%s); the changes since the "
                        "last commit are undone", self.path, again)
            self._forget_transaction()
            return False
        self._invalidate_open_rows()
        self._cache.clear()
        self._by_cio.clear()
        self._reindex_staged()
        return True

    def _forget_transaction(self) -> None:
        """Forget everything since the last commit, in the database and in memory: the last commit is the truth."""
        with contextlib.suppress(*DB_ERRORS):
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        self._in_tx = False
        self._journal.clear()
        for statements in self._staged:
            statements.clear()
        if self._marks is not None:
            self._marks = [0] * _TABLES
        self._step_db = 0
        self._changed_attrs.clear()
        self._step_attrs.clear()
        self._cache.clear()
        self._by_cio.clear()
        self._reindex_staged()
        self._invalidate_open_rows()
        self._seq_dirty = True  # numbers given since are not reused (they may have been seen): store the last one

    def fault(self, exc: Exception, doing: str) -> CioSyncError:
        """The error to raise for ``exc`` from a read or write outside a step, after recovering (:meth:`_recover`)."""
        return self._recover(exc, doing, self._keep())

    def error(self, exc: Exception, doing: str) -> CioSyncError:
        """The error to raise for ``exc`` from a read made outside the sink's lock, without recovering: if SQLite
        dropped the transaction, the next write finds out (:meth:`_tx`) and recovers."""
        return self._error(exc, doing)

    def _error(self, exc: Exception, doing: str, note: str = "") -> CioSyncError:
        """``exc`` as a cio_sync error naming the state file: a :class:`~cio_sync.StorageError` for a fault of the
        storage (a full disk, an I/O error), else a :class:`~cio_sync.StateError`."""
        where = self.path if self.path is not None else "(in memory)"
        if isinstance(exc, BackendError):
            if exc.storage:
                return StorageError(f"workspace state {where}: could not {doing}: {exc}{note}", path=self.path)
            return StateError(f"workspace state {where} cannot be used: could not {doing}: {exc}{note}")
        code = getattr(exc, "sqlite_errorcode", None)
        name = getattr(exc, "sqlite_errorname", None)
        detail = f"{exc} ({name})" if name else str(exc)
        if library_error(exc) is StorageError:  # the one map of library errors (cio_sync._errors.LIBRARY_ERRORS)
            hint = "; free some space, then go on" if code is not None and code & 0xFF == _FULL else ""
            return StorageError(f"workspace state {where}: could not {doing}: {detail}{hint}{note}", path=self.path)
        return StateError(f"workspace state {where} cannot be used: could not {doing}: {detail}{note}")

    # -- time and numbers ----------------------------------------------------------------------------------------

    def clock(self) -> int:
        """Now in microseconds, strictly increasing across calls."""
        self._clock = max(now_micros(), self._clock + 1)
        return self._clock

    def next_seq_num(self) -> int:
        self._seq_num += 1
        self._seq_dirty = True
        return self._seq_num

    # -- people --------------------------------------------------------------------------------------------------

    def _remember(self, person: Person) -> Person:
        if person.id is not None:
            if len(self._cache) >= self._cache_size:
                evicted = self._cache.pop(next(iter(self._cache)))
                self._by_cio.pop(evicted.cio_id, None)
                if evicted.cio_id in self._staged_people:
                    self._people_cached = False
            self._cache[person.id] = person
            if len(self._by_cio) > 2 * self._cache_size:  # entries of people dropped from the cache otherwise
                self._by_cio = {p.cio_id: p for p in self._cache.values()}
            self._by_cio[person.cio_id] = person
        return person

    @staticmethod
    def _person(row: tuple[Any, ...]) -> Person:
        return Person(row[0], row[1], row[2], bool(row[3]), bool(row[4]), row[5], row[6])

    def person(self, external_id: str) -> Person | None:
        """The live (not deleted) person with this external id."""
        cache = self._cache
        cached = cache.get(external_id)
        if cached is not None:
            # Least recently used first out: move the person to the end of the eviction order.
            del cache[external_id]
            cache[external_id] = cached
            return cached
        if not self._people_cached:
            self._apply_staged(_PEOPLE)
        row = self._db.execute(_PERSON_BY_ID, (external_id,)).fetchone()
        if row is not None and row[0] in self._staged_people:
            # The database's row is older than a staged change of that person (a rename or a deletion).
            self._apply_staged(_PEOPLE)
            row = self._db.execute(_PERSON_BY_ID, (external_id,)).fetchone()
        return None if row is None else self._remember(self._person(row))

    def person_by_cio_id(self, cio_id: str) -> Person | None:
        """The person with this internal id, deleted or not."""
        cached = self._by_cio.get(cio_id)
        if cached is not None and cached.id is not None and self._cache.get(cached.id) is cached:
            return cached
        if cio_id in self._staged_people:
            self._apply_staged(_PEOPLE)
        row = self._db.execute(
            "SELECT cio_id, id, email, deleted, suppressed, created_at, updated_at FROM people WHERE cio_id = ?",
            (cio_id,)).fetchone()
        if row is None:
            return None
        person = self._person(row)
        return self._remember(person) if not person.deleted else person

    def create_person(self, external_id: str | None, at: int) -> Person:
        """A new person with a fresh internal id (``cio_id``), stable forever after."""
        person = Person(secrets.token_hex(8), external_id, None, False, False, at, at, {})
        self._stage(_PEOPLE, _INSERT_PERSON, (person.cio_id, external_id, None, at, at))
        self._staged_people.add(person.cio_id)
        if external_id is None:
            self._people_cached = False
        return self._remember(person)

    def save_person(self, person: Person) -> None:
        """Store the person's id, email, flags and times."""
        self._stage(_PEOPLE, _UPDATE_PERSON, (person.id, person.email, int(person.deleted), int(person.suppressed),
                                              person.updated_at, person.cio_id))
        self._staged_people.add(person.cio_id)
        if person.deleted or person.id is None:
            if person.id is not None:
                self._cache.pop(person.id, None)
        elif self._cache.get(person.id) is not person:
            self._remember(person)  # known under a new id (a rename)

    def blocked(self, external_id: str) -> Person | None:
        """The suppressed person whose id ``external_id`` is (blocked: no person may take it), or ``None``."""
        if external_id not in self._maybe_blocked:
            return None
        self._apply_staged(_PEOPLE)
        row = self._db.execute(
            "SELECT cio_id, id, email, deleted, suppressed, created_at, updated_at FROM people WHERE id = ? AND "
            "suppressed = 1 ORDER BY updated_at DESC LIMIT 1", (external_id,)).fetchone()
        return None if row is None else self._person(row)

    def block(self, person: Person) -> None:
        """Note that ``person`` is being suppressed, so that :meth:`blocked` looks their id up (the suppression
        itself is the person's saved flag: a step that fails leaves the id free)."""
        if person.id is not None:
            self._maybe_blocked.add(person.id)

    def forget_id(self, external_id: str) -> None:
        self._cache.pop(external_id, None)

    def attrs(self, person: Person) -> dict[str, str]:
        """The person's attributes (name -> value text), as the steps so far left them. Treat as read-only: change
        them with :meth:`change_attrs`."""
        attrs = person.attrs
        if attrs is None:
            attrs = self._changed_attrs.get(person.cio_id)
            if attrs is None:
                row = self._db.execute(_ATTRIBUTES_OF, (person.cio_id,)).fetchone()
                attrs = orjson.loads(row[0]) if row is not None else {}
            person.attrs = attrs
        return attrs

    def change_attrs(self, person: Person, changes: Iterable[tuple[str, str | None]]) -> None:
        """Set attributes to new value texts; ``None`` removes one."""
        attrs = self.attrs(person)
        cio_id = person.cio_id
        if self._marks is not None and not any(a is attrs for _, a, _, _ in self._step_attrs):
            self._step_attrs.append((cio_id, attrs, dict(attrs), cio_id in self._changed_attrs))
        for name, value in changes:
            if value is None:
                attrs.pop(name, None)
            else:
                attrs[name] = value
        self._changed_attrs[cio_id] = attrs

    # -- anonymous profiles --------------------------------------------------------------------------------------

    def anonymous(self, anonymous_id: str) -> tuple[str | None, dict[str, Any]]:
        """The person an anonymous id was merged into (if any) and the traits kept for it while anonymous."""
        staged = self._staged_anonymous.get(anonymous_id)
        if staged is not None:
            return staged[0], dict(staged[1])
        row = self._db.execute("SELECT cio_id, traits FROM anonymous WHERE anonymous_id = ?",
                               (anonymous_id,)).fetchone()
        if row is None:
            return None, {}
        return row[0], (orjson.loads(row[1]) if row[1] else {})

    def save_anonymous(self, anonymous_id: str, cio_id: str | None, traits: dict[str, Any]) -> None:
        self._stage(_ANONYMOUS, _SAVE_ANONYMOUS,
                    (anonymous_id, cio_id, orjson.dumps(traits).decode() if traits else None))
        self._staged_anonymous[anonymous_id] = (cio_id, dict(traits))

    # -- the dedupe window ---------------------------------------------------------------------------------------

    def message_id_seen(self, key: bytes, since: float) -> bool:
        """Whether a call whose ``messageId`` has the digest ``key`` was applied at ``since`` or later."""
        self._apply_staged(_MESSAGE_IDS)
        return self._db.execute("SELECT 1 FROM message_ids WHERE id = ? AND at >= ?", (key, since)).fetchone() \
            is not None

    def note_message_id(self, key: bytes, at: float) -> None:
        """Keep the digest of the current step's call's ``messageId`` (with the step: undone if the step is)."""
        self._stage(_MESSAGE_IDS, _SAVE_MESSAGE_ID, (key, at))

    def expire_message_ids(self, before: float) -> None:
        """Forget the ids kept before ``before`` (with the current step)."""
        self._stage(_EXPIRED_IDS, _EXPIRE_MESSAGE_IDS, (before,))

    # -- definitions ---------------------------------------------------------------------------------------------

    def definition(self, kind: str, key: int) -> Definition | None:
        self._apply_staged(_DEFINITIONS)
        row = self._db.execute("SELECT digest, version, created_at FROM definitions WHERE kind = ? AND id = ?",
                               (kind, key)).fetchone()
        return None if row is None else Definition(row[0], row[1], row[2])

    def save_definition(self, kind: str, key: int, definition: Definition) -> None:
        self._stage(_DEFINITIONS, _SAVE_DEFINITION,
                    (kind, key, definition.digest, definition.version, definition.created_at))

    # -- the outbox (used by SqliteOutbox) -----------------------------------------------------------------------

    def outbox_counts(self) -> dict[str, tuple[int, int]]:
        """Rows and bytes of each table's open rows (not cut yet): those in the database and those staged. Reads
        only (it runs after a failed write, too)."""
        try:
            counts = {str(table): [int(rows), int(size)] for table, rows, size in self._db.execute(
                "SELECT tbl, coalesce(sum(coalesce(rows, 1)), 0), coalesce(sum(size), 0) FROM outbox "
                "WHERE batch IS NULL GROUP BY tbl")}
        except DB_ERRORS as exc:
            raise self.fault(exc, "read the outbox") from exc
        for table, _, size, _ in self.outbox_staged:
            known = counts.setdefault(table, [0, 0])
            known[0] += 1
            known[1] += size
        return {table: (rows, size) for table, (rows, size) in counts.items()}

    def outbox_batch_ids(self) -> set[int]:
        try:
            return {int(batch_id) for (batch_id,) in self._db.execute("SELECT id FROM batches")}
        except DB_ERRORS as exc:
            raise self.fault(exc, "read the outbox") from exc

    def outbox_cut(self, table: str) -> tuple[int, list[Any], int, int | None, int | None]:
        """Close the table's open rows into a new batch; its id, rows (decoded), bytes and time range."""
        self._apply_staged(_OUTBOX)
        keep = self._keep()
        try:
            cursor = self._execute("INSERT INTO batches (tbl, rows) VALUES (?, 0)", (table,))
            batch_id = int(cursor.lastrowid or 0)
            self._execute("UPDATE outbox SET batch = ? WHERE batch IS NULL AND tbl = ?", (batch_id, table))
            rows = self._open_rows.get(table)
            if rows is None:
                rows = _unpack(self._db.execute(_BATCH_ENTRIES, (batch_id,)))
            nbytes, first, last = self._db.execute(
                "SELECT coalesce(sum(size), 0), min(at), max(coalesce(last_at, at)) FROM outbox WHERE batch = ?",
                (batch_id,)).fetchone()
            if rows:
                self._execute("UPDATE batches SET rows = ?, nbytes = ?, first_at = ?, last_at = ? WHERE id = ?",
                              (len(rows), nbytes, first, last, batch_id))
            else:  # nothing was open after all: no empty batch to publish
                self._execute("DELETE FROM batches WHERE id = ?", (batch_id,))
        except DB_ERRORS as exc:
            raise self._recover(exc, f"cut a batch of {table}", keep) from exc
        self._open_rows[table] = []
        # No commit here: a cut may happen inside a step (a call's savepoint); it becomes durable with the next
        # commit, at the latest when the batch is named, before its upload.
        return batch_id, rows, int(nbytes), first, last

    def outbox_batches(self) -> list[tuple[Any, ...]]:
        try:
            return [tuple(r) for r in self._db.execute(
                "SELECT id, tbl, rows, name, data, nbytes, first_at, last_at FROM batches ORDER BY id")]
        except DB_ERRORS as exc:
            raise self.fault(exc, "read the outbox") from exc

    def outbox_encoded(self, batch_id: int, *, recover: bool = True) -> bytes:
        """The batch's recorded bytes. Raises a cio_sync error (after recovering, :meth:`fault`), or with
        ``recover=False`` the raw ``sqlite3.Error``."""
        try:
            row = self._db.execute("SELECT data FROM batches WHERE id = ?", (batch_id,)).fetchone()
        except DB_ERRORS as exc:
            if not recover:
                raise
            raise self.fault(exc, "read a batch") from exc
        return bytes(row[0])

    def outbox_batch_rows(self, batch_id: int, *, recover: bool = True) -> list[Any]:
        """The batch's rows, decoded. Raises as :meth:`outbox_encoded` does."""
        try:
            return _unpack(self._db.execute(_BATCH_ENTRIES, (batch_id,)))
        except DB_ERRORS as exc:
            if not recover:
                raise
            raise self.fault(exc, "read a batch") from exc

    def outbox_named(self, batch_id: int, name: str, data: bytes) -> None:
        """Record the batch's file name and bytes, and commit (with everything before: the batch's rows come from
        it). If that fails, the batch has no name, and everything before is still applied."""
        self._apply_staged()
        keep = self._keep()
        try:
            cursor = self._execute("UPDATE batches SET name = ?, data = ? WHERE id = ?", (name, data, batch_id))
            if cursor.rowcount != 1:
                raise StateError(f"workspace state {self.path}: the batch for {name} is not in the outbox")
            self._commit_tail()
        except DB_ERRORS as exc:
            raise self._recover(exc, f"record the name of the batch {name}", keep) from exc

    def outbox_published(self, batch_id: int) -> None:
        """Forget a batch whose file landed, and commit. If that fails, the batch is still there, name and bytes."""
        self._apply_staged()
        keep = self._keep()
        try:
            self._execute("DELETE FROM outbox WHERE batch = ?", (batch_id,))
            self._execute("DELETE FROM batches WHERE id = ?", (batch_id,))
            self._commit_tail()
        except DB_ERRORS as exc:
            raise self._recover(exc, "clear a published batch", keep) from exc
