"""The memory budget holds while storage is down: ``max_buffer_bytes`` bounds what a sink takes, not only what it
counts.

The runs that measure memory happen in a fresh interpreter each (tests/budget_scenarios.py), whose peak RSS
(VmHWM) is compared with its RSS just before the sink opened. The bound is a memory bound, not a timing one, and
generous: three budgets, plus what the first publishes load and keep whatever the budget (pyarrow's Parquet
writer, its allocator's arenas: about 20 MiB on the project machine). Before the budget counted what rows really
take, the same run took over 8 budgets (13 with the smallest calls).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

import cio_sync
from tests import budget_scenarios

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")

MIB = 2**20
BUDGET = 16 * MIB
#: Random characters in each call's properties: calls that no file format compresses away.
PAD = 64
#: What RSS may take above the baseline whatever the budget (see the module docstring).
FIXED = 32 * MIB
#: How much of one rejected call is kept for the dead letters (docs/advanced.md).
MAX_REJECTED_INPUT = 32 * 1024
#: More than one of these calls takes (the budget is checked before each call is added).
ONE_CALL = 4096


def _rss_above_baseline(result: dict[str, Any]) -> float:
    return float((result["peak_mib"] - result["baseline_mib"]) * MIB)


@pytest.fixture(scope="module")
def storage_down() -> dict[str, Any]:
    """One run, shared by the tests below: small calls until BufferFull, no spool, storage down throughout."""
    return budget_scenarios.run("outage", BUDGET, PAD, None, None)


@pytest.mark.slow
def test_with_storage_down_a_full_budget_raises_buffer_full_and_loses_nothing(storage_down: dict[str, Any]) -> None:
    assert storage_down["stopped"] == "BufferFull"
    assert storage_down["accepted"] > 0
    assert storage_down["published"] == storage_down["accepted"]  # once storage came back


@pytest.mark.slow
def test_with_storage_down_bytes_in_memory_stay_within_the_budget(storage_down: dict[str, Any]) -> None:
    assert 0 < storage_down["most_in_memory"] <= BUDGET + ONE_CALL


@pytest.mark.slow
def test_with_storage_down_peak_rss_stays_within_a_few_budgets(storage_down: dict[str, Any]) -> None:
    assert _rss_above_baseline(storage_down) <= 3 * BUDGET + FIXED


@pytest.mark.slow
def test_with_a_spool_and_storage_down_the_sink_keeps_accepting_within_the_memory_bound(tmp_path: Path) -> None:
    calls = 500_000  # the smallest calls, several budgets' worth: they wait on disk
    result = budget_scenarios.run("outage", BUDGET, 0, str(tmp_path / "spool"), calls)
    assert result["stopped"] is None
    assert result["accepted"] == calls
    assert result["most_in_memory"] <= BUDGET + ONE_CALL
    assert _rss_above_baseline(result) <= 3 * BUDGET + FIXED
    assert result["published"] == calls


@pytest.mark.slow
def test_many_large_rejected_calls_kept_for_dead_letters_do_not_grow_memory_past_the_budget() -> None:
    result = budget_scenarios.run("rejected", BUDGET, 100_000, 20_000)  # 2 GB of rejected calls in all
    assert result["refused"] == result["rejected"] == 100_000
    assert result["most_in_memory"] <= BUDGET
    assert _rss_above_baseline(result) <= BUDGET
    assert result["kept"] > 0
    assert result["kept"] + result["not_kept"] == 100_000


def _letters(storage: Any) -> list[dict[str, Any]]:
    fs = storage.fs
    fs.invalidate_cache()
    names = fs.find(f"{storage.root}/_cio_sync/dead_letters/rejected")
    return [orjson.loads(line) for name in sorted(names) for line in fs.cat_file(name).splitlines()]


def test_a_rejected_call_is_kept_cut_to_the_cap_with_its_size(memory_storage: Any) -> None:
    huge = b'{"type": "track", "userId": 5, "event": "E", "properties": {"pad": "' + b"x" * 1_000_000 + b'"}}'
    with cio_sync.AdvancedSink(memory_storage.url, flush_interval=None, keep_rejected=True) as sink:
        with pytest.raises(cio_sync.InvalidCall):
            sink.write(huge)
        with pytest.raises(cio_sync.InvalidCall):
            sink.write({"type": "track", "userId": 6, "event": "E"})
    big, small = _letters(memory_storage)
    assert big["input"] == huge[:MAX_REJECTED_INPUT].decode()
    assert (big["input_truncated"], big["input_size"]) == (True, len(huge))
    assert small["input"] == {"type": "track", "userId": 6, "event": "E"}
    assert "input_truncated" not in small


def test_rejected_calls_beyond_a_quarter_of_the_budget_are_counted_not_kept(memory_storage: Any) -> None:
    with cio_sync.AdvancedSink(memory_storage.url, flush_interval=None, keep_rejected=True,
                               max_buffer_bytes=64 * 1024) as sink:
        for n in range(100):
            with pytest.raises(cio_sync.InvalidCall):
                sink.write({"type": "track", "userId": n, "event": "E", "properties": {"pad": "x" * 2000}})
        assert sink.stats.bytes_in_memory <= 16 * 1024
        assert sink.stats.calls_rejected == 100
    letters = _letters(memory_storage)
    kept = [x for x in letters if x["input"] is not None]
    [summary] = [x for x in letters if x["input"] is None]
    assert 0 < len(kept) < 100
    assert summary["not_kept"] == 100 - len(kept)
    assert [x["input"]["userId"] for x in kept] == list(range(len(kept)))
    assert json.dumps(summary).isascii()
