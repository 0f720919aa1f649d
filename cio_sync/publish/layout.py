"""File names: one place that builds them for the sinks and parses them for the loader.

- Advanced: ``<destination>.<action>.<position>.<type>.<ext>`` (docs/positions.md);
- Standard: ``<table>_v<version>_<workspace>_<sequence>.parquet``;
- manifests: ``_manifests/advanced.<destination>.<sequence>.json`` and
  ``_manifests/manifest_v<version>_<workspace>_<sequence>.json``;
- a custom sink's names come from its :class:`Layout` template (``"{table}.{position}.{ext}"`` by default).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from typing import Final, NamedTuple

from cio_sync._errors import ConfigError

#: Where the manifest of each sync goes, under the sink's root.
MANIFESTS_FOLDER: Final = "_manifests"

#: The call types an Advanced file can hold, and the extensions of its formats.
_CALL_TYPES: Final = ("identify", "track", "page", "screen", "group", "alias")
_EXTENSIONS: Final = ("parquet", "csv", "json")

_ADVANCED: Final = re.compile(
    r"(?P<destination>\d+)\.(?P<action>\d+)\.(?P<position>\d+)\."
    rf"(?P<type>{'|'.join(_CALL_TYPES)})\.(?P<ext>{'|'.join(_EXTENSIONS)})"
)
_STANDARD: Final = re.compile(r"(?P<table>[a-z_]+)_v(?P<version>\d+)_(?P<workspace>\d+)_(?P<sequence>\d+)\.parquet")


class AdvancedName(NamedTuple):
    """The parts of an Advanced file name."""

    destination: int
    action: int
    position: int
    type: str
    ext: str


class StandardName(NamedTuple):
    """The parts of a Standard file name (``table`` as it appears in the name)."""

    table: str
    version: int
    workspace: int
    sequence: int


def advanced_name(destination: int, action: int, position: int, call_type: str, ext: str) -> str:
    """The name of an Advanced file."""
    return f"{destination}.{action}.{position}.{call_type}.{ext}"


def advanced_counter(destination: int, action: int) -> str:
    """The counter key whose values are the positions of one (destination, action)."""
    return f"{destination}.{action}"


def parse_advanced(name: str) -> AdvancedName | None:
    """The parts of an Advanced file name; ``None`` if ``name`` is not one."""
    match = _ADVANCED.fullmatch(name)
    if match is None:
        return None
    return AdvancedName(int(match["destination"]), int(match["action"]), int(match["position"]), match["type"],
                        match["ext"])


def standard_counter(table: str, version: int, workspace: int) -> str:
    """The counter key whose values are the sequences of one Standard table of one workspace."""
    return f"{table}_v{version}_{workspace}"


def standard_name(table: str, version: int, workspace: int, sequence: int) -> str:
    """The name of a Standard file."""
    return f"{standard_counter(table, version, workspace)}_{sequence}.parquet"


def parse_standard(name: str) -> StandardName | None:
    """The parts of a Standard file name; ``None`` if ``name`` is not one."""
    match = _STANDARD.fullmatch(name)
    if match is None:
        return None
    return StandardName(match["table"], int(match["version"]), int(match["workspace"]), int(match["sequence"]))


def advanced_manifest_counter(destination: int) -> str:
    """The counter key of an Advanced sink's manifests."""
    return f"manifest.{destination}"


def advanced_manifest_name(destination: int, sequence: int) -> str:
    """The name (under the root) of an Advanced sink's manifest."""
    return f"{MANIFESTS_FOLDER}/advanced.{destination}.{sequence}.json"


def standard_manifest_counter(version: int, workspace: int) -> str:
    """The counter key of a Standard sink's manifests."""
    return f"manifest_v{version}_{workspace}"


def standard_manifest_name(version: int, workspace: int, sequence: int) -> str:
    """The name (under the root) of a Standard sink's manifest."""
    return f"{MANIFESTS_FOLDER}/{standard_manifest_counter(version, workspace)}_{sequence}.json"


def custom_manifest_counter(label: str) -> str:
    """The counter key of a custom sink's manifests (``label``: letters, digits, ``._-``)."""
    return f"manifest.{label}"


