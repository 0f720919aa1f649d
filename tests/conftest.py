"""Fixtures: the storages every contract test runs over, and the real servers behind them."""

from __future__ import annotations

import os

# gcsfs probes buckets over gRPC/TLS and hangs against an emulator unless this is set before it is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import itertools
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import pytest
from fsspec import AbstractFileSystem

from tests import faults, servers

_bucket_ids = itertools.count(1)
T = TypeVar("T")


@dataclass
class Storage:
    """One place to write to: a URL with its storage options, and the filesystem to look at it with."""

    kind: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    _looker: tuple[int, AbstractFileSystem] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def fs(self) -> AbstractFileSystem:
        """A filesystem on this storage whose listings cache is empty, as a new one's would be.

        One instance per test and process: a new object-store client for every look costs ~0.2 s on S3, and a
        client made before a fork is not usable in the child.
        """
        if self._looker is None or self._looker[0] != os.getpid():
            fs, _ = fsspec.core.url_to_fs(self.url, **self.storage_options)
            self._looker = (os.getpid(), fs)
        fs = self._looker[1]
        fs.invalidate_cache()
        return fs

    @property
    def root(self) -> str:
        _, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return str(root).rstrip("/")

    def data_files(self) -> list[str]:
        """Names of the data files directly under the root (not the ``_cio_sync/`` bookkeeping, not temp files)."""
        return self._data_files(self.fs)

    def _data_files(self, fs: AbstractFileSystem) -> list[str]:
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
        fs, root = self.fs, self.root
        for name in self._data_files(fs):
            (dest / name).write_bytes(bytes(fs.cat_file(f"{root}/{name}")))
        return dest


def pytest_configure(config: pytest.Config) -> None:
    for kind, server in (("gcs", "fake-gcs-server"), ("azure", "Azurite")):
        config.addinivalue_line("markers", f"{kind}: needs the {server} {kind} emulator (started by the test session)")
    # aiohttp (under gcsfs and adlfs) advises its callers about any request body over 1 MiB given as bytes, which is
    # what fsspec's pipe_file hands them; a ResourceWarning that Python ignores by default, not a fault of ours.
    config.addinivalue_line(
        "filterwarnings", "ignore:Sending a large body directly with raw bytes:ResourceWarning:aiohttp.payload"
    )


def _serve(what: str, server: Callable[[], AbstractContextManager[T]]) -> Iterator[T]:
    """Run ``server`` for the whole session; without its binary, skip locally but fail loudly in CI."""
    try:
        context = server()
        running = context.__enter__()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{what} unavailable: {exc}")
    try:
        yield running
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[servers.S3Server]:
    yield from _serve("SeaweedFS", servers.seaweedfs)


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[servers.GCSServer]:
    yield from _serve("fake-gcs-server", servers.fake_gcs_server)


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[servers.NatsCluster]:
    """A 3-node NATS JetStream cluster on loopback for one test module (a test may kill and restart its nodes)."""
    yield from _serve("NATS JetStream", servers.nats_cluster)


@pytest.fixture(scope="session")
def azure_server() -> Iterator[servers.AzureServer]:
    yield from _serve("Azurite", servers.azurite)


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


def _new_bucket() -> str:
    # Valid as an S3 and GCS bucket and an Azure container: 3-63 lowercase letters, digits and dashes.
    return f"cio-sync-{next(_bucket_ids)}-{uuid.uuid4().hex[:8]}"


def _object_store(request: pytest.FixtureRequest, kind: str, scheme: str) -> Storage:
    """A fresh bucket (container) on the session's server for ``kind``, with a prefix in it."""
    server = request.getfixturevalue(f"{kind}_server")
    bucket = _new_bucket()
    storage = Storage(kind, f"{scheme}://{bucket}/prefix", dict(server.storage_options))
    storage.fs.mkdir(bucket)
    return storage


@pytest.fixture
def s3_storage(request: pytest.FixtureRequest) -> Storage:
    return _object_store(request, "s3", "s3")


@pytest.fixture
def gcs_storage(request: pytest.FixtureRequest) -> Storage:
    return _object_store(request, "gcs", "gs")


@pytest.fixture
def azure_storage(request: pytest.FixtureRequest) -> Storage:
    return _object_store(request, "azure", "az")


#: The object stores, each behind a real server (or its emulator) started by the test session.
OBJECT_STORE_KINDS = [
    pytest.param("s3", marks=pytest.mark.s3),
    pytest.param("gcs", marks=pytest.mark.gcs),
    pytest.param("azure", marks=pytest.mark.azure),
]
STORAGE_KINDS = ["memory", "local", *OBJECT_STORE_KINDS]


@pytest.fixture(params=STORAGE_KINDS)
def storage(request: pytest.FixtureRequest) -> Storage:
    """Every storage the contract holds on; a test using it runs once per storage."""
    result: Storage = request.getfixturevalue(f"{request.param}_storage")
    return result


@pytest.fixture(params=OBJECT_STORE_KINDS)
def object_storage(request: pytest.FixtureRequest) -> Storage:
    """Every object store (S3, GCS, Azure); a test using it runs once per object store."""
    result: Storage = request.getfixturevalue(f"{request.param}_storage")
    return result


def _installed(what: str, find: Callable[[], T]) -> T:
    """What ``find`` finds; without it, skip locally but fail loudly in CI (the noxfile's tests session installs it)."""
    try:
        return find()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{what} unavailable: {exc}")


@pytest.fixture(scope="session")
def js_clients() -> Path:
    """The node_modules folder with the pinned npm client libraries (tests/clients/package.json)."""
    return _installed("the npm client libraries", servers.js_clients)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, for analytics.js in a headless browser."""
    return _installed("Chromium", servers.chromium_binary)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[servers.PostgresServer]:
    try:
        with servers.postgres() as server:
            yield server
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL unavailable: {exc}")


def _harness(what: str, exc: Exception) -> None:
    """Skip a fault test that cannot run here, with the reason; in CI (Linux, root, gcc) that is a failure."""
    if os.environ.get("CI") and sys.platform.startswith("linux"):
        raise exc
    pytest.skip(f"{what}: {exc}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[faults.SmallDisk]:
    """A 16 MiB tmpfs for this test: a real disk that ``fill()`` makes full and ``free()`` empties again."""
    try:
        disk = faults.SmallDisk(tmp_path / "small-disk")
    except faults.Unavailable as exc:
        _harness("no small disk", exc)
        raise
    yield disk
    disk.unmount()


@pytest.fixture(scope="session")
def faultfs() -> Path:
    """The compiled faultfs injector (tests/faults.py), for tests that run children with failing writes."""
    try:
        return faults.faultfs_library()
    except faults.Unavailable as exc:
        _harness("no fault injector", exc)
        raise


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cio-sync-scratch-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[list[Any]]:
    """Everything a test started, stopped at the end whatever happened (workers first, then intakes)."""
    started: list[Any] = []
    yield started
    for thing in reversed(started):
        if isinstance(thing, servers.WorkerProcess):
            thing.kill()
        elif thing.proc.poll() is None:
            thing.stop(9)
