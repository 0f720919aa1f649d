"""Durable counters: continue across restarts, survive deleted data files, never hand out a value twice."""

from __future__ import annotations

import threading

import pytest

from cio_sync import FsspecWriter
from cio_sync.publish.counters import COUNTERS_FOLDER, KEEP, Counters
from tests.conftest import Storage


def test_values_start_at_one_and_continue_in_a_new_process(storage: Storage) -> None:
    writer = FsspecWriter(storage.url, storage_options=storage.storage_options)
    first = Counters(writer)
    assert [first.claim("7.2") for _ in range(3)] == [1, 2, 3]
    assert first.claim("7.3") == 1
    again = Counters(FsspecWriter(storage.url, storage_options=storage.storage_options))
    assert again.claim("7.2") == 4
    assert again.current("7.2") == 4


def test_claim_markers_do_not_pile_up(storage: Storage) -> None:
    writer = FsspecWriter(storage.url, storage_options=storage.storage_options)
    counters = Counters(writer)
    for _ in range(KEEP * 3):
        counters.claim("k")
    markers = writer.list(f"{COUNTERS_FOLDER}/k")
    assert len(markers) <= KEEP * 3 // 2
    assert markers[-1] == f"{KEEP * 3:020d}"
    assert Counters(writer).claim("k") == KEEP * 3 + 1


def test_at_least_raises_the_floor(memory_storage: Storage) -> None:
    counters = Counters(FsspecWriter(memory_storage.url))
    assert counters.claim("seq", at_least=1_000) == 1_000
    assert counters.claim("seq", at_least=10) == 1_001


@pytest.mark.parametrize("key", ["", "../x", "a/b", ".hidden", "a b"])
def test_unsafe_keys_are_refused(memory_storage: Storage, key: str) -> None:
    from cio_sync import ConfigError

    with pytest.raises(ConfigError):
        Counters(FsspecWriter(memory_storage.url)).claim(key)


def test_concurrent_claimers_never_share_a_value_and_leave_no_gap(storage: Storage) -> None:
    per_thread, threads = 15, 4
    results: list[list[int]] = [[] for _ in range(threads)]

    def claim(i: int) -> None:
        counters = Counters(FsspecWriter(storage.url, storage_options=storage.storage_options))
        results[i].extend(counters.claim("shared") for _ in range(per_thread))

    workers = [threading.Thread(target=claim, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    values = [v for r in results for v in r]
    assert sorted(values) == list(range(1, per_thread * threads + 1))
    for r in results:
        assert r == sorted(r)


def test_a_writer_with_a_stale_view_never_reuses_a_pruned_value(memory_storage: Storage) -> None:
    stale = Counters(FsspecWriter(memory_storage.url))
    assert stale.claim("k") == 1
    busy = Counters(FsspecWriter(memory_storage.url))
    claimed = [busy.claim("k") for _ in range(KEEP * 3)]
    assert f"{2:020d}" not in FsspecWriter(memory_storage.url).list(f"{COUNTERS_FOLDER}/k")  # pruned
    assert stale.claim("k") == claimed[-1] + 1
