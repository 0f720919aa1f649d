"""Fixtures: the storages every contract test runs over, and the real servers behind them."""

from __future__ import annotations

import os

# gcsfs probes buckets over gRPC/TLS and hangs against an emulator unless this is set before it is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import itertools
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec import AbstractFileSystem

from tests import servers

_bucket_ids = itertools.count(1)


@dataclass
class Storage:
    """One place to write to: a URL with its storage options, and the filesystem to look at it with."""

    kind: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def fs(self) -> AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs

    @property
    def root(self) -> str:
        _, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return str(root).rstrip("/")

    def data_files(self) -> list[str]:
        """Names of the data files directly under the root (not the ``_cio_sync/`` bookkeeping, not temp files)."""
        fs = self.fs
        fs.invalidate_cache()
        try:
            entries = fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "file"]
        return sorted(n for n in names if not n.startswith((".", "_")))

    def read(self, name: str) -> bytes:
        fs = self.fs
        fs.invalidate_cache()
        return bytes(fs.cat_file(f"{self.root}/{name}"))

    def download(self, dest: Path) -> Path:
        """Copy every data file to ``dest`` (for DuckDB to read them as an independent reader)."""
        dest.mkdir(parents=True, exist_ok=True)
        for name in self.data_files():
            (dest / name).write_bytes(self.read(name))
        return dest


@pytest.fixture(scope="session")
def s3_server() -> Iterator[servers.S3Server]:
    try:
        with servers.seaweedfs() as server:
            yield server
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SeaweedFS unavailable: {exc}")


def _memory() -> Storage:
    return Storage("memory", f"memory://cio-sync-tests/{uuid.uuid4().hex}")


@pytest.fixture
def memory_storage() -> Iterator[Storage]:
    storage = _memory()
    yield storage
    fs = storage.fs
    if fs.exists(storage.root):
        fs.rm(storage.root, recursive=True)


@pytest.fixture
def local_storage(tmp_path: Path) -> Storage:
    return Storage("local", str(tmp_path / "bucket" / "prefix"))


@pytest.fixture
def s3_storage(request: pytest.FixtureRequest) -> Storage:
    server: servers.S3Server = request.getfixturevalue("s3_server")
    bucket = f"cio-sync-{next(_bucket_ids)}-{uuid.uuid4().hex[:8]}"
    storage = Storage("s3", f"s3://{bucket}/prefix", dict(server.storage_options))
    storage.fs.mkdir(bucket)
    return storage


STORAGE_KINDS = ["memory", "local", pytest.param("s3", marks=pytest.mark.s3)]


@pytest.fixture(params=STORAGE_KINDS)
def storage(request: pytest.FixtureRequest) -> Storage:
    """Every storage the contract holds on; a test using it runs once per storage."""
    result: Storage = request.getfixturevalue(f"{request.param}_storage")
    return result


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cio-sync-scratch-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
