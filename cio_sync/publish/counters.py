"""Durable counters for file names (Advanced positions, Standard sequences).

A counter lives under the writer's root in ``_cio_sync/counters/<key>/``, not in the data files, so deleting data
files after loading them (the documented workflow) never lets a name be used twice. Taking the next value means
publishing a small claim marker named by that value with a conditional create: of two processes that race for the
same value exactly one wins and the other moves on, so concurrent writers never share a name and leave no gap.

Markers more than ``KEEP`` below the value just claimed are deleted now and then, so a counter folder holds at most
about ``1.5 * KEEP`` small objects, however many files were written. That is safe because a marker is only deleted
when one at least ``KEEP`` higher exists, and a claim counts only if, once its marker is in place, no marker ``KEEP``
or more above it exists: a writer whose view was that stale (its value might have been claimed and pruned) throws
its claim away and claims above the highest. What a user must keep: the ``_cio_sync/`` folder under the prefix.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from datetime import UTC, datetime
from typing import Final

import orjson

from cio_sync._errors import ConfigError, PublishConflict, StorageError
from cio_sync.storage.writer import Writer

log = logging.getLogger("cio_sync.counters")

#: Folder under the root that holds every counter.
COUNTERS_FOLDER: Final = "_cio_sync/counters"
_WIDTH: Final = 20
#: How many of the most recent markers of a counter are always kept.
KEEP: Final = 64


class Counters:
    """Strictly increasing integers per key, shared safely by every process writing under one root."""

    def __init__(self, writer: Writer, *, folder: str = COUNTERS_FOLDER) -> None:
        self._writer = writer
        self._folder = folder
        self._last: dict[str, int] = {}
        self._lock = threading.Lock()
        self._owner = f"{socket.gethostname()}:{os.getpid()}"

    def _dir(self, key: str) -> str:
        if not key or any(not (c.isalnum() or c in "._-") for c in key) or key.startswith("."):
            raise ConfigError(f"counter key must be letters, digits, '.', '_' or '-'; got {key!r}")
        return f"{self._folder}/{key}"

    def current(self, key: str) -> int:
        """The highest value claimed so far for ``key`` by any writer (0 if none)."""
        values = [int(n) for n in self._writer.list(self._dir(key)) if n.isdigit()]
        return max(values, default=0)

    def claim(self, key: str, *, at_least: int = 1) -> int:
        """Take the next value of ``key``: above every value claimed before, and at least ``at_least``."""
        folder = self._dir(key)
        with self._lock:
            last = self._last.get(key)
            value = max((last if last is not None else self.current(key)) + 1, at_least)
            while True:
                # A nonce makes every claim's bytes unique, so no one can take another claimer's marker for its own.
                marker = orjson.dumps({"claimed_at": datetime.now(UTC), "by": self._owner,
                                       "nonce": secrets.token_hex(8)})
                try:
                    self._writer.publish(f"{folder}/{value:0{_WIDTH}d}", marker, table="_counter", rows=0)
                except PublishConflict:
                    value = max(value + 1, self.current(key) + 1)
                    continue
                highest = self.current(key)
                if highest >= value + KEEP:
                    # Our view was stale: this value may have been claimed and pruned. Claim above the highest.
                    self._remove_quietly(folder, value)
                    value = highest + 1
                    continue
                break
            self._last[key] = value
        if value % (KEEP // 2) == 0:
            self._prune(folder, below=value - KEEP)
        return value

    def _remove_quietly(self, folder: str, value: int) -> None:
        try:
            self._writer.remove(f"{folder}/{value:0{_WIDTH}d}")
        except StorageError as exc:
            log.debug("could not remove counter marker %s/%s: %s", folder, value, exc)

    def _prune(self, folder: str, *, below: int) -> None:
        """Delete the markers below ``below``. Best effort: a leftover marker is harmless."""
        try:
            stale = [int(n) for n in self._writer.list(folder) if n.isdigit() and int(n) < below]
        except StorageError as exc:
            log.debug("could not list counter markers in %s: %s", folder, exc)
            return
        for n in stale:
            self._remove_quietly(folder, n)
