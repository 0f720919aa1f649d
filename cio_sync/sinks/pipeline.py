"""Both modes from one stream of calls: each call is validated once and given to every sink."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from cio_sync._errors import ConfigError, InvalidCall
from cio_sync.intake.calls import Call, parse_call
from cio_sync.publish.publisher import SinkStats
from cio_sync.sinks.advanced import AdvancedSink
from cio_sync.sinks.base import BaseSink
from cio_sync.sinks.buffered import BufferedSink
from cio_sync.sinks.standard import StandardSink
from cio_sync.storage.writer import Writer, WrittenFile


@dataclass(frozen=True)
class PipelineStats:
    """What each sink of a :class:`Pipeline` has done: the stats of each, side by side (``None`` for a sink left
    out). They are not added up: a call both sinks accepted is one call in each."""

    advanced: SinkStats | None
    standard: SinkStats | None


class Pipeline(BaseSink):
    """Give each call to an Advanced sink (kept as sent) and a Standard sink (what it changed), as Customer.io does
    for a workspace with both integrations.

    A call is validated once: one rejected by validation reaches neither sink (``InvalidCall`` is raised), and the
    two sinks see the same ``messageId`` and ``receivedAt``. Either sink may be left out. The Advanced sink may be
    any sink built on :class:`~cio_sync.BufferedSink`. ``stats`` is a :class:`PipelineStats` (each sink's own);
    ``writer`` is the Advanced sink's writer (the Standard sink's if there is no Advanced sink).
    """

    def __init__(self, *, advanced: BufferedSink | None = None, standard: StandardSink | None = None) -> None:
        if advanced is None and standard is None:
            raise ConfigError("a Pipeline needs an advanced sink, a standard sink, or both")
        self.advanced = advanced
        self.standard = standard

    def __repr__(self) -> str:
        return f"Pipeline(advanced={self.advanced!r}, standard={self.standard!r})"

    @property
    def sinks(self) -> list[BaseSink]:
        """The sinks calls go to: the Advanced one first."""
        return [s for s in (self.advanced, self.standard) if s is not None]

    def write(self, call: Any) -> str:
        """Validate ``call`` once and give it to each sink; return its ``messageId``."""
        wants_row = isinstance(self.advanced, AdvancedSink) and not self.advanced.writes_documents
        try:
            parsed: Call = parse_call(call, row=wants_row)
            # Checks that only encoding can make (a value JSON cannot hold) happen before either sink sees it.
            for sink in self.sinks:
                sink.check_call(parsed)
        except InvalidCall as exc:
            for sink in self.sinks:
                sink.refuse(call, exc)
            raise
        if self.standard is None:
            assert self.advanced is not None
            self.advanced.write_call(parsed)
            return parsed.message_id
        if self.advanced is None:
            self.standard.write_call(parsed)
            return parsed.message_id
        # Both sinks or neither: the Advanced sink holds the call (spooled, if it has a spool) while the Standard
        # sink applies and commits it, and takes it back if that fails; no Advanced cut happens in between. Room is
        # made first in both, so that neither waits for storage while the other holds its lock.
        self.standard.make_room()
        with self.advanced.holding(parsed):
            cut = self.standard.write_deferred(parsed)
        if cut:
            self.standard.publish_ready()
        return parsed.message_id

    def prefetch_message_ids(self, message_ids: Iterable[str]) -> AbstractContextManager[None]:
        """The Advanced sink's (the Standard sink looks ids up in its state, within each call's step)."""
        if self.advanced is None:
            return super().prefetch_message_ids(message_ids)
        return self.advanced.prefetch_message_ids(message_ids)

    def sync(self) -> None:
        """The durability barrier: return once every call :meth:`write` accepted before this call is durable in
        both sinks: fsynced in the Advanced sink's spool (:meth:`BufferedSink.sync <cio_sync.BufferedSink.sync>`;
        an Advanced sink without a spool has nothing to wait for) and committed in the Standard sink's state
        (:meth:`StandardSink.commit <cio_sync.StandardSink.commit>`). Raises :class:`~cio_sync.StorageError` as
        those do; the Standard sink is committed even if the Advanced sink's spool failed."""
        error: BaseException | None = None
        if self.advanced is not None:
            try:
                self.advanced.sync()
            except BaseException as exc:
                error = exc
        if self.standard is not None:
            self.standard.commit()
        if error is not None:
            raise error

    def flush(self) -> list[WrittenFile]:
        """Flush both sinks; the files of both."""
        return [f for sink in self.sinks for f in sink.flush()]

    def close(self) -> list[WrittenFile]:
        """Close both sinks (each is closed even if the other fails)."""
        files: list[WrittenFile] = []
        error: BaseException | None = None
        for sink in self.sinks:
            try:
                files += sink.close()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error
        return files

    @property
    def closed(self) -> bool:
        """Whether every sink is closed."""
        return all(sink.closed for sink in self.sinks)

    @property
    def stats(self) -> PipelineStats:  # type: ignore[override]
        """Each sink's stats (see :class:`PipelineStats`)."""
        return PipelineStats(advanced=None if self.advanced is None else self.advanced.stats,
                             standard=None if self.standard is None else self.standard.stats)

    @property
    def writer(self) -> Writer:
        """The Advanced sink's writer, or the Standard sink's if there is no Advanced sink."""
        sink = self.advanced if self.advanced is not None else self.standard
        assert sink is not None
        return sink.writer

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
