"""The HTTP intake's benchmark runs end to end at a tiny size: it prints its table, the aim and the comparisons, and
saves JSON whose every ``cio-sync serve`` case had its acknowledged calls published.

No timing is checked (the machines are shared and noisy); only that ``nox -s bench_serve`` would produce its output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parent.parent
CASES = {"minimal-batch", "serve-batch-group", "serve-batch-always", "minimal-track", "serve-track-group",
         "serve-track-always"}


@pytest.mark.slow
def test_bench_serve_short_run_prints_the_table_and_the_aim_and_saves_json(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench.serve", "--seconds", "1", "--warmup", "0.2", "--repeat", "1", "--connections",
         "2", "--templates", "4", "--folder", str(tmp_path / "work"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for label in ("minimal ASGI app, batches of 100", "cio-sync serve, --spool-sync group, batches of 100",
                  "cio-sync serve, --spool-sync always, one track call"):
        assert label in done.stdout
    assert "calls/CPU-s" in done.stdout
    assert "load generator: busy at most" in done.stdout
    assert "RudderStack's anchor" in done.stdout
    assert "issue 14 aim, this run:" in done.stdout
    [saved] = out.glob("serve-*.json")
    data = json.loads(saved.read_text())
    rows = {row["key"]: row for row in data["results"]}
    assert set(rows) == CASES
    for row in rows.values():
        assert row["errors"] == []
        assert row["calls_per_s"] > 0
        assert row["p50_ms"] is not None
        assert row["p99_ms"] >= row["p50_ms"]
        [run] = row["runs"]
        assert run["statuses"] == {"200": run["sent"] - run["unanswered"]}
    assert rows["minimal-batch"]["ratio_to_minimal"] == pytest.approx(1.0)
    for key in CASES - {"minimal-batch", "minimal-track"}:
        [run] = rows[key]["runs"]
        assert rows[key]["landed"] is True
        assert run["published_rows"] == run["distinct_message_ids"] == run["acknowledged_calls"] > 0
    [aim] = data["targets"]
    assert aim["status"] in {"met", "NOT met"}
