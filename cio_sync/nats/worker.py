"""Workers: consume a JetStream stream of calls, partition by partition, into an Advanced sink's bucket.

How a partition is owned, and why nothing is lost or published twice (docs/scale-out.md has the whole story):

- **Who consumes what.** Every worker puts a heartbeat key ``w.<worker id>`` in the key-value bucket
  ``<stream>_leases`` (its keys expire ``lease_seconds`` after their last update). Every worker computes the same
  assignment of partitions to the live workers (:func:`assign_partitions`: balanced, each partition to the first
  worker of its rendezvous-hash ranking with room), so that all agree without talking, and a worker that joins or
  dies moves few partitions. A worker holds the partitions it is given with lease keys ``p.<partition>`` (created
  only if absent, renewed with a compare-and-set); it gives a partition up (after publishing what it read of it)
  when the assignment gives it to another worker, and a lease that stops being renewed
  expires, so a dead worker's partitions go to the others within ``lease_seconds``.
- **The fence.** The lease only decides who should work; what makes it safe is the partition's offset key
  ``o.<partition>`` in ``<stream>_offsets``: ``{epoch, owner, next, pending}``. A worker that takes a partition
  raises the epoch with a compare-and-set, and every later step of its own for that partition is a compare-and-set
  on the revision it last wrote, so a worker that lost the partition (paused past its lease, cut off) fails its
  next step and drops what it read, whatever it believes about its lease.
- **Exactly once.** The worker reads the partition's messages in order from a durable pull consumer, with explicit
  acks; the stream keeps a message (work-queue retention) until it is acked, which is only once it is in a
  published file. A publishing round for a partition claims the files' names (positions from the shared counters),
  then records the plan ``pending = {first, last, files, manifest}`` (stream sequences first..last of the
  partition's subject, and the names) with ``next = last + 1`` in one compare-and-set, then uploads the files and
  the manifest, acks the messages, and clears ``pending``. The rows of a plan are a function of the stream: the
  messages of the partition's subject between first and last. So a worker that takes a partition with a plan still
  pending reads those messages again (by sequence, from the stream) and publishes the same rows under the same
  names: a file that had landed is recognised (conditional create), one that had not is made. A message below
  ``next`` that is delivered again (its ack was lost, say when a NATS node died) is acked and skipped, by every
  worker at any time: duplicate suppression by stream sequence, which costs nothing.
- **Where the files go.** One file per call type per partition per round, named as SCHEMAS.md says (positions
  claimed by conditional create, shared with any sink writing to the same destination), and one manifest per
  round. Files of one partition are in stream order, so a person's calls are in the order the intake took them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import nats.errors
import nats.js.errors
import orjson
import pyarrow as pa
from nats.js import api as js_api

from cio_sync._errors import CioSyncError, ConfigError, Fenced, InvalidCall, PublishConflict, SinkClosed, StorageError
from cio_sync._time import to_micros
from cio_sync._types import Batch
from cio_sync.buffer.rows import rows_to_table
from cio_sync.formats.base import Format
from cio_sync.formats.registry import get_format
from cio_sync.intake.calls import Call, parse_call, parse_time
from cio_sync.nats._common import (
    NATS_ERRORS,
    LoopThread,
    check_stream_name,
    connect,
    describe,
    ensure_stream,
    server_list,
)
from cio_sync.publish.counters import Counters
from cio_sync.publish.layout import advanced_counter, advanced_manifest_counter, advanced_manifest_name, advanced_name
from cio_sync.publish.manifests import ManifestSpec, manifest_document
from cio_sync.sinks.advanced import DEFAULT_MAX_BUFFER_BYTES, action_ids_of, advanced_row
from cio_sync.sinks.base import check_int, make_writer
from cio_sync.storage.writer import RetryPolicy, Writer, WrittenFile
from cio_sync.testing import abandon

__all__ = ["Worker", "WorkerStats"]

log = logging.getLogger(__name__)

#: How many messages one fetch asks a partition's consumer for.
_FETCH: Final = 256
#: Back-off between tries of a round whose upload failed (storage down), in seconds.
_RETRY_DELAYS: Final = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class WorkerStats:
    """What a :class:`Worker` did so far.

    ``partitions``: the partitions it owns now. ``calls_published``/``files_published``: calls and files it put in
    the bucket (a file it found already published by another worker finishing its plan is not counted).
    ``redeliveries_skipped``: messages delivered again that were already in a published file (acked and skipped).
    ``calls_refused``: messages that are not calls (acked and left out, with an error in the log).
    ``publish_lag_seconds``: age of the oldest call read but not yet published (0 with none).
    ``takeovers``: partitions it took; ``partitions_lost``: partitions taken from it while it held them (its
    unpublished reads of them were dropped, to be published by the new owner). ``last_error``: the last failure.
    ``calls_applied``: calls applied to the Standard workspace (with ``standard``).
    """

    worker_id: str
    partitions: tuple[int, ...]
    calls_published: int
    files_published: int
    redeliveries_skipped: int
    calls_refused: int
    publish_lag_seconds: float
    takeovers: int
    partitions_lost: int
    last_error: str | None
    #: Calls applied to the Standard workspace state (committed with their stream sequence), 0 without Standard.
    calls_applied: int = 0


class _Lost(Exception):
    """The partition's offset key was changed by another worker: this worker no longer owns it."""


