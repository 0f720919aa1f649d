"""Nothing lost, nothing twice: a writer killed with SIGKILL at random moments, then restarted on its spool."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import Storage
from tests.helpers import duckdb_rows

#: Killed runs per storage: 8 in the default run (each is a new interpreter, ~1.3 s); `nox -s crash` sets 200.
TRIALS = int(os.environ.get("CIO_SYNC_CRASH_TRIALS", "8"))
ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"]


def _run_trials(storage: Storage, tmp: Path, trials: int, seed: int) -> tuple[set[str], list[str]]:
    rng = random.Random(seed)
    spool = tmp / "spool"
    acks = tmp / "acks.txt"
    options = json.dumps(storage.storage_options)
    first = 0
    for _ in range(trials):
        errors = tmp / "child.err"
        with open(errors, "wb") as err:
            child = subprocess.Popen(_python(
                f"from tests.workers import crash_writer; crash_writer({storage.url!r}, {options!r}, "
                f"{str(spool)!r}, {str(acks)!r}, {first})"), stdout=subprocess.DEVNULL, stderr=err)
        # Let it get going (imports take a while), then kill it somewhere in writing, flushing or uploading.
        size = acks.stat().st_size if acks.exists() else 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (acks.stat().st_size if acks.exists() else 0) == size:
            if child.poll() is not None:
                pytest.fail(f"the writer died by itself:\n{errors.read_text()[-3000:]}")
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait()
        first += 1_000_000  # the next run numbers its calls apart
    subprocess.run(_python(
        f"from tests.workers import recover; recover({storage.url!r}, {options!r}, {str(spool)!r})"),
        check=True, timeout=120)
    acked = set(acks.read_text().split()) if acks.exists() else set()
    published: list[str] = []
    download = tmp / "download"
    storage.download(download)
    for name in storage.data_files():
        published += [str(r["messageId"]) for r in duckdb_rows(download / name, "parquet")]
    return acked, published


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_every_accepted_call_is_published_exactly_once_after_sigkills(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    storage: Storage = request.getfixturevalue(f"{kind}_storage")
    acked, published = _run_trials(storage, tmp_path, TRIALS, seed=hash(kind) & 0xFFFF)
    print(f"{kind}: {len(acked)} calls accepted over {TRIALS} killed runs, {len(published)} published")
    assert len(acked) > TRIALS, "the writer never got going"
    counts = Counter(published)
    duplicated = [m for m, n in counts.items() if n > 1]
    assert not duplicated, f"{len(duplicated)} calls published twice, e.g. {duplicated[:5]}"
    missing = acked - set(counts)
    assert not missing, f"{len(missing)} accepted calls lost, e.g. {sorted(missing)[:5]}"
