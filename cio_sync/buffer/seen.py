"""The dedupe window: which ``messageId``\\ s a sink has already taken, so that a client's retry lands once.

A client that sent a batch and got no answer (a timeout, a 503 in the middle of the batch, the server killed) sends
the same calls again, under the same ``messageId``\\ s. A sink with a window (``dedupe_window=``) drops a call whose
``messageId`` it took within the window, whether its first copy is still in the spool or published long ago.

Where an id is, and why that is exactly what is durable:

- **Held** (in memory): the call's rows are in the row store (the spool) and not yet published. After a crash the
  spool's recovered rows give their ids back (:meth:`MessageIdWindow.hold` from the sink, before anything is
  published), so a kill -9 at any moment loses no id whose call survived, and keeps none whose call did not.
- **Kept** (in the window's SQLite file, ``message-ids.sqlite`` in the spool directory): before a publishing round
  names or uploads any batch, every held id is written there (after a ``sync()`` of the spool, so no id is on disk
  before its call is), and committed with an fsync. So an id leaves the spool only once it is in the file, and a
  call published and then retried is dropped for as long as the window lasts.

Ids are kept as they are (up to 64 bytes; longer ones as 16-byte BLAKE2b digests), each ~90 bytes on disk for a
36-character UUID with the index: about 8 GB for a day at 1,000 calls/s. Ids older than the window are deleted as
new ones are kept. A request's ids can be looked up in one query first (:meth:`MessageIdWindow.prefetched`), so
that each call's check under the publisher's lock is a lookup in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Final

from cio_sync._errors import ConfigError, StorageError

#: The window's file in the spool directory (the spool leaves it, and SQLite's -wal and -shm files, alone).
FILE_NAME: Final = "message-ids.sqlite"
#: The least window: what Segment documents for its own dedupe, and what the intake promises.
DEFAULT_WINDOW: Final = timedelta(hours=24)
#: Expired ids are deleted at most this often (seconds).
EXPIRE_EVERY: Final = 60.0


def digest(message_id: str) -> bytes:
    """The key ``message_id`` is kept under: its UTF-8 bytes behind a 1 if they are at most 64 (a UUID is 36),
    else a 0 and their 16-byte BLAKE2b digest (a collision needs ~2⁶⁴ ids). The marks keep the two kinds apart."""
    raw = message_id.encode("utf-8", "surrogatepass")
    if len(raw) <= _RAW_MAX:
        return b"\x01" + raw
    return b"\x00" + hashlib.blake2b(raw, digest_size=16).digest()


#: The longest id kept as it is (longer ones are kept as digests).
_RAW_MAX: Final = 64
#: Ids looked up in one query by :meth:`MessageIdWindow.prefetched` (SQLite allows 32,766 parameters).
_CHUNK: Final = 500


class _Hint(threading.local):
    """What :meth:`MessageIdWindow.prefetched` found for this thread: valid while ``generation`` is the window's."""

    generation = -1
    keys: frozenset[bytes] = frozenset()
    found: frozenset[bytes] = frozenset()


def window_seconds(window: float | timedelta | None) -> float | None:
    """``window`` (seconds or a ``timedelta``; ``None``: no dedupe) checked, in seconds."""
    if window is None:
        return None
    seconds = window.total_seconds() if isinstance(window, timedelta) else window
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise ConfigError(f"dedupe_window must be a positive number of seconds, a timedelta, or None; got {window!r}")
    return float(seconds)


