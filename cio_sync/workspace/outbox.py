"""The Standard sink's row store: the workspace state's transactional outbox."""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from cio_sync._errors import CioSyncError, StorageError
from cio_sync._types import Batch, BatchState, Buffered, Filled
from cio_sync.schemas.tables import STANDARD_SCHEMAS, STANDARD_TABLES, standard_spec
from cio_sync.workspace.state import DB_ERRORS, WorkspaceState

log = logging.getLogger("cio_sync.state")


class SqliteOutbox:
    """A :class:`~cio_sync.buffer.rows.RowStore` over the workspace state's outbox: rows are durable once committed
    with the state change that produced them, and survive restarts until their file is published."""

    def __init__(self, state: WorkspaceState) -> None:
        self._state = state
        self._stage = state.outbox_staged.append
        self._buffered: dict[str, list[Any]] = {}  # table -> [rows, bytes, since]
        #: The batches handed out (cut, or pending at start) that the state still holds, by id. A batch that a
        #: failed write undid is never named or cleared: its id may belong to a later cut.
        self._live: dict[int, Batch] = {}
        for table, (rows, size) in state.outbox_counts().items():
            self._buffered[table] = [rows, size, time.monotonic()]

    def append(self, table: str, schema: pa.Schema, row: tuple[Any, ...], size: int,
               at: int | None = None) -> Filled:
        self._stage((table, row, size, at))
        counts = self._buffered.get(table)
        if counts is None or counts[0] == 0:
            counts = self._buffered[table] = [0, 0, time.monotonic()]
        counts[0] += 1
        counts[1] += size
        return counts[0], counts[1], counts[2]

    def tables(self) -> list[str]:
        return [t for t, c in self._buffered.items() if c[0]]

    def cut(self, table: str) -> Batch | None:
        counts = self._buffered.get(table)
        if counts is None or counts[0] == 0:
            return None
        batch_id, rows, nbytes, first, last = self._state.outbox_cut(table)
        counts[0] = counts[1] = 0
        if not rows:
            return None
        batch = Batch(table, len(rows), rows, STANDARD_SCHEMAS[table], key=batch_id,
                      nbytes=nbytes, first_time=first, last_time=last)
        self._live[batch_id] = batch
        return batch

    def version_of(self, batch: Batch) -> int:
        """The version of the Standard tables that ``batch``'s rows are in (an earlier release's for the rows a
        state upgrade found: they are published in it)."""
        if batch.key is None:
            return STANDARD_TABLES[batch.table].version
        version = self._state.row_version(batch.key)
        spec = standard_spec(batch.table, version)
        return STANDARD_TABLES[batch.table].version if spec is None else spec.version

    def _schema(self, table: str, batch_id: int) -> pa.Schema:
        spec = standard_spec(table, self._state.row_version(batch_id))
        return STANDARD_SCHEMAS[table] if spec is None else spec.schema

    def pending(self) -> list[Batch]:
        batches = []
        for batch_id, table, rows, name, data, nbytes, first, last in self._state.outbox_batches():
            if name is not None and data is not None:
                batch = Batch(table, rows, None, self._schema(table, batch_id), name=name, encoded=data,
                              key=batch_id, state=BatchState.RECORDED, nbytes=nbytes, first_time=first,
                              last_time=last)
            else:
                decoded = self._state.outbox_batch_rows(batch_id)
                batch = Batch(table, len(decoded), decoded, self._schema(table, batch_id), key=batch_id,
                              nbytes=nbytes, first_time=first, last_time=last)
            self._live[batch_id] = batch
            batches.append(batch)
        return batches

    def release(self, batch: Batch) -> None:
        batch.data = None
        batch.encoded = None

    def load(self, batch: Batch) -> None:
        # The publisher loads outside its lock, while calls may be applied: a read error is reported as it is,
        # without recovering here (a write that finds the transaction gone recovers, in the calls' own thread).
        try:
            if batch.state is BatchState.RECORDED:
                batch.encoded = self._state.outbox_encoded(batch.key, recover=False)
            else:  # never named, or named but not recorded yet: the bytes are encoded again from the rows
                batch.data = self._state.outbox_batch_rows(batch.key, recover=False)
        except DB_ERRORS as exc:
            raise self._state.error(exc, f"read back a batch of {batch.table}") from exc

    def retract(self, table: str, size: int) -> None:
        raise NotImplementedError("the outbox takes a step's rows back by rolling the step back, not row by row")

    def named(self, batch: Batch) -> None:
        """Record the batch's name and bytes (and commit). If that fails the batch keeps its name, unrecorded and
        never uploaded: the publisher records it on the next try, before any upload."""
        assert batch.name is not None
        assert batch.encoded is not None
        if not self.holds(batch):
            raise StorageError(f"workspace state {self._state.path}: the batch of {batch.table} for {batch.name} was "
                               f"undone by a failed write of the state; its rows go in a later batch",
                               path=self._state.path)
        self._state.outbox_named(batch.key, batch.name, batch.encoded)

    def published(self, batch: Batch) -> None:
        self._state.outbox_published(batch.key)
        self._live.pop(batch.key, None)

    def buffered(self) -> dict[str, Buffered]:
        return {t: Buffered(c[0], c[1], c[2]) for t, c in self._buffered.items() if c[0]}

    def holds(self, batch: Batch) -> bool:
        """Whether ``batch`` is still in the state (a failed write may have undone it)."""
        return self._live.get(batch.key) is batch

    def resync(self) -> None:
        """After a failed write was rolled back: count the open rows again from what the state holds, and forget the
        batches it no longer holds. Reads only."""
        try:
            counts = self._state.outbox_counts()
            ids = self._state.outbox_batch_ids()
        except CioSyncError as exc:
            log.warning("could not count the outbox of %s again: %s", self._state.path, exc)
            return
        now = time.monotonic()
        for table, held in self._buffered.items():
            if table not in counts:
                held[0] = held[1] = 0
        for table, (rows, size) in counts.items():
            known = self._buffered.get(table)
            since = known[2] if known is not None and known[0] else now
            self._buffered[table] = [rows, size, since]
        self._live = {batch_id: batch for batch_id, batch in self._live.items() if batch_id in ids}
