"""File formats: each encodes one batch (an Arrow table under a fixed schema) into the bytes of one file.

A format knows no storage and no sink. It declares its name and extension and encodes; that is all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cio_sync._errors import ConfigError
from cio_sync.formats.base import Format
from cio_sync.formats.csv import CsvFormat
from cio_sync.formats.jsonlines import JsonLinesFormat
from cio_sync.formats.parquet import ParquetFormat

_REGISTRY: dict[str, Callable[..., Format]] = {
    "parquet": ParquetFormat,
    "csv": CsvFormat,
    "json": JsonLinesFormat,
    "jsonl": JsonLinesFormat,
    "ndjson": JsonLinesFormat,
}


def register_format(name: str, factory: Callable[..., Format]) -> None:
    """Make ``factory`` available by ``name`` wherever a sink takes ``format=``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"format name must be an identifier; got {name!r}")
    _REGISTRY[name.lower()] = factory


def get_format(spec: str | Format, **options: Any) -> Format:
    """A format by registered name (with its options), or ``spec`` itself when it already is a format."""
    if isinstance(spec, str):
        try:
            factory = _REGISTRY[spec.lower()]
        except KeyError:
            known = ", ".join(sorted(_REGISTRY))
            raise ConfigError(f"unknown format {spec!r}; known formats: {known}") from None
        try:
            return factory(**options)
        except TypeError as exc:
            raise ConfigError(f"format {spec!r} does not take these options: {exc}") from None
    if options:
        raise ConfigError("format options are given with a format name, not with a format object")
    if not isinstance(spec, Format):
        raise ConfigError(f"format must be a name or a Format; got {type(spec).__name__}")
    return spec
