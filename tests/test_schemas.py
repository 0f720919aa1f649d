"""Table specs: each table is declared once, and that one declaration is what record(), the sinks and the loader use.

The first tests add a table (``widgets``) by registering one TableSpec, with no other edit, and follow it through
``record()``, the Standard sink's files and the loader's warehouse table and view. The others hold the specs to the
contract (shared/SCHEMAS.md, docs/tables/) written out independently of the implementation.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cio_sync
from cio_sync.schemas import standard
from cio_sync.schemas.spec import INT, STRING, TIMESTAMP, CurrentView, TableSpec
from cio_sync.schemas.tables import ADVANCED_TABLES, STANDARD_TABLES, TABLES, is_json_text
from tests.conftest import Storage
from tests.test_loader import Warehouse, pg_warehouse
from tests.test_standard import CONTRACT, VERSION

ROOT = Path(__file__).resolve().parents[1]
WORKSPACE = 4242

WIDGETS = TableSpec(
    "widgets", "standard", 3,
    pa.schema([("workspace_id", INT), ("widget_id", STRING), ("color", STRING), ("weight", INT),
               ("created_at", TIMESTAMP), ("seq_num", INT)]),
    required=("widget_id",), key=("widget_id",), recordable=True, allowed={"color": frozenset({"red", "blue"})},
    view=CurrentView("widgets_current", "created_at DESC, seq_num DESC"), file_names=("gizmos",),
)


@pytest.fixture
def widgets(monkeypatch: pytest.MonkeyPatch) -> TableSpec:
    """The one edit that adds a table: its spec in the Standard registry."""
    monkeypatch.setitem(standard.STANDARD_TABLES, "widgets", WIDGETS)
    return WIDGETS


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path) -> Warehouse:
    if request.param == "duckdb":
        return Warehouse(f"duckdb:///{tmp_path}/warehouse.duckdb", "duckdb")
    return pg_warehouse(request)


def _sink(storage: Storage) -> cio_sync.StandardSink:
    return cio_sync.StandardSink(storage.url, workspace_id=WORKSPACE, flush_interval=None,
                                 storage_options=storage.storage_options)


def test_an_unregistered_table_is_refused_by_record(local_storage: Storage) -> None:
    with _sink(local_storage) as sink, pytest.raises(cio_sync.InvalidRecord, match="unknown table 'widgets'"):
        sink.record("widgets", {"widget_id": "w1"})


def test_record_checks_a_new_table_by_its_spec(local_storage: Storage, widgets: TableSpec) -> None:
    with _sink(local_storage) as sink:
        cases: list[tuple[dict[str, Any], str, str]] = [
            ({"color": "red"}, "widget_id", "is required"),
            ({"widget_id": "w1", "weight": "heavy"}, "weight", "must be an integer"),
            ({"widget_id": "w1", "color": "green"}, "color", "must be one of blue, red"),
            ({"widget_id": "w1", "size": 3}, "size", "is not a column of widgets"),
            ({"widget_id": "w1", "workspace_id": 1}, "workspace_id", "is set by the sink"),
        ]
        for row, column, reason in cases:
            with pytest.raises(cio_sync.InvalidRecord, match=reason) as caught:
                sink.record("widgets", row)
            assert (caught.value.table, caught.value.column) == ("widgets", column)
        assert sink.record("widgets", {"widget_id": "w1", "color": "blue", "weight": 7}) == 1


def test_the_sink_publishes_a_new_table_under_its_spec(local_storage: Storage, widgets: TableSpec,
                                                       tmp_path: Path) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with _sink(local_storage) as sink:
        sink.record("widgets", {"widget_id": "w1", "color": "red", "weight": 1, "created_at": at})
        sink.record("widgets", {"widget_id": "w2"})
    [name] = local_storage.data_files()
    assert re.fullmatch(rf"widgets_v3_{WORKSPACE}_\d+\.parquet", name)
    table = pq.read_table(local_storage.download(tmp_path / "files") / name)
    assert table.schema.equals(widgets.schema)
    rows = table.to_pylist()
    assert [(r["workspace_id"], r["widget_id"], r["color"], r["weight"]) for r in rows] == [
        (WORKSPACE, "w1", "red", 1), (WORKSPACE, "w2", None, None)]
    assert rows[0]["created_at"] == at
    assert rows[0]["seq_num"] < rows[1]["seq_num"]


def test_the_loader_loads_a_new_table_with_its_view(local_storage: Storage, widgets: TableSpec,
                                                    warehouse: Warehouse, tmp_path: Path) -> None:
    with _sink(local_storage) as sink:
        for weight in (1, 2, 3):  # three rows of w1; the view keeps the last
            sink.record("widgets", {"widget_id": "w1", "weight": weight})
        sink.record("widgets", {"widget_id": "w2", "weight": 10})
    # A file named by another name of the table (here in a prefix of its own, with no manifests) goes to the same
    # warehouse table.
    [name] = local_storage.data_files()
    other = tmp_path / "exports"
    other.mkdir()
    (other / name.replace("widgets", "gizmos")).write_bytes(local_storage.read(name))
    reports = [cio_sync.load(local_storage.url, warehouse.into), cio_sync.load(str(other), warehouse.into)]
    assert [(r.files_loaded, r.tables) for r in reports] == [(1, {"widgets": 4}), (1, {"widgets": 4})]
    assert warehouse.rows("SELECT widget_id, weight FROM widgets_current ORDER BY widget_id") == [
        ("w1", 3), ("w2", 10)]


# -- the specs against the contract ---------------------------------------------------------------------------------

S, I, B, T = pa.string(), pa.int64(), pa.bool_(), pa.timestamp("us", tz="UTC")  # noqa: E741

#: shared/SCHEMAS.md, "Required when a caller records a row".
REQUIRED = {
    "campaigns": ("campaign_id",), "actions": ("action_id",), "broadcasts": ("broadcast_id",),
    "subjects": ("subject_name", "campaign_id"), "outputs": ("output_id", "subject_name", "output_type"),
    "deliveries": ("delivery_id", "delivery_type"), "delivery_contents": ("delivery_id",),
    "metrics": ("event_id", "delivery_id", "metric"),
}

#: shared/SCHEMAS.md, Advanced mode's fields: name -> (the calls that have it, its type; "json" is JSON text).
FIELDS: dict[str, tuple[str, Any]] = {
    "messageId": ("all", S), "type": ("all", S), "userId": ("all", S), "anonymousId": ("all", S),
    "timestamp": ("all", T), "originalTimestamp": ("all", T), "sentAt": ("all", T), "receivedAt": ("all", T),
    "context": ("all", "json"), "integrations": ("all", "json"), "traits": ("identify group", "json"),
    "properties": ("track page screen", "json"), "event": ("track", S), "name": ("page screen", S),
    "category": ("page screen", S), "groupId": ("group", S), "previousId": ("alias", S),
    "version": ("all", S), "channel": ("all", S), "extra": ("all", "json"),
}

#: The loader's current-state views as they were before the specs held them (whitespace aside).
VIEWS = {
    "people_current": """SELECT * FROM people
        QUALIFY row_number() OVER (PARTITION BY internal_customer_id ORDER BY updated_at DESC) = 1""",
    "attributes_current": """SELECT * FROM attributes
        QUALIFY row_number() OVER (PARTITION BY internal_customer_id, attribute_name ORDER BY timestamp DESC) = 1
            AND attribute_value IS NOT NULL""",
    "deliveries_current": """SELECT * FROM deliveries
        QUALIFY row_number() OVER (PARTITION BY delivery_id ORDER BY created_at DESC, seq_num DESC) = 1""",
    "subjects_current": """SELECT * FROM subjects
        QUALIFY row_number() OVER (PARTITION BY subject_name ORDER BY created_at DESC, seq_num DESC) = 1""",
    "metrics_unique": """SELECT * FROM metrics
        QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY created_at, seq_num) = 1""",
}


def _doc_table(name: str) -> tuple[list[tuple[str, str]], str]:
    """The column table of docs/tables/<name>.md as (column, type) pairs, and the page's text."""
    text = (ROOT / "docs" / "tables" / f"{name}.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\S+) \| ([^|]+?) \|$", text, flags=re.MULTILINE)
    return [(c, t) for c, t in rows if c != "column"], text


