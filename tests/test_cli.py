"""The cio-sync command line as a shell user meets it."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import duckdb
import fsspec
import pytest

import cio_sync
from cio_sync import AdvancedSink
from cio_sync.cli import main
from tests.helpers import parse_advanced_name


def test_demo_writes_both_modes_and_loads_them_into_duckdb(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", str(tmp_path / "demo"), "--calls", "600"]) == 0
    out = capsys.readouterr().out
    for fmt in ("parquet", "csv", "json"):
        names = sorted(p.name for p in (tmp_path / "demo" / "advanced" / fmt).iterdir() if p.is_file())
        assert {parse_advanced_name(n)["type"] for n in names} == {"identify", "track", "page", "screen", "group",
                                                                    "alias"}
        for name in names:
            assert name in out
    files = [p.name for p in (tmp_path / "demo" / "standard").iterdir() if p.is_file()]
    standard = {re.split(r"_v\d+_", name)[0] for name in files}
    assert {"people", "attributes", "campaigns", "deliveries", "metrics"} <= standard
    # Version 4, as Customer.io's exports; actions is cio_sync's own table, version 1.
    assert all(("_v1_" if name.startswith("actions_") else "_v4_") in name for name in files), files
    # A person the workspace knows is in people_current by the id it was sent with.
    con = duckdb.connect(str(tmp_path / "demo" / "warehouse.duckdb"), read_only=True)
    [(known,)] = con.execute("SELECT count(*) FROM people_current WHERE customer_id IS NOT NULL").fetchall()
    con.close()
    assert known > 0
    con = duckdb.connect(str(tmp_path / "demo" / "warehouse.duckdb"), read_only=True)
    for table in ("people_current", "attributes_current", "deliveries_current", "metrics_unique", "raw_track"):
        row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        assert row[0] > 0, table
    assert "people_current" in out
    assert "metrics_unique" in out


def test_running_the_demo_twice_continues_and_loads_only_the_new_files(tmp_path: Path) -> None:
    assert main(["demo", str(tmp_path), "--calls", "50"]) == 0
    assert main(["demo", str(tmp_path), "--calls", "50"]) == 0
    positions = {parse_advanced_name(p.name)["position"] for p in (tmp_path / "advanced" / "csv").iterdir()
                 if p.is_file()}
    assert positions == {1, 2}
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True)
    row = con.execute("SELECT count(*), count(DISTINCT name) FROM _cio_sync_loaded").fetchone()
    assert row is not None
    assert row[0] == row[1]


def _help(*argv: str) -> str:
    result = subprocess.run([sys.executable, "-m", "cio_sync", *argv, "--help"], capture_output=True, text=True,
                            check=True)
    return " ".join(result.stdout.split())


def test_help_explains_the_commands() -> None:
    top = _help()
    for command in ("demo", "replay", "load", "inspect", "PostgreSQL", "--debug", "--version"):
        assert command in top
    demo = _help("demo")
    assert "--calls" in demo
    for what in ("advanced/parquet", "advanced/csv", "standard", "warehouse.duckdb", "workspace.sqlite"):
        assert what in demo
    assert "postgresql://" in _help("load")
    assert "JSON" in _help("inspect")
    assert "FILE" in _help("replay")


def test_a_wrong_command_line_exits_with_2() -> None:
    result = subprocess.run([sys.executable, "-m", "cio_sync", "nonsense"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_replay_writes_a_file_of_calls_and_reports_bad_lines(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    calls = tmp_path / "calls.jsonl"
    calls.write_text(
        '{"type": "track", "userId": "1", "event": "A"}\n'
        '{"type": "identify", "userId": "1", "traits": {"plan": "pro"}}\n'
        '{"type": "track", "userId": 2}\n'
        '{"batch": [{"type": "page", "userId": "1", "name": "Home"}], "sentAt": "2026-01-01T00:00:00Z"}\n'
    )
    out = tmp_path / "out"
    assert main(["replay", str(calls), "--to", str(out), "--mode", "both", "--workspace-id", "5"]) == 1
    captured = capsys.readouterr()
    assert "replayed 3 calls" in captured.out
    assert "1 rejected" in captured.out
    assert "line 3" in captured.err
    advanced = sorted(p.name for p in (out / "advanced").iterdir() if p.is_file())
    assert [parse_advanced_name(n)["type"] for n in advanced] == ["identify", "track", "page"]
    standard = sorted(re.split(r"_v\d+_", p.name)[0] for p in (out / "standard").iterdir() if p.is_file())
    assert standard == ["attributes", "people"]


# -- errors, as a shell user meets them ---------------------------------------------------------------------------

def _cio_sync(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cio_sync", *argv], capture_output=True, text=True, check=False,
                          env=env, timeout=240)


def _one_error_line(result: subprocess.CompletedProcess[str], code: int, *secrets: str) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cio-sync: error: ")
    for secret in secrets:
        assert secret not in result.stderr
        assert secret not in result.stdout
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _one_try_per_request_environment() -> dict[str, str]:
    """For an endpoint that refuses connections: botocore's own retries of each request (4 more, with backoff) are
    the backend's, not cio-sync's, and took ~20 s of each such run; cio-sync's retries still all run."""
    return {**os.environ, "AWS_MAX_ATTEMPTS": "1"}


