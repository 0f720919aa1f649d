"""The exceptions cio_sync raises.

Every error derives from :class:`CioSyncError` and also from the builtin that matches it, so callers can catch
either ``cio_sync.InvalidCall`` or a plain ``ValueError``. Messages name the call, table or path concerned and never
carry credentials.
"""

from __future__ import annotations


class CioSyncError(Exception):
    """Base class of every error raised by cio_sync."""


class InvalidCall(CioSyncError, ValueError):
    """A call was rejected by validation; nothing of it was buffered.

    ``field`` names the offending top-level field (``None`` when the call as a whole is wrong) and ``reason`` says
    what is wrong with it. ``index`` is the position of the call in a ``write_many`` batch, when known.
    """

    def __init__(self, reason: str, *, field: str | None = None, index: int | None = None) -> None:
        self.field = field
        self.reason = reason
        self.index = index
        where = f"call #{index}: " if index is not None else "call: "
        what = f"{field}: " if field is not None else ""
        super().__init__(f"invalid {where}{what}{reason}")


class InvalidCalls(InvalidCall):
    """Some calls of a ``write_many`` batch were rejected; the others were accepted.

    ``errors`` holds one :class:`InvalidCall` per rejected call (each with its ``index``), ``accepted`` the number of
    calls that were accepted.
    """

    def __init__(self, errors: list[InvalidCall], *, accepted: int) -> None:
        self.errors = errors
        self.accepted = accepted
        first = "; ".join(str(e) for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        CioSyncError.__init__(self, f"{len(errors)} call(s) rejected, {accepted} accepted: {first}{more}")
        self.field = errors[0].field if errors else None
        self.reason = errors[0].reason if errors else ""
        self.index = errors[0].index if errors else None


class ConfigError(CioSyncError, ValueError):
    """A sink, format or writer was configured with a value it cannot work with."""


class StorageError(CioSyncError, OSError):
    """Storage failed while publishing or reading ``path``; the original error is the ``__cause__``."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)

    def __str__(self) -> str:
        # OSError's own __str__ formats errno/strerror; keep our message as is.
        return str(self.args[0]) if self.args else ""


class PublishConflict(StorageError, FileExistsError):
    """A file already exists under the name being published; the existing object was left unchanged."""


class MissingBackend(CioSyncError, ImportError):
    """The fsspec backend for a URL is not installed; the message says which extra to install."""


class SinkClosed(CioSyncError, RuntimeError):
    """A call or record was given to a sink after it was closed."""


class InvalidRecord(CioSyncError, ValueError):
    """A workspace record was rejected: unknown table, unknown or missing column, or a value of the wrong type.

    ``table`` and ``column`` name what is wrong (either may be ``None``); ``reason`` says how.
    """

    def __init__(self, reason: str, *, table: str | None, column: str | None = None) -> None:
        self.table = table
        self.column = column
        self.reason = reason
        self.index: int | None = None
        where = table or "record"
        what = f".{column}" if column is not None else ""
        super().__init__(f"invalid {where}{what}: {reason}")


class InvalidRecords(InvalidRecord):
    """Some rows of a ``record_many`` batch were rejected; the others were recorded.

    ``errors`` holds one :class:`InvalidRecord` per rejected row (each with its ``index``); ``emitted`` is the number
    of rows the accepted ones produced.
    """

    def __init__(self, errors: list[InvalidRecord], *, emitted: int) -> None:
        self.errors = errors
        self.emitted = emitted
        first = "; ".join(f"#{e.index}: {e}" for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        CioSyncError.__init__(self, f"{len(errors)} record(s) rejected: {first}{more}")
        self.table = errors[0].table if errors else None
        self.column = errors[0].column if errors else None
        self.reason = errors[0].reason if errors else ""
        self.index = errors[0].index if errors else None


class UnknownPerson(CioSyncError, LookupError):
    """A person named by id or cio_id does not exist in the workspace state."""


class StateError(CioSyncError):
    """Local state cannot be used: the workspace state file or a spool directory is in use by another sink or
    process (one serves one sink at a time), or the state was made for another workspace. The message names the
    file or directory."""


class BufferFull(CioSyncError):
    """The sink's memory budget is used up, storage is not taking files, and ``block_timeout`` ran out; the call
    was not accepted."""
