"""Errors of the libraries cio_sync calls become cio_sync errors where they enter it, raised from the cause."""

from __future__ import annotations

import importlib
import inspect
import sqlite3
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pytest

import cio_sync
from cio_sync._errors import LIBRARY_ERRORS, library_error, library_errors
from cio_sync.loader.files import classify, read_file
from tests import faults

#: Every module whose exception classes reach cio_sync.
LIBRARIES = ("sqlite3", "duckdb", "psycopg", "psycopg.errors", "pyarrow", "pyarrow.lib")


#: Exception classes that are no errors: psycopg's Rollback ends a transaction block on purpose.
NOT_ERRORS = {"psycopg.Rollback"}


def _exception_classes(module: ModuleType) -> list[type[BaseException]]:
    """The exception classes ``module`` defines (not those it imports from the standard library)."""
    return [c for name, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, BaseException) and c.__module__.split(".")[0] not in sys.stdlib_module_names - {"sqlite3"}
            and f"{module.__name__.split('.')[0]}.{name}" not in NOT_ERRORS]


def _instance(kind: type[BaseException]) -> BaseException:
    try:
        return kind("boom")
    except TypeError:  # a class whose constructor wants more: its type is what the map reads
        return kind.__new__(kind)


def test_every_entry_of_the_map_names_a_class_the_library_exports() -> None:
    for name, target in LIBRARY_ERRORS.items():
        module, _, attribute = name.rpartition(".")
        kind = getattr(importlib.import_module(module), attribute, None)
        assert isinstance(kind, type), f"{name} is not a class"
        assert issubclass(kind, BaseException), f"{name} is not an exception class"
        assert issubclass(target, cio_sync.CioSyncError)


@pytest.mark.parametrize("name", sorted(LIBRARY_ERRORS))
def test_each_entry_maps_its_class_and_the_mapper_raises_from_it(name: str) -> None:
    module, _, attribute = name.rpartition(".")
    kind = getattr(importlib.import_module(module), attribute)
    original = _instance(kind)
    with pytest.raises(LIBRARY_ERRORS[name]) as raised, library_errors("reading /data/x.parquet",
                                                                      path="/data/x.parquet"):
        raise original
    assert raised.value.__cause__ is original
    assert "reading /data/x.parquet: " in str(raised.value)


@pytest.mark.parametrize("library", LIBRARIES)
def test_every_exception_class_a_library_exports_has_a_cio_sync_error(library: str) -> None:
    classes = _exception_classes(importlib.import_module(library))
    assert classes
    unmapped = [c.__name__ for c in classes
                if not issubclass(c, MemoryError) and library_error(_instance(c)) is None]
    assert unmapped == []


def test_errors_of_no_library_and_cio_sync_errors_pass_through_unchanged() -> None:
    with pytest.raises(KeyError), library_errors("x"):
        raise KeyError("k")
    original = cio_sync.ConfigError("as it was")
    with pytest.raises(cio_sync.ConfigError) as raised, library_errors("x"):
        raise original
    assert raised.value is original


def test_sqlite_storage_faults_are_storage_errors_and_others_state_errors() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # type: ignore[attr-defined]
    assert library_error(full) is cio_sync.StorageError
    corrupt = sqlite3.DatabaseError("file is not a database")
    corrupt.sqlite_errorcode = 26  # type: ignore[attr-defined]
    assert library_error(corrupt) is cio_sync.StateError


# -- each boundary, met through the public API -------------------------------------------------------------------

def test_a_state_file_that_is_not_a_database_is_a_state_error_naming_it(tmp_path: Path) -> None:
    state = tmp_path / "workspace.sqlite"
    state.write_bytes(b"this is no SQLite database " * 200)
    with pytest.raises(cio_sync.StateError) as raised:
        cio_sync.StandardSink(str(tmp_path / "out"), workspace_id=1, state=state)
    assert str(state) in str(raised.value)
    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)


def _prefix(tmp_path: Path) -> Path:
    prefix = tmp_path / "raw"
    with cio_sync.AdvancedSink(str(prefix), flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "1", "event": "E"})
    return prefix


def test_a_corrupt_duckdb_file_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    database = tmp_path / "warehouse.duckdb"
    database.write_bytes(b"no DuckDB here " * 1000)
    with pytest.raises(cio_sync.StorageError) as raised:
        cio_sync.load(str(_prefix(tmp_path)), f"duckdb:///{database}")
    assert str(database) in str(raised.value)
    assert isinstance(raised.value.__cause__, duckdb.Error)


def test_a_duckdb_url_with_three_slashes_for_an_absolute_path_gets_a_hint(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    absolute = str(tmp_path / "w.duckdb").lstrip("/")
    with pytest.raises(cio_sync.StorageError) as raised:
        cio_sync.load(str(_prefix(tmp_path)), f"duckdb:///{absolute}")
    assert f"duckdb:////{absolute}" in str(raised.value)
    assert isinstance(raised.value.__cause__, FileNotFoundError)


def test_a_duckdb_url_with_four_slashes_for_a_relative_path_gets_a_hint(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "warehouses").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cio_sync.StorageError) as raised:
        cio_sync.load(str(_prefix(tmp_path)), "duckdb:////warehouses/w.duckdb")
    assert "duckdb:///warehouses/w.duckdb (three slashes)" in str(raised.value)


@pytest.mark.parametrize("url", ["duckdb:/x.duckdb", "duckdb://x.duckdb", "duckdb:x.duckdb"])
def test_a_malformed_duckdb_url_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(cio_sync.ConfigError, match="malformed DuckDB URL"):
        cio_sync.load(str(_prefix(tmp_path)), url)


@pytest.mark.postgres
def test_a_postgres_url_of_a_missing_database_is_a_storage_error_naming_it(request: pytest.FixtureRequest,
                                                                           tmp_path: Path) -> None:
    server: Any = request.getfixturevalue("postgres_server")
    url = server.dsn.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(cio_sync.StorageError) as raised:
        cio_sync.load(str(_prefix(tmp_path)), url)
    assert "no_such_database" in str(raised.value)
    assert isinstance(raised.value.__cause__, psycopg.OperationalError)


def test_a_postgres_url_psycopg_cannot_parse_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(cio_sync.ConfigError) as raised:
        cio_sync.load(str(_prefix(tmp_path)), "postgresql://%zz@127.0.0.1/db")
    assert "postgresql://" in str(raised.value)
    assert isinstance(raised.value.__cause__, psycopg.ProgrammingError)


def test_an_unreadable_parquet_file_is_an_invalid_file_naming_it() -> None:
    name = "1.2.1.track.parquet"
    source = classify(name)
    assert source is not None
    with pytest.raises(cio_sync.InvalidFile) as raised:
        read_file(b"PAR1 but not really", source)
    assert raised.value.name == name
    assert str(raised.value).startswith(f"{name}: cannot be read as Parquet")
    assert isinstance(raised.value.__cause__, pa.ArrowException)


def test_a_spool_on_a_full_disk_is_a_storage_error_naming_it(small_disk: faults.SmallDisk, tmp_path: Path) -> None:
    spool = small_disk.path / "spool"
    sink = cio_sync.AdvancedSink(str(tmp_path / "out"), spool_dir=spool, flush_interval=None)
    try:
        small_disk.fill(leave=0)
        with pytest.raises(cio_sync.StorageError) as raised:  # noqa: PT012 - until a write needs a page it has not
            for n in range(1000):
                sink.write({"type": "track", "userId": str(n), "event": "E" * 500})
        assert str(spool) in str(raised.value)
        assert isinstance(raised.value.__cause__, OSError)
    finally:
        small_disk.free()
        sink.close()
