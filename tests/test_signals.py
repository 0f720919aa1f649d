"""Stopping with real signals: SIGTERM to real processes, with and without ``cio_sync.close_on_signals``.

With the helper, every call a service acknowledged is published exactly once and the process exits 128 + signum;
a signal that lands inside ``write()`` never tears a call. Without it, SIGTERM kills the process and a sink without
a spool loses its buffer (today's behaviour, documented by a test).
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

import cio_sync
from tests.faults import published_ids
from tests.signal_scenarios import call

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("CIO_SYNC_SIGNAL_ROUNDS", "40"))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _scenario(*args: str, **popen: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.signal_scenarios", *args], cwd=ROOT, env=ENV, **popen)


def _wait_for_acks(acks: Path, child: subprocess.Popen[bytes], at_least: int = 200) -> None:
    deadline = time.monotonic() + 60
    while (acks.stat().st_size if acks.exists() else 0) < at_least * 4:
        assert child.poll() is None, "the service died by itself"
        assert time.monotonic() < deadline, "the service never got going"
        time.sleep(0.01)


def test_sigterm_with_close_on_signals_publishes_every_acknowledged_call_once_and_exits_143(tmp_path: Path) -> None:
    root, acks = tmp_path / "prefix", tmp_path / "acks"
    child = _scenario("service", str(root), str(acks), "yes", stderr=subprocess.PIPE)
    _wait_for_acks(acks, child)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, stderr.decode()
    acked = acks.read_text().split()
    published = published_ids(root)
    assert all(published[m] == 1 for m in acked), "an acknowledged call is missing or published twice"
    assert set(published) - set(acked) <= {f"m{len(acked)}"}  # at most the call between write() and its ack
    assert max(published.values()) == 1


def test_sigterm_with_close_on_signals_given_no_sink_publishes_every_open_sink_of_both_modes(tmp_path: Path) -> None:
    root, acks = tmp_path / "out", tmp_path / "acks"
    child = _scenario("pipeline_service", str(root), str(tmp_path / "state.sqlite"), str(acks), stderr=subprocess.PIPE)
    _wait_for_acks(acks, child)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, stderr.decode()
    acked = acks.read_text().split()
    published = published_ids(root / "advanced")
    assert all(published[m] == 1 for m in acked)
    assert max(published.values()) == 1
    people = {r["customer_id"] for r in _rows(root / "standard") if "customer_id" in r}
    # Every acknowledged identify made its person in the Standard files (identify is every third call).
    assert {f"u{int(m[1:])}" for m in acked if int(m[1:]) % 3 == 1} <= people


def test_a_write_and_its_acknowledgement_in_a_hold_block_are_published_together_or_not_at_all(
    tmp_path: Path,
) -> None:
    root, acks = tmp_path / "prefix", tmp_path / "acks"
    child = _scenario("service", str(root), str(acks), "hold", stderr=subprocess.PIPE)
    _wait_for_acks(acks, child)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, stderr.decode()
    assert published_ids(root) == Counter(acks.read_text().split())


def test_sigterm_without_the_helper_kills_the_process_and_a_sink_without_a_spool_loses_its_buffer(
    tmp_path: Path,
) -> None:
    root, acks = tmp_path / "prefix", tmp_path / "acks"
    child = _scenario("service", str(root), str(acks), "no", stderr=subprocess.PIPE)
    _wait_for_acks(acks, child)
    child.send_signal(signal.SIGTERM)
    child.communicate(timeout=120)
    assert child.returncode == -signal.SIGTERM  # killed by the signal: no with block left, no atexit handler
    assert acks.read_text().split()
    assert published_ids(root) == Counter()  # everything it had accepted was in memory


def _rows(folder: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for path in sorted(folder.glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def test_sigterm_landing_inside_write_never_tears_a_call_nor_loses_an_acknowledged_one(tmp_path: Path) -> None:
    done = _scenario("rounds", str(tmp_path), str(ROUNDS), "11", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = done.communicate(timeout=600)
    assert done.returncode == 0, stderr.decode()[-3000:]
    report = json.loads(stdout)
    assert report["codes"] == [128 + signal.SIGTERM] * ROUNDS
    for n, acked in enumerate(report["acked"]):
        folder = tmp_path / str(n)
        rows = _rows(folder)
        ids = Counter(str(r["messageId"]) for r in rows)
        assert all(ids[m] == 1 for m in acked), f"round {n}: an acknowledged call is missing or doubled"
        assert set(ids) - set(acked) <= {f"r{n}-{len(acked)}"}, f"round {n}: calls published that were never written"
        assert max(ids.values(), default=1) == 1
        for row in rows:  # every published row whole: each field as its call was written
            i = int(str(row["messageId"]).rsplit("-", 1)[1])
            expected = call(f"r{n}-", i)
            assert (row["type"], row["userId"]) == (expected["type"], expected["userId"])
            if row["type"] != "identify":
                assert orjson.loads(str(row["properties"])) == expected["properties"]
        manifests = [orjson.loads(p.read_bytes()) for p in sorted((folder / "_manifests").glob("*.json"))]
        listed = {f["name"]: f["rows"] for m in manifests for f in m["files"]}
        assert listed == {p.name: pq.read_metadata(p).num_rows for p in folder.glob("*.parquet")}, \
            f"round {n}: a manifest's row count differs from its file's"


def _replay(root: Path, stdin: int | None = subprocess.PIPE) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "cio_sync", "replay", "-", "--to", str(root)], cwd=ROOT, env=ENV,
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigterm_mid_replay_publishes_every_call_it_accepted_and_says_so_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "prefix"
    child = _replay(root)
    assert child.stdin is not None
    lines = b"".join(orjson.dumps(call("c", i)) + b"\n" for i in range(10_000))
    # The pipe holds 64 KiB: once this write returns, the replay has read (and mostly accepted) the rest.
    child.stdin.write(lines)
    child.stdin.flush()
    child.send_signal(signal.SIGTERM)  # the pipe stays open: the replay is waiting for more, or still writing
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, stderr.decode()
    said = stderr.decode().splitlines()
    assert len(said) == 1, said
    assert said[0].startswith("cio-sync: stopped by SIGTERM after ")
    assert "every call accepted is published" in said[0]
    accepted = int(said[0].removeprefix("cio-sync: stopped by SIGTERM after ").split(" ")[0].replace(",", ""))
    assert accepted > 5000
    assert published_ids(root) == Counter({f"c{i}": 1 for i in range(accepted)})  # the first ones, each once
    assert stdout == b""


def test_sigterm_mid_load_stops_between_two_files_and_the_next_load_goes_on_without_duplicates(
    tmp_path: Path,
) -> None:
    root, database = tmp_path / "prefix", tmp_path / "w.duckdb"
    with cio_sync.AdvancedSink(cio_sync.FsspecWriter(str(root), fsync=False), flush_interval=None,
                               max_rows=2) as sink:
        for i in range(80):
            sink.write(call("l", i))
    # A terminal for stderr, so that the load shows its progress: the signal is sent once a file is loaded.
    leader, follower = pty.openpty()
    child = subprocess.Popen([sys.executable, "-m", "cio_sync", "load", str(root), "--into",
                              f"duckdb:///{database}"], cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    said = b""
    while b"loaded " not in said:
        said += os.read(leader, 4096)
    child.send_signal(signal.SIGTERM)
    reading = threading.Thread(target=lambda: child.communicate(timeout=120))
    reading.start()
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        said += chunk
    reading.join()
    os.close(leader)
    assert child.returncode == 128 + signal.SIGTERM, said.decode(errors="replace")[-2000:]
    assert b"cio-sync: stopped by SIGTERM after loading " in said
    assert b"Traceback" not in said
    first = _loaded(database)
    assert 0 < first < 40  # stopped part-way, between two files
    again = subprocess.run([sys.executable, "-m", "cio_sync", "load", str(root), "--into", f"duckdb:///{database}"],
                           cwd=ROOT, env=ENV, capture_output=True, check=False)
    assert again.returncode == 0, again.stderr.decode()
    import duckdb

    con = duckdb.connect(str(database), read_only=True)
    counts = con.execute('SELECT count(*), count(DISTINCT "messageId") FROM ('
                         'SELECT "messageId" FROM raw_track UNION ALL SELECT "messageId" FROM raw_identify '
                         'UNION ALL SELECT "messageId" FROM raw_page)').fetchall()
    con.close()
    assert counts == [(80, 80)]


def _loaded(database: Path) -> int:
    import duckdb

    con = duckdb.connect(str(database), read_only=True)
    try:
        row = con.execute("SELECT count(*) FROM _cio_sync_loaded").fetchone()
    finally:
        con.close()
    return int(row[0]) if row else 0


def test_close_on_signals_outside_the_main_thread_is_a_config_error() -> None:
    raised: list[BaseException] = []

    def enter() -> None:
        try:
            with cio_sync.close_on_signals():
                pass
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=enter)
    worker.start()
    worker.join()
    assert len(raised) == 1
    assert isinstance(raised[0], cio_sync.ConfigError)
    assert "main thread" in str(raised[0])


def test_close_on_signals_puts_the_previous_handlers_back_when_it_ends() -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    before = signal.signal(signal.SIGTERM, mine)
    interrupt = signal.getsignal(signal.SIGINT)
    try:
        with cio_sync.close_on_signals(signals=(signal.SIGTERM, signal.SIGINT)):
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is interrupt
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("signals", [(signal.SIGKILL,), (signal.SIGSTOP,), (), (12345,)])
def test_signals_that_cannot_be_caught_are_refused(signals: tuple[int, ...]) -> None:
    with pytest.raises(cio_sync.ConfigError):
        cio_sync.close_on_signals(signals=signals)
