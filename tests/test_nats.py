"""The intake's publisher to NATS JetStream, against a real 3-node cluster on loopback (tests/servers.py).

Each test uses a stream of its own; the calls are read back with a JetStream consumer, as a worker will.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import nats
import orjson
import pytest

import cio_sync
from cio_sync.asgi import app
from cio_sync.nats import Publisher, partition_of
from tests import servers
from tests.test_asgi import KEY
from tests.test_asgi import post as asgi_post
from tests.test_asgi import request as asgi_request

pytestmark = pytest.mark.timeout(120)
_streams = itertools.count(1)


@dataclass
class Stored:
    subject: str
    message_id: str | None
    call: dict[str, Any]


def _ask(cluster: servers.NatsCluster, job: Any) -> Any:
    """Run ``job(js)`` against the cluster with a connection of its own (not the publisher's)."""
    async def main() -> Any:
        nc = await nats.connect([n.url for n in cluster.nodes if n.server is not None], connect_timeout=5)
        try:
            return await job(nc.jetstream(timeout=5))
        finally:
            await nc.close()

    return asyncio.run(main())


def stored(cluster: servers.NatsCluster, stream: str) -> list[Stored]:
    """Every message in ``stream``, in order, read with an ephemeral pull consumer."""
    async def job(js: Any) -> list[Stored]:
        count = (await js.stream_info(stream)).state.messages
        if count == 0:
            return []
        sub = await js.pull_subscribe(f"{stream}.*", stream=stream)
        found: list[Stored] = []
        while len(found) < count:
            for msg in await sub.fetch(count - len(found), timeout=5):
                found.append(Stored(msg.subject, (msg.headers or {}).get("Nats-Msg-Id"), orjson.loads(msg.data)))
                await msg.ack()
        return found

    result: list[Stored] = _ask(cluster, job)
    return result


def stream_info(cluster: servers.NatsCluster, stream: str) -> Any:
    async def job(js: Any) -> Any:
        return await js.stream_info(stream)

    return _ask(cluster, job)


@pytest.fixture
def stream() -> str:
    return f"calls{next(_streams)}"


@pytest.fixture
def publisher(nats_cluster: servers.NatsCluster, stream: str) -> Iterator[Publisher]:
    with Publisher(nats_cluster.urls, stream=stream, ack_timeout=5) as p:
        yield p


def test_the_stream_is_created_with_three_replicas_and_a_day_of_dedupe(
        nats_cluster: servers.NatsCluster, publisher: Publisher, stream: str) -> None:
    info = stream_info(nats_cluster, stream)
    assert info.config.num_replicas == 3
    assert info.config.subjects == [f"{stream}.*"]
    assert info.config.duplicate_window >= 24 * 3600
    assert info.cluster.leader is not None
    assert len(info.cluster.replicas) == 2
    assert publisher.replicas == 3


def test_calls_land_on_their_persons_partition_with_their_message_id(
        nats_cluster: servers.NatsCluster, publisher: Publisher, stream: str) -> None:
    calls = [
        {"type": "identify", "userId": "u1", "messageId": "m1", "traits": {"plan": "pro"}},
        {"type": "track", "anonymousId": "a1", "messageId": "m2", "event": "Viewed"},
        {"type": "track", "userId": "u1", "anonymousId": "a1", "messageId": "m3", "event": "Bought"},
        {"type": "alias", "userId": "u2", "previousId": "a1", "messageId": "m4"},
    ]
    for call in calls:
        publisher.write(call)
    publisher.sync()

    found = stored(nats_cluster, stream)
    assert [s.message_id for s in found] == ["m1", "m2", "m3", "m4"]
    keys = ["u1", "a1", "u1", "u2"]  # userId, else anonymousId; an alias by its userId
    assert [s.subject for s in found] == [f"{stream}.{partition_of(k, 16)}" for k in keys]
    for sent, got in zip(calls, found, strict=True):
        assert {k: v for k, v in got.call.items() if k != "receivedAt"} == sent
        assert "receivedAt" in got.call
    assert publisher.stats == cio_sync.nats.PublisherStats(calls_published=4, duplicates=0, last_error=None)


def test_the_partition_of_a_person_is_stable() -> None:
    # BLAKE2b-64 of the UTF-8 key, big-endian, mod the partitions: the same in every process and release.
    assert [partition_of(k, 16) for k in ("u1", "a1", "u2", "")] == [partition_of(k, 16) for k in ("u1", "a1", "u2",
                                                                                                   "")]
    assert {partition_of(f"user-{i}", 16) for i in range(200)} == set(range(16))
    assert partition_of("u1", 1) == 0


def test_a_republished_message_id_is_stored_once(nats_cluster: servers.NatsCluster, publisher: Publisher,
                                                 stream: str) -> None:
    call = {"type": "track", "userId": "u7", "messageId": "retry-1", "event": "Paid"}
    publisher.write(call)
    publisher.sync()
    publisher.write(call)  # the client's retry after it saw no answer
    publisher.sync()

    assert [s.message_id for s in stored(nats_cluster, stream)] == ["retry-1"]
    assert publisher.stats.calls_published == 2
    assert publisher.stats.duplicates == 1
    scrape = app(publisher, write_keys=[KEY])
    metrics = asgi_request(scrape, "GET", "/metrics").body.decode()
    assert 'cio_sync_calls_duplicate_total{sink="nats"} 1.0' in metrics
    assert 'cio_sync_calls_published_total{sink="nats"} 2.0' in metrics


def test_a_bad_call_is_refused_and_not_published(nats_cluster: servers.NatsCluster, publisher: Publisher,
                                                 stream: str) -> None:
    with pytest.raises(cio_sync.InvalidCall, match="type"):
        publisher.write({"type": "purchase", "userId": "u1"})
    publisher.write({"type": "track", "userId": "u1", "event": "Kept"})
    publisher.sync()
    assert [s.call["event"] for s in stored(nats_cluster, stream)] == ["Kept"]


def test_the_http_intake_over_a_publisher_answers_200_once_the_stream_has_the_calls(
        nats_cluster: servers.NatsCluster, publisher: Publisher, stream: str) -> None:
    intake = app(publisher, write_keys=[KEY])
    batch = [{"type": "track", "userId": f"u{i}", "messageId": f"http-{i}", "event": "Viewed"} for i in range(20)]
    batch.append({"type": "nonsense", "userId": "u1"})

    response = asgi_post(intake, "/v1/batch", {"batch": batch})

    assert response.status == 200
    assert [e["index"] for e in response.json()["errors"]] == [20]
    assert sorted(s.message_id or "" for s in stored(nats_cluster, stream)) == sorted(f"http-{i}" for i in range(20))


def test_without_a_stream_leader_sync_fails_and_the_intake_answers_503_then_recovers(
        nats_cluster: servers.NatsCluster, stream: str) -> None:
    publisher = Publisher(nats_cluster.urls, stream=stream, ack_timeout=2)
    intake = app(publisher, write_keys=[KEY], retry_after=3)
    n = itertools.count()

    def send() -> Any:
        i = next(n)
        return asgi_post(intake, "/v1/batch", {"batch": [
            {"type": "track", "userId": f"u{i}", "messageId": f"k-{i}", "event": "Viewed"}]})

    try:
        assert send().status == 200
        leader = nats_cluster.stream_leader(stream)
        assert leader is not None
        nats_cluster.kill(nats_cluster.node(leader))

        refused = None
        deadline = time.monotonic() + 30
        while refused is None and time.monotonic() < deadline:
            response = send()
            if response.status == 503:
                refused = response
        assert refused is not None, "the intake kept answering 200 with the stream's leader killed"
        assert refused.headers[b"retry-after"] == b"3"
        assert "storage is not taking calls" in refused.json()["message"]
        assert publisher.stats.last_error is not None  # sync() raised StorageError: the intake's 503

        # The two nodes left elect a new leader; the intake takes calls again without a restart.
        deadline = time.monotonic() + 60
        while send().status != 200:
            assert time.monotonic() < deadline, "the stream did not take calls again after a new leader"
        nats_cluster.start(nats_cluster.node(leader))
        assert send().status == 200
    finally:
        nats_cluster.start()
        publisher.close()
    assert stream_info(nats_cluster, stream).state.messages >= 3
