"""What every sink shares: where its files go, the context manager, flush/close/stats, and batch intake."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Self

from fsspec import AbstractFileSystem

from cio_sync._errors import ConfigError, InvalidCall, InvalidCalls
from cio_sync.intake.calls import Call, load_json
from cio_sync.publish.publisher import Publisher, SinkStats
from cio_sync.storage.writer import FsspecWriter, RetryPolicy, Writer, WrittenFile

#: Keys of a Segment batch envelope (``POST /v1/batch``) that apply to every call in it that lacks them.
_ENVELOPE_DEFAULTS = ("context", "integrations", "sentAt")


def make_writer(
    target: str | Writer,
    *,
    filesystem: AbstractFileSystem | None,
    storage_options: Mapping[str, Any] | None,
    retry: RetryPolicy | None,
) -> Writer:
    """The writer a sink publishes through: ``target`` itself if it is a Writer, else an :class:`FsspecWriter`."""
    if isinstance(target, str):
        return FsspecWriter(target, filesystem=filesystem, storage_options=storage_options,
                            retry=retry or RetryPolicy())
    if filesystem is not None or storage_options or retry is not None:
        raise ConfigError("filesystem, storage_options and retry are given with a URL or path, not with a Writer")
    if not isinstance(target, Writer):
        raise ConfigError(f"target must be a URL, a path or a Writer; got {type(target).__name__}")
    return target


def check_int(name: str, value: Any, *, minimum: int = 0) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; a clear :class:`ConfigError` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def expand_batch(calls: Any) -> Iterable[Any]:
    """The calls of ``calls``: an iterable of calls, or a Segment batch payload ``{"batch": [...], ...}`` given as a
    dict, JSON str or JSON bytes, whose ``context``, ``integrations`` and ``sentAt`` fill in calls that lack them."""
    payload = calls
    if isinstance(calls, str | bytes | bytearray | memoryview):
        payload = load_json(calls, "batch", batch=True)  # its calls are checked one by one, each with its index
    if isinstance(payload, Mapping):
        batch = payload.get("batch")
        if not isinstance(batch, list):
            raise InvalidCall("a batch payload needs a 'batch' array of calls", field="batch")
        defaults = {k: payload[k] for k in _ENVELOPE_DEFAULTS if payload.get(k) is not None}
        if not defaults:
            return batch
        return ({**defaults, **c} if isinstance(c, Mapping) else c for c in batch)
    if isinstance(payload, list | tuple) or (isinstance(payload, Iterable) and not isinstance(payload, str)):
        return payload
    raise InvalidCall(f"write_many takes an iterable of calls or a batch payload; got {type(calls).__name__}")


def write_each(write: Callable[[Any], object], calls: Any) -> int:
    """``write`` each call of ``calls`` (an iterable of calls or a Segment batch payload, see :func:`expand_batch`);
    how many were accepted. Every valid call is written even when others are not; the refused ones are raised at
    the end as :class:`~cio_sync.InvalidCalls`, one error per call with its ``index``."""
    errors: list[InvalidCall] = []
    accepted = 0
    for index, call in enumerate(expand_batch(calls)):
        try:
            write(call)
        except InvalidCall as exc:
            errors.append(InvalidCall(exc.reason, field=exc.field, index=index))
        else:
            accepted += 1
    if errors:
        raise InvalidCalls(errors, accepted=accepted)
    return accepted


class BaseSink:
    """Context manager, flush, close and stats over a :class:`Publisher`. Subclasses set ``_publisher``."""

    _publisher: Publisher

    def write(self, call: Any) -> object:  # pragma: no cover - every sink overrides it
        raise NotImplementedError

    def write_many(self, calls: Any) -> int:
        """Write every call of ``calls``; return how many were accepted.

        ``calls`` is an iterable of calls (dicts, JSON strs or bytes) or a Segment batch payload. Every valid call is
        accepted even when others are not; if any was rejected, :class:`~cio_sync.InvalidCalls` is raised at the end
        with one error per rejected call (``.errors``, each with its ``index``) and the number accepted.
        """
        return write_each(self.write, calls)

    # -- composing sinks: how a Pipeline gives one validated call to several sinks, to all of them or to none ----

    def check_call(self, parsed: Call) -> None:
        """Raise :class:`~cio_sync.InvalidCall` if this sink would refuse ``parsed`` (a call ``parse_call``
        accepted) for what only its own encoding finds; keep nothing."""

    def refuse(self, given: Any, error: InvalidCall) -> None:
        """Count a call refused before it reached this sink (kept as a dead letter with ``keep_rejected``)."""
        self._publisher.reject(given, error)

    def prefetch_message_ids(self, message_ids: Iterable[str]) -> AbstractContextManager[None]:
        """A block within which this thread's writes of calls with these ``messageId``\\ s check the dedupe window
        against one lookup made now instead of one per call (a batch's ids, before its writes); nothing to do for
        a sink without a window."""
        return contextlib.nullcontext()

    def make_room(self) -> None:
        """Before taking a call: publish (or spill, or wait) if the memory budget is used up."""
        self._publisher.make_room()

    def holding(self, parsed: Call) -> AbstractContextManager[None]:
        """Buffer ``parsed`` for as long as the ``with`` block does not raise; if it does, the call is taken back
        as if it had never been written, and no batch is cut in between. Raises ``InvalidCall`` (counted) before
        the block if the sink refuses the call."""
        raise NotImplementedError(f"{type(self).__name__} cannot hold a call for another sink")

    def write_deferred(self, parsed: Call) -> bool:
        """Take ``parsed`` without publishing anything now; return whether batches are ready to publish (then
        call :meth:`publish_ready`, outside any other sink's :meth:`holding`)."""
        self.write_call(parsed)
        return False

    def write_call(self, parsed: Call) -> object:  # pragma: no cover - every sink overrides it
        """Buffer a call already validated by ``parse_call``."""
        raise NotImplementedError

    def publish_ready(self) -> None:
        """Publish the batches already cut; a failure is logged and retried later, never raised."""
        self._publisher.publish_ready()

    def flush(self) -> list[WrittenFile]:
        """Publish everything buffered now: one file per table that has rows. Returns the files published.

        Raises :class:`~cio_sync.StorageError` if storage fails for good; the rows stay buffered for the next
        flush.
        """
        return self._publisher.flush()

    def close(self) -> list[WrittenFile]:
        """Publish what is buffered and stop the timer. Idempotent; after it, writes raise ``SinkClosed``."""
        return self._publisher.close()

    @property
    def closed(self) -> bool:
        """Whether the sink takes no more calls."""
        return self._publisher.closed

    @property
    def stats(self) -> SinkStats:
        """Counts of calls, rows, files and bytes, and the age of the oldest buffered row."""
        return self._publisher.stats()

    @property
    def writer(self) -> Writer:
        """Where the sink publishes its files."""
        return self._publisher.writer

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