def custom_manifest_name(label: str, sequence: int) -> str:
    """The name (under the root) of a custom sink's manifest."""
    return f"{MANIFESTS_FOLDER}/{label}.{sequence}.json"


#: What a field of a custom layout may hold in a name: a counter key's characters (so a name never holds a path).
_FIELD_TEXT: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class Layout:
    """A file-name template with ``{placeholders}``: ``{position}`` (required: the durable counter's value, which
    makes each name new), ``{ext}`` (the format's extension), ``{table}`` and any ``extra`` fields a sink gives.

    Checked when it is made: an unknown placeholder, a missing ``{position}``, a format spec or conversion, a path
    separator or ``..`` raise :class:`~cio_sync.ConfigError`. :meth:`name` builds a name, :meth:`parse` reads one
    back (its fields as strings, ``position`` as an int).
    """

    __slots__ = ("_pattern", "extra", "fields", "template")

    def __init__(self, template: str, *, extra: tuple[str, ...] = ()) -> None:
        if not isinstance(template, str) or not template:
            raise ConfigError(f"layout must be a non-empty string; got {template!r}")
        if "/" in template or "\\" in template or ".." in template or template.startswith((".", "_")):
            raise ConfigError(f"layout {template!r} must be a plain file name: no '/', '\\', '..', and not "
                              "starting with '.' or '_' (those names are the sink's own bookkeeping)")
        known = ("table", "position", "ext", *extra)
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ConfigError(f"layout {template!r} is not a valid template: {exc}") from None
        seen: list[str] = []
        for _, field, spec, conversion in parts:
            if field is None:
                continue
            if field not in known:
                raise ConfigError(f"layout {template!r}: unknown placeholder {{{field}}}; known: "
                                  f"{', '.join('{' + k + '}' for k in known)}")
            if spec or conversion:
                raise ConfigError(f"layout {template!r}: {{{field}}} takes no format spec or conversion")
            if field in seen:
                raise ConfigError(f"layout {template!r}: {{{field}}} appears twice")
            seen.append(field)
        if "position" not in seen:
            raise ConfigError(f"layout {template!r} needs {{position}}: it is what makes every file name new")
        self.template = template
        self.extra = tuple(extra)
        #: The placeholders of the template, in order.
        self.fields = tuple(seen)
        self._pattern = re.compile("".join(
            re.escape(text) + ("" if field is None else
                               r"(?P<position>\d+)" if field == "position" else f"(?P<{field}>[A-Za-z0-9._-]+?)")
            for text, field, _, _ in parts
        ))

    def __repr__(self) -> str:
        return f"Layout({self.template!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and (self.template, self.extra) == (other.template, other.extra)

    def __hash__(self) -> int:
        return hash((self.template, self.extra))

    def name(self, *, table: str, position: int, ext: str, **extra: object) -> str:
        """The file name of ``table``'s file at ``position``; :class:`~cio_sync.ConfigError` if a field's value
        cannot be part of a file name."""
        values = {"table": table, "position": position, "ext": ext, **extra}
        for field in self.fields:
            if field != "position" and not _FIELD_TEXT.fullmatch(str(values[field])):
                raise ConfigError(f"layout {self.template!r}: {{{field}}} = {values[field]!r} cannot be part of a "
                                  "file name (letters, digits, '.', '_' and '-' only)")
        return self.template.format_map(values)

    def parse(self, name: str) -> dict[str, str | int] | None:
        """The fields of a name this layout built (``position`` as an int); ``None`` if it did not build it."""
        match = self._pattern.fullmatch(name)
        if match is None:
            return None
        fields: dict[str, str | int] = dict(match.groupdict())
        fields["position"] = int(match["position"])
        return fields


def check_table_names(tables: Iterable[str]) -> None:
    """Raise :class:`~cio_sync.ConfigError` for a table name that cannot name a spool folder or a counter."""
    for table in tables:
        if not isinstance(table, str) or not _FIELD_TEXT.fullmatch(table) or table.startswith((".", "_")):
            raise ConfigError(f"table name {table!r} must be letters, digits, '.', '_' or '-', not starting with "
                              "'.' or '_'")
