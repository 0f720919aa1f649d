"""publish/layout.py: every file name is built and parsed in one place, and the loader reads names through it."""

from __future__ import annotations

import pytest

import cio_sync
from cio_sync.loader.files import classify
from cio_sync.publish import layout
from cio_sync.testing import MemoryWriter


def test_advanced_names_round_trip_and_are_what_the_sink_publishes() -> None:
    name = layout.advanced_name(3, 2, 17, "track", "parquet")
    assert name == "3.2.17.track.parquet"
    assert layout.parse_advanced(name) == layout.AdvancedName(3, 2, 17, "track", "parquet")
    writer = MemoryWriter()
    with cio_sync.AdvancedSink(writer, destination_id=3, flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "u", "event": "E"})
    assert list(writer.data_files()) == [layout.advanced_name(3, 2, 1, "track", "parquet")]
    assert [n for n in writer.files if n.startswith("_manifests/")] == [layout.advanced_manifest_name(3, 1)]


def test_standard_names_round_trip() -> None:
    name = layout.standard_name("people", 1, 42, 1_700_000_000_000_000)
    assert name == "people_v1_42_1700000000000000.parquet"
    assert layout.parse_standard(name) == layout.StandardName("people", 1, 42, 1_700_000_000_000_000)
    assert layout.standard_manifest_name(1, 42, 5) == "_manifests/manifest_v1_42_5.json"


@pytest.mark.parametrize("name", ["1.2.3.track.parquet.tmp", "1.2.x.track.parquet", "1.2.3.order.parquet",
                                  "people_v1_42.parquet", "orders.1.parquet"])
def test_names_of_neither_mode_are_not_parsed(name: str) -> None:
    assert layout.parse_advanced(name) is None
    assert layout.parse_standard(name) is None
    assert classify(name) is None


def test_the_loader_classifies_names_with_the_layout_module() -> None:
    advanced = classify(layout.advanced_name(1, 6, 9, "alias", "csv"))
    assert advanced is not None
    assert (advanced.table, advanced.mode, advanced.ext, advanced.order) == ("raw_alias", "advanced", "csv",
                                                                             ("advanced", 1, 6, 9))
    standard = classify(layout.standard_name("people", 1, 7, 12))
    assert standard is not None
    assert (standard.table, standard.order) == ("people", ("standard", "people", 12))


def test_a_custom_layout_builds_and_parses_its_names() -> None:
    orders = layout.Layout("{table}-{position}.{ext}")
    name = orders.name(table="refunds", position=12, ext="csv")
    assert name == "refunds-12.csv"
    assert orders.parse(name) == {"table": "refunds", "position": 12, "ext": "csv"}
    assert orders.parse("refunds-x.csv") is None
    assert orders.fields == ("table", "position", "ext")


def test_a_custom_layout_refuses_a_value_that_is_not_a_plain_name_part() -> None:
    with pytest.raises(cio_sync.ConfigError, match="cannot be part of a file name"):
        layout.Layout("{table}.{position}").name(table="../x", position=1, ext="csv")


def test_extra_fields_are_placeholders_only_for_the_sink_that_declares_them() -> None:
    assert layout.Layout("{shard}.{position}", extra=("shard",)).name(table="t", position=1, ext="e",
                                                                      shard="a") == "a.1"
    with pytest.raises(cio_sync.ConfigError, match="unknown placeholder"):
        layout.Layout("{shard}.{position}")
