"""The Writer: publishes one batch as one file, create-only, whole or not at all.

The writer knows no modes and no formats: it takes a name under its root and the bytes of a file. On object stores
the create-only rule is enforced by the service through a conditional create (fsspec's ``mode="create"``: S3
``If-None-Match: *``, GCS ``ifGenerationMatch=0``, Azure ``If-None-Match: *``); on local disk the bytes go to a
temporary file that is then hard-linked under the final name, which fails if the name exists, so a reader never
sees a half-written file and an existing file is never replaced.

Local temporary files live in ``<root>/_cio_sync/tmp/``, never beside the data: a reader of the prefix (a glob, a
loader) cannot count one as data. A writer holds an ``flock`` on its temporary file from creation to removal, and
removes it on every failure. What a writer killed mid-publish left there is removed when a writer next opens the
prefix: a file nobody holds a lock on belongs to a dead writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import posixpath
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, TypeVar, runtime_checkable

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from cio_sync._errors import ConfigError, PublishConflict, StorageError
from cio_sync.storage.backends import display_url, redact, resolve, secrets_in

if sys.platform != "win32":
    import fcntl

log = logging.getLogger("cio_sync.writer")

#: Folder under a local root for the temporary files of publishes in progress (same filesystem as the data, so a
#: hard link can publish them).
TEMPORARY_FOLDER: Final = "_cio_sync/tmp"
#: Errors of ``os.link`` that mean "no hard links here" rather than "this publish failed".
_NO_HARD_LINKS: Final = frozenset({errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK})
_BINARY: Final = getattr(os, "O_BINARY", 0)

T = TypeVar("T")


@dataclass(frozen=True)
class WrittenFile:
    """One file that a writer published.

    ``path`` is the file's full location (a URL for object stores, a path on local disk), ``name`` its name under
    the sink's root, ``table`` the table or call type it holds, ``rows`` its row count and ``bytes`` its size.
    """

    path: str
    name: str
    table: str
    rows: int
    bytes: int

    def __repr__(self) -> str:
        return f"WrittenFile({self.path!r}, table={self.table!r}, rows={self.rows}, bytes={self.bytes})"


@runtime_checkable
class Writer(Protocol):
    """Where a sink's files go. ``publish`` is the one method a sink needs for data; the others keep counters."""

    #: A readable location of the writer's root, free of credentials.
    url: str

    def publish(self, name: str, data: bytes, *, table: str, rows: int, resume: bool = False) -> WrittenFile:
        """Create ``name`` under the root holding exactly ``data``.

        Raises :class:`~cio_sync.PublishConflict` if the name exists (the existing file is left unchanged) and
        :class:`~cio_sync.StorageError` if storage fails for good. With ``resume``, this publish may repeat an
        earlier attempt whose outcome is unknown (e.g. before a crash): a file that exists under ``name`` with
        exactly ``data`` counts as published.
        """
        ...

    def list(self, folder: str) -> list[str]:
        """The names directly inside ``folder`` (relative to the root), sorted; empty if it does not exist."""
        ...

    def remove(self, name: str) -> None:
        """Delete ``name`` under the root; a missing file is not an error."""
        ...


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter for transient storage errors."""

    #: Tries in all, the first included.
    attempts: int = 6
    initial_delay: float = 0.2
    max_delay: float = 10.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"retry attempts must be at least 1; got {self.attempts}")
        if self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ConfigError("retry delays must be non-negative and the multiplier at least 1")

    def delays(self) -> Iterator[float]:
        """The pauses between tries: "full jitter" on an exponentially growing ceiling."""
        ceiling = self.initial_delay
        for _ in range(self.attempts - 1):
            yield random.uniform(ceiling / 2, ceiling)
            ceiling = min(self.max_delay, ceiling * self.multiplier)


Outcome = Literal["conflict", "maybe-conflict", "permanent", "transient"]

#: Network failures that backends raise outside the OSError tree, by class (matched by name so that cio_sync
#: imports neither): azure-core's, under adlfs, once its own retries are spent, and aiohttp's lost connections and
#: cut-off bodies, under gcsfs.
_TRANSIENT_CLASSES: Final = frozenset({
    "azure.core.exceptions.ServiceRequestError",
    "azure.core.exceptions.ServiceResponseError",
    "aiohttp.client_exceptions.ClientConnectionError",
    "aiohttp.client_exceptions.ClientPayloadError",
})


def classify(exc: BaseException) -> Outcome:
    """What a storage exception means for a retry."""
    if isinstance(exc, FileExistsError):
        return "conflict"
    if isinstance(exc, PermissionError | FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return "permanent"
    if isinstance(exc, OSError) and exc.errno == errno.EINVAL:
        # s3fs reports a refused conditional create (HTTP 412) as EINVAL unless the body names If-None-Match
        # (shared/TESTING.md); it is checked, not assumed.
        return "maybe-conflict"
    if isinstance(exc, ConnectionError | TimeoutError | asyncio.TimeoutError):
        return "transient"
    if any(f"{c.__module__}.{c.__qualname__}" in _TRANSIENT_CLASSES for c in type(exc).__mro__):
        return "transient"
    status = getattr(exc, "code", None) or getattr(exc, "status", None) or getattr(exc, "status_code", None)
    if isinstance(status, int) and 100 <= status < 600:
        return "transient" if status in (408, 429) or status >= 500 else "permanent"
    if isinstance(exc, OSError):
        return "transient"
    return "permanent"


def check_name(name: str) -> str:
    """``name`` if it is a safe relative name under a root; a name that could leave the root is refused."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"file name must be a non-empty string; got {name!r}")
    if name.startswith("/") or "\\" in name or "://" in name or any(ord(c) < 32 for c in name):
        raise ConfigError(f"unsafe file name {name!r}: names are relative, without backslashes or control characters")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise ConfigError(f"unsafe file name {name!r}: empty, '.' and '..' path segments are not allowed")
    return name


