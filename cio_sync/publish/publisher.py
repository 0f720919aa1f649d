"""The rolling buffer shared by every sink: rows accumulate per table, batches are cut and published in order.

A sink hands rows (tuples in its table's fixed column order) to a :class:`Publisher`, which
- keeps them in a :class:`RowStore` (in memory by default; the Standard sink's store is its workspace state's
  transactional outbox, so a state change and its rows are committed together);
- cuts a table's rows into a batch on ``flush()``, on ``close()``, every ``flush_interval`` seconds from a
  background thread, and early when the table reaches ``max_rows`` rows or ``max_bytes`` bytes;
- publishes batches in the order they were cut: each is encoded once and named once (the name comes from the
  sink's durable counter), the name and bytes are kept by the store before the upload, and the batch is retried
  under that name with those bytes until it lands, so an ambiguous failure, or a crash with a durable store, can
  never make two files of the same rows;
- keeps statistics about what is buffered and what was published.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import pyarrow as pa

from cio_sync._errors import BufferFull, CioSyncError, ConfigError, PublishConflict, SinkClosed
from cio_sync._types import Batch, BatchState, Filled, Row, held_size
from cio_sync.buffer.rows import MemoryRowStore, RowStore, rows_to_table
from cio_sync.buffer.seen import MessageIdWindow
from cio_sync.formats.base import Format
from cio_sync.publish.dead_letters import batch_letter, dead_letter_name, kept_size, rejected_letter, rejected_line
from cio_sync.publish.manifests import ManifestSpec, manifest_document
from cio_sync.storage.writer import Writer, WrittenFile

log = logging.getLogger("cio_sync.sink")


#: Published files remembered for the next ``flush()`` to return.
_MAX_UNREPORTED = 100_000


#: Rejected calls kept in memory for the dead letters between two syncs (more are counted, not kept).
_MAX_REJECTED_KEPT = 10_000


#: The share of ``max_buffer_bytes`` that rejected calls kept for the dead letters may take (without a budget:
#: ``_MAX_REJECTED_BYTES``), so that a flood of bad calls never leaves no room for good ones.
_REJECTED_SHARE = 4


#: While storage fails, a table's rows are cut into a batch at the budget only if they hold at least this share of
#: ``max_buffer_bytes``.
_CUT_SHARE = 16


#: A batch holds at most this share of ``max_buffer_bytes``.
_BATCH_SHARE = 4


#: The longest pause between two early publishes while storage fails (seconds).
_MAX_RETRY_PAUSE = 30.0


_MAX_REJECTED_BYTES = 64 * 1024 * 1024


#: New names tried for one batch whose names were taken by files that are not its own.
_MAX_RENAMES = 20


@dataclass(frozen=True)
class SinkStats:
    """A snapshot of what a sink has done. Readable in a notebook; cheap to take."""

    calls_accepted: int
    calls_rejected: int
    rows_buffered: int
    bytes_buffered: int
    batches_pending: int
    files_published: int
    rows_published: int
    bytes_published: int
    last_publish_at: datetime | None
    oldest_buffered_age: float | None
    last_error: str | None
    rows_dead_lettered: int = 0
    #: Bytes of rows held in memory, buffered or waiting to be published (what ``max_buffer_bytes`` bounds).
    bytes_in_memory: int = 0
    #: Of the calls accepted, those that changed nothing because they name a blocked identifier (a suppressed
    #: person's, in Standard mode: Customer.io ignores them too).
    calls_blocked: int = 0
    #: Calls dropped because a call with their ``messageId`` was taken within the dedupe window (a client's retry);
    #: not counted as accepted.
    calls_duplicate: int = 0


@dataclass(eq=False)
class _Counts:
    accepted: int = 0
    rejected: int = 0
    files: int = 0
    rows: int = 0
    bytes: int = 0
    last_publish_at: datetime | None = None
    last_error: str | None = None
    dead_letters: int = 0
    duplicates: int = 0


_OPEN: weakref.WeakSet[Publisher] = weakref.WeakSet()


@atexit.register
def _flush_open_publishers() -> None:
    """At interpreter exit, publish what sinks that were never closed still buffer, rather than drop it."""
    for publisher in list(_OPEN):
        try:
            publisher.close()
        except Exception:
            log.exception("could not publish buffered rows of %s at exit", publisher.label)


def _after_fork_in_child() -> None:
    """In the child of ``os.fork()``: every sink open in the parent belongs to the parent. The child holds a copy of
    its buffers, its pending batches, its spool and state files and its locks; publishing or committing any of it
    would publish the parent's rows twice, or change the parent's files under it. So the child never uses them:
    those sinks refuse every call, their ``close()`` does nothing, and the exit handler forgets them."""
    for publisher in list(_OPEN):
        publisher._inherit()
    _OPEN.clear()


if hasattr(os, "register_at_fork"):  # POSIX: where there is fork, there is this
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Inherited:
    """The lock of a sink in a process that inherited it through ``fork``: taking it refuses, with the reason.
    (It also stands in for a lock another thread of the parent may have held at the fork: the child would wait
    for it forever.)"""

    def __init__(self, message: str) -> None:
        self.message = message

    def __enter__(self) -> bool:
        raise SinkClosed(self.message)

    def __exit__(self, *exc: object) -> None:  # pragma: no cover - __enter__ never succeeds
        return None


WHEN_FULL: Final = ("block", "spill")




class Publisher:
    """Buffers rows per table in a :class:`RowStore` and publishes them as files through ``format`` and ``writer``."""

    def __init__(
        self,
        *,
        label: str,
        writer: Writer,
        format: Format,
        name_for: Callable[[Batch], str],
        flush_interval: float | None,
        max_rows: int | None,
        max_bytes: int | None,
        store: RowStore | None = None,
        on_publish: Callable[[WrittenFile], None] | None = None,
        max_buffer_bytes: int | None = None,
        when_full: str = "block",
        block_timeout: float | None = None,
        manifest: ManifestSpec | None = None,
        keep_rejected: bool = False,
        dedupe: MessageIdWindow | None = None,
        message_ids_of: Callable[[Batch], Iterable[str]] | None = None,
    ) -> None:
        if flush_interval is not None and (
            isinstance(flush_interval, bool) or not isinstance(flush_interval, int | float)
            or not math.isfinite(flush_interval) or flush_interval <= 0
        ):
            raise ConfigError(f"flush_interval must be a positive number of seconds or None; got {flush_interval!r}")
        for name, value in (("max_rows", max_rows), ("max_bytes", max_bytes), ("max_buffer_bytes", max_buffer_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an integer of at least 1, or None; got {value!r}")
        if when_full not in WHEN_FULL:
            raise ConfigError(f"when_full must be one of {', '.join(WHEN_FULL)}; got {when_full!r}")
        if block_timeout is not None and not (isinstance(block_timeout, int | float) and block_timeout >= 0):
            raise ConfigError(f"block_timeout must be seconds >= 0 or None; got {block_timeout!r}")
        self.label = label
        self.writer = writer
        self.format = format
        self._name_for = name_for
        self.flush_interval = flush_interval
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_buffer_bytes = max_buffer_bytes
        #: A table's rows are cut into a batch at ``max_bytes``, and at a quarter of the budget: encoding a batch
        #: takes about its size again for a moment, so a batch of the whole budget would double the memory.
        limits = [n for n in (max_bytes, max_buffer_bytes and max_buffer_bytes // _BATCH_SHARE) if n]
        self._batch_bytes: int | None = min(limits) if limits else None
        self.when_full = when_full
        self.block_timeout = block_timeout
        self.manifest = manifest
        self.keep_rejected = keep_rejected
        #: Rejected calls kept for the dead letters, each as its line of JSON, and the bytes they take (counted in
        #: ``_memory``); how many more were refused but not kept.
        self._rejected: list[str] = []
        self._rejected_bytes = 0
        self._rejected_dropped = 0
        self.store: RowStore = store if store is not None else MemoryRowStore()
        self._pending: deque[Batch] = deque(self.store.pending())
        for batch in self._pending:
            batch.held = held_size(batch)
        #: The dedupe window (``None``: none): ids of calls taken are held while their rows wait, and kept in the
        #: window's file before a publishing round names or uploads anything (see :mod:`cio_sync.buffer.seen`).
        self.dedupe = dedupe
        if dedupe is not None:
            if message_ids_of is None:
                raise ConfigError("a dedupe window needs message_ids_of, to read back the ids of recovered rows")
            for batch in self._pending:
                # Rows recovered from the spool: their calls were taken before the crash. A batch recovered as its
                # encoded file was named, so its ids were kept before that.
                if batch.data is not None:
                    dedupe.hold(message_ids_of(batch))
        #: What memory holds, as the budget counts it: rows buffered, batches waiting (their rows or their encoded
        #: file), rejected calls kept. Raised by each row's size as it comes (an upper bound), and counted again
        #: exactly (:meth:`_recount`) when that reaches the budget and at each cut.
        self._memory = sum(b.held for b in self._pending)
        self._counts = _Counts()
        self._on_publish = on_publish
        self._unreported: deque[WrittenFile] = deque(maxlen=_MAX_UNREPORTED)
        # ``lock`` guards the store, the queue and the counts; sinks hold it to make a state change and its rows
        # one step. ``_publish_lock`` lets one thread at a time publish, in order.
        self.lock: AbstractContextManager[Any] = threading.RLock()
        self._publish_lock: AbstractContextManager[Any] = threading.RLock()
        self._closed = False
        self._closing = False
        #: The process that opened the sink; in another one (a child after fork) the sink is not usable.
        self._pid = os.getpid()
        self._inherited: str | None = None  # why it is not usable here, in a child
        #: Whether the last publish of waiting batches failed (storage is not taking files), and when an early
        #: publish may try again.
        self._failing = False
        self._retry_pause = 0.0
        self._retry_at = 0.0
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        if max_buffer_bytes is not None and self._memory >= max_buffer_bytes and when_full == "spill":
            self._spill()  # batches recovered from the spool wait on disk, not in memory
        if flush_interval is not None:
            self._timer = threading.Thread(target=self._run_timer, name=f"cio_sync-flush-{label}", daemon=True)
            self._timer.start()
        _OPEN.add(self)

    # -- intake --------------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the sink takes no more calls: it was closed, or this process inherited it through fork."""
        return self._closed or self._inherited is not None

    @property
    def inherited(self) -> bool:
        """Whether this process is a child that inherited the sink through ``os.fork()`` (see :meth:`_inherit`)."""
        return self._inherited is not None

    def _inherit(self) -> None:
        """Mark the sink as the parent's, in a child just forked: every use raises :class:`SinkClosed` saying so
        (whatever takes its lock: writes, flushes, stats, a sink's own state), ``close()`` does nothing, and no
        thread or exit handler of the child publishes its rows."""
        self._inherited = (f"{self.label} was opened by process {self._pid} before a fork; this process "
                           f"({os.getpid()}) cannot use it: open a new sink in the child (on its own spool and state)")
        self.lock = self._publish_lock = _Inherited(self._inherited)
        self._timer = None  # threads do not survive a fork

    def check_open(self) -> None:
        if self._inherited is not None:
            raise SinkClosed(self._inherited)
        if self._closed or self._closing:
            raise SinkClosed(f"{self.label} is closed; create a new sink to write more")

    def reject(self, given: Any = None, error: BaseException | None = None) -> None:
        """Count a rejected call or record; with ``keep_rejected``, keep it and the reason for the dead letters.

        What is kept counts in the memory budget: at most a quarter of ``max_buffer_bytes`` (64 MiB without a
        budget) and :data:`MAX_REJECTED_INPUT` characters of any one input; past that a rejected call is only
        counted, and the next dead-letter file says how many were not kept."""
        limit = _MAX_REJECTED_BYTES if self.max_buffer_bytes is None else self.max_buffer_bytes // _REJECTED_SHARE
        with self.lock:
            self._counts.rejected += 1
            if not self.keep_rejected or error is None:
                return
            if self._rejected_dropped:  # full since one was not kept: until the next sync publishes them
                self._rejected_dropped += 1
                return
        line = rejected_line(given, error)  # outside the lock: writing a large input as JSON takes time
        size = kept_size(line)
        with self.lock:
            if len(self._rejected) >= _MAX_REJECTED_KEPT or self._rejected_bytes + size > limit:
                self._rejected_dropped += 1
                return
            self._rejected.append(line)
            self._rejected_bytes += size
            self._memory += size

    def _publish_rejected(self) -> None:
        with self.lock:
            rejected, self._rejected = self._rejected, []
            dropped, self._rejected_dropped = self._rejected_dropped, 0
        if not rejected and not dropped:
            return
        name = dead_letter_name("rejected")
        data, lines = rejected_letter(rejected, dropped, _MAX_REJECTED_KEPT)
        try:
            self.writer.publish(name, data, table="_rejected", rows=lines)
        except CioSyncError:
            with self.lock:
                self._rejected = rejected + self._rejected
                self._rejected_dropped += dropped
            raise
        freed = sum(map(kept_size, rejected))
        with self.lock:
            self._rejected_bytes -= freed
            self._memory -= freed

    def accept(self) -> None:
        """Count one call or record accepted (whether or not it produced rows)."""
        with self.lock:
            self._counts.accepted += 1

    def make_room(self) -> None:
        """Before accepting a call: if the memory budget is used up, publish early; if storage does not take the
        files, spill them to the spool (``when_full="spill"``) or wait for storage (``"block"``, meanwhile
        holding waiting batches as their encoded files, which take less than their rows), and after
        ``block_timeout`` raise :class:`BufferFull` rather than drop anything."""
        budget = self.max_buffer_bytes
        if budget is None or self._memory < budget:
            return
        with self.lock:
            self._recount()  # the sizes added per row are upper bounds; converted rows take less
        if self._memory < budget:
            return
        with self.lock:
            # While storage fails, a table's rows are cut only once they are worth a file of their own: cutting
            # each time the budget fills would make ever smaller batches, as encoded ones take more of it.
            least = budget // _CUT_SHARE if self._failing else 0
            for table, buffered in self.store.buffered().items():
                if buffered.nbytes >= least:
                    self._cut(table)
        self.publish_ready()
        self._publish_rejected_quietly()
        if self._memory < budget:
            return
        self._spill() if self.when_full == "spill" else self._compact()
        if self._memory < budget:
            return
        deadline = None if self.block_timeout is None else time.monotonic() + self.block_timeout
        pause = 0.05
        while self._memory >= budget:
            self.check_open()
            if deadline is not None and time.monotonic() >= deadline:
                raise BufferFull(
                    f"{self.label}: {self._memory:,} bytes wait to be published (max_buffer_bytes="
                    f"{budget:,}) and storage is not taking files: {self._counts.last_error}"
                )
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, 5.0)
            self.publish_ready(retry=True)
            self._publish_rejected_quietly()
            self._spill() if self.when_full == "spill" else self._compact()

    def _publish_rejected_quietly(self) -> None:
        try:
            self._publish_rejected()
        except CioSyncError as exc:
            log.warning("%s: could not publish rejected calls, will retry on the next flush: %s", self.label, exc)

    def _hold(self, batch: Batch) -> None:
        """Count again what ``batch`` holds in memory after its rows or bytes changed (under ``lock``)."""
        held = held_size(batch)
        self._memory += held - batch.held
        batch.held = held

    def _recount(self) -> None:
        """Count exactly what memory holds (under ``lock``): buffered rows (at their Arrow size once converted),
        what each waiting batch holds, and the rejected calls kept."""
        self._memory = (sum(b.nbytes for b in self.store.buffered().values())
                        + sum(b.held for b in self._pending) + self._rejected_bytes)

    def _spill(self) -> None:
        """Let go of what waiting batches hold in memory where the store can read it back (the spool)."""
        with self._publish_lock, self.lock:  # never under a batch that is being published
            for batch in self._pending:
                if batch.held:
                    self.store.release(batch)
                    self._hold(batch)

    def _compact(self) -> None:
        """Encode the waiting batches that still hold rows, so that each holds its file instead (a fraction of
        the rows' size), until memory is under the budget. A batch that cannot be encoded keeps its rows; its
        publish sends them to the dead letters."""
        budget = self.max_buffer_bytes
        with self._publish_lock:
            with self.lock:
                waiting = [b for b in self._pending if b.encoded is None and b.data is not None]
            for batch in waiting:
                if budget is not None and self._memory < budget:
                    return
                try:
                    assert batch.schema is not None
                    encoded = self.format.encode(rows_to_table(batch.data, batch.schema))
                except Exception:
                    continue
                if len(encoded) >= batch.nbytes:
                    continue  # a few rows: the file (its footer, its schema) takes more than they do
                with self.lock:
                    batch.encoded, batch.data = encoded, None
                    self._hold(batch)

    def append_rows(self, rows: list[tuple[str, pa.Schema, tuple[Any, ...], int, int | None]]) -> set[str]:
        """Buffer the rows one call or record produced (table, schema, row, size, time); return the tables they
        filled. Cut those with :meth:`cut_tables` once the call's step is kept, so that a step undone after this
        never leaves its rows in a batch, and a durable store keeps a call's rows whole."""
        with self.lock:
            self.check_open()
            full: set[str] = set()
            append, max_rows, max_bytes = self.store.append, self.max_rows, self._batch_bytes
            added = 0
            for table, schema, row, size, at in rows:
                count, nbytes, _ = append(table, schema, row, size, at)
                if (max_rows is not None and count >= max_rows) or (max_bytes is not None and nbytes >= max_bytes):
                    full.add(table)
                added += size
            self._memory += added
            return full

    def cut_tables(self, tables: set[str]) -> bool:
        """Cut these tables' rows into batches. Returns True if something was cut: then call :meth:`publish_ready`
        once, outside any transaction of your own."""
        if not tables:
            return False
        with self.lock:
            for table in tables:
                self._cut(table)
        return True

    def add(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int, at: int | None = None, *,
            message_id: str | None = None) -> bool:
        """Buffer one row of one accepted call, publishing early if its table is full. With a dedupe window and
        ``message_id``: if the window has the id, nothing is buffered and ``False`` is returned (a duplicate)."""
        if self.max_buffer_bytes is not None and self._memory >= self.max_buffer_bytes:
            self.make_room()
        with self.lock:
            if self._closed or self._closing:
                self.check_open()
            if self._duplicate(message_id):
                return False
            full = self._accepted(table, self.store.append(table, schema, row, size, at), size)
            self._hold_id(message_id)
        if full:
            self.publish_ready()
        return True

    def _duplicate(self, message_id: str | None) -> bool:
        """Under ``lock``: whether the dedupe window has ``message_id`` (then the call is counted as a duplicate)."""
        if self.dedupe is None or message_id is None or not self.dedupe.seen(message_id):
            return False
        self._counts.duplicates += 1
        return True

    def _hold_id(self, message_id: str | None) -> None:
        if self.dedupe is not None and message_id is not None:
            self.dedupe.hold((message_id,))

    @contextlib.contextmanager
    def holding(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int,
                at: int | None = None, *, message_id: str | None = None) -> Iterator[None]:
        """Buffer one row of a call whose acceptance depends on what the ``with`` block does (the other sink of a
        :class:`~cio_sync.Pipeline`): the row is appended before the block runs (a failure to append raises before
        it), taken back if the block raises, and counted — its table cut when full — only once the block is done.
        No cut can happen in between: the lock is held throughout. A duplicate (see :meth:`add`) appends nothing
        and still runs the block."""
        if self.max_buffer_bytes is not None and self._memory >= self.max_buffer_bytes:
            self.make_room()
        with self.lock:
            if self._closed or self._closing:
                self.check_open()
            if self._duplicate(message_id):
                yield
                return
            now = self.store.append(table, schema, row, size, at)
            try:
                yield
            except BaseException:
                self.store.retract(table, size)
                raise
            full = self._accepted(table, now, size)
            self._hold_id(message_id)
        if full:
            self.publish_ready()

    def add_call(self, rows: list[tuple[str, pa.Schema, Row, int]], at: int | None = None, *,
                 message_id: str | None = None) -> bool:
        """Buffer every row one accepted call gave (table, schema, row, size; ``at``: the call's time in µs), or
        none of them: if the store refuses one, those appended before it are taken back and the error raised.
        ``False`` for a duplicate (see :meth:`add`)."""
        if not rows:
            self.check_open()
            self.accept()
            return True
        if self.max_buffer_bytes is not None and self._memory >= self.max_buffer_bytes:
            self.make_room()
        with self.lock:
            if self._closed or self._closing:
                self.check_open()
            if self._duplicate(message_id):
                return False
            full = self._accepted_rows(self._append_all(rows, at))
            self._hold_id(message_id)
        if full:
            self.publish_ready()
        return True

    @contextlib.contextmanager
    def holding_call(self, rows: list[tuple[str, pa.Schema, Row, int]], at: int | None = None, *,
                     message_id: str | None = None) -> Iterator[None]:
        """:meth:`holding` for every row of one call: all appended before the block, all taken back if it
        raises."""
        if self.max_buffer_bytes is not None and self._memory >= self.max_buffer_bytes:
            self.make_room()
        with self.lock:
            if self._closed or self._closing:
                self.check_open()
            if self._duplicate(message_id):
                yield
                return
            done = self._append_all(rows, at)
            try:
                yield
            except BaseException:
                self._retract_all(done)
                raise
            full = self._accepted_rows(done) if done else False
            if not done:
                self._counts.accepted += 1
            self._hold_id(message_id)
        if full:
            self.publish_ready()

    def _append_all(self, rows: list[tuple[str, pa.Schema, Row, int]],
                    at: int | None) -> list[tuple[str, int, Filled]]:
        """Append rows to the store (under ``lock``); if one fails, take back the others and raise."""
        done: list[tuple[str, int, Filled]] = []
        try:
            for table, schema, row, size in rows:
                done.append((table, size, self.store.append(table, schema, row, size, at)))
        except BaseException:
            self._retract_all(done)
            raise
        return done

    def _retract_all(self, done: list[tuple[str, int, Filled]]) -> None:
        for table, size, _ in reversed(done):
            self.store.retract(table, size)

    def _accepted_rows(self, done: list[tuple[str, int, Filled]]) -> bool:
        """Count one call whose rows were just appended, and cut the tables they filled (under ``lock``)."""
        self._counts.accepted += 1
        last: dict[str, Filled] = {}
        for table, size, now in done:
            self._memory += size
            last[table] = now
        full = False
        for table, now in last.items():
            if (self.max_rows is not None and now[0] >= self.max_rows) or (
                self._batch_bytes is not None and now[1] >= self._batch_bytes
            ):
                self._cut(table)
                full = True
        return full

    def _accepted(self, table: str, now: Filled, size: int) -> bool:
        """Count a call's row just appended (``now``: what its table buffers) and cut its table if that is full;
        whether it was (then call :meth:`publish_ready`, outside the lock). Under ``lock``."""
        self._memory += size
        self._counts.accepted += 1
        full = (self.max_rows is not None and now[0] >= self.max_rows) or (
            self._batch_bytes is not None and now[1] >= self._batch_bytes
        )
        if full:
            self._cut(table)
        return full

    def _cut(self, table: str) -> None:
        batch = self.store.cut(table)
        if batch is None:
            return
        while batch is not None:
            batch.held = held_size(batch)
            self._pending.append(batch)
            batch = self.store.cut(table)
        self._recount()  # the rows were counted by their sizes; the batches hold what they measured

    def reconcile(self, holds: Callable[[Batch], bool]) -> None:
        """After a durable store undid changes (a failed write rolled back): drop the queued batches it no longer
        ``holds``, and count the memory held again from what is left."""
        with self.lock:
            self._pending = deque(batch for batch in self._pending if holds(batch))
            self._recount()

    # -- publishing ----------------------------------------------------------------------------------------------

    def publish_ready(self, *, retry: bool = False) -> None:
        """Publish the batches already cut; a failure is logged and retried later, never raised: the caller's call
        or record was already accepted. After a failure, tries again only once a pause has passed (half a second,
        doubling up to :data:`_MAX_RETRY_PAUSE`), unless ``retry``: a write must not wait on storage that is down
        each time it fills a batch, nor read spilled batches back each time."""
        if self._failing and not retry and time.monotonic() < self._retry_at:
            return
        try:
            self._publish_pending()
        except Exception as exc:
            log.warning("%s: early publish failed, will retry on the next flush: %s", self.label, exc)

    def flush(self) -> list[WrittenFile]:
        """Publish everything buffered now, one file per table with rows. Returns every file published since the
        last ``flush()`` or ``close()`` returned, including those published early or by the timer."""
        with self._publish_lock:
            with self.lock:
                for table in self.store.tables():
                    self._cut(table)
            self._publish_pending()
            self._publish_rejected()
            with self.lock:
                files = list(self._unreported)
                self._unreported.clear()
            return files

    def _publish_pending(self) -> None:
        """Publish queued batches in order, then the manifest of what landed, then let the batches go.

        A table whose batch fails keeps its later batches queued behind it (files of a table land in order); other
        tables go on. Batches leave the store only after the manifest that lists them was published, so a crash or
        a failure in between publishes them again (recognised, not duplicated) with the next manifest. The first
        failure is raised at the end.
        """
        failed: set[str] = set()
        first_error: CioSyncError | None = None
        landed: list[tuple[Batch, WrittenFile | None]] = []
        with self._publish_lock:
            with self.lock:
                queue = list(self._pending)
                held = self.dedupe.snapshot() if self.dedupe is not None and queue else frozenset()
            if held:
                self._keep_ids(held)
            for batch in queue:
                if batch.table in failed:
                    continue
                try:
                    landed.append((batch, self._publish_one(batch)))
                except CioSyncError as exc:
                    failed.add(batch.table)
                    first_error = first_error or exc
                    with self.lock:
                        self._counts.last_error = str(exc)
                        if self.when_full == "spill":
                            # Read back from the spool to be published: on disk still, so let it go again at once,
                            # rather than hold it past the budget until the next write makes room.
                            self.store.release(batch)
                            self._hold(batch)
            files = [(b, w) for b, w in landed if w is not None]
            if files and self.manifest is not None:
                try:
                    self._publish_manifest(files)
                except CioSyncError as exc:
                    with self.lock:
                        self._counts.last_error = str(exc)
                    self._failed(True)
                    raise exc from (first_error if first_error is not exc else None)
            for batch, written in landed:
                with self.lock:
                    self.store.published(batch)
                    self._pending.remove(batch)
                    self._memory -= batch.held
                    batch.held = 0
                    if written is not None:
                        self._record(written)
        self._failed(first_error is not None)
        if first_error is not None:
            raise first_error

    def _keep_ids(self, held: frozenset[bytes]) -> None:
        """Before a round names or uploads a batch: keep the ids held (every call of every batch queued is among
        them, or was kept before) in the dedupe window's file, once their calls are durable in the row store, so
        that no id is on disk before its call and none leaves the spool before it is on disk."""
        assert self.dedupe is not None
        sync = getattr(self.store, "sync", None)
        if callable(sync):
            try:
                sync()
            except CioSyncError as exc:
                # Rows whose fsync failed are published from memory (this round, or the next): keep their ids all
                # the same, or a retry of a call about to be published would land twice.
                log.warning("%s: the spool could not be synced before keeping the dedupe window's ids: %s",
                            self.label, exc)
        try:
            self.dedupe.keep(held)
        except CioSyncError as exc:
            with self.lock:
                self._counts.last_error = str(exc)
            self._failed(True)
            raise

    def _failed(self, failing: bool) -> None:
        """Note whether the last publish failed, and when an early publish should try again."""
        self._failing = failing
        self._retry_pause = min(max(self._retry_pause * 2, 0.5), _MAX_RETRY_PAUSE) if failing else 0.0
        self._retry_at = time.monotonic() + self._retry_pause

    def _record(self, written: WrittenFile) -> None:
        self._counts.files += 1
        self._counts.rows += written.rows
        self._counts.bytes += written.bytes
        self._counts.last_publish_at = datetime.now(UTC)
        self._counts.last_error = None
        self._unreported.append(written)
        log.info("%s: published %s (%d rows, %d bytes)", self.label, written.path, written.rows, written.bytes)
        if self._on_publish is not None:
            try:
                self._on_publish(written)
            except Exception:
                log.exception("%s: on_publish callback failed for %s", self.label, written.path)

    def _publish_one(self, batch: Batch) -> WrittenFile | None:
        """Encode, name and upload one batch; ``None`` if its rows could not be encoded and went to dead letters."""
        if batch.state is BatchState.DAMAGED:
            assert batch.damage is not None
            self._dead_letter(batch, batch.damage)
            return None
        if batch.data is None and batch.encoded is None:
            self.store.load(batch)  # spilled: read back from the spool
            with self.lock:
                self._hold(batch)
        if batch.encoded is None:
            try:
                assert batch.data is not None
                assert batch.schema is not None
                encoded = self.format.encode(rows_to_table(batch.data, batch.schema))
            except Exception as exc:
                self._dead_letter(batch, exc)
                return None
            with self.lock:
                batch.encoded, batch.data = encoded, None  # from here on the batch holds its file, not its rows
                self._hold(batch)
        if batch.sha256 is None:
            batch.sha256 = hashlib.sha256(batch.encoded).hexdigest()
        for _ in range(_MAX_RENAMES):
            if batch.name is None:
                batch.name = self._name_for(batch)
                batch.state = BatchState.NAMED
            if batch.state is BatchState.NAMED:
                # If recording fails the batch keeps its name and records it on the next try, before any upload.
                with self.lock:
                    self.store.named(batch)
                batch.state = BatchState.RECORDED
            try:
                # Always as a resume: the name is ours (claimed from the counter), so a file already under it
                # with exactly these bytes is this batch landed by an earlier try, ours or the backend client's
                # own retry after a lost response (botocore, gcsfs and azure-core all retry by themselves).
                return self.writer.publish(batch.name, batch.encoded, table=batch.table, rows=batch.rows,
                                           resume=True)
            except PublishConflict as exc:
                # The name holds someone else's file (counters lost, or files from another writer): leave it
                # alone and publish these rows under the next name.
                log.error("%s: %s; publishing the batch under a new name", self.label, exc)
                batch.name = None
                batch.state = BatchState.CUT
        raise CioSyncError(f"{self.label}: gave up after {_MAX_RENAMES} names that were already taken")

    def _publish_manifest(self, files: list[tuple[Batch, WrittenFile]]) -> None:
        assert self.manifest is not None
        name = self.manifest.name_for()
        self.writer.publish(name, manifest_document(self.manifest, name, files), table="_manifest", rows=len(files))

    def _dead_letter(self, batch: Batch, exc: BaseException) -> None:
        """Keep rows that cannot be encoded under ``_cio_sync/dead_letters/`` with the reason, never drop them."""
        reason = f"{type(exc).__name__}: {exc}"
        name = dead_letter_name(batch.table)
        self.writer.publish(name, batch_letter(batch, reason, self.format.name), table=batch.table, rows=batch.rows)
        log.error("%s: %d rows of %s could not be %s (%s); kept in %s", self.label, batch.rows, batch.table,
                  "read back" if batch.state is BatchState.DAMAGED else "encoded", reason, name)
        with self.lock:
            self._counts.dead_letters += batch.rows

    def _run_timer(self) -> None:
        assert self.flush_interval is not None
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush()
            except Exception as exc:
                log.warning("%s: timed flush failed, the rows stay buffered: %s", self.label, exc)

    def close(self) -> list[WrittenFile]:
        """Stop the timer and publish everything; idempotent. If publishing fails, nothing is dropped and
        ``close()`` may be called again. In a child that inherited the sink through fork, does nothing: the rows
        are the parent's, which publishes them."""
        if self._closed or self._inherited is not None:
            return []
        self._stop.set()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join()
        with self._publish_lock:
            if self._closed:
                return []
            with self.lock:
                self._closing = True  # from here on writes are refused, so nothing lands after the last cut
            files = self.flush()
            with self.lock:
                self._closed = True
        _OPEN.discard(self)
        return files

    def abandon(self) -> None:
        """Stop as a crash would stop the process: the timer ends, nothing more is published, buffered rows are
        dropped (a durable store keeps its own), and the exit handler forgets the sink. For tests of recovery."""
        self._stop.set()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join()
        with self.lock:
            self._closed = True
        _OPEN.discard(self)

    # -- observation ---------------------------------------------------------------------------------------------

    def stats(self) -> SinkStats:
        now = time.monotonic()
        with self.lock:
            self._recount()
            buffered = self.store.buffered()
            counts = self._counts
            since = [b.since for b in buffered.values() if b.since is not None]
            return SinkStats(
                calls_accepted=counts.accepted,
                calls_rejected=counts.rejected,
                rows_buffered=sum(b.rows for b in buffered.values()) + sum(p.rows for p in self._pending),
                bytes_buffered=sum(b.nbytes for b in buffered.values()),
                batches_pending=len(self._pending),
                files_published=counts.files,
                rows_published=counts.rows,
                bytes_published=counts.bytes,
                last_publish_at=counts.last_publish_at,
                oldest_buffered_age=(now - min(since)) if since else None,
                last_error=counts.last_error,
                rows_dead_lettered=counts.dead_letters,
                bytes_in_memory=self._memory,
                calls_duplicate=counts.duplicates,
            )
