"""The Standard sink on the sink toolkit: what its hooks into the toolkit give (issue 12, section 1)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import cio_sync
from cio_sync.publish.layout import parse_standard
from cio_sync.sinks.buffered import PublishingSink


def _sequences(root: Path) -> dict[str, int]:
    """Each published name (data files and manifests) -> its sequence."""
    found = {}
    for path in root.glob("*.parquet"):
        parsed = parse_standard(path.name)
        assert parsed is not None, path.name
        found[path.name] = parsed.sequence
    for path in (root / "_manifests").glob("manifest_v4_7_*.json"):
        found[f"_manifests/{path.name}"] = int(path.stem.rsplit("_", 1)[1])
    return found


def test_the_standard_and_the_buffered_sinks_open_through_one_toolkit() -> None:
    assert issubclass(cio_sync.StandardSink, PublishingSink)
    assert issubclass(cio_sync.BufferedSink, PublishingSink)
    assert cio_sync.StandardSink._open is cio_sync.BufferedSink._open


def test_sequences_start_from_the_current_time_so_a_lost_counters_folder_never_reuses_a_name(tmp_path: Path) -> None:
    """File and manifest sequences are claimed from at least now in µs: after ``_cio_sync/`` is deleted, the next
    files still get new, larger names."""
    root, state = tmp_path / "ws", tmp_path / "ws.sqlite"
    before = time.time_ns() // 1000
    with cio_sync.StandardSink(str(root), workspace_id=7, state=state, flush_interval=None) as sink:
        sink.write({"type": "identify", "userId": "42", "traits": {"plan": "pro"}})
    first = _sequences(root)
    assert len(first) == 3  # people, attributes, the manifest
    assert min(first.values()) >= before
    shutil.rmtree(root / "_cio_sync")
    with cio_sync.StandardSink(str(root), workspace_id=7, state=state, flush_interval=None) as sink:
        sink.write({"type": "identify", "userId": "42", "traits": {"plan": "team"}})
    second = {name: seq for name, seq in _sequences(root).items() if name not in first}
    assert len(second) == 2  # attributes, the manifest
    assert min(second.values()) > max(first.values())
