"""A fleet: `cio-sync serve --nats` intakes, `cio-sync worker` processes and a 3-node JetStream cluster, all on
loopback, with kill -9 of a worker, a NATS node killed and restarted, and a worker paused past its lease.

What is asserted is what a user sees: every call the intake answered 200 to is in exactly one published file.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests import servers
from tests.helpers import post
from tests.test_nats_worker import in_person_order, message_ids, wait_for

pytestmark = pytest.mark.timeout(300)
_streams = itertools.count(1)


class Traffic:
    """Clients posting batches to the intakes until stopped, retrying each batch until it gets a 200 (as the client
    libraries do); ``acked`` holds every messageId of a batch answered 200."""

    def __init__(self, urls: list[str], clients: int = 2, batch: int = 25, people: int = 40,
                 identify: bool = False) -> None:
        self.urls, self.batch, self.people, self.identify = urls, batch, people, identify
        self.acked: list[str] = []
        self.calls: list[dict[str, Any]] = []  # the calls of the batches answered 200, in each client's order
        self.refused = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(clients)]
        for thread in self._threads:
            thread.start()

    def _calls(self, client: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(self.batch):
            i = next(self._numbers)
            person = f"user-{client}-{i % self.people}"  # a person is sent by one client, in order
            if self.identify:
                out.append({"type": "identify", "userId": person, "messageId": f"c{client}-{i}",
                            "traits": {"plan": ("free", "pro", "team")[(i // 7) % 3], "step": i // 50,
                                       "email": f"{person}@example.com"}})
            else:
                out.append({"type": "track", "userId": person, "messageId": f"c{client}-{i}", "event": "Viewed",
                            "properties": {"n": i}})
        return out

    def _run(self, client: int) -> None:
        while not self._stop.is_set():
            calls = self._calls(client)
            for attempt in itertools.count():
                url = self.urls[(client + attempt) % len(self.urls)]
                if post(url, {"batch": calls}, servers.SERVE_KEY, timeout=30) == 200:
                    with self._lock:
                        self.acked.extend(c["messageId"] for c in calls)
                        self.calls.extend(calls)
                    break
                self.refused += 1
                time.sleep(0.2)
            time.sleep(0.02)

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def stop(self) -> list[str]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        return list(self.acked)


@pytest.fixture
def stream() -> str:
    return f"fleet{next(_streams)}"


def intake(root: Path, cluster: servers.NatsCluster, stream: str, fleet: list[Any]) -> servers.Served:
    served = servers.Served(root, sink=["--nats", ",".join(cluster.urls), "--stream", stream, "--partitions", "8"])
    fleet.append(served)
    return served


def worker(root: Path, worker_id: str, cluster: servers.NatsCluster, stream: str, fleet: list[Any],
           *extra: str) -> servers.WorkerProcess:
    process = servers.WorkerProcess(root, worker_id, "--flush-interval", "1", "--lease-seconds", "3", *extra,
                                    urls=cluster.urls, stream=stream, out=root / "out")
    fleet.append(process)
    return process


def exactly_once(out: Path, acked: list[str]) -> None:
    counts = Counter(message_ids(out))
    twice = [m for m, n in counts.items() if n > 1]
    missing = [m for m in acked if m not in counts]
    assert not twice, f"{len(twice)} calls published more than once, e.g. {twice[:5]}"
    assert not missing, f"{len(missing)} calls answered 200 are in no file, e.g. {missing[:5]}"


def test_four_workers_through_a_worker_kill_and_a_nats_node_kill(
        nats_cluster: servers.NatsCluster, stream: str, tmp_path: Path, fleet: list[Any]) -> None:
    served = [intake(tmp_path, nats_cluster, stream, fleet) for _ in range(2)]
    workers = [worker(tmp_path, f"w{i}", nats_cluster, stream, fleet) for i in range(4)]
    traffic = Traffic([s.url for s in served])
    try:
        wait_for(lambda: traffic.count() >= 1000, "traffic")
        workers[1].kill()  # kill -9 mid-stream: what it read and did not publish is read again by another
        wait_for(lambda: traffic.count() >= 2000, "traffic after the worker kill")
        node = nats_cluster.node(nats_cluster.stream_leader(stream) or "n1")
        nats_cluster.kill(node)  # the stream's leader: intakes answer 503 until a new one is elected
        wait_for(lambda: traffic.count() >= 3000, "traffic after the NATS node kill", timeout=120)
        nats_cluster.start(node)
        workers[1] = worker(tmp_path, "w1", nats_cluster, stream, fleet)
        wait_for(lambda: traffic.count() >= 4000, "traffic after the restarts", timeout=120)
    finally:
        acked = traffic.stop()
        nats_cluster.start()
    out = tmp_path / "out"
    wait_for(lambda: set(acked) <= set(message_ids(out)), "every acked call published", timeout=120)
    for process in workers:
        assert process.stop() == 0
    exactly_once(out, acked)
    assert in_person_order(out)


def test_a_worker_paused_past_its_lease_does_not_publish_what_it_lost(
        nats_cluster: servers.NatsCluster, stream: str, tmp_path: Path, fleet: list[Any]) -> None:
    served = intake(tmp_path, nats_cluster, stream, fleet)
    # The paused worker publishes rarely, so that it holds calls it read but did not publish when it is paused.
    paused = worker(tmp_path, "slow", nats_cluster, stream, fleet, "--flush-interval", "30")
    other = worker(tmp_path, "fast", nats_cluster, stream, fleet)
    traffic = Traffic([served.url], clients=1)
    try:
        wait_for(lambda: traffic.count() >= 500, "traffic")
        paused.signal(19)  # SIGSTOP: its heartbeat and leases expire; the other worker takes its partitions
        time.sleep(8)
        wait_for(lambda: traffic.count() >= 1200, "traffic while it is paused")
        paused.signal(18)  # SIGCONT: its next step on each partition it lost fails, and it drops what it read
        wait_for(lambda: traffic.count() >= 1800, "traffic after it resumed")
    finally:
        acked = traffic.stop()
    out = tmp_path / "out"
    wait_for(lambda: set(acked) <= set(message_ids(out)), "every acked call published", timeout=120)
    assert paused.stop() == 0
    assert other.stop() == 0
    exactly_once(out, acked)
    assert "lost" in paused.log.read_text(), "the paused worker never noticed it lost its partitions"


#: kill -9s of the kill sweep (nox -s crash: 40).
KILLS = int(os.environ.get("CIO_SYNC_FLEET_KILLS", "4"))


def kill_sweep(tmp_path: Path, cluster: servers.NatsCluster, stream: str, fleet: list[Any], *extra: str,
               identify: bool = False) -> Traffic:
    """kill -9 of a random worker of three at random moments (mid-read, mid-round, mid-upload, mid-ack, mid-commit:
    with rounds every 0.3 s, most kills land in one), each restarted at once, while clients keep sending; then
    every acked call published and the workers stopped. Asserts the Advanced files hold each acked call once."""
    served = intake(tmp_path, cluster, stream, fleet)
    names = ["k0", "k1", "k2"]
    options = ("--flush-interval", "0.3", *extra)
    workers = {n: worker(tmp_path, n, cluster, stream, fleet, *options) for n in names}
    traffic = Traffic([served.url], clients=2, batch=10, identify=identify, people=15)
    chance = random.Random(int(os.environ.get("CIO_SYNC_FLEET_SEED", "15")))
    try:
        for _ in range(KILLS):
            time.sleep(chance.uniform(0.3, 2.5))
            victim = chance.choice(names)
            workers[victim].kill()
            workers[victim] = worker(tmp_path, victim, cluster, stream, fleet, *options)
    finally:
        acked = traffic.stop()
    out = tmp_path / "out"
    wait_for(lambda: set(acked) <= set(message_ids(out)), "every acked call published", timeout=120)
    for process in workers.values():
        assert process.stop() == 0
    exactly_once(out, acked)
    return traffic


def test_workers_killed_at_random_moments_lose_and_duplicate_nothing(
        nats_cluster: servers.NatsCluster, stream: str, tmp_path: Path, fleet: list[Any]) -> None:
    kill_sweep(tmp_path, nats_cluster, stream, fleet)
    assert in_person_order(tmp_path / "out")


@pytest.mark.parametrize(("args", "words", "code"), [
    (["--nats", "nats://127.0.0.1:1", "--stream", "s", "--connect-timeout", "1"], "cannot connect to NATS", 1),
    (["--nats", "nats://127.0.0.1:1", "--stream", "a.b"], "stream name 'a.b'", 1),
    (["--nats", "nats://127.0.0.1:1", "--stream", "s", "--lease-seconds", "0"], "--lease-seconds", 2),
])
def test_the_worker_explains_a_bad_start_in_one_line(tmp_path: Path, args: list[str], words: str, code: int) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cio_sync.cli", "worker", "--advanced", str(tmp_path), *args],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == code
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("cio-sync: error:")
    assert words in line


def test_the_worker_serves_its_partitions_and_lag_as_metrics(
        nats_cluster: servers.NatsCluster, stream: str, tmp_path: Path, fleet: list[Any]) -> None:
    import urllib.request

    port = servers.free_port()
    process = worker(tmp_path, "metered", nats_cluster, stream, fleet, "--metrics-port", str(port))

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())

    wait_for(lambda: 'cio_sync_worker_partitions{worker="metered"} 16.0' in scrape(), "all 16 partitions owned")
    text = scrape()
    assert 'cio_sync_worker_partition_owned{partition="0",worker="metered"} 1.0' in text
    assert 'cio_sync_publish_lag_seconds{worker="metered"}' in text
    assert 'cio_sync_calls_published_total{worker="metered"} 0.0' in text
    assert process.stop() == 0
