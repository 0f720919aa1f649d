"""What a table is: one :class:`TableSpec` per table, read by the sinks, ``record()`` and the loader alike.

A leaf module: it imports only pyarrow and the standard library. The specs themselves are in
:mod:`cio_sync.schemas.advanced` (the six call tables) and :mod:`cio_sync.schemas.standard` (the workspace tables);
adding a table, or a new version of one, is one new or changed ``TableSpec`` there (docs/standard.md, "Adding a
table or a version").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import pyarrow as pa

#: Arrow type of every timestamp column: UTC instants with microsecond precision.
TIMESTAMP: Final = pa.timestamp("us", tz="UTC")
STRING: Final = pa.string()
INT: Final = pa.int64()
BOOL: Final = pa.bool_()

#: Field metadata marking a string column that holds JSON text (a nested object kept whole).
JSON_TEXT_META: Final = {b"cio_sync.json": b"1"}

#: The two modes of shared/SCHEMAS.md.
Mode = Literal["advanced", "standard"]


def json_text(name: str) -> pa.Field:
    """A string column holding JSON text: a JSON writer embeds its values as JSON, ``record()`` takes objects."""
    return pa.field(name, STRING, metadata=JSON_TEXT_META)


def is_json_text(field: pa.Field) -> bool:
    """Whether ``field`` holds JSON text that a JSON writer should embed as a value, not as a string."""
    return bool(field.metadata and field.metadata.get(b"cio_sync.json") == b"1")


@dataclass(frozen=True)
class CurrentView:
    """A current-state view over a change log: per value of the table's key, the row that ``order_by`` ranks first.

    ``where`` is a condition on that row, applied after ranking (the latest attribute row is not current state when
    its value is null: the attribute was removed).
    """

    name: str
    order_by: str
    where: str | None = None

    def sql(self, table: str, key: tuple[str, ...]) -> str:
        """The view's DuckDB SQL over ``table`` partitioned by ``key`` (the loader turns it into PostgreSQL)."""
        sql = (f"SELECT * FROM {table} QUALIFY row_number() OVER (PARTITION BY {', '.join(key)} "
               f"ORDER BY {self.order_by}) = 1")
        return sql if self.where is None else f"{sql} AND {self.where}"


@dataclass(frozen=True)
class TableSpec:
    """One table of one mode and version: its file schema and how the sinks, ``record()`` and the loader treat it.

    - ``schema``: the columns of its files, in file order, with their Arrow types; never inferred from a batch.
    - ``required``: the columns a recorded row must give, non-null and non-empty.
    - ``key``: the columns that name a row's entity (a person, a delivery, ...): current state is the latest row
      per key, and a definition's changes are tracked per key. Empty when rows name no entity.
    - ``view``: the loader's current-state view over the table, partitioned by ``key``; ``None`` for none.
    - ``recordable``: whether ``record()`` takes rows of it (people and attributes come from calls instead).
    - ``definition``: rows are definitions (campaigns, actions, broadcasts): ``record()`` emits a row only when the
      definition with that key changed, and the sink counts its ``version``.
    - ``allowed``: for a column that takes only some values, those values.
    - ``words``: columns whose values are lowercase words (a letter, then letters, digits or ``_``), an open
      vocabulary (``metrics.metric``: Customer.io's grows).
    - ``resolved``: columns a recorded row may give in place of a column of the table, which the sink resolves from
      the workspace and does not write: ``{"customer_id": "internal_customer_id"}`` names the person by the id
      they were sent with.
    - ``file_names``: other names its files may have in place of ``name`` (Customer.io's own exports).
    - ``renamed``: for a table of a later version, how the columns of its version-1 files map to it: version-1
      name -> this version's name (version 1's ``external_customer_id`` is version 4's ``customer_id``).
    - ``dropped``: the columns of its version-1 files that have no counterpart in this version; the loader keeps
      them after this version's columns, so loading a version-1 file loses nothing.
    """

    name: str
    mode: Mode
    version: int
    schema: pa.Schema
    required: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    view: CurrentView | None = None
    recordable: bool = False
    definition: bool = False
    allowed: Mapping[str, frozenset[str]] = field(default_factory=dict, hash=False)
    words: tuple[str, ...] = ()
    resolved: Mapping[str, str] = field(default_factory=dict, hash=False)
    file_names: tuple[str, ...] = ()
    renamed: Mapping[str, str] = field(default_factory=dict, hash=False)
    dropped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A spec is data that several layers trust; a slip in one (a required column that does not exist) would
        # otherwise surface as a confusing error far from its cause.
        names = set(self.schema.names)
        if len(names) != len(self.schema.names):
            raise ValueError(f"table {self.name}: a column appears twice in its schema")
        if self.version < 1:
            raise ValueError(f"table {self.name}: version must be 1 or more, got {self.version}")
        for what, columns in (("required", self.required), ("key", self.key), ("allowed", tuple(self.allowed)),
                              ("words", self.words), ("resolved", tuple(self.resolved.values()))):
            unknown = [c for c in columns if c not in names]
            if unknown:
                raise ValueError(f"table {self.name}: {what} names {', '.join(unknown)}, not columns of it")
        if (self.renamed or self.dropped) and self.version == 1:
            raise ValueError(f"table {self.name}: version 1 maps from no earlier version")
        unknown = [c for c in self.renamed.values() if c not in names]
        if unknown:
            raise ValueError(f"table {self.name}: renamed names {', '.join(unknown)}, not columns of it")
        clash = [c for c in (*self.renamed, *self.dropped, *self.resolved) if c in names]
        if clash:
            raise ValueError(f"table {self.name}: {', '.join(clash)} renamed, dropped or resolved, yet columns of it")
        if self.view is not None and not self.key:
            raise ValueError(f"table {self.name}: a current-state view needs a key to partition by")
        if self.definition and len(self.key) != 1:
            raise ValueError(f"table {self.name}: a definition table needs a key of one column")
