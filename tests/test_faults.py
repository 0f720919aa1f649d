"""Storage that fails 30 % of the time, transiently: every call still arrives exactly once."""

from __future__ import annotations

import contextlib
import random
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import cio_sync
from cio_sync import FsspecWriter, RetryPolicy
from cio_sync._sample import sample_calls


class ChaosMemory(MemoryFileSystem):
    """An in-memory filesystem where ``rate`` of the operations fail with a transient network error; a failing
    write fails before or after it landed, at random."""

    protocol = ("chaosmem",)

    def __init__(self, *args: Any, rate: float = 0.3, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rate = rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.failures = Counter[str]()

    def _fail(self, what: str) -> bool:
        with self.lock:
            if self.rng.random() < self.rate:
                self.failures[what] += 1
                return True
            return False

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        if self._fail("write-before"):
            raise ConnectionResetError("connection reset by peer")
        super().pipe_file(path, value, mode=mode, **kwargs)
        if self._fail("write-after"):
            raise TimeoutError("the response never came")

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        if self._fail("read"):
            raise ConnectionResetError("connection reset by peer")
        return bytes(super().cat_file(path, start=start, end=end, **kwargs))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        if self._fail("list"):
            raise TimeoutError("listing timed out")
        return super().ls(path, detail=detail, **kwargs)

    def rm_file(self, path: str) -> None:
        if self._fail("delete"):
            raise ConnectionResetError("connection reset by peer")
        super().rm_file(path)


def chaos_writer(root: str, seed: int) -> tuple[FsspecWriter, ChaosMemory]:
    """A writer on its own root (memory filesystems share one store per process)."""
    fs = ChaosMemory(rate=0.3, seed=seed, skip_instance_cache=True)
    writer = FsspecWriter(f"{root}-{uuid.uuid4().hex}", filesystem=fs,
                          retry=RetryPolicy(attempts=8, initial_delay=0, max_delay=0))
    return writer, fs


def flush_until_done(sink: cio_sync.AdvancedSink | cio_sync.StandardSink, tries: int = 50) -> None:
    for _ in range(tries):
        try:
            sink.close()
            return
        except cio_sync.StorageError:
            continue
    pytest.fail("storage never recovered")


def data_rows(fs: MemoryFileSystem, root: str, scratch: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(MemoryFileSystem.find(fs, root)):
        if "/_cio_sync/" in path or "/_manifests/" in path:
            continue
        local = scratch / path.rsplit("/", 1)[-1]
        local.write_bytes(MemoryFileSystem.cat_file(fs, path))
        rows += pq.read_table(local).to_pylist()
    return rows


@pytest.mark.parametrize("spool", [False, True])
def test_every_call_arrives_exactly_once_through_flaky_storage(tmp_path: Path, spool: bool) -> None:
    writer, fs = chaos_writer("/chaos", seed=7 + spool)
    calls = list(sample_calls(4_000, seed=9))
    sink = cio_sync.AdvancedSink(writer, flush_interval=None, max_rows=150,
                                 spool_dir=tmp_path / "spool" if spool else None)
    ids = []
    for i, call in enumerate(calls):
        ids.append(sink.write(call))
        if i % 700 == 0:
            with contextlib.suppress(cio_sync.StorageError):
                sink.flush()  # if it fails, the rows stay queued and the next flush takes them
    flush_until_done(sink)
    assert sum(fs.failures.values()) > 100, fs.failures  # the storage really was that bad
    rows = data_rows(fs, writer.root, tmp_path)
    assert Counter(r["messageId"] for r in rows) == Counter(ids)
    assert sink.stats.rows_published == len(calls)


def test_standard_changes_arrive_exactly_once_through_flaky_storage(tmp_path: Path) -> None:
    writer, fs = chaos_writer("/chaos-ws", seed=11)
    sink = cio_sync.StandardSink(writer, workspace_id=5, state=tmp_path / "ws.sqlite", flush_interval=None,
                                 max_rows=50)
    expected = 0
    for i in range(600):
        expected += sink.write({"type": "identify", "userId": f"u{i % 200}", "traits": {"n": i // 200}})
    flush_until_done(sink)
    rows = data_rows(fs, writer.root, tmp_path)
    assert len(rows) == expected
    keys = Counter((r.get("external_customer_id"), r.get("attribute_name"), r.get("attribute_value"),
                    r.get("updated_at") or r.get("timestamp")) for r in rows)
    assert max(keys.values()) == 1
