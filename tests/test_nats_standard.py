"""Standard mode on NATS workers: each partition's workspace state in a schema of a real PostgreSQL server, the
calls from a real 3-node JetStream cluster; compared with one StandardSink fed the same calls in the same order.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import cio_sync
from cio_sync.nats import Publisher, Worker
from tests import servers
from tests.test_nats_fleet import Traffic, exactly_once, intake, kill_sweep
from tests.test_nats_fleet import worker as worker_process
from tests.test_nats_worker import message_ids, wait_for

pytestmark = pytest.mark.timeout(300)
_streams = itertools.count(1)
WORKSPACE = 111528


@pytest.fixture
def stream() -> str:
    return f"std{next(_streams)}"


def identify_calls(n: int, *, people: int = 30, start: int = 0) -> list[dict[str, Any]]:
    """Identify calls whose traits change some of the time (an identify that changes nothing writes nothing)."""
    out = []
    for i in range(start, start + n):
        person = f"user-{i % people}"
        out.append({"type": "identify", "userId": person, "messageId": f"s-{i}",
                    "traits": {"plan": ("free", "pro", "team")[(i // people) % 3], "seen": (i // people) // 2,
                               "email": f"{person}@example.com"}})
    return out


def diffs(folder: Path) -> dict[str, list[tuple[str, str | None]]]:
    """Each person's attribute changes, in the order the files (by sequence) and their rows hold them, by the
    person's id (``customer_id``; the internal id differs between runs)."""
    def rows(table: str) -> list[dict[str, Any]]:
        paths = sorted(folder.glob(f"{table}_v4_{WORKSPACE}_*.parquet"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        return [r for p in paths for r in pq.read_table(p).to_pylist()]

    ids = {r["internal_customer_id"]: r["customer_id"] for r in rows("people")}
    out: dict[str, list[tuple[str, str | None]]] = {}
    for r in rows("attributes"):
        out.setdefault(ids[r["internal_customer_id"]], []).append((r["attribute_name"], r["attribute_value"]))
    return out


def one_process(calls: list[dict[str, Any]], folder: Path) -> dict[str, list[tuple[str, str | None]]]:
    with cio_sync.StandardSink(str(folder), workspace_id=WORKSPACE, flush_interval=None) as sink:
        for call in calls:
            sink.write(call)
    return diffs(folder)


@pytest.fixture
def standard_workers(nats_cluster: servers.NatsCluster, postgres_server: servers.PostgresServer, stream: str,
                     tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def make(**options: Any) -> Worker:
        options = {"flush_interval": 1.0, "standard_flush_interval": 1.0, "lease_seconds": 2.0, **options}
        worker = Worker(nats_cluster.urls, stream=stream, standard=str(tmp_path / "std"), workspace_id=WORKSPACE,
                        state=postgres_server.dsn, **options).start()
        started.append(worker)
        return worker

    yield make
    for each in started:
        each.close()


def test_two_standard_workers_write_the_diffs_one_process_writes(
        nats_cluster: servers.NatsCluster, stream: str, tmp_path: Path,
        standard_workers: Callable[..., Worker]) -> None:
    calls = identify_calls(900)
    with Publisher(nats_cluster.urls, stream=stream, partitions=4) as publisher:
        publisher.write_many(calls[:1])
        publisher.sync()
        a, b = standard_workers(worker_id="a"), standard_workers(worker_id="b")
        wait_for(lambda: len(a.owned | b.owned) == 4 and bool(a.owned) and bool(b.owned), "partitions shared")
        publisher.write_many(calls[1:])
        publisher.sync()
    wait_for(lambda: a.stats().calls_applied + b.stats().calls_applied >= len(calls), "every call applied")
    a.close()
    b.close()

    expected = one_process(calls, tmp_path / "one")
    assert sum(len(v) for v in expected.values()) > 0
    assert diffs(tmp_path / "std") == expected


def test_a_standard_worker_fenced_off_commits_nothing_and_the_next_owner_goes_on(
        nats_cluster: servers.NatsCluster, postgres_server: servers.PostgresServer, stream: str, tmp_path: Path,
        standard_workers: Callable[..., Worker]) -> None:
    calls = identify_calls(300, people=10)
    with Publisher(nats_cluster.urls, stream=stream, partitions=2) as publisher:
        publisher.write_many(calls[:150])
        publisher.sync()
        first = standard_workers(worker_id="first")
        wait_for(lambda: first.stats().calls_applied >= 150, "the first half applied")
        # Another owner takes both partitions' states with a higher epoch, as a takeover does.
        for number in range(2):
            with cio_sync.StandardSink(str(tmp_path / "thief"), workspace_id=WORKSPACE, state=postgres_server.dsn,
                                       state_schema=f"{stream}_p{number}", flush_interval=None) as thief:
                thief.state.take_ownership(1000)
        publisher.write_many(calls[150:])
        publisher.sync()
        wait_for(lambda: first.stats().partitions_lost == 2, "the first worker fenced off both partitions")
    assert first.stats().calls_applied == 150
    first.close()


def test_a_fleet_with_standard_state_in_postgresql_through_kills_writes_the_diffs_of_one_process(
        nats_cluster: servers.NatsCluster, postgres_server: servers.PostgresServer, stream: str, tmp_path: Path,
        fleet: list[Any]) -> None:
    standard = ("--standard", str(tmp_path / "std"), "--workspace-id", str(WORKSPACE), "--state", postgres_server.dsn,
                "--standard-flush-interval", "1")
    served = [intake(tmp_path, nats_cluster, stream, fleet) for _ in range(2)]
    workers = [worker_process(tmp_path, f"s{i}", nats_cluster, stream, fleet, *standard) for i in range(3)]
    traffic = Traffic([s.url for s in served], identify=True, people=15)
    try:
        wait_for(lambda: traffic.count() >= 600, "traffic")
        workers[0].kill()  # kill -9 mid-stream: its partitions' states are taken with a higher epoch by others
        wait_for(lambda: traffic.count() >= 1200, "traffic after the worker kill")
        node = nats_cluster.node(nats_cluster.stream_leader(stream) or "n1")
        nats_cluster.kill(node)
        wait_for(lambda: traffic.count() >= 1800, "traffic after the NATS node kill", timeout=120)
        nats_cluster.start(node)
        workers[0] = worker_process(tmp_path, "s0", nats_cluster, stream, fleet, *standard)
        wait_for(lambda: traffic.count() >= 2400, "traffic after the restarts", timeout=120)
    finally:
        acked = traffic.stop()
        nats_cluster.start()
    out = tmp_path / "out"
    wait_for(lambda: set(acked) <= set(message_ids(out)), "every acked call in an Advanced file", timeout=120)
    for process in workers:
        assert process.stop() == 0
    exactly_once(out, acked)
    expected = one_process(traffic.calls, tmp_path / "one")
    assert sum(len(v) for v in expected.values()) > 100
    assert diffs(tmp_path / "std") == expected


def test_calls_delivered_again_to_the_next_owner_are_not_applied_twice(
        nats_cluster: servers.NatsCluster, postgres_server: servers.PostgresServer, stream: str,
        tmp_path: Path) -> None:
    from tests.test_nats_worker import freeze

    calls = identify_calls(400, people=8)
    options: dict[str, Any] = {"standard": str(tmp_path / "std"), "workspace_id": WORKSPACE,
                               "state": postgres_server.dsn, "advanced": str(tmp_path / "out"),
                               "standard_flush_interval": 0.5, "lease_seconds": 2.0}
    with Publisher(nats_cluster.urls, stream=stream, partitions=2) as publisher:
        publisher.write_many(calls)
        publisher.sync()
    # Its Advanced rounds are far off, so nothing it applied to the Standard state is acked when it dies.
    dead = Worker(nats_cluster.urls, stream=stream, flush_interval=600.0, worker_id="dead", **options).start()
    wait_for(lambda: dead.stats().calls_applied >= len(calls), "every call applied (and committed) by the first")
    freeze(dead)
    with Worker(nats_cluster.urls, stream=stream, flush_interval=0.5, worker_id="next", **options) as heir:
        wait_for(lambda: len(message_ids(tmp_path / "out")) >= len(calls), "the Advanced files, by the next owner")
        time.sleep(1.5)  # a Standard publish or two
    assert heir.stats().calls_applied == 0  # every call was in the state already (its position says so)
    assert heir.stats().redeliveries_skipped == 0  # not skipped: delivered again for the Advanced files
    assert diffs(tmp_path / "std") == one_process(calls, tmp_path / "one")


def test_standard_workers_killed_at_random_moments_write_the_diffs_of_one_process(
        nats_cluster: servers.NatsCluster, postgres_server: servers.PostgresServer, stream: str, tmp_path: Path,
        fleet: list[Any]) -> None:
    """kill -9s landing mid-commit, mid-outbox-publish and mid-takeover too (CIO_SYNC_FLEET_KILLS: 4, 40 in nox -s
    crash)."""
    traffic = kill_sweep(tmp_path, nats_cluster, stream, fleet, "--standard", str(tmp_path / "std"),
                         "--workspace-id", str(WORKSPACE), "--state", postgres_server.dsn,
                         "--standard-flush-interval", "0.5", identify=True)
    expected = one_process(traffic.calls, tmp_path / "one")
    assert sum(len(v) for v in expected.values()) > 50
    assert diffs(tmp_path / "std") == expected