def _doc_type(field: pa.Field) -> str:
    if pa.types.is_list(field.type):
        return f"list<{field.type.value_type}>"
    if pa.types.is_timestamp(field.type):
        return "timestamp (UTC, µs)"
    if is_json_text(field):
        return "string (JSON text)"
    return {"int64": "int64", "bool": "bool", "string": "string"}[str(field.type)]


def test_every_standard_table_has_the_columns_of_the_contract() -> None:
    assert set(STANDARD_TABLES) == set(CONTRACT)
    for name, spec in STANDARD_TABLES.items():
        assert (spec.mode, str(spec.version)) == ("standard", VERSION[name]), name
        assert [(f.name, f.type) for f in spec.schema] == CONTRACT[name], name


def test_every_standard_table_page_lists_its_spec() -> None:
    for name, spec in STANDARD_TABLES.items():
        columns, text = _doc_table(name)
        assert columns == [(f.name, _doc_type(f)) for f in spec.schema], name
        assert f"`{name}_v{spec.version}_<workspace_id>_<sequence>.parquet`" in text, name
        required = ", ".join(f"`{c}`" for c in spec.required)
        assert (f"Required when recorded: {required}." in text) == spec.recordable, name


def test_record_takes_the_contract_tables_and_requires_their_key() -> None:
    assert {n: s.required for n, s in STANDARD_TABLES.items() if s.recordable} == REQUIRED
    assert all(not s.required for s in STANDARD_TABLES.values() if not s.recordable)
    for name, spec in STANDARD_TABLES.items():
        assert set(spec.key) <= set(spec.schema.names), name
        if spec.definition:
            assert spec.recordable, name
            assert len(spec.key) == 1, name


