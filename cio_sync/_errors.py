"""The exceptions cio_sync raises.

Every error derives from :class:`CioSyncError` and also from the builtin that matches it, so callers can catch
either ``cio_sync.InvalidCall`` or a plain ``ValueError``. Messages name the call, table or path concerned and never
carry credentials.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Final, NoReturn


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


class StateError(CioSyncError, RuntimeError):
    """Local state cannot be used: the workspace state file or a spool directory is in use by another sink or
    process (one serves one sink at a time), the state was made for another workspace, or the file is not a state
    at all. The message names the file or directory.

    A ``RuntimeError``: the state is in a condition this process cannot work in, and trying again will not help
    until someone acts (unlike a fault of the storage, a :class:`StorageError`, which is an ``OSError``)."""


class Fenced(StateError):
    """A workspace state was taken over by a later owner: another process called ``take_ownership`` with a higher
    epoch (a worker that took this one's partition). Raised by ``take_ownership`` when a higher epoch is stored, and
    by a commit of a state that owned a lower one, in the same transaction as the check: that commit was rolled
    back, so nothing of it is visible, and the state writes nothing more. Stop using the sink; the new owner goes
    on from what was committed before."""


class BufferFull(CioSyncError, TimeoutError):
    """The sink's memory budget is used up, storage is not taking files, and ``block_timeout`` ran out; the call
    was not accepted, and may be written again later.

    A ``TimeoutError`` (so also an ``OSError``): it is raised only when the wait ``block_timeout`` allows has run
    out, as ``concurrent.futures`` and ``asyncio`` raise it for their timeouts, and what it waited for is storage.
    (``BufferError`` would read well but is Python's error for the buffer protocol of ``memoryview``.)"""


class InvalidFile(CioSyncError, ValueError):
    """A file's contents cannot be read as what its name says (a Parquet, CSV or JSON-lines file of a table, or a
    manifest): cut short, of another format, or with values its table's schema cannot hold.

    ``name`` is the file (``None`` when not known), ``reason`` what is wrong with it. The loader quarantines such a
    file with the reason and goes on (see :func:`cio_sync.load`).
    """

    def __init__(self, reason: str, *, name: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.name = name

    def __str__(self) -> str:
        # The name may be filled in by a caller that knows it (the loader, around a parser that does not).
        return f"{self.name}: {self.reason}" if self.name else self.reason


# -- the libraries' errors, where they enter cio_sync -----------------------------------------------------------

#: The error cio_sync raises for each error of the libraries it calls into, by where the library exports the class
#: (``module.Name``; not the class's ``__module__``, which moves: DuckDB's are ``_duckdb.*``). :func:`library_error`
#: looks the class of an exception and then its bases up here, so a library's base class covers its subclasses and
#: a specific entry overrides its base. tests/test_errors.py checks that every exception
#: class these libraries export finds an entry and that every entry names a class that exists.
LIBRARY_ERRORS: Final[Mapping[str, type[CioSyncError]]] = {
    # The workspace state (SQLite): a state that cannot be used; faults of the disk below are picked out by
    # their result code (``_SQLITE_STORAGE_CODES``), not by class, since SQLite raises them as OperationalError.
    "sqlite3.Error": StateError,
    "sqlite3.Warning": StateError,
    # DuckDB as a load target: the warehouse failed.
    "duckdb.Error": StorageError,
    "duckdb.Warning": StorageError,
    "duckdb.DataError": InvalidFile,  # rows the warehouse refuses (conversions, ranges): the file's fault
    # PostgreSQL as a load target.
    "psycopg.Error": StorageError,
    "psycopg.Warning": StorageError,
    "psycopg.DataError": InvalidFile,
    # (A ProgrammingError is a URL psycopg cannot parse only when connecting: the loader says so there.)
    # pyarrow reading a file: the bytes are not what the name says; its I/O errors are the storage's.
    "pyarrow.ArrowException": InvalidFile,
    "pyarrow.lib.ArrowIOError": StorageError,
    # The spool, the state file and anything else on disk.
    "builtins.OSError": StorageError,
}

#: SQLite's primary result codes for faults of the storage below it: BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL,
#: CANTOPEN, PROTOCOL.
_SQLITE_STORAGE_CODES: Final = frozenset({5, 6, 7, 8, 10, 13, 14, 15})


def _library_classes() -> dict[type, type[CioSyncError]]:
    """The classes :data:`LIBRARY_ERRORS` names, of the libraries this process has imported (an error of a library
    that was never imported cannot occur, and importing an optional one here would cost its import)."""
    found: dict[type, type[CioSyncError]] = {}
    for name, kind in LIBRARY_ERRORS.items():
        module, _, attribute = name.rpartition(".")
        if module.split(".")[0] not in sys.modules:
            continue
        try:
            cls = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError):  # a version of the library without it
            continue
        found[cls] = kind
    return found


def library_error(exc: BaseException) -> type[CioSyncError] | None:
    """The cio_sync error class that stands for ``exc``, an error of a library cio_sync calls (the nearest class in
    its MRO that :data:`LIBRARY_ERRORS` names), or ``None`` if it is none of theirs."""
    if isinstance(exc, CioSyncError):
        return type(exc)
    if isinstance(exc, MemoryError):
        return None  # this process ran out of memory (pyarrow's ArrowMemoryError too): no library's fault
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _SQLITE_STORAGE_CODES:
        return StorageError
    classes = _library_classes()
    for kind in type(exc).__mro__:
        if kind in classes:
            return classes[kind]
    return None


def make_error(kind: type[CioSyncError], message: str, *, path: str | None = None) -> CioSyncError:
    """An instance of ``kind`` with ``message`` (and ``path`` where the class keeps one)."""
    if issubclass(kind, StorageError):
        return kind(message, path=path)
    if issubclass(kind, InvalidFile):
        return kind(message, name=path)
    return kind(message)


@contextlib.contextmanager
def library_errors(what: str, *, path: str | None = None,
                   clean: Callable[[str], str] | None = None) -> Iterator[None]:
    """Raise, for an error of a library met within, the cio_sync error :func:`library_error` names, ``from`` it.

    The message is ``"<what>: <the library's message>"`` (on one line, passed through ``clean``, which removes
    credentials, when given); ``what`` should name the file, URL or database. cio_sync errors and errors of no
    listed library pass through unchanged.
    """
    try:
        yield
    except Exception as exc:
        kind = library_error(exc)
        if kind is None or isinstance(exc, CioSyncError):
            raise
        raise_as(kind, what, exc, path=path, clean=clean)


def raise_as(kind: type[CioSyncError], what: str, exc: BaseException, *, path: str | None = None,
             clean: Callable[[str], str] | None = None) -> NoReturn:
    """Raise a ``kind`` saying ``what`` and ``exc``'s message, ``from exc``."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if clean is not None:
        detail = clean(detail)
    raise make_error(kind, f"{what}: {detail}", path=path) from exc
