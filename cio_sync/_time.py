"""Time as the files hold it: timestamp columns count microseconds since the epoch, in UTC.

A leaf module: every layer that turns a time into a cell, or a cell into a time, uses these and no copy of them.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Final

#: The instant timestamp columns count microseconds from.
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(moment: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch (UTC), as timestamp columns store it."""
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def now_micros() -> int:
    """The current time in microseconds since the epoch."""
    return time.time_ns() // 1000


#: ISO-8601 in UTC with microseconds, as dead letters and manifests write times.
ISO_MICROS: Final = "%Y-%m-%dT%H:%M:%S.%fZ"


def iso_micros(micros: int) -> str:
    """Microseconds since the epoch as ISO-8601 UTC text (``2026-12-02T05:37:53.000000Z``)."""
    return (EPOCH + timedelta(microseconds=micros)).strftime(ISO_MICROS)
