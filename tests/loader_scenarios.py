"""Child functions for the loader's fault tests, run under faultfs by ``tests.faults.run_child``."""

from __future__ import annotations

from typing import Any

import cio_sync
from tests.faults import faults


def load(prefix: str, into: str, arm: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load ``prefix`` into ``into``, with the injector armed as ``arm`` says once the database is open (or from the
    start, by the environment); report how it ended and the injector's counts."""
    injector = faults()
    if arm:
        injector.arm(**arm)
    try:
        report = cio_sync.load(prefix, into)
    except cio_sync.CioSyncError as exc:
        return {"error": str(exc), "type": type(exc).__name__, "failures": injector.failures,
                "totals": injector.totals()}
    return {"error": None, "loaded": report.files_loaded, "quarantined": [q.name for q in report.quarantined],
            "failures": injector.failures, "totals": injector.totals()}
