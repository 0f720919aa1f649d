"""The cio-sync command line as a shell user meets it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

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
    standard = {p.name.split("_v1_")[0] for p in (tmp_path / "demo" / "standard").iterdir() if p.is_file()}
    assert {"people", "attributes", "campaigns", "deliveries", "metrics"} <= standard
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


def test_help_explains_the_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "cio_sync", "--help"], capture_output=True, text=True,
                            check=True)
    assert "demo" in result.stdout
    result = subprocess.run([sys.executable, "-m", "cio_sync", "demo", "--help"], capture_output=True, text=True,
                            check=True)
    assert "--calls" in result.stdout


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
    standard = sorted(p.name.split("_v1_")[0] for p in (out / "standard").iterdir() if p.is_file())
    assert standard == ["attributes", "people"]
