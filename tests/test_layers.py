"""The package's layers (docs/architecture.md): imports flow down only, checked by import-linter's contract in
pyproject.toml, on the package as it is and on a copy given one upward import (which must be caught)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(where: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(where)}
    return subprocess.run([str(LINT), "--config", str(where / "pyproject.toml"), "--no-cache"], cwd=where, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def copy_of_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "cio_sync", tmp_path / "cio_sync", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_every_module_imports_only_from_lower_layers(tmp_path: Path) -> None:
    done = lint(copy_of_package(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_a_module_that_imports_a_higher_layer_breaks_the_contract(tmp_path: Path) -> None:
    where = copy_of_package(tmp_path)
    values = where / "cio_sync" / "intake" / "values.py"
    values.write_text(values.read_text() + "\nfrom cio_sync.sinks.base import BaseSink  # an upward import\n")
    done = lint(where)
    assert done.returncode != 0
    assert "cio_sync.intake.values -> cio_sync.sinks.base" in done.stdout


def test_a_format_that_imports_storage_breaks_the_contract(tmp_path: Path) -> None:
    where = copy_of_package(tmp_path)
    parquet = where / "cio_sync" / "formats" / "parquet.py"
    parquet.write_text(parquet.read_text() + "\nfrom cio_sync.storage.writer import Writer  # siblings: independent\n")
    done = lint(where)
    assert done.returncode != 0
    assert "cio_sync.formats.parquet -> cio_sync.storage.writer" in done.stdout
