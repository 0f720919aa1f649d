"""The benchmark suite runs end to end on tiny sizes: it prints the table and the targets, saves JSON and a chart.

No timing is checked (the machines are shared and noisy); only that ``nox -s bench`` would produce its output.
matplotlib comes with the test extra for this test (dlt, the other bench-only need, is left out by --no-dlt).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_quick_run_prints_the_table_and_saves_json_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--calls", "300", "--repeat", "1", "--quick", "--no-s3", "--no-dlt",
         "--always-calls", "20", "--identify-calls", "100", "--outage-budget-mib", "2", "--outage-calls", "20000",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "raw pyarrow (from_pylist + write_table)" in done.stdout
    assert "Advanced parquet, dicts in" in done.stdout
    assert "issue 7 targets, this run:" in done.stdout
    [saved] = out.glob("bench-*.json")
    data = json.loads(saved.read_text())
    by_key = {row["key"]: row for row in data["results"]}
    assert by_key["raw-pyarrow"]["ratio_to_raw_pyarrow"] == pytest.approx(1.0)
    assert by_key["parquet"]["median"] > 0
    assert by_key["parquet"]["files"] >= 1
    assert not any(row["errors"] for row in data["results"])
    assert {t["status"] for t in data["targets"]} <= {"met", "NOT met", "not measured"}
    outage = {row["key"]: row for row in data["results"] if row["group"] == "outage"}
    assert set(outage) == {"outage-small", "outage-small-spool", "outage-mixed", "outage-mixed-spool"}
    assert outage["outage-small"]["stopped_by"] == "BufferFull"
    assert outage["outage-small-spool"]["calls"] == 20_000
    assert all(row["peak_rss_above_start_per_budget"] > 0 for row in outage.values())
    assert "storage down, small calls, no spool: " in done.stdout
    [chart] = out.glob("bench-*.png")
    assert chart.read_bytes().startswith(b"\x89PNG")
