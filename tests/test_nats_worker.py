"""Workers consuming a JetStream stream into Advanced files, against a real 3-node cluster on loopback.

In-process workers here (cio_sync.nats.Worker); the kill -9 and SIGSTOP runs with `cio-sync worker` processes are in
tests/test_nats_fleet.py.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cio_sync.nats import Publisher, Worker
from tests import servers
from tests.helpers import published

pytestmark = pytest.mark.timeout(180)
_streams = itertools.count(1)


@pytest.fixture
def stream() -> str:
    return f"work{next(_streams)}"


def calls(n: int, *, people: int = 50, start: int = 0) -> list[dict[str, Any]]:
    """``n`` calls of ``people`` people, each call numbered in its person's order (``properties.n``)."""
    out = []
    for i in range(start, start + n):
        person = f"user-{i % people}"
        out.append({"type": "track" if i % 3 else "identify", "userId": person, "messageId": f"m-{i}",
                    "event": "Viewed", "properties": {"n": i}, "traits": {"n": i}})
    return out


def publish(cluster: servers.NatsCluster, stream: str, batch: list[dict[str, Any]], **options: Any) -> None:
    with Publisher(cluster.urls, stream=stream, ack_timeout=10, **options) as publisher:
        for call in batch:
            publisher.write(call)
        publisher.sync()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def message_ids(folder: Path) -> list[str]:
    return [r["messageId"] for r in published(folder)]


def in_person_order(folder: Path) -> bool:
    """Whether each person's calls of each type are in the order they were sent, reading that type's files by
    position (the order SCHEMAS.md gives them) and each file's rows in order."""
    import pyarrow.parquet as pq

    seen: dict[tuple[str, str], int] = {}
    names = sorted(folder.glob("*.parquet"), key=lambda p: (p.name.split(".")[3], int(p.name.split(".")[2])))
    for path in names:
        for row in pq.read_table(path).to_pylist():
            n = orjson.loads(row.get("properties") or row.get("traits"))["n"]
            key = (row["type"], row["userId"])
            if n <= seen.get(key, -1):
                return False
            seen[key] = n
    return True


