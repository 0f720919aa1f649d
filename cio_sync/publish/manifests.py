"""Manifests: one JSON document per sync, listing the files it published (docs/manifests.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from cio_sync._time import ISO_MICROS, iso_micros
from cio_sync._types import Batch
from cio_sync.publish.layout import MANIFESTS_FOLDER
from cio_sync.storage.writer import WrittenFile

__all__ = ["MANIFESTS_FOLDER", "ManifestSpec", "manifest_document"]


@dataclass(frozen=True)
class ManifestSpec:
    """How a sink's manifests are named and what they say about the sink (see docs/manifests.md)."""

    #: Returns the name (under the sink's root) of the next manifest; names never repeat.
    name_for: Callable[[], str]
    #: Fields about the sink written at the top of every manifest (mode, destination or workspace id).
    header: dict[str, Any]
    #: What the files' time range is: ``"received_at"`` (Advanced) or ``"changed_at"`` (Standard).
    time_label: str


def _when(micros: int | None) -> str | None:
    return None if micros is None else iso_micros(micros)


def manifest_document(spec: ManifestSpec, name: str, files: Sequence[tuple[Batch, WrittenFile]]) -> bytes:
    """The manifest ``name`` of one sync that published ``files`` (each batch with the file it became), as JSON."""
    label = spec.time_label
    entries = [{
        "name": w.name, "table": w.table, "rows": w.rows, "bytes": w.bytes, "sha256": b.sha256,
        f"min_{label}": _when(b.first_time), f"max_{label}": _when(b.last_time),
    } for b, w in files]
    document = {
        "manifest_version": 1, **spec.header, "name": name, "created_at": datetime.now(UTC).strftime(ISO_MICROS),
        "files": entries, "rows": sum(w.rows for _, w in files),
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"