@dataclass
class _File:
    call_type: str
    name: str
    data: bytes
    rows: int
    first_time: int | None
    last_time: int | None


@dataclass
class _Segment:
    """What a worker read of one partition since its last round: rows by call type, in stream order."""

    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    schemas: dict[str, pa.Schema] = field(default_factory=dict)
    times: dict[str, list[int]] = field(default_factory=dict)
    first: int | None = None  # stream sequence of the first message of the round
    last: int = 0  # the highest stream sequence read
    calls: int = 0
    nbytes: int = 0  # what its rows take in memory (as the sinks' memory budget counts them)
    messages: list[Any] = field(default_factory=list)  # to ack once published
    started: float = 0.0  # monotonic time of the first message
    oldest: float | None = None  # receivedAt (epoch seconds) of the oldest call

    def add(self, call_type: str, schema: pa.Schema, row: tuple[Any, ...], received: int, size: int) -> None:
        self.rows.setdefault(call_type, []).append(row)
        self.nbytes += size
        self.schemas[call_type] = schema
        span = self.times.setdefault(call_type, [received, received])
        span[0], span[1] = min(span[0], received), max(span[1], received)
        self.calls += 1
        seconds = received / 1e6
        self.oldest = seconds if self.oldest is None else min(self.oldest, seconds)


@dataclass
class _Partition:
    number: int
    lease_revision: int
    offset_revision: int = 0
    epoch: int = 0
    next: int = 1
    segment: _Segment = field(default_factory=_Segment)
    task: asyncio.Task[None] | None = None
    releasing: bool = False
    lost: bool = False
    standard: Any = None  # the partition's StandardSink, with its state in the partition's PostgreSQL schema
    std_position: int = 0  # the last stream sequence the Standard state holds (committed)