class MessageIdWindow:
    """The ids a sink took within the last ``window`` seconds: held (their calls in the row store) or kept (in the
    SQLite file at ``path``; ``None``: in memory, for a sink without a spool, whose calls do not outlive it either).

    Thread-safe. :meth:`seen` and :meth:`hold` are called under the publisher's lock, together with the append of the
    call's rows, so two copies of one call never both get in.
    """

    def __init__(self, path: str | os.PathLike[str] | None, window: float | timedelta = DEFAULT_WINDOW, *,
                 clock: Callable[[], float] = time.time) -> None:
        seconds = window_seconds(window)
        assert seconds is not None
        self.window = seconds
        self.path = Path(path) if path is not None else None
        self._clock = clock
        self._lock = threading.Lock()
        self._held: set[bytes] = set()
        self._expired_at = 0.0
        #: Raised by every :meth:`keep` (under ``_lock``, with the ids it moved from held to the file): a prefetch
        #: of an older generation may have missed them, and is not used.
        self._generation = 0
        self._hint = _Hint()
        try:
            self._db = sqlite3.connect(str(self.path) if self.path is not None else ":memory:",
                                       isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS ids (id BLOB PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID")
            self._db.execute("CREATE INDEX IF NOT EXISTS ids_at ON ids (at)")
        except sqlite3.Error as exc:
            raise self._error("cannot open", exc) from exc

    def _error(self, what: str, exc: BaseException) -> StorageError:
        where = str(self.path) if self.path is not None else "memory"
        return StorageError(f"dedupe window {where}: {what}: {type(exc).__name__}: {exc}")

    @property
    def held(self) -> int:
        """How many ids are held (their calls not yet published)."""
        with self._lock:
            return len(self._held)

    def seen(self, message_id: str) -> bool:
        """Whether a call with this ``messageId`` was taken within the window. :class:`StorageError` if the file
        cannot be read (then the call is not taken: better a retry than a duplicate or a loss)."""
        key = digest(message_id)
        with self._lock:
            if key in self._held:
                return True
            hint = self._hint
            if hint.generation == self._generation and key in hint.keys:
                return key in hint.found
            try:
                row = self._db.execute("SELECT 1 FROM ids WHERE id = ? AND at >= ?",
                                       (key, self._clock() - self.window)).fetchone()
            except sqlite3.Error as exc:
                raise self._error("cannot read", exc) from exc
        return row is not None

    @contextlib.contextmanager
    def prefetched(self, message_ids: Iterable[str]) -> Iterator[None]:
        """Within the block, :meth:`seen` in this thread answers for ``message_ids`` from one lookup of the file
        made now (in queries of 500), instead of one query per call; a :meth:`keep` in between makes it ask the
        file again. :class:`StorageError` if the file cannot be read."""
        keys = frozenset(digest(m) for m in message_ids)
        with self._lock:
            generation = self._generation
            since = self._clock() - self.window
            found: set[bytes] = set()
            chunks = list(keys)
            try:
                for start in range(0, len(chunks), _CHUNK):
                    part = chunks[start:start + _CHUNK]
                    marks = ",".join("?" * len(part))
                    found.update(row[0] for row in self._db.execute(
                        f"SELECT id FROM ids WHERE at >= ? AND id IN ({marks})", (since, *part)))
            except sqlite3.Error as exc:
                raise self._error("cannot read", exc) from exc
        hint = self._hint
        hint.generation, hint.keys, hint.found = generation, keys, frozenset(found)
        try:
            yield
        finally:
            hint.generation, hint.keys, hint.found = -1, frozenset(), frozenset()

    def hold(self, message_ids: Iterable[str]) -> None:
        """Note ids whose calls were just put in the row store (or were found there after a restart)."""
        keys = [digest(m) for m in message_ids]
        with self._lock:
            self._held.update(keys)

    def snapshot(self) -> frozenset[bytes]:
        """The ids held now (take it together with the batches about to be published, under the publisher's lock)."""
        with self._lock:
            return frozenset(self._held)

    def keep(self, keys: frozenset[bytes]) -> None:
        """Write ``keys`` (from :meth:`snapshot`, once their calls are durable in the row store) to the file with an
        fsync, then stop holding them; delete ids past the window now and then. :class:`StorageError` if the file
        cannot be written (a full disk): the ids stay held, and nothing may be published until a later try works."""
        if not keys:
            return
        now = self._clock()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany("INSERT OR REPLACE INTO ids VALUES (?, ?)", ((k, now) for k in keys))
                    if now - self._expired_at >= EXPIRE_EVERY:
                        self._db.execute("DELETE FROM ids WHERE at < ?", (now - self.window,))
                    self._db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error("cannot keep ids", exc) from exc
            if now - self._expired_at >= EXPIRE_EVERY:
                self._expired_at = now
            self._generation += 1
            self._held.difference_update(keys)

    def kept(self) -> int:
        """How many ids the file holds within the window."""
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM ids WHERE at >= ?", (self._clock() - self.window,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()
