"""The cio-sync command line as a shell user meets it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cio_sync.cli import main
from tests.helpers import parse_advanced_name


def test_demo_writes_every_format_and_prints_what_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", str(tmp_path / "demo"), "--calls", "500"]) == 0
    out = capsys.readouterr().out
    for fmt in ("parquet", "csv", "json"):
        names = sorted(p.name for p in (tmp_path / "demo" / fmt).iterdir() if p.is_file())
        assert {parse_advanced_name(n)["type"] for n in names} == {"identify", "track", "page", "screen", "group",
                                                                    "alias"}
        for name in names:
            assert name in out
    assert "Loaded into DuckDB" in out
    assert "track" in out


def test_running_the_demo_twice_continues_the_positions(tmp_path: Path) -> None:
    assert main(["demo", str(tmp_path), "--calls", "50"]) == 0
    assert main(["demo", str(tmp_path), "--calls", "50"]) == 0
    positions = {parse_advanced_name(p.name)["position"] for p in (tmp_path / "csv").iterdir() if p.is_file()}
    assert positions == {1, 2}


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
