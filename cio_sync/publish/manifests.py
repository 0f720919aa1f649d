"""Manifests: one JSON document per sync, listing the files it published (docs/manifests.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cio_sync.publish.layout import MANIFESTS_FOLDER

__all__ = ["MANIFESTS_FOLDER", "ManifestSpec"]


@dataclass(frozen=True)
class ManifestSpec:
    """How a sink's manifests are named and what they say about the sink (see docs/manifests.md)."""

    #: Returns the name (under the sink's root) of the next manifest; names never repeat.
    name_for: Callable[[], str]
    #: Fields about the sink written at the top of every manifest (mode, destination or workspace id).
    header: dict[str, Any]
    #: What the files' time range is: ``"received_at"`` (Advanced) or ``"changed_at"`` (Standard).
    time_label: str
