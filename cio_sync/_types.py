"""Shared types of the layers below the sinks: a batch, and what a row store says it buffers."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

import pyarrow as pa


class BatchState(Enum):
    """Where a batch is on its way to a file. Whether its rows or its encoded bytes are in memory is apart from
    this (a spilled batch holds neither; the store reads them back)."""

    #: Cut from the buffers, with no name yet.
    CUT = "cut"
    #: A name was claimed from the counter but the store has not recorded it: it must be recorded (a name that is
    #: not recorded would be given again, to the same rows, after a crash) before any upload under it.
    NAMED = "named"
    #: The name and the bytes are recorded by the store: uploaded, and retried, under that name with those bytes.
    RECORDED = "recorded"
    #: Bytes the store could not read back (``damage`` says why; ``data`` describes them): for the dead letters.
    DAMAGED = "damaged"


@dataclass(eq=False)
class Batch:
    """Rows of one table cut for one file. ``name`` and ``encoded`` are set once, just before the first upload;
    ``state`` says how far it got (:class:`BatchState`)."""

    table: str
    rows: int
    #: The rows (tuples in ``schema`` order, or an Arrow table) until the batch is encoded; ``None`` once the bytes
    #: are known.
    data: list[Any] | pa.Table | None
    schema: pa.Schema | None = None
    name: str | None = None
    encoded: bytes | None = None
    #: The store's handle on the batch (e.g. its id in a durable outbox).
    key: Any = None
    #: Bytes its rows take in memory (as the memory budget counts them), whether or not they are in memory now.
    nbytes: int = 0
    #: Earliest and latest row time (µs): receivedAt for calls, the change time for workspace rows.
    first_time: int | None = None
    last_time: int | None = None
    #: SHA-256 of ``encoded``, for the manifest.
    sha256: str | None = None
    state: BatchState = BatchState.CUT
    #: Why a :attr:`BatchState.DAMAGED` batch could not be read back (its dead letter's reason).
    damage: BaseException | None = None
    #: What the memory budget counts for the batch now: its rows' bytes while it holds rows, the length of
    #: ``encoded`` once it holds that instead, nothing once both were let go (spilled). Kept by the Publisher.
    held: int = 0


def held_size(batch: Batch) -> int:
    """What ``batch`` holds in memory now: its encoded file if it has one (its rows are let go once encoded), else
    its rows, else nothing."""
    if batch.encoded is not None:
        return len(batch.encoded) + (batch.nbytes if batch.data is not None else 0)
    return batch.nbytes if batch.data is not None else 0


#: One row of a table: its values in the table's column order.
Row = tuple[Any, ...]


class Buffered(NamedTuple):
    """What a store holds for one table that is not yet cut (a tuple: stores make one per appended row)."""

    rows: int
    nbytes: int
    since: float | None


#: What a store's ``append`` returns: the table's buffered rows, bytes and since when (a :class:`Buffered` or a
#: plain tuple, which costs less to make once per row).
Filled = tuple[int, int, float | None]