def _no_aws_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    return env


@pytest.fixture
def s3_bucket(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """A new bucket on the session's SeaweedFS: its URL and the storage options that reach it."""
    server: Any = request.getfixturevalue("s3_server")
    bucket = f"cli-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", **server.storage_options).mkdir(bucket)
    return f"s3://{bucket}/raw", dict(server.storage_options)


@pytest.mark.s3
def test_a_storage_option_the_backend_does_not_take_is_one_line_naming_it(
        s3_bucket: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_bucket
    result = _cio_sync("inspect", url, "--storage-option", f"endpoint={options['endpoint_url']}",
                       "--storage-option", f"key={options['key']}", "--storage-option", f"secret={options['secret']}")
    line = _one_error_line(result, 1, options["secret"])
    assert "'endpoint'" in line
    assert "endpoint_url" in line


@pytest.mark.s3
def test_an_unreachable_endpoint_is_one_line_saying_to_check_it(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_bucket
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    result = _cio_sync("load", url, "--into", "duckdb:///:memory:", "--storage-option", f"endpoint_url={endpoint}",
                       "--storage-option", f"key={options['key']}", "--storage-option", f"secret={options['secret']}",
                       env=_one_try_per_request_environment())
    line = _one_error_line(result, 1, options["secret"])
    assert endpoint.removeprefix("http://") in line
    assert "endpoint" in line


@pytest.mark.s3
def test_a_replay_to_an_unreachable_endpoint_is_one_line_even_after_the_retry_at_exit(
        s3_bucket: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, options = s3_bucket
    calls = tmp_path / "calls.jsonl"
    calls.write_text('{"type": "track", "userId": "1", "event": "A"}\n')
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    result = _cio_sync("replay", str(calls), "--to", url, "--storage-option", f"endpoint_url={endpoint}",
                       "--storage-option", f"key={options['key']}", "--storage-option", f"secret={options['secret']}",
                       env=_one_try_per_request_environment())
    line = _one_error_line(result, 1, options["secret"])
    assert url.removeprefix("s3://") in line
    assert endpoint.removeprefix("http://") in line


@pytest.mark.s3
def test_missing_credentials_are_one_line_saying_to_give_them(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_bucket
    result = _cio_sync("inspect", url, "--storage-option", f"endpoint_url={options['endpoint_url']}",
                       env=_no_aws_environment())
    line = _one_error_line(result, 1)
    assert "credentials" in line


@pytest.mark.s3
def test_a_wrong_secret_is_one_line_that_does_not_show_it(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_bucket
    secret = "not-the-secret-" + uuid.uuid4().hex
    result = _cio_sync("inspect", url, "--storage-option", f"endpoint_url={options['endpoint_url']}",
                       "--storage-option", f"key={options['key']}", "--storage-option", f"secret={secret}",
                       env=_no_aws_environment())
    line = _one_error_line(result, 1, secret)
    assert url.rsplit("/", 1)[0] in line
    assert "credentials" in line


@pytest.mark.s3
def test_storage_options_take_json_values(s3_bucket: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, options = s3_bucket
    with AdvancedSink(url, storage_options=options, flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "1", "event": "E"})
    client = json.dumps({"endpoint_url": options["endpoint_url"]})
    result = _cio_sync("load", url, "--into", f"duckdb:///{tmp_path / 'w.duckdb'}", "--storage-option",
                       f"client_kwargs={client}", "--storage-option", "use_ssl=false",
                       "--storage-option", f"key={options['key']}", "--storage-option", f"secret={options['secret']}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("loaded 1 files (1 rows)")


def test_the_traceback_shows_only_with_debug(tmp_path: Path) -> None:
    quiet = _cio_sync("inspect", str(tmp_path / "nothing"))
    _one_error_line(quiet, 1)
    loud = _cio_sync("--debug", "inspect", str(tmp_path / "nothing"))
    assert loud.returncode == 1
    assert "Traceback" in loud.stderr
    assert loud.stderr.splitlines()[-1].startswith("cio-sync: error: ")


def test_inspecting_a_prefix_of_unreadable_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "1.2.1.track.parquet").write_bytes(b"PAR1 not really")
    result = _cio_sync("inspect", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"cio-sync: unreadable {tmp_path}/1.2.1.track.parquet: cannot be read as Parquet")
    assert lines[-1].startswith(f"cio-sync: error: no readable files in {tmp_path}")


def test_a_storage_option_without_a_value_is_a_usage_error() -> None:
    line = _one_error_line(_cio_sync("inspect", "memory://x/y", "--storage-option", "anon"), 2)
    assert "KEY=VALUE" in line


def test_a_local_storage_option_the_backend_does_not_take_is_an_error(tmp_path: Path) -> None:
    line = _one_error_line(_cio_sync("inspect", f"file://{tmp_path}", "--storage-option", "anon=true"), 1)
    assert "'anon'" in line


def test_loading_a_prefix_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-prefix"
    result = _cio_sync("load", str(missing), "--into", f"duckdb:///{tmp_path / 'w.duckdb'}")
    line = _one_error_line(result, 1)
    assert f"{missing} does not exist" in line
    assert not (tmp_path / "w.duckdb").exists()


def test_inspecting_the_demo_folder_points_to_its_subfolders(tmp_path: Path) -> None:
    assert main(["demo", str(tmp_path / "demo"), "--calls", "50"]) == 0
    line = _one_error_line(_cio_sync("inspect", str(tmp_path / "demo")), 1)
    assert "no cio_sync files in" in line
    for sub in ("advanced/parquet", "advanced/csv", "standard"):
        assert str(tmp_path / "demo" / sub) in line


def test_a_folder_of_other_files_is_not_loaded_as_zero_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    line = _one_error_line(_cio_sync("load", str(tmp_path), "--into", "duckdb:///:memory:"), 1)
    assert "no cio_sync files" in line


def test_a_malformed_duckdb_url_is_an_error(tmp_path: Path) -> None:
    assert main(["demo", str(tmp_path / "demo"), "--calls", "20"]) == 0
    line = _one_error_line(_cio_sync("load", str(tmp_path / "demo" / "standard"), "--into", "duckdb:/w.duckdb"), 1)
    assert "duckdb:////" in line


def test_version_prints_the_version() -> None:
    result = _cio_sync("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"cio-sync {cio_sync.__version__}"