@pytest.fixture
def workers(nats_cluster: servers.NatsCluster, stream: str, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def make(**options: Any) -> Worker:
        options = {"flush_interval": 1.0, "lease_seconds": 2.0, **options}
        worker = Worker(nats_cluster.urls, stream=stream, advanced=str(tmp_path / "out"), **options).start()
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.close()


def test_two_workers_publish_every_call_once_in_person_order(
        nats_cluster: servers.NatsCluster, stream: str, tmp_path: Path, workers: Callable[..., Worker]) -> None:
    batch = calls(3000)
    publish(nats_cluster, stream, batch[:10], partitions=8)  # makes the stream
    a, b = workers(worker_id="a"), workers(worker_id="b")
    wait_for(lambda: a.owned | b.owned == set(range(8)) and a.owned and b.owned and not a.owned & b.owned,
             "the partitions shared between the two workers")
    publish(nats_cluster, stream, batch[10:], partitions=8)
    out = tmp_path / "out"
    wait_for(lambda: len(message_ids(out)) >= len(batch), "every call published")
    a.close()
    b.close()

    ids = message_ids(out)
    assert sorted(ids) == sorted(c["messageId"] for c in batch)
    assert in_person_order(out)
    assert a.stats().partitions == ()
    assert b.stats().partitions == ()
    assert a.stats().calls_published + b.stats().calls_published == len(batch)
    assert a.stats().calls_published > 0
    assert b.stats().calls_published > 0
    assert len(list((out / "_manifests").glob("*.json"))) > 0


def _offsets(cluster: servers.NatsCluster, stream: str, job: Callable[[Any], Any]) -> Any:
    import asyncio

    import nats

    async def main() -> Any:
        nc = await nats.connect(cluster.urls, connect_timeout=5)
        try:
            return await job(await nc.jetstream(timeout=5).key_value(f"{stream}_offsets"))
        finally:
            await nc.close()

    return asyncio.run(main())


def test_a_worker_fenced_off_its_partitions_publishes_nothing_it_read(
        nats_cluster: servers.NatsCluster, stream: str, tmp_path: Path, workers: Callable[..., Worker]) -> None:
    batch = calls(400)
    publish(nats_cluster, stream, batch, partitions=4)
    fenced = workers(worker_id="fenced", flush_interval=60.0)
    wait_for(lambda: fenced.stats().publish_lag_seconds > 0 and len(fenced.owned) == 4, "the calls read")
    time.sleep(1.0)

    async def take_over(kv: Any) -> None:
        # What another worker's takeover does to each partition: a higher epoch, with a compare-and-set.
        for number in range(4):
            entry = await kv.get(f"o.{number}")
            value = orjson.loads(entry.value)
            value.update(epoch=value["epoch"] + 1, owner="thief")
            await kv.update(f"o.{number}", orjson.dumps(value), last=entry.revision)

    _offsets(nats_cluster, stream, take_over)
    fenced.close()  # its last rounds: each compare-and-set fails, so nothing it read is published

    out = tmp_path / "out"
    assert message_ids(out) == []
    assert fenced.stats().partitions_lost == 4
    assert fenced.stats().calls_published == 0

    heir = workers(worker_id="heir")  # the stream still holds every call: none was acked
    wait_for(lambda: len(message_ids(out)) >= len(batch), "every call published by the next owner")
    heir.close()
    assert sorted(message_ids(out)) == sorted(c["messageId"] for c in batch)


#: Workers that "died" in a test: their event loops stopped but kept, so that their tasks are never collected.
_graveyard: list[Any] = []


def freeze(worker: Worker) -> None:
    """Stop ``worker``'s event loop where it is, as a process that died would: no close, no more lease renewals
    (its leases expire), nothing published or acked from here on."""
    assert worker._loop is not None
    worker._loop.loop.call_soon_threadsafe(worker._loop.loop.stop)
    _graveyard.append(worker)
    worker._closed = True  # the fixture's close() leaves it alone


class FailingWriter:
    """A writer whose uploads fail (storage down) while ``down`` is set; counters and reads go through."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.down, self.url = inner, True, inner.url

    def publish(self, name: str, data: bytes, **kw: Any) -> Any:
        import cio_sync

        if self.down and not name.startswith("_cio_sync/"):
            raise cio_sync.StorageError(f"injected: storage is down ({name})")
        return self.inner.publish(name, data, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_plan_left_pending_by_a_dead_worker_is_published_under_its_names_by_the_next(
        nats_cluster: servers.NatsCluster, stream: str, tmp_path: Path) -> None:
    from cio_sync import FsspecWriter

    out = tmp_path / "out"
    batch = calls(300, people=10)
    publish(nats_cluster, stream, batch, partitions=2)
    down = FailingWriter(FsspecWriter(str(out)))
    dead = Worker(nats_cluster.urls, stream=stream, advanced=down, flush_interval=0.5, lease_seconds=2,
                  worker_id="dead").start()
    try:
        wait_for(lambda: dead.stats().last_error is not None, "a failed upload (the plan recorded)")

        async def plans(kv: Any) -> list[Any]:
            return [orjson.loads((await kv.get(f"o.{n}")).value)["pending"] for n in range(2)]

        wait_for(lambda: all(_offsets(nats_cluster, stream, plans)), "both partitions' plans recorded")
        pending = _offsets(nats_cluster, stream, plans)
    finally:
        freeze(dead)
    planned = sorted(name for plan in pending for _, name in plan["files"])
    assert message_ids(out) == []

    with Worker(nats_cluster.urls, stream=stream, advanced=str(out), flush_interval=0.5, lease_seconds=2,
                worker_id="next") as heir:
        wait_for(lambda: len(message_ids(out)) >= len(batch), "the plans published by the next owner")
    assert sorted(message_ids(out)) == sorted(c["messageId"] for c in batch)
    names = sorted(p.name for p in out.glob("*.parquet"))
    assert set(planned) <= set(names)  # under the names the dead worker claimed: no position skipped, none reused
    assert heir.stats().takeovers == 2
    assert in_person_order(out)


def test_a_worker_that_joins_takes_its_share_and_nothing_lands_twice(
        nats_cluster: servers.NatsCluster, stream: str, tmp_path: Path, workers: Callable[..., Worker]) -> None:
    out = tmp_path / "out"
    first = workers(worker_id="first")
    sent: list[dict[str, Any]] = []
    with Publisher(nats_cluster.urls, stream=stream) as publisher:  # the stream the worker made: 16 partitions
        for round_ in range(6):
            for call in calls(300, start=round_ * 300):
                publisher.write(call)
                sent.append(call)
            publisher.sync()
            if round_ == 1:
                joined = workers(worker_id="joined")
            time.sleep(0.5)
    wait_for(lambda: joined.owned and len(first.owned | joined.owned) == 16 and not first.owned & joined.owned,
             "the partitions shared")
    wait_for(lambda: len(message_ids(out)) >= len(sent), "every call published")
    first.close()
    joined.close()
    assert sorted(message_ids(out)) == sorted(c["messageId"] for c in sent)
    assert joined.stats().takeovers >= 1
    assert joined.stats().calls_published > 0
    assert in_person_order(out)


def test_storage_down_then_back_publishes_every_call_once_under_the_planned_names(
        nats_cluster: servers.NatsCluster, stream: str, tmp_path: Path) -> None:
    from cio_sync import FsspecWriter

    out = tmp_path / "out"
    batch = calls(500, people=20)
    publish(nats_cluster, stream, batch, partitions=2)
    down = FailingWriter(FsspecWriter(str(out)))
    with Worker(nats_cluster.urls, stream=stream, advanced=down, flush_interval=0.5, lease_seconds=2) as worker:
        wait_for(lambda: worker.stats().last_error is not None, "an upload refused")
        assert "storage is down" in (worker.stats().last_error or "")
        time.sleep(2)  # a few retries of the same plan
        assert message_ids(out) == []
        down.down = False
        wait_for(lambda: len(message_ids(out)) >= len(batch), "every call published once storage is back")
    assert sorted(message_ids(out)) == sorted(c["messageId"] for c in batch)
    assert worker.stats().calls_published == len(batch)
    positions = sorted(int(p.name.split(".")[2]) for p in out.glob("*.track.parquet"))
    assert positions == list(range(1, len(positions) + 1))  # retried under the same names: no position skipped


def test_partitions_are_shared_evenly_the_same_way_by_every_worker_and_few_move() -> None:
    from cio_sync.nats import assign_partitions

    for workers in ({"a"}, {"a", "b"}, {"a", "b", "c"}, {"w1", "w2", "w3", "w4"}):
        for partitions in (1, 4, 16, 17):
            owners = assign_partitions(partitions, workers)
            assert sorted(owners) == list(range(partitions))
            loads = [list(owners.values()).count(w) for w in workers]
            assert max(loads) <= -(-partitions // len(workers))
    before, after = assign_partitions(16, {"a", "b", "c"}), assign_partitions(16, {"a", "b", "c", "d"})
    moved = [p for p in range(16) if before[p] != after[p]]
    assert all(after[p] == "d" for p in moved)  # only to the newcomer
    assert len(moved) == 4


def test_the_memory_budget_publishes_before_the_interval(
        nats_cluster: servers.NatsCluster, stream: str, tmp_path: Path, workers: Callable[..., Worker]) -> None:
    batch = calls(2000, people=10)
    publish(nats_cluster, stream, batch, partitions=2)
    worker = workers(flush_interval=600.0, max_buffer_bytes=100_000)  # 50 KB a partition: ~150 calls of ~300 bytes
    out = tmp_path / "out"
    wait_for(lambda: len(message_ids(out)) >= len(batch), "every call published, long before the interval")
    worker.close()
    assert sorted(message_ids(out)) == sorted(c["messageId"] for c in batch)
    assert worker.stats().files_published >= 10  # many rounds, each within its share of the budget
