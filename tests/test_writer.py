"""The Writer contract: create-only, whole or not at all, retries that never duplicate, errors without secrets."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.memory import MemoryFileSystem

import cio_sync
from cio_sync import FsspecWriter, RetryPolicy
from tests.conftest import Storage
from tests.faults import leftovers

NO_WAIT = RetryPolicy(attempts=4, initial_delay=0, max_delay=0)


def writer_for(storage: Storage, **kwargs: Any) -> FsspecWriter:
    return FsspecWriter(storage.url, storage_options=storage.storage_options, **kwargs)


def test_publish_creates_the_file_with_exactly_the_bytes(storage: Storage) -> None:
    writer = writer_for(storage)
    written = writer.publish("1.2.1.track.parquet", b"abc" * 1000, table="track", rows=7)
    assert storage.read("1.2.1.track.parquet") == b"abc" * 1000
    assert (written.name, written.table, written.rows, written.bytes) == ("1.2.1.track.parquet", "track", 7, 3000)


def test_publishing_onto_an_existing_name_is_refused_and_the_file_is_unchanged(storage: Storage) -> None:
    writer = writer_for(storage)
    writer.publish("1.2.1.track.csv", b"first", table="track", rows=1)
    with pytest.raises(cio_sync.PublishConflict) as caught:
        writer.publish("1.2.1.track.csv", b"second", table="track", rows=1)
    assert "1.2.1.track.csv" in str(caught.value)
    assert isinstance(caught.value, FileExistsError)
    assert storage.read("1.2.1.track.csv") == b"first"


def test_a_second_writer_cannot_overwrite_either(storage: Storage) -> None:
    writer_for(storage).publish("x.json", b"one", table="t", rows=1)
    with pytest.raises(cio_sync.PublishConflict):
        writer_for(storage).publish("x.json", b"one", table="t", rows=1)
    assert storage.read("x.json") == b"one"


@pytest.mark.parametrize("name", ["../escape.csv", "a/../../b.csv", "/abs.csv", "a//b", "a\\b.csv", "./x", "",
                                  "s3://other/x", "new\nline"])
def test_names_that_could_leave_the_root_are_refused(memory_storage: Storage, name: str) -> None:
    with pytest.raises(cio_sync.ConfigError):
        writer_for(memory_storage).publish(name, b"x", table="t", rows=1)


def test_nothing_half_written_is_left_on_local_disk_when_a_publish_is_refused(local_storage: Storage) -> None:
    writer = writer_for(local_storage)
    writer.publish("f.csv", b"1", table="t", rows=1)
    with pytest.raises(cio_sync.PublishConflict):
        writer.publish("f.csv", b"2", table="t", rows=1)
    assert sorted(os.listdir(local_storage.root)) == ["_cio_sync", "f.csv"]
    assert leftovers(Path(local_storage.root)) == []


def test_folders_are_listed_and_files_removed(storage: Storage) -> None:
    writer = writer_for(storage)
    assert writer.list("_cio_sync/none") == []
    for n in ("b", "a", "c"):
        writer.publish(f"_cio_sync/k/{n}", b"", table="t", rows=0)
    assert writer.list("_cio_sync/k") == ["a", "b", "c"]
    writer.remove("_cio_sync/k/b")
    writer.remove("_cio_sync/k/missing")
    assert writer.list("_cio_sync/k") == ["a", "c"]


class FlakyMemory(MemoryFileSystem):
    """A memory filesystem whose pipe_file fails the way networks do: before or after the write landed."""

    protocol = ("flakymem",)

    def __init__(self, *args: Any, failures: list[str] | None = None, data_only: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures = list(failures or [])
        self.data_only = data_only  # fail only data files, not the _cio_sync/ bookkeeping
        self.calls = 0

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        self.calls += 1
        skip = self.data_only and "/_cio_sync/" in path
        failure = self.failures.pop(0) if self.failures and not skip else None
        if failure == "before":
            raise ConnectionResetError("connection reset by peer")
        if failure == "einval-before":
            raise OSError(errno.EINVAL, "something else was invalid")
        if failure == "denied":
            raise PermissionError("Access Denied for key AKIASECRETKEY123 with secret s3cr3t-value")
        super().pipe_file(path, value, mode=mode, **kwargs)
        if failure == "after":
            raise TimeoutError("read timed out")
        if failure == "lands-then-exists":
            # A client that retried by itself after a lost response, and found its own object.
            raise FileExistsError(path)
        if failure == "after-then-einval":
            self.failures.insert(0, "einval-on-exists")
            raise TimeoutError("read timed out")


def flaky_writer(failures: list[str], root: str = "/flaky") -> tuple[FsspecWriter, FlakyMemory]:
    fs = FlakyMemory(failures=failures, skip_instance_cache=True)
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    return FsspecWriter(root, filesystem=fs, retry=NO_WAIT), fs


def test_transient_errors_before_the_write_are_retried() -> None:
    writer, fs = flaky_writer(["before", "before"])
    writer.publish("f.parquet", b"data", table="t", rows=1)
    assert fs.cat_file("/flaky/f.parquet") == b"data"
    assert fs.calls == 3


def test_a_retry_after_an_ambiguous_failure_that_had_landed_does_not_write_twice() -> None:
    writer, fs = flaky_writer(["after"])
    written = writer.publish("f.parquet", b"data", table="t", rows=1)
    assert written.bytes == 4
    assert fs.cat_file("/flaky/f.parquet") == b"data"
    assert fs.ls("/flaky", detail=False) == ["/flaky/f.parquet"]


def test_a_retry_never_overwrites_a_different_file_that_appeared_meanwhile() -> None:
    writer, fs = flaky_writer(["before"])
    original = fs.pipe_file

    def sneak_in(path: str, value: bytes, mode: str = "overwrite", **kw: Any) -> None:
        fs.pipe_file = original  # type: ignore[method-assign]
        MemoryFileSystem.pipe_file(fs, path, b"someone else's", mode="create")
        raise ConnectionResetError("reset")

    fs.pipe_file = sneak_in  # type: ignore[method-assign]
    with pytest.raises(cio_sync.PublishConflict):
        writer.publish("f.parquet", b"ours", table="t", rows=1)
    assert fs.cat_file("/flaky/f.parquet") == b"someone else's"


def test_an_einval_that_is_not_a_conflict_is_retried() -> None:
    writer, fs = flaky_writer(["einval-before"])
    writer.publish("f.csv", b"x", table="t", rows=1)
    assert fs.cat_file("/flaky/f.csv") == b"x"


def test_transient_errors_give_up_after_the_retry_budget_with_a_storage_error() -> None:
    writer, fs = flaky_writer(["before"] * 10)
    with pytest.raises(cio_sync.StorageError) as caught:
        writer.publish("f.csv", b"x", table="t", rows=1)
    assert fs.calls == NO_WAIT.attempts
    assert "/flaky/f.csv" in str(caught.value)
    assert isinstance(caught.value.__cause__, ConnectionResetError)


def test_permanent_errors_raise_at_once_naming_the_path_without_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fs = FlakyMemory(failures=["denied"], skip_instance_cache=True)
    writer = FsspecWriter("/flaky", filesystem=fs, retry=NO_WAIT)
    writer._secrets = ["AKIASECRETKEY123", "s3cr3t-value"]  # as if they came from storage_options
    with caplog.at_level(logging.DEBUG), pytest.raises(cio_sync.StorageError) as caught:
        writer.publish("f.csv", b"x", table="t", rows=1)
    assert fs.calls == 1
    message = str(caught.value)
    assert "/flaky/f.csv" in message
    assert "s3cr3t-value" not in message
    assert "AKIASECRETKEY123" not in message
    assert "s3cr3t-value" not in caplog.text


@pytest.mark.s3
def test_s3_errors_name_the_path_and_never_the_secret(s3_storage: Storage) -> None:
    options = dict(s3_storage.storage_options)
    bucket = s3_storage.url.split("/")[2]
    missing = FsspecWriter(f"s3://{bucket}-missing/p", storage_options=options, retry=NO_WAIT)
    with pytest.raises(cio_sync.StorageError) as caught:
        missing.publish("f.csv", b"x", table="t", rows=1)
    assert f"{bucket}-missing/p/f.csv" in str(caught.value)
    bad = {**options, "secret": "wrong-secret-value-xyz"}
    denied = FsspecWriter(f"s3://{bucket}/p", storage_options=bad, retry=NO_WAIT)
    with pytest.raises(cio_sync.StorageError) as caught:
        denied.publish("f.csv", b"x", table="t", rows=1)
    assert "wrong-secret-value-xyz" not in str(caught.value)
    assert "wrong-secret-value-xyz" not in repr(denied)
    assert str(options["secret"]) not in repr(missing)


def test_storage_options_never_show_in_reprs() -> None:
    writer = FsspecWriter("memory://b/p", storage_options={})
    assert repr(writer) == "FsspecWriter('memory://b/p')"
    sink = cio_sync.AdvancedSink("memory://b/q", flush_interval=None)
    assert "memory://b/q" in repr(sink)
    sink.close()


def test_a_url_with_a_backend_that_is_not_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec.core

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(cio_sync.MissingBackend, match=r"cio_sync\[gcs\]"):
        FsspecWriter("gs://bucket/prefix")


def test_local_publish_survives_a_folder_that_does_not_exist_yet(tmp_path: Path) -> None:
    writer = FsspecWriter(str(tmp_path / "a" / "b"))
    writer.publish("deep/er/f.json", b"{}\n", table="t", rows=1)
    assert (tmp_path / "a" / "b" / "deep" / "er" / "f.json").read_bytes() == b"{}\n"
