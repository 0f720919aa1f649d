"""cio_sync.BufferedSink: a custom sink of a few lines gets counters, the spool, manifests and the rest."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cio_sync
from cio_sync.testing import MemoryWriter, abandon
from tests.buffered_scenarios import ORDERS, OrdersSink, order
from tests.conftest import Storage
from tests.helpers import duckdb_rows

ROOT = Path(__file__).resolve().parents[1]
TRIALS = int(os.environ.get("CIO_SYNC_CRASH_TRIALS", "5"))


def file_rows(storage: Storage, name: str) -> list[dict[str, Any]]:
    return pq.read_table(pa.BufferReader(storage.read(name))).to_pylist()


# -- names ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "local", pytest.param("s3", marks=pytest.mark.s3)])
def test_orders_are_published_as_orders_1_2_3(request: pytest.FixtureRequest, kind: str) -> None:
    storage: Storage = request.getfixturevalue(f"{kind}_storage")
    with OrdersSink(storage.url, storage_options=storage.storage_options, flush_interval=None) as sink:
        for i in range(3):
            sink.write(order(f"o{i}", revenue=float(i)))
            sink.write({"type": "track", "userId": "u", "event": "Viewed"})  # not an order: accepted, ignored
            [written] = sink.flush()
            assert written.name == f"orders.{i + 1}.parquet"
    assert storage.data_files() == ["orders.1.parquet", "orders.2.parquet", "orders.3.parquet"]
    assert [r["messageId"] for r in file_rows(storage, "orders.2.parquet")] == ["o1"]
    row = file_rows(storage, "orders.3.parquet")[0]
    assert row["revenue"] == 2.0
    assert row["userId"] == "u1"
    assert row["receivedAt"].tzinfo is not None


def test_a_restart_continues_the_positions(local_storage: Storage) -> None:
    for run in range(2):
        with OrdersSink(local_storage.url, flush_interval=None) as sink:
            sink.write(order(f"a{run}"))
            sink.flush()
            sink.write(order(f"b{run}"))
    assert local_storage.data_files() == [f"orders.{n}.parquet" for n in (1, 2, 3, 4)]


def test_two_sinks_on_one_prefix_never_share_a_name(local_storage: Storage) -> None:
    one = OrdersSink(local_storage.url, flush_interval=None)
    two = OrdersSink(local_storage.url, flush_interval=None)
    names = []
    for i in range(4):
        for sink in (one, two):
            sink.write(order(f"{id(sink)}-{i}"))
            names += [f.name for f in sink.flush()]
    one.close()
    two.close()
    assert len(set(names)) == 8
    assert sorted(names, key=lambda n: int(n.split(".")[1])) == [f"orders.{n}.parquet" for n in range(1, 9)]


def test_the_default_layout_names_each_table() -> None:
    class Events(cio_sync.BufferedSink):
        """Two tables."""

        tables = {"tracks": pa.schema([("event", pa.string())]), "pages": pa.schema([("name", pa.string())])}

        def route(self, call: cio_sync.Call) -> Iterator[tuple[str, Any]]:
            if call.type == "track":
                yield "tracks", (call.data["event"],)
            elif call.type == "page":
                yield "pages", {"name": call.data.get("name")}

    writer = MemoryWriter()
    with Events(writer, format="csv", flush_interval=None) as sink:
        sink.write({"type": "track", "userId": "u", "event": "E"})
        sink.write({"type": "page", "userId": "u", "name": "Home"})
    assert sorted(writer.data_files()) == ["pages.1.csv", "tracks.1.csv"]


@pytest.mark.parametrize(("layout", "why"), [
    ("{table}.{nope}.{position}", "unknown placeholder"),
    ("{table}.parquet", "needs {position}"),
    ("a/{position}.{ext}", "plain file name"),
    ("..{position}", "plain file name"),
    ("{position:05}.{ext}", "format spec"),
])
def test_a_bad_layout_is_refused_when_the_class_is_defined(layout: str, why: str) -> None:
    pattern = why.replace("{", r"\{").replace("}", r"\}")
    with pytest.raises(cio_sync.ConfigError, match=pattern):
        type("Bad", (cio_sync.BufferedSink,), {"tables": {"orders": ORDERS}, "layout": layout})


def test_a_layout_set_on_an_instance_is_checked_when_the_sink_is_made() -> None:
    sink = OrdersSink.__new__(OrdersSink)
    sink.layout = "orders.{ext}"  # type: ignore[misc]
    with pytest.raises(cio_sync.ConfigError, match="needs"):
        OrdersSink.__init__(sink, MemoryWriter(), flush_interval=None)


def test_several_tables_need_the_table_in_their_layout() -> None:
    with pytest.raises(cio_sync.ConfigError, match=r"needs \{table\}"):
        type("Two", (cio_sync.BufferedSink,), {"tables": {"a": ORDERS, "b": ORDERS}, "layout": "x.{position}"})


def test_tables_may_be_table_specs_carrying_a_schema() -> None:
    class Spec:
        schema = pa.schema([("messageId", pa.string())])

    class Ids(cio_sync.BufferedSink):
        """Every message id."""

        tables = {"ids": Spec()}

        def route(self, call: cio_sync.Call) -> Iterator[tuple[str, Any]]:
            yield "ids", (call.message_id,)

    writer = MemoryWriter()
    with Ids(writer, flush_interval=None) as sink:
        sink.write({"type": "identify", "userId": "u", "messageId": "x"})
    assert writer.rows() == [{"messageId": "x"}]


# -- rows that do not fit ------------------------------------------------------------------------------------------


class Split(cio_sync.BufferedSink):
    """Each order as an order row and a line row: the line row fits only for some calls."""

    tables = {
        "orders": pa.schema([("messageId", pa.string())]),
        "lines": pa.schema([pa.field("messageId", pa.string(), nullable=False), ("quantity", pa.int32())]),
    }

    def route(self, call: cio_sync.Call) -> Iterator[tuple[str, Any]]:
        p = call.data.get("properties") or {}
        yield "orders", {"messageId": call.message_id}
        yield "lines", p.get("line", {"messageId": call.message_id, "quantity": p.get("quantity")})


@pytest.mark.parametrize(("properties", "column", "why"), [
    ({"quantity": "two"}, "lines.quantity", "expected an integer"),
    ({"quantity": 2**40}, "lines.quantity", "out of range"),
    ({"line": {"messageId": "m", "colour": "red"}}, "lines.colour", "no column 'colour'"),
    ({"line": ["m", 1, 2]}, "lines", "3 values for 2 columns"),
    ({"line": {"quantity": 1}}, "lines.messageId", "not nullable"),
])
@pytest.mark.parametrize("spooled", [False, True])
def test_a_row_that_does_not_fit_refuses_the_whole_call(tmp_path: Path, properties: dict[str, Any], column: str,
                                                         why: str, spooled: bool) -> None:
    writer = MemoryWriter()
    spool = tmp_path / "spool" if spooled else None
    sink = Split(writer, flush_interval=None, spool_dir=spool, keep_rejected=True)
    sink.write({"type": "track", "userId": "u", "event": "E", "messageId": "before", "properties": {"quantity": 1}})
    with pytest.raises(cio_sync.InvalidCall, match=why) as caught:
        sink.write({"type": "track", "userId": "u", "event": "E", "messageId": "bad", "properties": properties})
    assert caught.value.field == column
    assert column.split(".", maxsplit=1)[0] in str(caught.value)
    sink.write({"type": "track", "userId": "u", "event": "E", "messageId": "after", "properties": {"quantity": 3}})
    sink.close()
    if spooled:  # nothing of the refused call waits on the spool either
        Split(writer, flush_interval=None, spool_dir=spool).close()
    ids = sorted(r["messageId"] for r in writer.rows())
    assert ids == ["after", "after", "before", "before"]
    assert sink.stats.calls_accepted == 2
    assert sink.stats.calls_rejected == 1
    [letters] = [n for n in writer.files if n.startswith("_cio_sync/dead_letters/rejected/")]
    assert column in writer.files[letters].decode()


def test_a_row_for_an_unknown_table_is_refused() -> None:
    class Wrong(OrdersSink):
        def route(self, call: cio_sync.Call) -> Iterator[tuple[str, Any]]:
            yield "refunds", {}

    sink = Wrong(MemoryWriter(), flush_interval=None)
    with pytest.raises(cio_sync.InvalidCall, match="'refunds', which is not one of this sink's tables"):
        sink.write(order("x"))
    sink.close()


def test_a_bad_call_is_refused_like_every_sink_refuses_it() -> None:
    writer = MemoryWriter()
    with OrdersSink(writer, flush_interval=None) as sink:
        for bad in ({"type": "nope"}, b"{broken", '{"type": "track", "userId": 1, "event": "E"}'):
            with pytest.raises(cio_sync.InvalidCall):
                sink.write(bad)
        with pytest.raises(cio_sync.InvalidCalls) as caught:
            sink.write_many({"batch": [order("1"), {"type": "nope"}, order("2")]})
        assert caught.value.accepted == 2
        assert sink.write(json.dumps(order("3")).encode()) == "3"
    assert sorted(r["messageId"] for r in writer.rows()) == ["1", "2", "3"]


def test_values_are_converted_to_their_columns_and_survive_the_spool(tmp_path: Path) -> None:
    class Typed(cio_sync.BufferedSink):
        """One row of every kind of column."""

        tables = {"kinds": pa.schema([
            ("at", pa.timestamp("ms", tz="UTC")), ("day", pa.date32()), ("amount", pa.decimal128(10, 2)),
            ("blob", pa.binary()), ("tags", pa.list_(pa.string())), ("ok", pa.bool_()), ("n", pa.int64()),
        ])}

        def route(self, call: cio_sync.Call) -> Iterator[tuple[str, Any]]:
            yield "kinds", (call.received_at, dt.date(2024, 2, 29), decimal.Decimal("12.34"), b"\x00\xff",
                            ["a", "b"], True, 7)

    writer = MemoryWriter()
    sink = Typed(writer, flush_interval=None, spool_dir=tmp_path / "spool")
    sink.write({"type": "identify", "userId": "u"})
    abandon(sink)  # as if killed: the next sink reads the row back from the spool
    Typed(writer, flush_interval=None, spool_dir=tmp_path / "spool").close()
    [row] = writer.rows()
    assert row["day"] == dt.date(2024, 2, 29)
    assert row["amount"] == decimal.Decimal("12.34")
    assert row["blob"] == b"\x00\xff"
    assert row["tags"] == ["a", "b"]
    assert (row["ok"], row["n"]) == (True, 7)


# -- what every sink has -------------------------------------------------------------------------------------------


def test_stats_manifests_repr_and_on_publish(local_storage: Storage) -> None:
    landed: list[cio_sync.WrittenFile] = []
    sink = OrdersSink(local_storage.url, flush_interval=None, on_publish=landed.append)
    assert repr(sink).startswith("OrdersSink(")
    assert "closed=False" in repr(sink)
    sink.write(order("a"))
    sink.write(order("b"))
    assert sink.stats.rows_buffered == 2
    files = sink.close()
    assert files == landed
    assert sink.stats.files_published == 1
    assert sink.stats.rows_published == 2
    assert sink.closed
    with pytest.raises(cio_sync.SinkClosed):
        sink.write(order("c"))
    [manifest] = local_storage.fs.ls(f"{local_storage.root}/_manifests")
    document = json.loads(local_storage.fs.cat_file(manifest))
    assert [f["name"] for f in document["files"]] == ["orders.1.parquet"]
    assert document["mode"] == "custom"


def test_rows_are_published_early_at_max_rows() -> None:
    writer = MemoryWriter()
    with OrdersSink(writer, flush_interval=None, max_rows=2) as sink:
        for i in range(5):
            sink.write(order(str(i)))
        assert sorted(writer.data_files()) == ["orders.1.parquet", "orders.2.parquet"]
    assert len(writer.rows()) == 5


# -- crashes -------------------------------------------------------------------------------------------------------


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"]


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_every_accepted_order_is_published_exactly_once_after_sigkills(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    storage: Storage = request.getfixturevalue(f"{kind}_storage")
    rng = random.Random(12)
    spool, acks, errors = tmp_path / "spool", tmp_path / "acks.txt", tmp_path / "child.err"
    options = json.dumps(storage.storage_options)
    for trial in range(TRIALS):
        with open(errors, "wb") as err:
            child = subprocess.Popen(_python(
                f"from tests.buffered_scenarios import crash_writer; crash_writer({storage.url!r}, {options!r}, "
                f"{str(spool)!r}, {str(acks)!r}, {trial * 1_000_000})"), stdout=subprocess.DEVNULL, stderr=err)
        size = acks.stat().st_size if acks.exists() else 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (acks.stat().st_size if acks.exists() else 0) == size:
            if child.poll() is not None:
                pytest.fail(f"the writer died by itself:\n{errors.read_text()[-3000:]}")
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
    subprocess.run(_python(f"from tests.buffered_scenarios import recover; recover({storage.url!r}, {options!r}, "
                           f"{str(spool)!r})"), check=True, timeout=120)
    acked = set(acks.read_text().split())
    download = storage.download(tmp_path / "download")
    published: list[str] = []
    names = storage.data_files()
    for name in names:
        published += [str(r["messageId"]) for r in duckdb_rows(download / name, "parquet")]
    print(f"{kind}: {len(acked)} orders accepted over {TRIALS} killed runs, {len(published)} published")
    assert len(acked) > TRIALS, "the writer never got going"
    counts = Counter(published)
    assert not [m for m, n in counts.items() if n > 1], "orders published twice"
    assert not acked - set(counts), "accepted orders lost"
    positions = sorted(int(n.split(".")[1]) for n in names)
    assert len(positions) == len(set(positions))
    assert all(n.startswith("orders.") and n.endswith(".parquet") for n in names)


def test_a_call_whose_second_row_the_spool_refuses_leaves_no_row_anywhere(tmp_path: Path) -> None:
    from tests import faults
    from tests.buffered_scenarios import OrdersAndLines

    target, spool = tmp_path / "target", tmp_path / "spool"
    try:
        done = faults.run_child("tests.buffered_scenarios:refused_second_row", str(target), str(spool),
                                prefix=spool)
    except faults.Unavailable as exc:
        pytest.skip(str(exc))
    assert done.result is not None, done.stderr
    assert done.result["said"] == {"bad": "refused"}
    OrdersAndLines(str(target), spool_dir=spool, flush_interval=None).close()  # the restart after the crash
    for table in ("orders", "lines"):
        ids = sorted(r["messageId"] for n in sorted(os.listdir(target)) if n.startswith(f"{table}.")
                     for r in pq.read_table(target / n).to_pylist())
        assert ids == ["after", "tail", "warm"], table