def test_every_call_table_has_the_fields_of_the_contract() -> None:
    assert list(ADVANCED_TABLES) == ["identify", "track", "page", "screen", "group", "alias"]
    for call_type, spec in ADVANCED_TABLES.items():
        expected = {n: t for n, (calls, t) in FIELDS.items() if calls == "all" or call_type in calls.split()}
        assert set(spec.schema.names) == set(expected), call_type
        for f in spec.schema:
            assert (("json" if is_json_text(f) else f.type) == expected[f.name]), (call_type, f.name)
        assert spec.key == ("messageId",)


def test_the_views_are_the_loaders_views_of_before() -> None:
    made = {view: (table, sql) for view, table, sql in standard.current_views()}
    assert made == {name: (sql.split()[3], " ".join(sql.split())) for name, sql in VIEWS.items()}


def test_customer_io_export_names_map_to_their_tables() -> None:
    assert standard.table_for_file_name("content") is STANDARD_TABLES["delivery_contents"]
    assert standard.table_for_file_name("contents") is STANDARD_TABLES["delivery_contents"]
    assert standard.table_for_file_name("people") is STANDARD_TABLES["people"]
    assert standard.table_for_file_name("widgets") is None


def test_the_registry_holds_both_modes() -> None:
    assert TABLES == {"advanced": ADVANCED_TABLES, "standard": STANDARD_TABLES}
    assert all(spec.mode == mode and spec.name == name for mode, specs in TABLES.items()
               for name, spec in specs.items())


@pytest.mark.parametrize(("options", "message"), [
    ({"required": ("nope",)}, "required names nope"),
    ({"key": ("nope",)}, "key names nope"),
    ({"allowed": {"nope": frozenset({"x"})}}, "allowed names nope"),
    ({"view": CurrentView("t_current", "a")}, "needs a key"),
    ({"definition": True}, "needs a key of one column"),
    ({"version": 0}, "version must be 1 or more"),
])
def test_a_spec_that_contradicts_itself_is_refused(options: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"version": 1, **options}
    version = arguments.pop("version")
    with pytest.raises(ValueError, match=message):
        TableSpec("t", "standard", version, pa.schema([("a", INT)]), **arguments)