def _score(partition: int, worker: str) -> int:
    digest = hashlib.blake2b(f"{partition}/{worker}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign_partitions(partitions: int, workers: set[str]) -> dict[int, str]:
    """Which live worker each partition goes to: every worker computes the same answer from the same set, each
    gets at most ceil(partitions / workers) of them, and each partition goes to the first worker of its
    rendezvous-hash ranking that still has room, so a worker joining or leaving moves few partitions."""
    ranked = sorted(workers)
    room = -(-partitions // len(ranked))
    load = dict.fromkeys(ranked, 0)
    owners = {}
    for number in range(partitions):
        for worker in sorted(ranked, key=lambda w: (_score(number, w), w), reverse=True):
            if load[worker] < room:
                owners[number] = worker
                load[worker] += 1
                break
    return owners


def _worker_id(given: str | None) -> str:
    if given is not None:
        if not given or not all(c.isascii() and (c.isalnum() or c in "-_") for c in given):
            raise ConfigError(f"worker_id {given!r} must be letters, digits, '-' or '_'")
        return given
    host = "".join(c if c.isascii() and c.isalnum() else "-" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    """Consume the JetStream stream ``stream`` (made by :class:`~cio_sync.nats.Publisher`, or by the first worker)
    into Advanced files under ``advanced`` (a URL or path with ``storage_options``, or a
    :class:`~cio_sync.Writer`), sharing the stream's partitions with every other worker of the stream.

    ``format``, ``destination_id``, ``action_ids``, ``compression`` and ``manifests`` are the Advanced sink's. A
    partition's round publishes every ``flush_interval`` seconds, or once it read ``max_rows`` calls, or once
    ``max_ack_pending`` messages wait for their ack (the consumer's bound), or once its rows take its share of
    ``max_buffer_bytes`` (the worker's memory budget for unpublished rows, split between its partitions; 256 MiB
    by default, as the sinks'). ``lease_seconds`` is how long a dead worker keeps its partitions (its heartbeat
    and leases expire after that), ``ack_wait`` how long JetStream waits for an ack before delivering a message
    again (default: the flush interval plus a minute). ``worker_id`` names the worker in the leases (default: host,
    pid and a random suffix); two live workers must not share one.

    :meth:`start` connects and begins; :meth:`close` publishes what the worker read, gives its partitions back at
    once (another worker takes them without waiting for the leases to expire) and disconnects. The worker runs on
    an event loop thread of its own; storage calls run in threads.
    """

    def __init__(
        self,
        servers: list[str] | str,
        *,
        stream: str,
        advanced: str | Writer | None = None,
        standard: str | Writer | None = None,
        workspace_id: int | None = None,
        state: str | None = None,
        standard_flush_interval: float = 900.0,
        format: str | Format = "parquet",
        destination_id: int = 1,
        action_ids: Mapping[str, int] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        compression: str | None = None,
        manifests: bool = True,
        flush_interval: float = 600.0,
        max_rows: int = 100_000,
        max_ack_pending: int = 200_000,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        lease_seconds: float = 30.0,
        ack_wait: float | None = None,
        worker_id: str | None = None,
        retry: RetryPolicy | None = None,
        connect_timeout: float = 30.0,
        on_publish: Callable[[WrittenFile], None] | None = None,
    ) -> None:
        self.servers = server_list(servers)
        self.stream = check_stream_name(stream)
        self.worker_id = _worker_id(worker_id)
        self.destination_id = check_int("destination_id", destination_id)
        self.action_ids = action_ids_of(action_ids)
        if not flush_interval > 0:
            raise ConfigError(f"flush_interval must be above 0 seconds, not {flush_interval!r}")
        if not lease_seconds >= 1:
            raise ConfigError(f"lease_seconds must be at least 1, not {lease_seconds!r}")
        self.max_rows = check_int("max_rows", max_rows, minimum=1)
        self.max_ack_pending = check_int("max_ack_pending", max_ack_pending, minimum=_FETCH)
        self.max_buffer_bytes = check_int("max_buffer_bytes", max_buffer_bytes, minimum=1)
        self.flush_interval, self.lease_seconds = float(flush_interval), float(lease_seconds)
        self.ack_wait = float(ack_wait) if ack_wait is not None else self.flush_interval + 60.0
        if not self.ack_wait > 0:
            raise ConfigError(f"ack_wait must be above 0 seconds, not {ack_wait!r}")
        self.connect_timeout = connect_timeout
        options: dict[str, Any] = {"compression": compression} if compression is not None else {}
        self.format = get_format(format, **options)
        self._documents = bool(getattr(self.format, "accepts_documents", False))
        if advanced is None and standard is None:
            raise ConfigError("a worker needs advanced= (where Advanced files go), standard=, or both")
        if standard is not None:
            from cio_sync.workspace import is_postgres

            if workspace_id is None or not is_postgres(state):
                raise ConfigError("standard= needs workspace_id= and state='postgresql://...': the workspace state of "
                                  "each partition is a schema of that database, so that it moves with the partition")
            check_int("workspace_id", workspace_id)
            if not standard_flush_interval > 0:
                raise ConfigError(f"standard_flush_interval must be above 0 seconds, not {standard_flush_interval!r}")
        self._standard_target, self.workspace_id, self._state = standard, workspace_id, state
        self.standard_flush_interval = float(standard_flush_interval)
        self._storage_options, self._manifests_on, self._retry = storage_options, manifests, retry
        self.advanced = advanced is not None
        self.writer = make_writer(advanced if advanced is not None else "memory://cio-sync-unused",
                                  filesystem=None, storage_options=storage_options if advanced is not None else None,
                                  retry=retry)
        self._counters = Counters(self.writer)
        self._manifest = ManifestSpec(
            name_for=lambda: advanced_manifest_name(self.destination_id, self._counters.claim(
                advanced_manifest_counter(self.destination_id))),
            header={"mode": "advanced", "destination_id": self.destination_id, "format": self.format.name,
                    "worker_id": self.worker_id},
            time_label="received_at",
        ) if manifests else None
        self.on_publish = on_publish
        self.partitions = 0
        self._owned: dict[int, _Partition] = {}
        self._lock = threading.Lock()
        self._counts = {"calls": 0, "files": 0, "skipped": 0, "refused": 0, "takeovers": 0, "lost": 0, "applied": 0}
        self._last_error: str | None = None
        self._loop: LoopThread | None = None
        self._nc: Any = None
        self._js: Any = None
        self._leases: Any = None
        self._offsets: Any = None
        self._closing = False
        self._closed = False
        self._main: asyncio.Task[None] | None = None
        self._started = threading.Event()

    def __repr__(self) -> str:
        return (f"Worker(servers={self.servers!r}, stream={self.stream!r}, worker_id={self.worker_id!r}, "
                f"advanced={getattr(self.writer, 'url', self.writer)!r})")

    # -- the synchronous interface ---------------------------------------------------------------------------------

    def start(self) -> Worker:
        """Connect, find (or create) the stream and the key-value buckets, and begin taking partitions. Raises
        :class:`~cio_sync.StorageError` if NATS cannot be reached within ``connect_timeout`` seconds."""
        if self._closed:
            raise SinkClosed(f"worker {self.worker_id} is closed")
        if self._loop is not None:
            return self
        self._loop = LoopThread(f"cio-sync-worker-{self.worker_id}")
        try:
            self._loop.run(self._connect(), self.connect_timeout + 10)
        except BaseException:
            self._loop.stop()
            self._loop = None
            raise
        self._loop.run(self._begin(), 10)
        return self

    def close(self, timeout: float = 120.0) -> None:
        """Publish what the worker read, give its partitions back, and disconnect. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._loop is None:
            return
        try:
            self._loop.run(self._shutdown(), timeout)
        except NATS_ERRORS as exc:
            log.warning("worker %s: closing: %s", self.worker_id, describe(exc))
        finally:
            self._loop.stop()

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def owned(self) -> frozenset[int]:
        """The partitions this worker owns now."""
        with self._lock:
            return frozenset(p for p, part in self._owned.items() if not part.lost)

    def stats(self) -> WorkerStats:
        with self._lock:
            owned = sorted(p for p, part in self._owned.items() if not part.lost)
            oldest = [part.segment.oldest for part in self._owned.values() if part.segment.oldest is not None]
            counts = dict(self._counts)
            error = self._last_error
        lag = max(0.0, time.time() - min(oldest)) if oldest else 0.0
        with self._lock:
            sinks = [part.standard for part in self._owned.values() if part.standard is not None]
        for sink in sinks:
            lag = max(lag, sink.stats.oldest_buffered_age or 0.0)
        return WorkerStats(self.worker_id, tuple(owned), counts["calls"], counts["files"], counts["skipped"],
                           counts["refused"], lag, counts["takeovers"], counts["lost"], error, counts["applied"])

    # -- connecting ------------------------------------------------------------------------------------------------

    async def _connect(self) -> None:
        self._nc = await connect(self.servers, name=f"cio-sync-worker-{self.worker_id}",
                                 timeout=self.connect_timeout, on_error=self._on_error)
        self._js = self._nc.jetstream(timeout=5.0)
        try:
            found = await ensure_stream(self._nc, self._js, self.stream, partitions=None, replicas=None,
                                        duplicate_window=24 * 3600.0, timeout=self.connect_timeout)
            self.partitions = found.partitions
            self._leases = await self._bucket(f"{self.stream}_leases", ttl=self.lease_seconds,
                                              replicas=found.replicas)
            self._offsets = await self._bucket(f"{self.stream}_offsets", ttl=None, replicas=found.replicas)
        except BaseException:
            await self._nc.close()
            raise

    async def _bucket(self, name: str, *, ttl: float | None, replicas: int) -> Any:
        deadline = asyncio.get_running_loop().time() + self.connect_timeout
        while True:
            try:
                try:
                    return await self._js.key_value(name)
                except nats.js.errors.BucketNotFoundError:
                    config = js_api.KeyValueConfig(bucket=name, history=1, ttl=ttl, replicas=replicas,
                                                   storage=js_api.StorageType.FILE)
                    return await self._js.create_key_value(config)
            except NATS_ERRORS as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise StorageError(f"the key-value bucket {name!r} could not be found or created: "
                                       f"{describe(exc)}") from exc
                await asyncio.sleep(0.3)

    async def _on_error(self, exc: Exception) -> None:
        log.warning("worker %s: nats: %s", self.worker_id, exc)

    def _failed(self, doing: str, exc: BaseException) -> None:
        text = f"{doing}: {describe(exc) if isinstance(exc, NATS_ERRORS) else exc}"
        with self._lock:
            self._last_error = text
        log.warning("worker %s: %s", self.worker_id, text)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    # -- membership: heartbeats, who owns what ---------------------------------------------------------------------

    async def _begin(self) -> None:
        self._main = asyncio.get_running_loop().create_task(self._membership())

    async def _membership(self) -> None:
        while not self._closing:
            try:
                await self._tick()
            except NATS_ERRORS as exc:
                self._failed("keeping the leases", exc)
            except Exception as exc:  # a bug: say so, and keep the heartbeat going (a dead one moves everything)
                self._failed("keeping the leases", exc)
                log.exception("worker %s: keeping the leases", self.worker_id)
            await asyncio.sleep(self.lease_seconds / 4)

    async def _tick(self) -> None:
        await self._leases.put(f"w.{self.worker_id}", self.worker_id.encode())
        try:
            keys = await self._leases.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        live = {k[2:] for k in keys if k.startswith("w.")} | {self.worker_id}
        owners = assign_partitions(self.partitions, live)
        for number, part in list(self._owned.items()):
            if part.lost or part.releasing:
                continue
            try:
                part.lease_revision = await self._leases.update(f"p.{number}", self.worker_id.encode(),
                                                                last=part.lease_revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                self._lose(part, "its lease was taken")
                continue
            if owners[number] != self.worker_id:
                part.releasing = True  # its task publishes what it read, then gives the lease back
        for number in range(self.partitions):
            if self._closing or number in self._owned or owners[number] != self.worker_id:
                continue
            try:
                revision = await self._leases.create(f"p.{number}", self.worker_id.encode())
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # still held: its owner gives it up after its round, or its lease expires
            part = _Partition(number, revision)
            with self._lock:
                self._owned[number] = part
            part.task = asyncio.get_running_loop().create_task(self._consume(part))

    def _lose(self, part: _Partition, why: str) -> None:
        if part.lost:
            return
        part.lost = True
        self._count("lost")
        log.warning("worker %s: partition %d lost (%s); dropping %d calls read but not published (its new owner "
                    "publishes them)", self.worker_id, part.number, why, part.segment.calls)
        part.segment = _Segment()
        if part.standard is not None:
            sink, part.standard = part.standard, None
            abandon(sink)  # no more commits or uploads from here: the state is the next owner's
        if part.task is not None and part.task is not asyncio.current_task():
            part.task.cancel()
        with self._lock:
            self._owned.pop(part.number, None)

    # -- one partition ---------------------------------------------------------------------------------------------

    async def _consume(self, part: _Partition) -> None:
        try:
            await self._take(part)
            if self._standard_target is not None:
                await self._open_standard(part)
            subscription = await self._subscribe(part)
            try:
                await self._read(part, subscription)
            finally:
                with contextlib.suppress(*NATS_ERRORS):
                    await subscription.unsubscribe()
            if not part.lost:
                await self._release(part)
        except _Lost:
            self._lose(part, "another worker took it")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug, or storage refusing for good: give the partition back to be retried
            self._failed(f"partition {part.number}", exc)
            log.exception("worker %s: partition %d stopped", self.worker_id, part.number)
            self._lose(part, "it failed")
            with contextlib.suppress(*NATS_ERRORS):
                await self._leases.delete(f"p.{part.number}", last=part.lease_revision)

    async def _release(self, part: _Partition) -> None:
        if part.standard is not None:
            sink, part.standard = part.standard, None
            try:
                await asyncio.to_thread(sink.close)  # commits and publishes the partition's outbox
            except Fenced:
                self._lose(part, "another worker took its Standard state")
                return
            except CioSyncError as exc:  # its outbox is in the state: the next owner publishes it
                self._failed(f"closing partition {part.number}'s Standard sink", exc)
                await asyncio.to_thread(abandon, sink)
        try:
            await self._leases.delete(f"p.{part.number}", last=part.lease_revision)
        except NATS_ERRORS as exc:
            self._failed(f"giving partition {part.number} back", exc)
        with self._lock:
            self._owned.pop(part.number, None)

    async def _take(self, part: _Partition) -> None:
        """Raise the partition's epoch (fencing off its previous owner), then finish its pending plan."""
        key = f"o.{part.number}"
        while True:
            try:
                entry = await self._offsets.get(key)
                value, revision = orjson.loads(entry.value), entry.revision
            except nats.js.errors.KeyNotFoundError:
                value, revision = {"epoch": 0, "next": 1, "pending": None}, None
            value = {**value, "epoch": int(value["epoch"]) + 1, "owner": self.worker_id}
            try:
                if revision is None:
                    part.offset_revision = await self._offsets.create(key, orjson.dumps(value))
                else:
                    part.offset_revision = await self._offsets.update(key, orjson.dumps(value), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # changed under us (its previous owner's last step): read it again
            break
        part.epoch, part.next = value["epoch"], int(value["next"])
        self._count("takeovers")
        log.info("worker %s: took partition %d (epoch %d, next %d)", self.worker_id, part.number, part.epoch,
                 part.next)
        if value.get("pending"):
            await self._finish_plan(part, value["pending"])

    async def _set_offset(self, part: _Partition, pending: dict[str, Any] | None, next_seq: int) -> None:
        value = {"epoch": part.epoch, "owner": self.worker_id, "next": next_seq, "pending": pending}
        try:
            part.offset_revision = await self._offsets.update(f"o.{part.number}", orjson.dumps(value),
                                                              last=part.offset_revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise _Lost from exc
        part.next = next_seq

    async def _subscribe(self, part: _Partition) -> Any:
        """A new durable consumer for the partition's subject: what the stream still holds is delivered at once,
        not after the previous owner's ack wait."""
        durable = f"p{part.number}"
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._js.delete_consumer(self.stream, durable)
        config = js_api.ConsumerConfig(
            durable_name=durable, filter_subject=f"{self.stream}.{part.number}",
            deliver_policy=js_api.DeliverPolicy.ALL, ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait, max_ack_pending=self.max_ack_pending, max_deliver=-1,
        )
        await self._js.add_consumer(self.stream, config)
        return await self._js.pull_subscribe_bind(durable, self.stream)

    async def _read(self, part: _Partition, subscription: Any) -> None:
        while not part.lost:
            stopping = self._closing or part.releasing
            segment = part.segment
            due = segment.first is not None and (
                stopping or segment.calls >= self.max_rows or segment.nbytes >= self._share()
                or len(segment.messages) + _FETCH > self.max_ack_pending
                or time.monotonic() - segment.started >= self.flush_interval)
            if due or (stopping and segment.messages):
                await self._round(part)
                continue
            if stopping:
                return
            try:
                messages = await subscription.fetch(_FETCH, timeout=min(1.0, self.flush_interval))
            except TimeoutError:  # nats.errors.TimeoutError is one: nothing to read within the wait
                continue
            except NATS_ERRORS as exc:
                if isinstance(exc, nats.js.errors.NotFoundError):
                    raise _Lost from exc  # our consumer was deleted: another worker took the partition
                self._failed(f"reading partition {part.number}", exc)
                await asyncio.sleep(0.5)
                continue
            await self._take_messages(part, messages)

    def _share(self) -> int:
        """The bytes of unpublished rows one partition may hold: the memory budget split between the partitions
        this worker owns."""
        return self.max_buffer_bytes // max(1, len(self._owned))

    async def _take_messages(self, part: _Partition, messages: list[Any]) -> None:
        """Apply fresh messages to the Standard state (committed with their sequence) and add them to the Advanced
        segment; ack at once those both already hold (delivered again)."""
        segment = part.segment
        for_advanced, for_standard, done = [], [], []
        for msg in messages:
            seq = msg.metadata.sequence.stream
            standard = part.standard is not None and seq > part.std_position
            advanced = self.advanced and seq >= part.next and seq > segment.last
            if advanced:
                for_advanced.append(msg)
                segment.last = seq
            if standard:
                for_standard.append(msg)
            if not advanced and not standard:
                if not self.advanced or seq < part.next:
                    done.append(msg)  # in a published file, and in the state: ack it again
                self._count("skipped")
        fresh = {m.metadata.sequence.stream: m for m in for_advanced + for_standard}
        parsed = dict(zip(fresh, await asyncio.to_thread(self._parse, [m.data for m in fresh.values()]),
                          strict=True))
        if for_standard:
            sequences = [m.metadata.sequence.stream for m in for_standard]
            await self._apply_standard(part, [(seq, parsed[seq]) for seq in sequences], sequences[-1])
            if not self.advanced:
                done.extend(for_standard)  # durable in the state: that is what Standard-only acks wait for
        for msg in done:
            await msg.ack()
        if not for_advanced:
            return
        if segment.first is None:
            segment.first = for_advanced[0].metadata.sequence.stream
            segment.started = time.monotonic()
        rows = await asyncio.to_thread(self._advanced_rows, [parsed[m.metadata.sequence.stream] for m in for_advanced])
        for row in rows:
            if row is not None:
                segment.add(*row)
        segment.messages.extend(for_advanced)

    def _parse(self, payloads: list[bytes]) -> list[Call | None]:
        """The calls of ``payloads`` (``None`` for a message that is not one: counted, logged, left out)."""
        out: list[Call | None] = []
        for payload in payloads:
            try:
                data = orjson.loads(payload)
                if not isinstance(data, dict):
                    raise InvalidCall("a message must hold one call, a JSON object")
                received = parse_time(data.get("receivedAt"), "receivedAt")
                out.append(parse_call(data, received_at=received))
            except (InvalidCall, orjson.JSONDecodeError) as exc:
                self._count("refused")
                log.error("worker %s: a message of stream %s is not a call and is left out: %s", self.worker_id,
                          self.stream, exc)
                out.append(None)
        return out

    def _advanced_rows(self, calls: list[Call | None]) -> list[tuple[str, pa.Schema, tuple[Any, ...], int, int] | None]:
        out: list[tuple[str, pa.Schema, tuple[Any, ...], int, int] | None] = []
        for parsed in calls:
            if parsed is None:
                out.append(None)
                continue
            try:
                schema, row, size = advanced_row(parsed, documents=self._documents)
            except InvalidCall as exc:
                self._count("refused")
                log.error("worker %s: a call cannot be written to an Advanced file and is left out: %s",
                          self.worker_id, exc)
                out.append(None)
                continue
            out.append((parsed.type, schema, row, to_micros(parsed.received_at), size))
        return out

    def _rows(self, payloads: list[bytes]) -> list[tuple[str, pa.Schema, tuple[Any, ...], int, int] | None]:
        return self._advanced_rows(self._parse(payloads))

    # -- the Standard workspace state of a partition ---------------------------------------------------------------

    async def _open_standard(self, part: _Partition) -> None:
        """The partition's StandardSink, its state in the schema ``<stream>_p<partition>`` of the PostgreSQL
        database, owned with the partition's epoch (a previous owner's later commits fail: Fenced)."""
        from cio_sync.sinks.standard import StandardSink

        def open_it() -> Any:
            assert self._standard_target is not None
            assert self.workspace_id is not None
            # state_epoch: owned before anything of its outbox is published (a previous owner's pending batches).
            return StandardSink(self._standard_target, workspace_id=self.workspace_id, state=self._state,
                                state_schema=f"{self.stream}_p{part.number}", state_epoch=part.epoch,
                                flush_interval=self.standard_flush_interval, commit_every=1 << 40,
                                manifests=self._manifests_on, storage_options=self._storage_options,
                                retry=self._retry)

        try:
            part.standard = await asyncio.to_thread(open_it)
        except Fenced as exc:
            raise _Lost from exc
        part.std_position = part.standard.state.position

    async def _apply_standard(self, part: _Partition, calls: list[tuple[int, Call | None]], last: int) -> None:
        """Apply ``calls`` (with their stream sequences) to the partition's state and commit them with ``last`` as
        its position. If the database fails, the sink is dropped with what it had not committed, opened again on
        what was committed (its position says how far that is) and the rest applied again: nothing twice."""
        for attempt in itertools.count():
            todo = [(seq, parsed) for seq, parsed in calls if seq > part.std_position]
            try:
                if part.standard is None:
                    await self._open_standard(part)
                    continue
                await asyncio.to_thread(self._apply_now, part.standard, todo, last)
                break
            except Fenced as exc:
                raise _Lost from exc
            except StorageError as exc:
                self._failed(f"applying partition {part.number} to its Standard state", exc)
                if part.standard is not None:
                    sink, part.standard = part.standard, None
                    await asyncio.to_thread(abandon, sink)
                await asyncio.sleep(_RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS) - 1)])
                if part.lost:
                    raise _Lost from exc
        part.std_position = last

    def _apply_now(self, sink: Any, calls: list[tuple[int, Call | None]], last: int) -> None:
        applied = 0
        for seq, parsed in calls:
            if parsed is None:
                continue
            try:
                sink.write_at(parsed, seq)
                applied += 1
            except InvalidCall as exc:
                self._count("refused")
                log.error("worker %s: the Standard sink refused a call of stream %s: %s", self.worker_id,
                          self.stream, exc)
        sink.commit(position=last)
        self._count("applied", applied)

    # -- publishing rounds -----------------------------------------------------------------------------------------

    async def _round(self, part: _Partition) -> None:
        """Publish what the partition's segment holds, then ack it (see the module's docstring for the order)."""
        segment = part.segment
        assert segment.first is not None or not segment.calls
        if segment.calls:
            files, manifest = await asyncio.to_thread(self._name_and_encode, segment)
            plan = {"first": segment.first, "last": segment.last, "manifest": manifest,
                    "files": [[f.call_type, f.name] for f in files]}
            await self._set_offset(part, plan, segment.last + 1)  # the commit point: raises _Lost if fenced
            await self._upload(part, files, manifest)
        elif segment.first is not None:
            await self._set_offset(part, None, segment.last + 1)  # only refused messages
        for msg in segment.messages:
            await msg.ack()
        if segment.messages:
            try:
                await self._nc.flush(timeout=5)
            except NATS_ERRORS as exc:  # a lost ack is delivered again and skipped: nothing to do here
                self._failed("acking", exc)
        part.segment = _Segment()
        if segment.calls:
            await self._set_offset(part, None, part.next)

    def _name_and_encode(self, segment: _Segment) -> tuple[list[_File], str | None]:
        files = []
        for call_type, rows in segment.rows.items():
            action = self.action_ids[call_type]
            position = self._counters.claim(advanced_counter(self.destination_id, action))
            data = self.format.encode(rows_to_table(rows, segment.schemas[call_type]))
            first, last = segment.times[call_type]
            files.append(_File(call_type, advanced_name(self.destination_id, action, position, call_type,
                                                        self.format.extension), data, len(rows), first, last))
        manifest = self._manifest.name_for() if self._manifest is not None else None
        return files, manifest

    async def _upload(self, part: _Partition, files: list[_File], manifest: str | None) -> None:
        """Upload a plan's files and manifest, retrying while storage fails (the plan is kept: every try uses the
        same names). Between tries, check that the partition is still ours."""
        for attempt in range(1_000_000):
            try:
                await asyncio.to_thread(self._upload_now, files, manifest)
                return
            except StorageError as exc:
                self._failed(f"publishing partition {part.number}", exc)
                await asyncio.sleep(_RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS) - 1)])
                if part.lost:
                    raise _Lost from exc

    def _upload_now(self, files: list[_File], manifest: str | None) -> None:
        written = []
        for f in files:
            try:
                landed = self.writer.publish(f.name, f.data, table=f.call_type, rows=f.rows, resume=True)
                self._count("calls", f.rows)
                self._count("files")
                if self.on_publish is not None:
                    self.on_publish(landed)
            except PublishConflict:
                # Published by another worker finishing this plan (same rows, maybe other bytes): describe
                # the file that is there.
                existing = self.writer.read(f.name) if hasattr(self.writer, "read") else None
                data = existing if existing is not None else f.data
                landed = WrittenFile(path=f.name, name=f.name, table=f.call_type, rows=f.rows, bytes=len(data))
                f.data = data
            written.append((f, landed))
        if manifest is None or not written:
            return
        batches = [(Batch(table=f.call_type, rows=f.rows, data=None, sha256=hashlib.sha256(f.data).hexdigest(),
                          first_time=f.first_time, last_time=f.last_time), w) for f, w in written]
        assert self._manifest is not None
        document = manifest_document(self._manifest, manifest, batches)
        # A conflict: the plan's manifest, published by the worker that finished the plan first.
        with contextlib.suppress(PublishConflict):
            self.writer.publish(manifest, document, table="_manifest", rows=len(batches), resume=True)

    async def _finish_plan(self, part: _Partition, plan: dict[str, Any]) -> None:
        """Publish a plan its previous owner recorded but may not have finished: the same rows (the partition's
        messages from ``first`` to ``last``, read again from the stream) under the same names."""
        first, last = int(plan["first"]), int(plan["last"])
        subject = f"{self.stream}.{part.number}"
        payloads: list[bytes] = []
        seq = first
        while seq <= last:
            try:
                msg = await self._js.get_msg(self.stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break  # the rest were acked: their files had landed
            if msg.seq > last:
                break
            payloads.append(msg.data)
            seq = msg.seq + 1
        segment = _Segment()
        for row in await asyncio.to_thread(self._rows, payloads):
            if row is not None:
                segment.add(*row)
        def encode(call_type: str) -> bytes:
            schema = segment.schemas.get(call_type) or self._schema(call_type)
            return self.format.encode(rows_to_table(segment.rows.get(call_type, []), schema))

        files = []
        for call_type, name in plan["files"]:
            first_time, last_time = segment.times.get(call_type, [None, None])
            files.append(_File(call_type, name, await asyncio.to_thread(encode, call_type),
                               len(segment.rows.get(call_type, [])), first_time, last_time))
        log.info("worker %s: finishing partition %d's plan %d..%d (%d calls read again)", self.worker_id,
                 part.number, first, last, segment.calls)
        # Files whose messages were all acked had landed (acks come after the upload): only a file with rows, or
        # the manifest, can still be missing.
        await self._upload(part, [f for f in files if f.rows], plan.get("manifest"))
        await self._set_offset(part, None, part.next)

    def _schema(self, call_type: str) -> pa.Schema:
        from cio_sync.schemas.tables import CALL_SCHEMAS, DOCUMENT_SCHEMA

        return DOCUMENT_SCHEMA if self._documents else CALL_SCHEMAS[call_type]

    # -- shutting down ---------------------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self._closing = True
        if self._main is not None:
            self._main.cancel()
        tasks = [part.task for part in list(self._owned.values()) if part.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(*NATS_ERRORS):
            await self._leases.delete(f"w.{self.worker_id}")
        await self._nc.drain()



def metrics_collector(worker: Worker) -> Any:
    """A prometheus-client collector of ``worker``'s stats, read at each scrape: ``cio_sync_worker_partitions``
    (owned now, and one ``cio_sync_worker_partition_owned`` series per owned partition),
    ``cio_sync_publish_lag_seconds``, and the counters of :class:`WorkerStats`."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Collector:
        def collect(self) -> list[Any]:
            stats = worker.stats()
            label = [stats.worker_id]
            owned = GaugeMetricFamily("cio_sync_worker_partitions", "Partitions this worker owns", labels=["worker"])
            owned.add_metric(label, len(stats.partitions))
            each = GaugeMetricFamily("cio_sync_worker_partition_owned", "1 for each partition this worker owns",
                                     labels=["worker", "partition"])
            for number in stats.partitions:
                each.add_metric([stats.worker_id, str(number)], 1)
            lag = GaugeMetricFamily("cio_sync_publish_lag_seconds", "Age of the oldest call read but not yet "
                                    "published", labels=["worker"])
            lag.add_metric(label, stats.publish_lag_seconds)
            families: list[Any] = [owned, each, lag]
            for name, value, text in (
                ("calls_published", stats.calls_published, "Calls this worker published"),
                ("files_published", stats.files_published, "Files this worker published"),
                ("redeliveries_skipped", stats.redeliveries_skipped, "Messages delivered again, already published"),
                ("calls_refused", stats.calls_refused, "Messages that were not calls"),
                ("worker_takeovers", stats.takeovers, "Partitions this worker took"),
                ("worker_partitions_lost", stats.partitions_lost, "Partitions taken from this worker"),
            ):
                family = CounterMetricFamily(f"cio_sync_{name}", text, labels=["worker"])
                family.add_metric(label, value)
                families.append(family)
            return families

    return Collector()