_S3_MIN_PART: Final = 5 * 2**20


def _upload_options(fs: AbstractFileSystem, concurrency: int, part_size: int) -> dict[str, Any]:
    """What ``pipe_file`` of this filesystem takes to upload a large file in parts, several at once."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"s3", "s3a"}:
        wanted = {"max_concurrency": concurrency, "chunksize": part_size}  # s3fs: parts of chunksize, gathered
    elif protocols & {"abfs", "az", "abfss"}:
        wanted = {"max_concurrency": concurrency}  # adlfs: azure-storage-blob uploads blocks in parallel
    else:
        return {}
    # Only what this version's pipe_file names: an older one would hand an unknown keyword on to the service's
    # client, and every publish would fail.
    try:
        accepted = inspect.signature(getattr(fs, "_pipe_file", fs.pipe_file)).parameters
    except (TypeError, ValueError):
        return {}
    return {name: value for name, value in wanted.items() if name in accepted}


@dataclass(eq=False)
class FsspecWriter:
    """A :class:`Writer` over any fsspec filesystem.

    ``FsspecWriter("s3://bucket/prefix", storage_options={...})`` or ``FsspecWriter("bucket/prefix",
    filesystem=fs)``. Transient errors (connection resets, timeouts, throttling, 5xx) are retried by ``retry``; a
    retry after an ambiguous failure that finds the name taken reads the object back and accepts it only if it holds
    exactly the bytes being published, so a file is never overwritten and never written twice.
    """

    target: str
    filesystem: AbstractFileSystem | None = None
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Flush file contents to the disk before publishing on local filesystems.
    fsync: bool = True
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    #: Parts of one large file uploaded at once (S3 multipart parts, Azure blocks). GCS uploads a large file as one
    #: resumable upload, in order (gcsfs has no parallel upload).
    upload_concurrency: int = 8
    #: Size of each part of a multipart upload to S3 (at least 5 MiB, S3's minimum); files of two parts or more are
    #: uploaded in parts, ``upload_concurrency`` at a time.
    part_size: int = 16 * 2**20

    def __post_init__(self) -> None:
        fs, root = resolve(self.target, filesystem=self.filesystem, storage_options=self.storage_options)
        self._fs = fs
        self._root = root
        self._secrets = secrets_in(self.storage_options)
        self._local = isinstance(fs, LocalFileSystem)
        for name, value, least in (("upload_concurrency", self.upload_concurrency, 1),
                                   ("part_size", self.part_size, _S3_MIN_PART)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{name} must be an integer of at least {least}; got {value!r}")
        self._upload_options = _upload_options(fs, self.upload_concurrency, self.part_size)
        self.url = display_url(fs, root)
        # The writer keeps no credentials of its own beyond what the filesystem holds.
        self.storage_options = None
        if self._local:
            self._sweep_temporaries()

    def __repr__(self) -> str:
        return f"FsspecWriter({self.url!r})"

    @property
    def fs(self) -> AbstractFileSystem:
        """The fsspec filesystem files are published on."""
        return self._fs

    @property
    def root(self) -> str:
        """The root path on :attr:`fs` that names are relative to."""
        return self._root

    def path(self, name: str) -> str:
        """The full filesystem path of ``name``."""
        return f"{self._root}/{check_name(name)}" if self._root not in ("", "/") else f"/{check_name(name)}"

    def _where(self, path: str) -> str:
        return redact(path, self._secrets) if self._local else redact(display_url(self._fs, path), self._secrets)

    def _message(self, action: str, path: str, exc: BaseException) -> str:
        return redact(f"could not {action} {self._where(path)}: {type(exc).__name__}: {exc}", self._secrets)

    # -- publishing --------------------------------------------------------------------------------------------

    def publish(self, name: str, data: bytes, *, table: str, rows: int, resume: bool = False) -> WrittenFile:
        path = self.path(name)
        delays = self.retry.delays()
        ambiguous = resume
        while True:
            try:
                self._create(path, data)
            except Exception as exc:
                outcome = classify(exc)
                if outcome in ("conflict", "maybe-conflict"):
                    existing = self._read_existing(path) if ambiguous or outcome == "maybe-conflict" else b""
                    if existing is not None:
                        if ambiguous and existing == data:
                            log.info("publish of %s had landed before an ambiguous failure", self._where(path))
                            break
                        raise PublishConflict(
                            f"{self._where(path)} already exists; it was left unchanged", path=path
                        ) from exc
                elif outcome == "permanent":
                    raise StorageError(self._message("publish", path, exc), path=path) from exc
                delay = next(delays, None)
                if delay is None:
                    raise StorageError(
                        self._message(f"publish (after {self.retry.attempts} tries)", path, exc), path=path
                    ) from exc
                log.warning("retrying publish of %s in %.2fs: %s", self._where(path), delay,
                            redact(repr(exc), self._secrets))
                ambiguous = True
                self.sleep(delay)
            else:
                break
        return WrittenFile(path=self._where(path), name=name, table=table, rows=rows, bytes=len(data))

    def _create(self, path: str, data: bytes) -> None:
        if self._local:
            self._create_local(path, data)
            return
        try:
            self._fs.pipe_file(path, data, mode="create", **self._upload_options)
        except TypeError as exc:
            if "mode" not in str(exc):
                raise
            # A filesystem whose pipe_file predates mode="create": fall back to exclusive open.
            with self._fs.open(path, "xb") as f:
                f.write(data)

    def _create_local(self, path: str, data: bytes) -> None:
        """Publish ``data`` as ``path`` on local disk: whole or not at all, and nothing left behind when it fails.

        A publish that raises leaves neither its temporary file nor the final name: even a failed fsync of the
        folder takes the new name back, since it may not survive a power loss (the retry publishes it again).
        """
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = self._open_temporary(path)
        try:
            _write_all(fd, data)
            if self.fsync:
                os.fsync(fd)
            self._link(tmp, path, data)
        finally:
            _discard(fd, tmp)
        if self.fsync:
            try:
                _fsync_directory(directory)
            except BaseException:
                _remove_quietly(path)
                raise

    def _open_temporary(self, path: str) -> tuple[int, str]:
        """A new temporary file for ``path`` in the root's temporary folder, open for writing and locked.

        The lock is what tells a live writer's file from a dead one's (:meth:`_sweep_temporaries`). A sweeper
        may find the file in the moment between its creation and the lock, take the lock itself and delete it;
        then the file has no name left (or the lock is taken) and a new one is made, so no age threshold is
        needed.
        """
        folder = self.path(TEMPORARY_FOLDER)
        os.makedirs(folder, exist_ok=True)
        for _ in range(8):
            tmp = os.path.join(folder, f"{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o666)
            try:
                if _try_lock(fd) != "busy" and os.fstat(fd).st_nlink > 0:
                    return fd, tmp
            except BaseException:
                _discard(fd, tmp)
                raise
            os.close(fd)  # a sweeper has it and deletes it
        raise BlockingIOError(errno.EAGAIN, "could not lock a new temporary file", folder)

    def _link(self, tmp: str, path: str, data: bytes) -> None:
        try:
            os.link(tmp, path)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # No hard links here (some network and FUSE filesystems, or a data folder on another filesystem
            # than _cio_sync/): an exclusive create, not atomic. What it created is removed if it fails.
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _BINARY, 0o666)
            try:
                _write_all(fd, data)
                if self.fsync:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                _remove_quietly(path)
                raise
            os.close(fd)

    def _sweep_temporaries(self) -> None:
        """Remove the temporary files that writers killed mid-publish left under this root.

        Only files whose lock can be taken are removed: a live writer holds the lock on its own until it is done.
        Cheap when there is nothing to clean: one listing of an empty (or missing) folder. Best effort: a file
        that cannot be removed now is tried again by the next writer.
        """
        folder = self.path(TEMPORARY_FOLDER)
        try:
            with os.scandir(folder) as entries:
                names = [e.path for e in entries if e.name.endswith(".tmp")]
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            log.debug("could not list %s: %s", folder, exc)
            return
        removed = sum(_remove_if_dead(name) for name in names)
        if removed:
            log.info("removed %d temporary file(s) left in %s by writers that died mid-publish", removed,
                     self._where(folder))

    def _read_existing(self, path: str) -> bytes | None:
        """The bytes stored at ``path``, or ``None`` when nothing is there."""

        def read() -> bytes | None:
            self._fs.invalidate_cache(path)
            try:
                return bytes(self._fs.cat_file(path))
            except FileNotFoundError:
                return None

        return self._retrying("read", path, read)

    # -- counters' helpers -------------------------------------------------------------------------------------

    def list(self, folder: str) -> list[str]:
        path = self.path(folder)

        def ls() -> list[str]:
            self._fs.invalidate_cache(path)
            try:
                entries = self._fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            names = {posixpath.basename(str(e).rstrip("/")) for e in entries}
            return sorted(n for n in names if n and not n.startswith("."))

        return self._retrying("list", path, ls)

    def remove(self, name: str) -> None:
        path = self.path(name)

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(path)

        self._retrying("remove", path, rm)

    def read(self, name: str) -> bytes | None:
        """The bytes of ``name``, or ``None`` if there is no such file."""
        return self._read_existing(self.path(name))

    def _retrying(self, action: str, path: str, op: Callable[[], T]) -> T:
        delays = self.retry.delays()
        while True:
            try:
                return op()
            except Exception as exc:
                if classify(exc) != "transient":
                    raise StorageError(self._message(action, path, exc), path=path) from exc
                delay = next(delays, None)
                if delay is None:
                    raise StorageError(self._message(action, path, exc), path=path) from exc
                self.sleep(delay)



# -- local temporary files -----------------------------------------------------------------------------------------


def _try_lock(fd: int) -> Literal["locked", "busy", "unsupported"]:
    """Take the exclusive ``flock`` of ``fd`` without waiting. "busy": another open file holds it;
    "unsupported": this platform or filesystem has no such locks, so writers cannot be told apart."""
    if sys.platform == "win32":
        return "unsupported"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "busy"
    except OSError:
        return "unsupported"
    return "locked"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _discard(fd: int, tmp: str) -> None:
    """Remove a temporary file and close it (in that order, so that no sweeper takes it for a dead writer's
    while it still has a name; Windows cannot remove an open file, so there it is closed first)."""
    if sys.platform == "win32":
        with contextlib.suppress(OSError):
            os.close(fd)
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove the temporary file %s (%s); the next writer on this prefix removes it",
                    tmp, exc)
    finally:
        if sys.platform != "win32":
            with contextlib.suppress(OSError):
                os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not take back %s after a failed publish: %s", path, exc)


def _fsync_directory(directory: str) -> None:
    if sys.platform == "win32":
        return  # directories cannot be opened, nor need to be synced, there
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_if_dead(path: str) -> bool:
    """Delete the temporary file ``path`` if no live writer holds its lock; whether it was deleted."""
    try:
        fd = os.open(path, os.O_RDONLY | _BINARY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        if _try_lock(fd) != "locked":
            return False
        mine = os.fstat(fd)
        named = os.stat(path, follow_symlinks=False)
        if (named.st_dev, named.st_ino) != (mine.st_dev, mine.st_ino):
            return False
        os.unlink(path)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True
