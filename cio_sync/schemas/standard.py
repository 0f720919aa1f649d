"""Standard mode's tables: what the workspace made of the data (shared/SCHEMAS.md, docs/tables/).

Each table the sink writes is one :class:`~cio_sync.schemas.spec.TableSpec` in :data:`STANDARD_TABLES`; the
Standard sink, the workspace state, ``record()`` and the loader read nothing else, so a new table or version is one
entry here (docs/standard.md, "Adding a table or a version").

The sink writes version 4, the tables as Customer.io's own exports have them (shared/SCHEMAS.md, "Version 4"), and
cio_sync's own ``actions`` table, version 1. :data:`STANDARD_V1_TABLES` holds version 1 of every table, as earlier
releases wrote them: each version-4 spec says how its version-1 files map to it (``renamed``, ``dropped``), and the
loader reads both into one warehouse table shaped by the version the sink writes (:func:`latest_spec`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

import pyarrow as pa

from cio_sync.schemas.spec import BOOL, INT, STRING, TIMESTAMP, CurrentView, TableSpec, json_text

#: Arrow type of ``topic_names`` (version 4 campaigns and broadcasts): a list of strings.
TOPICS: Final = pa.list_(pa.string())

#: Schema version of the Standard tables this release writes (``actions``, cio_sync's own table, is version 1);
#: a new column means a new version.
STANDARD_VERSION: Final = 4

#: Columns the sink owns: a caller may not set them.
SINK_COLUMNS: Final = frozenset({"workspace_id", "version"})

#: The common values of ``metrics.metric`` (shared/SCHEMAS.md). Customer.io's vocabulary is wider: the column
#: takes any non-empty lowercase word (``TableSpec.words``).
METRICS: Final = frozenset({
    "sent", "delivered", "opened", "clicked", "converted", "bounced", "spammed", "dropped", "failed",
    "unsubscribed", "undeliverable", "attempted", "drafted", "deferred",
})

#: Version 1's ``metrics.metric`` values: the only ones that release accepted.
_V1_METRICS: Final = METRICS - {"deferred"}


def _table(name: str, columns: tuple[tuple[str, pa.DataType] | pa.Field, ...], **options: Any) -> TableSpec:
    # Every version-1 table has workspace_id first.
    fields = [c if isinstance(c, pa.Field) else pa.field(c[0], c[1]) for c in columns]
    return TableSpec(name, "standard", 1, pa.schema([pa.field("workspace_id", INT), *fields]), **options)


_SPECS: Final = (
    _table("people", (
        ("internal_customer_id", STRING), ("external_customer_id", STRING), ("email_addr", STRING),
        ("deleted", BOOL), ("suppressed", BOOL), ("created_at", TIMESTAMP), ("updated_at", TIMESTAMP),
    ), key=("internal_customer_id",), view=CurrentView("people_current", "updated_at DESC")),
    _table("attributes", (
        ("internal_customer_id", STRING), ("external_customer_id", STRING), ("attribute_name", STRING),
        ("attribute_value", STRING), ("timestamp", TIMESTAMP),
    ), key=("internal_customer_id", "attribute_name"),
        view=CurrentView("attributes_current", "timestamp DESC", where="attribute_value IS NOT NULL")),
    _table("campaigns", (
        ("campaign_id", INT), ("name", STRING), ("type", STRING), ("state", STRING), ("version", INT),
        ("created_at", TIMESTAMP), ("updated_at", TIMESTAMP),
    ), required=("campaign_id",), key=("campaign_id",), recordable=True, definition=True),
    _table("actions", (
        ("action_id", INT), ("campaign_id", INT), ("broadcast_id", INT), ("action_type", STRING), ("name", STRING),
        ("version", INT), ("created_at", TIMESTAMP), ("updated_at", TIMESTAMP),
    ), required=("action_id",), key=("action_id",), recordable=True, definition=True),
    _table("broadcasts", (
        ("broadcast_id", INT), ("name", STRING), ("type", STRING), ("created_at", TIMESTAMP),
        ("updated_at", TIMESTAMP),
    ), required=("broadcast_id",), key=("broadcast_id",), recordable=True, definition=True),
    _table("subjects", (
        ("subject_name", STRING), ("internal_customer_id", STRING), ("external_customer_id", STRING),
        ("campaign_type", STRING), ("campaign_id", INT), ("event_id", STRING), ("trigger_id", INT),
        ("started_campaign_at", TIMESTAMP), ("created_at", TIMESTAMP), ("seq_num", INT),
    ), required=("subject_name", "campaign_id"), key=("subject_name",), recordable=True,
        view=CurrentView("subjects_current", "created_at DESC, seq_num DESC")),
    _table("outputs", (
        ("output_id", STRING), ("subject_name", STRING), ("output_type", STRING), ("action_id", INT),
        ("explanation", STRING), ("delivery_id", STRING), ("draft", BOOL), ("link_tracked", BOOL),
        ("split_test_index", INT), ("delay_ends_at", TIMESTAMP), ("branch_index", INT), ("manual_segment_id", INT),
        ("add_to_manual_segment", BOOL), ("created_at", TIMESTAMP), ("seq_num", INT),
    ), required=("output_id", "subject_name", "output_type"), key=("output_id",), recordable=True),
    _table("deliveries", (
        ("delivery_id", STRING), ("internal_customer_id", STRING), ("external_customer_id", STRING),
        ("subject_name", STRING), ("event_id", STRING), ("delivery_type", STRING), ("campaign_id", INT),
        ("action_id", INT), ("newsletter_id", INT), ("content_id", INT), ("trigger_id", INT),
        ("transactional_message_id", INT), ("created_at", TIMESTAMP), ("seq_num", INT),
    ), required=("delivery_id", "delivery_type"), key=("delivery_id",), recordable=True,
        view=CurrentView("deliveries_current", "created_at DESC, seq_num DESC")),
    _table("delivery_contents", (
        ("delivery_id", STRING), ("delivery_type", STRING), ("campaign_id", INT), ("action_id", INT),
        ("newsletter_id", INT), ("content_id", INT), ("from", STRING), ("reply_to", STRING), ("bcc", STRING),
        ("recipients", STRING), ("subject", STRING), ("body", STRING), ("body_amp", STRING), ("body_plain", STRING),
        ("preheader", STRING), ("url", STRING), ("method", STRING), json_text("headers"), ("created_at", TIMESTAMP),
    ), required=("delivery_id",), key=("delivery_id",), recordable=True, file_names=("content", "contents")),
    _table("metrics", (
        ("event_id", STRING), ("delivery_id", STRING), ("metric", STRING), ("reason", STRING), ("link_id", INT),
        ("link_url", STRING), ("created_at", TIMESTAMP), ("seq_num", INT),
    ), required=("event_id", "delivery_id", "metric"), key=("event_id",), recordable=True,
        allowed={"metric": _V1_METRICS}, view=CurrentView("metrics_unique", "created_at, seq_num")),
)

def _v4(name: str, columns: tuple[tuple[str, pa.DataType] | pa.Field, ...], **options: Any) -> TableSpec:
    # Version 4 gives every column, workspace_id included: in metrics it is not first.
    fields = [c if isinstance(c, pa.Field) else pa.field(c[0], c[1]) for c in columns]
    return TableSpec(name, "standard", 4, pa.schema(fields), **options)


_W: Final = ("workspace_id", INT)

_V4_SPECS: Final = (
    _v4("people", (
        _W, ("customer_id", STRING), ("internal_customer_id", STRING), ("deleted", BOOL), ("suppressed", BOOL),
        ("created_at", TIMESTAMP), ("updated_at", TIMESTAMP), ("email_addr", STRING),
    ), key=("internal_customer_id",), view=CurrentView("people_current", "updated_at DESC"),
        renamed={"external_customer_id": "customer_id"}),
    _v4("attributes", (
        _W, ("internal_customer_id", STRING), ("attribute_name", STRING), ("attribute_value", STRING),
        ("timestamp", TIMESTAMP),
    ), key=("internal_customer_id", "attribute_name"),
        view=CurrentView("attributes_current", "timestamp DESC", where="attribute_value IS NOT NULL"),
        dropped=("external_customer_id",)),
    _v4("campaigns", (
        _W, ("campaign_id", INT), ("name", STRING), ("created_at", TIMESTAMP), ("updated_at", TIMESTAMP),
        ("version", INT), ("topic_names", TOPICS),
    ), required=("campaign_id",), key=("campaign_id",), recordable=True, definition=True, dropped=("type", "state")),
    _v4("broadcasts", (
        _W, ("broadcast_id", INT), ("name", STRING), ("created_at", TIMESTAMP), ("updated_at", TIMESTAMP),
        ("topic_names", TOPICS),
    ), required=("broadcast_id",), key=("broadcast_id",), recordable=True, definition=True, dropped=("type",)),
    _v4("subjects", (
        _W, ("subject_name", STRING), ("internal_customer_id", STRING), ("campaign_type", STRING),
        ("campaign_id", INT), ("event_id", STRING), ("trigger_id", INT), ("started_campaign_at", TIMESTAMP),
        ("created_at", TIMESTAMP), ("seq_num", INT),
    ), required=("subject_name", "campaign_id"), key=("subject_name",), recordable=True,
        view=CurrentView("subjects_current", "created_at DESC, seq_num DESC"), dropped=("external_customer_id",),
        resolved={"customer_id": "internal_customer_id"}),
    _v4("outputs", (
        _W, ("output_id", STRING), ("subject_name", STRING), ("output_type", STRING), ("action_id", INT),
        ("explanation", STRING), ("delivery_id", STRING), ("draft", BOOL), ("link_tracked", BOOL),
        ("split_test_index", INT), ("delay_ends_at", TIMESTAMP), ("branch_index", INT), ("manual_segment_id", INT),
        ("add_to_manual_segment", BOOL), ("created_at", TIMESTAMP), ("seq_num", INT),
    ), required=("output_id", "subject_name", "output_type"), key=("output_id",), recordable=True),
    _v4("deliveries", (
        _W, ("delivery_id", STRING), ("internal_customer_id", STRING), ("subject_id", STRING), ("event_id", STRING),
        ("delivery_type", STRING), ("campaign_id", INT), ("action_id", INT), ("newsletter_id", INT),
        ("content_id", INT), ("trigger_id", INT), ("created_at", TIMESTAMP), ("transactional_message_id", INT),
        ("seq_num", INT),
    ), required=("delivery_id", "delivery_type"), key=("delivery_id",), recordable=True,
        view=CurrentView("deliveries_current", "created_at DESC, seq_num DESC"),
        renamed={"subject_name": "subject_id"}, dropped=("external_customer_id",),
        resolved={"customer_id": "internal_customer_id"}),
    _v4("delivery_contents", (
        _W, ("delivery_id", STRING), ("campaign_id", INT), ("action_id", INT), ("newsletter_id", INT),
        ("content_id", INT), ("from", STRING), ("reply_to", STRING), ("bcc", STRING), ("recipient", STRING),
        ("subject", STRING), ("body", STRING), ("body_amp", STRING), ("body_plain", STRING), ("preheader", STRING),
        ("url", STRING), ("method", STRING), json_text("headers"), ("type", STRING),
    ), required=("delivery_id",), key=("delivery_id",), recordable=True, file_names=("content", "contents"),
        renamed={"recipients": "recipient", "delivery_type": "type"}, dropped=("created_at",)),
    _v4("metrics", (
        ("event_id", STRING), _W, ("delivery_id", STRING), ("metric", STRING), ("created_at", TIMESTAMP),
        ("reason", STRING), ("link_id", INT), ("link_url", STRING), ("seq_num", INT),
        # Bot and privacy-proxy detection: in newer exports only; null in older ones and in version-1 files.
        ("proxied", BOOL), ("prefetched", BOOL), ("machine", BOOL), ("user_agent", STRING),
        ("email_client", STRING), ("inbox_domain", STRING), ("inbox_provider", STRING), ("mx_host", STRING),
    ), required=("event_id", "delivery_id", "metric"), key=("event_id",), recordable=True, words=("metric",),
        view=CurrentView("metrics_unique", "created_at, seq_num")),
)

#: Version 1 of every Standard table by name, as earlier releases wrote them (``<table>_v1_...``); the loader
#: reads their files into the tables of :data:`STANDARD_TABLES`.
STANDARD_V1_TABLES: Final[Mapping[str, TableSpec]] = {spec.name: spec for spec in _SPECS}

#: The Standard tables of version 4 by name, as Customer.io's own exports have them (shared/SCHEMAS.md, "Version
#: 4"); ``actions`` is cio_sync's own table and has version 1 only.
STANDARD_V4_TABLES: Final[Mapping[str, TableSpec]] = {spec.name: spec for spec in _V4_SPECS}

#: Every Standard table the sink writes, by name, in the order the contract lists them: version 4, and ``actions``
#: in version 1. The one place a table is declared: the lookups below and the layers above read it when they run,
#: not a copy taken at import (only the Standard sink keeps the people and attributes schemas, whose rows it builds
#: from calls itself).
STANDARD_TABLES: Final[Mapping[str, TableSpec]] = {
    name: STANDARD_V4_TABLES.get(name, spec) for name, spec in STANDARD_V1_TABLES.items()}

#: Every version of the Standard tables: version -> table name -> spec.
STANDARD_VERSIONS: Final[Mapping[int, Mapping[str, TableSpec]]] = {1: STANDARD_V1_TABLES, 4: STANDARD_V4_TABLES}


def _check_mappings() -> None:
    # Every version-1 column must land somewhere in version 4 (same name, renamed or dropped), with the same type
    # where it lands, or a version-1 file would lose a column or change a type when it loads.
    for name, later in STANDARD_V4_TABLES.items():
        for f in STANDARD_V1_TABLES[name].schema:
            if f.name in later.dropped:
                continue
            target = later.renamed.get(f.name, f.name)
            if target not in later.schema.names:
                raise ValueError(f"table {name} version 4: version 1's column {f.name} maps to no column")
            if later.schema.field(target).type != f.type:
                raise ValueError(f"table {name} version 4: column {target} changes its type from version 1")


_check_mappings()


def standard_spec(name: str, version: int) -> TableSpec | None:
    """The spec of Standard table ``name`` in ``version``, or ``None`` if that version has no such table."""
    spec = STANDARD_TABLES.get(name)
    if spec is not None and spec.version == version:
        return spec
    return STANDARD_VERSIONS.get(version, {}).get(name)


def latest_spec(name: str) -> TableSpec:
    """The version of Standard table ``name`` that the sink writes (version 4, or 1 for ``actions``): the loader's
    shape of it. Raises ``KeyError`` for a name that is no Standard table."""
    return STANDARD_TABLES[name]


def record_tables() -> tuple[str, ...]:
    """The tables ``record()`` takes rows of, in contract order."""
    return tuple(name for name, spec in STANDARD_TABLES.items() if spec.recordable)


def table_for_file_name(name: str) -> TableSpec | None:
    """The Standard table whose files are named ``name`` (its own name, or one of Customer.io's), or ``None``."""
    spec = STANDARD_TABLES.get(name)
    if spec is not None:
        return spec
    for spec in STANDARD_TABLES.values():
        if name in spec.file_names:
            return spec
    return None


def current_views() -> list[tuple[str, str, str]]:
    """The loader's current-state views over the Standard tables: (view, table, DuckDB SQL), in table order.

    Each is the view of the table's newest version (:func:`latest_spec`): the warehouse tables have its columns.
    """
    views = []
    for spec in map(latest_spec, STANDARD_TABLES):
        if spec.view is not None:
            views.append((spec.view.name, spec.name, spec.view.sql(spec.name, spec.key)))
    return views


class _Schemas(Mapping[str, pa.Schema]):
    """The schema of each Standard table, read from :data:`STANDARD_TABLES` at each lookup."""

    def __getitem__(self, name: str) -> pa.Schema:
        return STANDARD_TABLES[name].schema

    def __iter__(self) -> Iterator[str]:
        return iter(STANDARD_TABLES)

    def __len__(self) -> int:
        return len(STANDARD_TABLES)


#: Each Standard table's file schema, by name: a view of :data:`STANDARD_TABLES` for code that needs only schemas.
STANDARD_SCHEMAS: Final[Mapping[str, pa.Schema]] = _Schemas()
