"""Sinks by name: the built-in ones, ones registered at run time, and third-party ones from the entry-point group
``cio_sync.sinks`` (loaded only when a name is asked for)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Final

from cio_sync._errors import ConfigError

#: Entry-point group third-party packages declare their sinks in: ``name = "package.module:SinkClass"``.
ENTRY_POINT_GROUP: Final = "cio_sync.sinks"

_BUILT_IN: Final = {"advanced": "cio_sync.sinks.advanced:AdvancedSink",
                    "standard": "cio_sync.sinks.standard:StandardSink"}
_REGISTERED: dict[str, Callable[..., Any]] = {}


def register_sink(name: str, factory: Callable[..., Any]) -> None:
    """Make ``factory`` (a sink class, or any callable returning a sink) available as ``open_sink(name, ...)``."""
    if not isinstance(name, str) or not name.replace("-", "_").isidentifier():
        raise ConfigError(f"sink name must be an identifier; got {name!r}")
    if not callable(factory):
        raise ConfigError(f"sink factory for {name!r} must be callable")
    _REGISTERED[name.lower()] = factory


def _load(target: str) -> Callable[..., Any]:
    module, _, attribute = target.partition(":")
    factory: Callable[..., Any] = getattr(importlib.import_module(module), attribute)
    return factory


def sink_factory(name: str) -> Callable[..., Any]:
    """The factory registered under ``name``: registered at run time, built in, or from an entry point."""
    key = name.lower()
    if key in _REGISTERED:
        return _REGISTERED[key]
    if key in _BUILT_IN:
        return _load(_BUILT_IN[key])
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name.lower() == key:
            factory: Callable[..., Any] = point.load()
            _REGISTERED[key] = factory
            return factory
    raise ConfigError(f"no sink named {name!r}; known: {', '.join(sink_names())}")


def sink_names() -> list[str]:
    """Every sink name available: built in, registered, and declared by installed packages."""
    return sorted({*_BUILT_IN, *_REGISTERED, *(p.name.lower() for p in entry_points(group=ENTRY_POINT_GROUP))})


def open_sink(name: str, *args: Any, **kwargs: Any) -> Any:
    """A new sink of the kind registered as ``name``, e.g. ``open_sink("advanced", "s3://bucket/raw")``."""
    return sink_factory(name)(*args, **kwargs)
