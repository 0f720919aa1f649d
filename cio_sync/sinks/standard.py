"""The Standard sink: what the workspace made of the data, as Parquet change logs.

Calls are applied to the workspace state and only real changes are emitted: a ``people`` row when a person is
created or their email, deleted or suppressed state changes, one ``attributes`` row per attribute whose value
changed or that was removed. Campaign, journey and message data comes in through :meth:`StandardSink.record`.
Files are version 4 of shared/SCHEMAS.md (``actions``, cio_sync's own table, version 1). What each call type does
to the workspace, and why, is in docs/standard.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, Final

import orjson
import pyarrow as pa
from fsspec import AbstractFileSystem

from cio_sync._errors import CioSyncError, Fenced, InvalidCall, InvalidRecord, InvalidRecords, UnknownPerson
from cio_sync._types import Batch
from cio_sync.buffer.seen import EXPIRE_EVERY, digest, window_seconds
from cio_sync.formats.parquet import ParquetFormat
from cio_sync.intake.calls import (
    JSON_OPTIONS,
    NUMBER_SIZE,
    Call,
    call_document,
    row_overhead,
    row_size,
    text_size,
)
from cio_sync.intake.records import check_record
from cio_sync.intake.values import shown
from cio_sync.publish.layout import standard_counter, standard_manifest_counter, standard_manifest_name, standard_name
from cio_sync.publish.publisher import SinkStats
from cio_sync.schemas.tables import STANDARD_TABLES, STANDARD_VERSION, STANDARD_VERSIONS
from cio_sync.sinks.base import check_int
from cio_sync.sinks.buffered import PublishingSink
from cio_sync.storage.writer import RetryPolicy, Writer, WrittenFile
from cio_sync.workspace import open_state
from cio_sync.workspace.outbox import SqliteOutbox
from cio_sync.workspace.state import DB_ERRORS, Definition, Person, WorkspaceState

log = logging.getLogger("cio_sync.sink")

#: One row a step produced: table, schema, values, approximate size, change time (µs).
Row = tuple[str, pa.Schema, tuple[Any, ...], int, int | None]

DEFAULT_MAX_ROWS: Final = 500_000
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
_PEOPLE: Final = STANDARD_TABLES["people"].schema
_ATTRIBUTES: Final = STANDARD_TABLES["attributes"].schema
#: Where a people row holds the person's internal id.
_PEOPLE_CIO_ID: Final = _PEOPLE.get_field_index("internal_customer_id")
#: What an attributes row costs in memory besides its text cells (see row_size): the tuple, workspace_id, the time.
_ATTRIBUTE_ROW: Final = row_overhead(len(_ATTRIBUTES)) + 2 * NUMBER_SIZE
_ATTR_OPTIONS: Final = JSON_OPTIONS | orjson.OPT_SORT_KEYS
#: Columns that do not make a definition different (they say when, not what).
_NOT_DEFINITION: Final = frozenset({"created_at", "updated_at", "version"})


def _is_text(value: str) -> bool:
    """Whether ``value`` is valid Unicode text (no lone surrogate), as SQLite and every file here need."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def attribute_text(value: Any, name: str) -> str | None:
    """An attribute's value as stored and emitted: strings as they are, anything else as JSON text (object keys
    sorted, so the same object is always the same text); ``None`` for null, which removes the attribute."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value, option=_ATTR_OPTIONS).decode()
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise InvalidCall(f"trait {name!r} cannot be written as JSON: {exc}", field="traits") from None


class StandardSink(PublishingSink):
    """Applies calls to a workspace and writes only what changed, plus campaign and message records, to Parquet.

    Files are named ``<table>_v<version>_<workspace_id>_<sequence>.parquet``; ``sequence`` strictly increases across
    syncs, restarts and deleted files, and never repeats between concurrent writers of one workspace (it is a
    durable counter under ``_cio_sync/`` that starts from the current time in microseconds).

    ``state`` is the path of the workspace's SQLite state file (people, their ids and attributes, definitions, and
    the outbox of rows not yet published), or ``None`` to keep it in memory for the sink's life. A missing file
    starts a new workspace; an empty one (0 bytes) raises :class:`~cio_sync.StateError`, as it may be a state
    whose content was lost, unless ``new_workspace=True`` says that an empty state file may start a new workspace.
    ``state`` may instead be a PostgreSQL URL (``"postgresql://user@host:port/db"``; needs the ``postgres`` extra):
    the same tables in one schema of that database, ``state_schema`` or the URL's ``?schema=NAME`` (default
    ``cio_sync_<workspace_id>``), created if missing; see docs/standard.md, "Workspace state in PostgreSQL".
    ``state_epoch`` takes ownership of the state with that epoch as soon as it is open, before anything of it is
    published (``state.take_ownership``: raises :class:`~cio_sync.Fenced` if a higher one is stored; from then on a
    commit after a later owner took a higher epoch raises ``Fenced``, and nothing of it is kept).
    ``commit_every`` is how many calls or records are applied between commits of the state (1: each one is durable
    before ``write`` returns; more is faster, and a crash may then lose up to that many, with their rows).

    ``dedupe_window`` (seconds or a ``timedelta``; ``None``, the default: off) drops a call whose ``messageId`` was
    applied within the window (a client's retry: ``stats.calls_duplicate`` counts them); the ids are kept in the
    state, in the same step as the call's changes, so a crash keeps both or neither.

    If the state cannot be written (a full disk, an I/O error), the call or record being applied is refused with
    :class:`~cio_sync.StorageError` naming the state file, and nothing of it is kept; the calls accepted before it
    are kept, and the sink goes on as soon as the disk takes writes again. A failed ``flush``, ``commit`` or
    ``close`` keeps everything and can be called again. (Only if SQLite cannot even restore the uncommitted calls
    are they undone with their rows, and the error says how many: with ``commit_every=1`` there are none.)
    Publishing works as for :class:`~cio_sync.AdvancedSink`: on :meth:`flush`, :meth:`close`, every
    ``flush_interval`` seconds (900 by default) and early at ``max_rows`` / ``max_bytes`` per table.

    It is built on the sink toolkit under :class:`~cio_sync.BufferedSink`, extended for the workspace: its rows are
    the state's changes (not routed calls), kept in the state's outbox instead of a spool.
    """

    _manifest_time = "changed_at"
    #: The workspace's state: people, ids, attributes, definitions and the outbox (opened by the sink).
    state: WorkspaceState

    def __init__(
        self,
        target: str | Writer,
        *,
        workspace_id: int,
        state: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        filesystem: AbstractFileSystem | None = None,
        flush_interval: float | None = 900.0,
        max_rows: int | None = DEFAULT_MAX_ROWS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        compression: str = "zstd",
        retry: RetryPolicy | None = None,
        on_publish: Callable[[WrittenFile], None] | None = None,
        commit_every: int = 1,
        max_buffer_bytes: int | None = 256 * 1024 * 1024,
        when_full: str = "spill",
        block_timeout: float | None = None,
        manifests: bool = True,
        keep_rejected: bool = False,
        new_workspace: bool = False,
        dedupe_window: float | timedelta | None = None,
        state_schema: str | None = None,
        state_epoch: int | None = None,
    ) -> None:
        self.workspace_id = check_int("workspace_id", workspace_id)
        self._dedupe_window = window_seconds(dedupe_window)
        #: Calls dropped as retries (see ``stats``), those of the open step, and when old ids were last forgotten.
        self._duplicates = self._duplicating = 0
        self._expired_at = 0.0
        self.commit_every = check_int("commit_every", commit_every, minimum=1)
        self._uncommitted = 0
        #: Calls accepted and ignored because their identifier is blocked (see ``stats``); those of the open step.
        self._blocked = self._blocking = 0
        self._floors: dict[str, int] = {}
        self._state_file, self._new_workspace, self._state_schema = state, new_workspace, state_schema
        self._state_epoch = None if state_epoch is None else check_int("state_epoch", state_epoch)
        self._open(
            target, format=ParquetFormat(compression=compression), storage_options=storage_options,
            filesystem=filesystem, flush_interval=flush_interval, max_rows=max_rows, max_bytes=max_bytes,
            max_buffer_bytes=max_buffer_bytes, when_full=when_full, block_timeout=block_timeout,
            manifests=manifests, retry=retry, on_publish=on_publish, keep_rejected=keep_rejected,
        )

    def __repr__(self) -> str:
        where = self.state.path or "memory"
        return (f"StandardSink({self.writer.url!r}, workspace_id={self.workspace_id}, state={where!r}, "
                f"closed={self.closed})")

    # -- the toolkit's hooks: the workspace state's outbox as the row store, files named by table version and
    # workspace, sequences from the current time in µs ----------------------------------------------------------

    def _open_store(self) -> SqliteOutbox:
        self.state = open_state(self._state_file, workspace_id=self.workspace_id,
                                new_workspace=self._new_workspace, schema=self._state_schema)
        try:
            if self._state_epoch is not None:
                self.state.take_ownership(self._state_epoch)
            self._outbox = SqliteOutbox(self.state)
        except BaseException:
            self.state.close()
            raise
        return self._outbox

    def _close_store(self) -> None:
        self.state.close()

    def _resume(self) -> None:
        self.state.on_recover = self._state_recovered
        # Batches cut before a crash or a failed close: publish them (under their recorded names) first.
        super()._resume()

    def _counter_key(self, table: str) -> str:
        return standard_counter(table, STANDARD_TABLES[table].version, self.workspace_id)

    def _position_floor(self) -> int:
        # A sequence starts from now in µs, so that a workspace whose counters were lost still names new files.
        return time.time_ns() // 1000

    def _file_name(self, table: str, position: int) -> str:
        return standard_name(table, STANDARD_TABLES[table].version, self.workspace_id, position)

    def _name_for(self, batch: Batch) -> str:
        # A batch of rows an earlier release left in the outbox keeps their version (WorkspaceState.row_version);
        # a new version's sequences start above every sequence of the versions before it, so that a table's files
        # sort by sequence across an upgrade.
        table, ws = batch.table, self.workspace_id
        version = self._outbox.version_of(batch)
        key = standard_counter(table, version, ws)
        earlier = [standard_counter(table, v, ws) for v in STANDARD_VERSIONS if v < version and table in
                   STANDARD_VERSIONS[v]]
        floor = max(self._position_floor(), self._after_earlier(key, earlier))
        return standard_name(table, version, ws, self._counters.claim(key, at_least=floor))

    def _after_earlier(self, key: str, earlier: list[str]) -> int:
        """The least value of counter ``key`` above every value the ``earlier`` counters (the same table's, or the
        manifests', in earlier versions) gave: read once per sink (the earlier versions' files are no longer written,
        but by the batches an upgrade found, which are named first)."""
        floor = self._floors.get(key)
        if floor is None:
            floor = self._floors[key] = max((self._counters.current(k) + 1 for k in earlier), default=1)
        return floor

    def _manifest_header(self) -> dict[str, Any]:
        return {"mode": "standard", "workspace_id": self.workspace_id, "schema_version": STANDARD_VERSION}

    def _manifest_counter(self) -> str:
        return standard_manifest_counter(STANDARD_VERSION, self.workspace_id)

    def _manifest_file(self, sequence: int) -> str:
        return standard_manifest_name(STANDARD_VERSION, self.workspace_id, sequence)

    def _manifest_name(self) -> str:
        key = self._manifest_counter()
        earlier = [standard_manifest_counter(v, self.workspace_id) for v in STANDARD_VERSIONS if v < STANDARD_VERSION]
        floor = max(self._position_floor(), self._after_earlier(key, earlier))
        return self._manifest_file(self._counters.claim(key, at_least=floor))

    @property
    def stats(self) -> SinkStats:
        """What the sink has done (see :class:`~cio_sync.SinkStats`); ``calls_blocked`` counts the calls accepted
        and ignored because they name a suppressed person's identifier."""
        return dataclasses.replace(self._publisher.stats(), calls_blocked=self._blocked,
                                   calls_duplicate=self._duplicates)

    def close(self) -> list[WrittenFile]:
        """Commit the state, publish what is buffered and stop the timer. Idempotent; after it, writes raise
        ``SinkClosed``. Raises :class:`~cio_sync.StorageError` if the state cannot be committed or storage fails
        for good: then nothing is dropped and ``close()`` may be called again."""
        if self._publisher.inherited:
            return []  # a child after fork: the buffers, the state file and its lock are the parent's
        if not self._publisher.closed:
            try:
                self.commit()
            except Fenced:
                # A later owner took the state: this sink may publish nothing more. Let it go (as a killed
                # process would: what it had not committed is the new owner's to redo), then say why.
                self._publisher.abandon()
                self.state.abandon()
                raise
        return super().close()

    # -- applying changes ----------------------------------------------------------------------------------------

    def _apply(self, produce: Callable[[], list[Row]]) -> int:
        """Run ``produce`` (which changes the state and returns the rows of the change) as one step: its state
        changes and rows are kept together or not at all. The commit that ``commit_every`` calls for is part of the
        step, so a failed commit refuses this step alone."""
        emitted, cut = self._step(produce)
        if cut:
            self._publisher.publish_ready()
        return emitted

    def _step(self, produce: Callable[[], list[Row]], position: int | None = None) -> tuple[int, bool]:
        """:meth:`_apply` but for publishing the batches the step cut: how many rows it emitted, and whether the
        caller should call ``publish_ready()`` (outside any lock of its own)."""
        publisher, state = self._publisher, self.state
        publisher.make_room()
        with publisher.lock:
            publisher.check_open()
            state.savepoint()
            rows = None
            self._blocking = self._duplicating = 0
            before = state.position if position is not None else None
            try:
                rows = produce()
                full = publisher.append_rows(rows)
                if position is not None:
                    state.set_position(position)  # after the step's changes: a failed step leaves it unchanged
                commit = self._uncommitted + 1 >= self.commit_every
                if commit:
                    state.commit()
                state.release_savepoint()
            except BaseException as exc:
                if before is not None:
                    state.set_position(before)  # the step is undone, its position with it
                error = state.rollback_savepoint(exc)
                if rows:
                    self._resync()  # the step's rows were counted as buffered
                if error is not None:
                    raise error from exc
                raise
            self._uncommitted = 0 if commit else self._uncommitted + 1
            self._blocked += self._blocking
            self._duplicates += self._duplicating
            if not self._duplicating:
                publisher.accept()
            try:
                cut = publisher.cut_tables(full)
            except CioSyncError as exc:
                # The call is kept; the rows stay open and are cut with the next ones, or by flush.
                log.warning("%s: could not cut a batch, the rows stay buffered: %s", publisher.label, exc)
                cut = True  # a table cut before the failure is published
        return len(rows), cut

    def _resync(self) -> None:
        """Count the outbox and the publisher's queue again from what the state holds (after a failure)."""
        self._outbox.resync()
        self._publisher.reconcile(self._outbox.holds)

    def _state_recovered(self, lost: bool) -> str:
        """Called by the state after it rolled a failed write back (WorkspaceState.on_recover); with ``lost``, the
        changes since the last commit were undone too: say how many calls that was."""
        self._resync()
        if not lost:
            return ""
        undone, self._uncommitted = self._uncommitted, 0
        if not undone:
            return ""
        return (f"; the state could not be restored either, so the {undone} call(s) or record(s) accepted since its "
                f"last commit (commit_every={self.commit_every}) were undone with their rows: send them again")

    def flush(self) -> list[WrittenFile]:
        """Commit the state and publish everything buffered now (see :meth:`BaseSink.flush`). Raises
        :class:`~cio_sync.StorageError` if the state cannot be committed: nothing is lost, call it again."""
        with self._publisher.lock:
            self.state.commit()
            self._uncommitted = 0
        return self._publisher.flush()

    def commit(self, *, position: int | None = None) -> None:
        """Make every change applied so far durable in the state (``flush`` and ``close`` do it too), with
        ``position`` as the state's position if given (see :meth:`write_at`). Raises
        :class:`~cio_sync.StorageError` if the state cannot be written: the changes stay applied, to be committed
        by the next try."""
        with self._publisher.lock:
            if position is not None:
                self.state.set_position(position)
            self.state.commit()
            self._uncommitted = 0

    def write(self, call: Any) -> int:
        """Apply one call (a dict, JSON str or JSON bytes) to the workspace; return how many rows it emitted.

        Raises :class:`~cio_sync.InvalidCall` if the call is bad (nothing changes).
        """
        parsed = self._parse(call)
        try:
            traits = self._trait_texts(parsed)
        except InvalidCall as exc:
            self._publisher.reject(call, exc)
            raise
        return self._apply(self._once(parsed, lambda: self._rules(parsed, traits)))

    def write_call(self, parsed: Call) -> int:
        """Apply a call already validated by :func:`parse_call` (used by :class:`~cio_sync.Pipeline`). A ``Call``
        made some other way has its values checked first: :class:`~cio_sync.InvalidCall` if one cannot be held."""
        emitted, cut = self._write_parsed(parsed)
        if cut:
            self._publisher.publish_ready()
        return emitted

    def check_call(self, parsed: Call) -> None:
        self._trait_texts(parsed)

    def write_deferred(self, parsed: Call) -> bool:
        return self._write_parsed(parsed)[1]

    def write_at(self, parsed: Call, position: int) -> int:
        """:meth:`write_call`, and the state's position (``state.position``) becomes ``position`` in the same
        step: whichever commit makes the call's changes durable stores the position with them, so a consumer of a
        log (a NATS worker: ``position`` is the call's stream sequence) knows after a crash exactly which calls the
        state holds. A refused call changes neither (store its position with :meth:`commit`)."""
        emitted, cut = self._write_parsed(parsed, position)
        if cut:
            self._publisher.publish_ready()
        return emitted

    def _write_parsed(self, parsed: Call, position: int | None = None) -> tuple[int, bool]:
        """:meth:`write_call` but for publishing what it cut (see :meth:`_step`)."""
        if parsed.row is None and parsed.document is None:  # not from parse_call, which leaves one of them
            try:
                call_document(parsed)
            except InvalidCall as exc:
                self._publisher.reject(parsed.data, exc)
                raise
        return self._step(self._once(parsed, lambda: self._rules(parsed, self._trait_texts(parsed))), position)

    def _once(self, parsed: Call, produce: Callable[[], list[Row]]) -> Callable[[], list[Row]]:
        """``produce`` within the dedupe window: nothing for a call whose ``messageId`` was applied within it; else
        the call's rows, its id kept in the same step (so a crash keeps both or neither)."""
        window = self._dedupe_window
        if window is None:
            return produce

        def step() -> list[Row]:
            key, now = digest(parsed.message_id), time.time()
            if self.state.message_id_seen(key, now - window):
                self._duplicating = 1
                return []
            rows = produce()
            self.state.note_message_id(key, now)
            if now - self._expired_at >= EXPIRE_EVERY:
                self.state.expire_message_ids(now - window)
                self._expired_at = now
            return rows

        return step

    @staticmethod
    def _trait_texts(call: Call) -> dict[str, str | None]:
        """The call's traits as the value texts they would be stored as (computed once per call, before its step)."""
        traits = call.data.get("traits") if call.type == "identify" else None
        if not traits:
            return {}
        texts: dict[str, str | None] = {}
        dumps = orjson.dumps
        try:
            for key, value in traits.items():
                # Strings and nulls are their own text; only the rest goes through JSON (attribute_text, inlined).
                texts[key if key.__class__ is str else str(key)] = (
                    value if value is None or value.__class__ is str else dumps(value, option=_ATTR_OPTIONS).decode())
        except (orjson.JSONEncodeError, TypeError):
            return {str(name): attribute_text(value, str(name)) for name, value in traits.items()}  # names the trait
        return texts

    def _rules(self, call: Call, traits: dict[str, str | None]) -> list[Row]:
        if call.type == "identify":
            return self._identify(call, traits)
        if call.type == "alias":
            return self._alias(call)
        # track, page, screen and group are events and relations: they change no person (docs/standard.md).
        return []

    # -- rows ----------------------------------------------------------------------------------------------------

    def _people_row(self, person: Person) -> Row:
        row = (self.workspace_id, person.id, person.cio_id, person.deleted, person.suppressed, person.created_at,
               person.updated_at, person.email)
        return "people", _PEOPLE, row, row_size(row), person.updated_at

    def _touch(self, person: Person) -> int:
        """A change time for ``person``: now, and always after its previous change."""
        person.updated_at = max(self.state.clock(), person.updated_at + 1)
        return person.updated_at

    def _set_traits(self, person: Person, traits: Mapping[str, str | None], at: int, *,
                    only_new: bool = False) -> list[Row]:
        """Set the traits (value texts; ``None`` removes) that differ from the person's attributes; with
        ``only_new``, only those the person does not have. Returns an ``attributes`` row per change."""
        attrs = self.state.attrs(person)
        get = attrs.get
        changes: list[tuple[str, str | None]]
        if only_new:
            changes = [(name, text) for name, text in traits.items() if text is not None and name not in attrs]
        else:
            # A null text equals a missing attribute, so removing one that is not there is no change.
            changes = [(name, text) for name, text in traits.items() if get(name) != text]
        if not changes:
            return []
        self.state.change_attrs(person, changes)
        workspace_id, cio_id = self.workspace_id, person.cio_id
        # What row_size() would say, with the cells every row of this person shares counted once.
        base = _ATTRIBUTE_ROW + text_size(cio_id)
        return [("attributes", _ATTRIBUTES, (workspace_id, cio_id, name, text, at),
                 base + text_size(name) + (text_size(text) if text is not None else 0), at)
                for name, text in changes]

    def _person_for(self, user_id: str) -> tuple[Person | None, list[Row]]:
        """The live person known as ``user_id``, made if there is none (with their people row); ``None`` if the
        identifier is blocked (its person was suppressed): the call is then ignored and counted in the stats."""
        person = self.state.person(user_id)
        if person is None:
            if self.state.blocked(user_id) is not None:
                self._blocking += 1
                return None, []
            at = self.state.clock()
            person = self.state.create_person(user_id, at)
            return person, [self._people_row(person)]
        if person.suppressed:  # suppressed by an earlier release, which kept the profile
            self._blocking += 1
            return None, []
        return person, []

    def _merge_anonymous(self, person: Person, anonymous_id: str, at: int, exclude: Iterable[str] = ()) -> list[Row]:
        """Give ``person`` the traits kept for ``anonymous_id`` that it does not have, and link the id to it."""
        owner, kept = self.state.anonymous(anonymous_id)
        if owner == person.cio_id and not kept:
            return []
        skip = set(exclude)
        rows = self._set_traits(person, {k: v for k, v in kept.items() if k not in skip}, at, only_new=True)
        self.state.save_anonymous(anonymous_id, person.cio_id, {})
        return rows

    def _identify(self, call: Call, traits: dict[str, str | None]) -> list[Row]:
        data = call.data
        user_id, anonymous_id = data.get("userId"), data.get("anonymousId")
        if not user_id:
            assert anonymous_id
            owner, kept = self.state.anonymous(anonymous_id)
            person = self.state.person_by_cio_id(owner) if owner else None
            if person is None or person.deleted:
                # Anonymous: keep the traits until the profile is identified (nothing to emit yet).
                merged = {**kept, **traits}
                self.state.save_anonymous(anonymous_id, None, {k: v for k, v in merged.items() if v is not None})
                return []
            if person.suppressed:
                self._blocking += 1
                return []
            return self._sync_email(person, self._set_traits(person, traits, self.state.clock()))
        person, rows = self._person_for(user_id)
        if person is None:
            return []
        at = self.state.clock()
        if anonymous_id:
            rows += self._merge_anonymous(person, anonymous_id, at, exclude=traits)
        rows += self._set_traits(person, traits, at)
        return self._sync_email(person, rows)

    def _sync_email(self, person: Person, rows: list[Row]) -> list[Row]:
        """``email_addr`` follows the person's ``email`` attribute; when it changes the people row is emitted (the
        row of a person created in this same step is refreshed instead, so a new person has one people row)."""
        email = self.state.attrs(person).get("email")
        if email == person.email:
            return rows
        person.email = email
        self._touch(person)
        self.state.save_person(person)
        created = [i for i, r in enumerate(rows) if r[0] == "people" and r[2][_PEOPLE_CIO_ID] == person.cio_id]
        if created:
            rows[created[0]] = self._people_row(person)
        else:
            rows.append(self._people_row(person))
        return rows

    def _alias(self, call: Call) -> list[Row]:
        user_id, previous_id = call.data["userId"], call.data["previousId"]
        target = self.state.person(user_id)
        if (target is None and self.state.blocked(user_id) is not None) or (target is not None and target.suppressed):
            self._blocking += 1  # nothing joins a blocked identifier
            return []
        source = self.state.person(previous_id) if previous_id != user_id else None
        if source is not None and target is None:
            # The person known as previousId is now known as userId: same person, new external id.
            self.state.forget_id(previous_id)
            source.id = user_id
            self._touch(source)
            self.state.save_person(source)
            return [self._people_row(source)]
        if source is not None and target is not None:
            return self._merge_people(target, source)
        target, rows = self._person_for(user_id)
        assert target is not None  # not blocked: checked above
        rows += self._merge_anonymous(target, previous_id, self.state.clock())
        return self._sync_email(target, rows)

    def _merge_people(self, primary: Person, secondary: Person) -> list[Row]:
        """Merge ``secondary`` into ``primary``: primary keeps its values and gains the attributes it lacks; the
        secondary person is deleted."""
        at = self.state.clock()
        rows = self._set_traits(primary, dict(self.state.attrs(secondary)), at, only_new=True)
        rows = self._sync_email(primary, rows)
        self._end_profile(secondary)
        rows.append(self._people_row(secondary))
        return rows

    def _end_profile(self, person: Person, *, suppressed: bool | None = None) -> None:
        """Delete ``person``'s profile (merged away, deleted or suppressed): their rows keep their ids, not their
        email address (shared/SCHEMAS.md, person lifecycle)."""
        person.deleted = True
        person.email = None
        if suppressed is not None:
            person.suppressed = suppressed
        self._touch(person)
        self.state.save_person(person)

    # -- the person lifecycle ------------------------------------------------------------------------------------

    def _find(self, external_id: str | None, cio_id: str | None, *, blocked: bool = False) -> Person:
        """The live person with this id or internal id; with ``blocked``, the suppressed person who blocks it."""
        if (external_id is None) == (cio_id is None):
            raise ValueError("name the person by exactly one of id (their external id) or cio_id")
        name = external_id if external_id is not None else cio_id
        which = "id" if external_id is not None else "cio_id"
        if isinstance(name, str) and not name.isascii() and not _is_text(name):
            # The state cannot even look it up; no person can have it (calls with such ids are refused).
            raise UnknownPerson(f"no person with {which} {shown(name)} in workspace {self.workspace_id}: it is not "
                                "valid Unicode text")
        if blocked:
            person = (self.state.blocked(external_id) if external_id is not None else
                      self.state.person_by_cio_id(str(cio_id)))
            if person is None or not person.suppressed:
                raise UnknownPerson(f"no suppressed person with {which} {shown(name)} in workspace "
                                    f"{self.workspace_id}")
            return person
        person = self.state.person(external_id) if external_id is not None else self.state.person_by_cio_id(
            str(cio_id))
        if person is None or person.deleted:
            raise UnknownPerson(f"no person with {which} {shown(name)} in workspace {self.workspace_id}")
        return person

    def _lifecycle(self, external_id: str | None, cio_id: str | None, *, suppressed: bool | None) -> int:
        def change() -> list[Row]:
            if suppressed is False:
                person = self._find(external_id, cio_id, blocked=True)
            else:
                try:
                    person = self._find(external_id, cio_id)
                except UnknownPerson:
                    if suppressed and self._is_blocked(external_id, cio_id):
                        return []  # suppressed already
                    raise
                if suppressed:
                    self.state.block(person)
            self._end_profile(person, suppressed=suppressed)
            return [self._people_row(person)]

        return self._apply(change)

    def _is_blocked(self, external_id: str | None, cio_id: str | None) -> bool:
        try:
            self._find(external_id, cio_id, blocked=True)
        except UnknownPerson:
            return False
        return True

    def delete_person(self, id: str | None = None, *, cio_id: str | None = None) -> int:
        """Delete a person (by external ``id`` or ``cio_id``): emits their ``people`` row with ``deleted`` true and
        ``email_addr`` null. A later identify with the same id creates a new person, with a new internal id. Raises
        :class:`~cio_sync.UnknownPerson` if there is no such person."""
        return self._lifecycle(id, cio_id, suppressed=None)

    def suppress_person(self, id: str | None = None, *, cio_id: str | None = None) -> int:
        """Suppress a person, as Customer.io does: their profile is deleted and their identifier blocked. Emits their
        ``people`` row with ``deleted`` and ``suppressed`` true and ``email_addr`` null. Calls that name a blocked
        identifier (identify, alias) are accepted and ignored, as Customer.io ignores them, and counted in
        ``stats.calls_blocked``, until :meth:`unsuppress_person`. Raises :class:`~cio_sync.UnknownPerson`."""
        return self._lifecycle(id, cio_id, suppressed=True)

    def unsuppress_person(self, id: str | None = None, *, cio_id: str | None = None) -> int:
        """Free a suppressed person's identifier: emits their ``people`` row with ``suppressed`` false (still
        ``deleted``: the profile does not come back). The next identify with the id creates a new person, with a
        new internal id. Raises :class:`~cio_sync.UnknownPerson` if no suppressed person has that id."""
        return self._lifecycle(id, cio_id, suppressed=False)

    def person(self, id: str | None = None, *, cio_id: str | None = None) -> dict[str, Any]:
        """A person as the workspace knows them now: ids, email, flags and attributes (values as stored)."""
        with self._publisher.lock:
            try:
                person = self._find(id, cio_id)
                attributes = dict(self.state.attrs(person))
            except DB_ERRORS as exc:
                raise self.state.fault(exc, "read a person") from exc
            return {"cio_id": person.cio_id, "id": person.id, "email": person.email,
                    "suppressed": person.suppressed, "attributes": attributes}

    # -- records -------------------------------------------------------------------------------------------------

    def record(self, table: str, row: Mapping[str, Any]) -> int:
        """Record one row of a campaign, journey or message table; return how many rows it emitted (0 or 1).

        Tables: campaigns, actions, broadcasts, subjects, outputs, deliveries, delivery_contents, metrics, with
        the column names of version 4 (docs/tables/; version 1's names are taken, with a DeprecationWarning, in this
        release only). The row is checked against the table's fixed schema: an unknown table, an unknown or missing
        column, or a value of the wrong type raises :class:`~cio_sync.InvalidRecord` naming the table and column.
        Subjects and deliveries name their person by ``internal_customer_id`` or by ``customer_id`` (the id the
        person was sent with), which the sink resolves to the internal id and does not write: an unknown one is an
        :class:`~cio_sync.InvalidRecord`. ``created_at``/``updated_at`` default to now, ``seq_num`` to the sink's
        next number and ``topic_names`` to an empty list. Campaigns, actions and broadcasts emit a row only when the
        definition changed, with ``version`` going up by one.
        """
        try:
            values = check_record(table, row)
            schema = STANDARD_TABLES[table].schema
            return self._apply(lambda: self._record_rows(table, schema, values))
        except InvalidRecord as exc:
            self._publisher.reject({"table": table, "row": row}, exc)
            raise

    def record_many(self, table: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Record many rows of one table; every valid row is kept, and if some were not,
        :class:`~cio_sync.InvalidRecords` lists them (each error with its ``index``) after the others are in."""
        errors: list[InvalidRecord] = []
        emitted = 0
        for index, row in enumerate(rows):
            try:
                emitted += self.record(table, row)
            except InvalidRecord as exc:
                exc.index = index
                errors.append(exc)
        if errors:
            raise InvalidRecords(errors, emitted=emitted)
        return emitted

    def _record_rows(self, table: str, schema: pa.Schema, values: dict[str, Any]) -> list[Row]:
        state = self.state
        now = state.clock()
        if "customer_id" in values:
            self._resolve_person(table, values)
        for column in ("created_at", "updated_at"):
            if column in values and values[column] is None:
                values[column] = now
        if "seq_num" in values and values["seq_num"] is None:
            values["seq_num"] = state.next_seq_num()
        spec = STANDARD_TABLES[table]
        if spec.definition:
            key_column = spec.key[0]
            what = {k: v for k, v in values.items() if k not in _NOT_DEFINITION}
            digest = hashlib.sha256(orjson.dumps(what, option=orjson.OPT_SORT_KEYS)).hexdigest()
            key = values[key_column]
            known = state.definition(table, key)
            if known is not None and known.digest == digest:
                return []
            version = known.version + 1 if known is not None else 1
            created = known.created_at if known is not None else values["created_at"]
            state.save_definition(table, key, Definition(digest, version, created))
            values["created_at"] = created
            if "version" in schema.names:
                values["version"] = version
        row = tuple(self.workspace_id if name == "workspace_id" else values[name] for name in schema.names)
        return [(table, schema, row, row_size(row), now)]

    def _resolve_person(self, table: str, values: dict[str, Any]) -> None:
        """Fill ``internal_customer_id`` from ``customer_id`` (the person's id as sent), which is not written."""
        external = values.pop("customer_id")
        if external is None:
            return
        person = self.state.person(external) if _is_text(external) else None
        if person is None:
            raise InvalidRecord(f"names no person of workspace {self.workspace_id} ({shown(external)}); give "
                                "internal_customer_id, or identify the person first", table=table,
                                column="customer_id")
        internal = values.get("internal_customer_id")
        if internal is not None and internal != person.cio_id:
            raise InvalidRecord(f"is {shown(external)}, whose internal id is {person.cio_id}, not the row's "
                                f"internal_customer_id {shown(internal)}", table=table, column="customer_id")
        values["internal_customer_id"] = person.cio_id
