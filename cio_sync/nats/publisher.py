"""Intake to NATS JetStream: :class:`Publisher` puts each accepted call on a replicated, partitioned log.

Several intake processes (``cio_sync.asgi.app(publisher, ...)``) can feed one stream; workers that consume it into
the sinks are not built yet (docs/scale-out.md). A call goes to the subject ``<stream>.<partition>``, where the
partition is :func:`partition_of` its person, with the header ``Nats-Msg-Id`` set to its ``messageId`` so that the
stream's duplicate window drops a client's retry. ``sync()`` returns once JetStream acked every call written
before it (on the calling thread), so an HTTP 200 is a call that is on a quorum of the stream's replicas.

Needs ``nats-py`` (``pip install 'cio_sync[nats]'``); importing this module without it raises MissingBackend.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import Any, Final

from cio_sync._errors import ConfigError, SinkClosed, StorageError
from cio_sync.intake.calls import parse_call
from cio_sync.nats._common import (
    NATS_ERRORS,
    LoopThread,
    check_stream_name,
    connect,
    describe,
    ensure_stream,
    partition_of,
    person_key,
    server_list,
)
from cio_sync.sinks.base import write_each

__all__ = ["MIN_DUPLICATE_WINDOW", "Publisher", "PublisherStats"]

log = logging.getLogger(__name__)

#: The shortest duplicate window a stream created here gets: a client retrying a call within a day is dropped.
MIN_DUPLICATE_WINDOW: Final = 24 * 3600.0
#: What waiting for an ack can raise: NATS's failures, or the publish cancelled when the connection closed.
_ACK_FAILURES: Final[tuple[type[BaseException], ...]] = (*NATS_ERRORS, concurrent.futures.CancelledError)


@dataclass(frozen=True)
class PublisherStats:
    """What a :class:`Publisher` did so far: calls JetStream acked (``duplicates`` of them were retries the stream
    dropped, acked with ``duplicate=True``), and the last failure (``None`` while none occurred)."""

    calls_published: int
    duplicates: int
    last_error: str | None


class Publisher:
    """Publish calls to the JetStream stream ``stream`` on the NATS servers ``servers`` (URLs, or one URL or a
    comma-separated list of them).

    The stream is created when it is missing: subjects ``<stream>.*``, split into ``partitions`` (recorded in the
    stream's metadata, and checked against an existing stream's), ``replicas`` copies (default: 3 when the cluster
    has 3 or more nodes, else 1), and a duplicate window of ``duplicate_window`` seconds (at least 24 hours).

    ``write(call)`` validates the call as the sinks do (raising :class:`~cio_sync.InvalidCall`) and publishes it
    without waiting; ``sync()`` waits for the acks of the calls this thread wrote since its last ``sync()`` and
    raises :class:`~cio_sync.StorageError` if any failed (no stream leader, a node unreachable, no ack within
    ``ack_timeout`` seconds): the intake then answers 503 and the client retries, which the duplicate window makes
    safe. There is no ``flush()``: nothing is buffered that could be published instead (the intake answers 503
    on a failed ``sync()`` rather than flushing, as it does for a sink). The NATS client runs on an event loop
    thread of its own, so ``write`` and ``sync`` may be called from any threads (the ASGI intake calls them from
    its worker threads).
    """

    def __init__(self, servers: list[str] | str, *, stream: str, partitions: int = 16, replicas: int | None = None,
                 duplicate_window: float = MIN_DUPLICATE_WINDOW, connect_timeout: float = 30.0,
                 ack_timeout: float = 10.0, name: str = "cio-sync-intake") -> None:
        urls = server_list(servers)
        check_stream_name(stream)
        if partitions < 1:
            raise ConfigError(f"partitions must be at least 1, not {partitions}")
        if replicas is not None and not 1 <= replicas <= 5:
            raise ConfigError(f"replicas must be 1 to 5 (JetStream's limits), not {replicas}")
        self.servers, self.stream, self.partitions = urls, stream, partitions
        self.duplicate_window = max(float(duplicate_window), MIN_DUPLICATE_WINDOW)
        self.ack_timeout = ack_timeout
        self._lock = threading.Lock()
        self._local = threading.local()
        self._published = self._duplicates = 0
        self._last_error: str | None = None
        self._closed = False
        self._loop = LoopThread("cio-sync-nats")
        self._nc: Any = None
        self._js: Any = None
        try:
            self.replicas = self._loop.run(self._connect(name, connect_timeout, replicas), connect_timeout + 5)
        except BaseException:
            self._loop.stop()
            raise

    # -- the event loop thread -------------------------------------------------------------------------------------

    async def _connect(self, name: str, timeout: float, replicas: int | None) -> int:
        self._nc = await connect(self.servers, name=name, timeout=timeout, on_error=self._on_error)
        self._js = self._nc.jetstream(timeout=min(5.0, timeout))
        try:
            found = await ensure_stream(self._nc, self._js, self.stream, partitions=self.partitions,
                                        replicas=replicas, duplicate_window=self.duplicate_window, timeout=timeout)
        except BaseException:
            await self._nc.close()
            raise
        return found.replicas

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def _publish(self, subject: str, payload: bytes, message_id: str) -> Any:
        future = await self._js.publish_async(subject, payload, headers={"Nats-Msg-Id": message_id},
                                              wait_stall=self.ack_timeout)
        return await asyncio.wait_for(future, self.ack_timeout)

    # -- the sink-like interface the intake drives -----------------------------------------------------------------

    def write(self, call: dict[str, Any] | str | bytes) -> None:
        """Validate ``call`` and publish it to its partition's subject; its ack is waited for by :meth:`sync`.

        Raises :class:`~cio_sync.InvalidCall` for a bad call (nothing is published), SinkClosed once closed.
        """
        if self._closed:
            raise SinkClosed(f"the publisher to stream {self.stream!r} is closed")
        parsed = parse_call(call)
        payload = parsed.document
        assert payload is not None  # parse_call without row=True always writes it
        subject = f"{self.stream}.{partition_of(person_key(parsed.data), self.partitions)}"
        future = self._loop.submit(self._publish(subject, payload, parsed.message_id))
        pending: list[concurrent.futures.Future[Any]] | None = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = []
        pending.append(future)

    def write_many(self, calls: Any) -> int:
        """Write each call of ``calls`` (an iterable of calls, or a Segment batch payload), as the sinks'
        ``write_many`` does: how many were published; the bad ones are skipped and raised together as
        :class:`~cio_sync.InvalidCalls` after the others were written."""
        return write_each(self.write, calls)

    def sync(self) -> None:
        """Return once JetStream acked every call this thread wrote since its last ``sync()``; raise
        :class:`~cio_sync.StorageError` if any of them was not acked (it may or may not be in the stream: write it
        again, and the duplicate window keeps one copy)."""
        pending: list[concurrent.futures.Future[Any]] = getattr(self._local, "pending", None) or []
        self._local.pending = []
        failure: BaseException | None = None
        published = duplicates = 0
        for future in pending:
            try:
                # The coroutine itself gives up after ack_timeout; the margin covers a stalled loop.
                ack = future.result(self.ack_timeout * 2 + 5)
            except _ACK_FAILURES as exc:
                failure = failure or exc
                continue
            published += 1
            duplicates += bool(ack.duplicate)
        with self._lock:
            self._published += published
            self._duplicates += duplicates
            if failure is not None:
                self._last_error = describe(failure)
        if failure is not None:
            raise StorageError(f"JetStream did not ack {len(pending) - published} of {len(pending)} calls to stream "
                               f"{self.stream!r}: {describe(failure)}") from failure

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> PublisherStats:
        with self._lock:
            return PublisherStats(self._published, self._duplicates, self._last_error)

    def close(self) -> None:
        """Wait for this thread's acks, then drain and close the connection and stop its event loop thread.
        Idempotent. Raises StorageError if acks failed (the connection is closed all the same)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sync()
        finally:
            try:
                if self._nc is not None:
                    self._loop.run(self._nc.drain(), self.ack_timeout + 5)
            except NATS_ERRORS as exc:
                log.warning("nats: closing the connection: %s", exc)
            finally:
                self._loop.stop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Publisher(servers={self.servers!r}, stream={self.stream!r}, partitions={self.partitions}, "
                f"replicas={getattr(self, 'replicas', None)})")
