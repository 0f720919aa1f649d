"""Resolving where files go: a URL plus ``storage_options``, or an fsspec filesystem plus a path.

Also the two rules about what storage errors may say: they name the backend extra to install when one is missing,
and they never carry credentials.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

import fsspec
from fsspec import AbstractFileSystem

from cio_sync._errors import ConfigError, MissingBackend

#: fsspec protocol -> the cio_sync extra that installs its backend.
_EXTRAS: Final = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
}

_SECRET_KEY: Final = re.compile(
    r"(secret|password|passwd|token|credential|key|sas|signature|connection_string|account_key)", re.IGNORECASE
)
#: Option names that look secret but are not.
_NOT_SECRET: Final = frozenset({"key_prefix", "keyfile_path"})
_URL_USERINFO: Final = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")


#: Options every fsspec filesystem takes (read by fsspec's base class and its instance cache, not by ``__init__``).
_FSSPEC_OPTIONS: Final = frozenset({"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"})


def is_secret_name(name: str) -> bool:
    """Whether an option called ``name`` holds a credential (its value is never shown)."""
    return bool(_SECRET_KEY.search(name)) and name not in _NOT_SECRET


def _accepted_options(cls: type) -> set[str] | None:
    """The keyword arguments the ``__init__`` methods of filesystem class ``cls`` name, or ``None`` when they cannot
    be read. Unknown options reach fsspec's base class, which keeps them unused: a typo would silently be ignored."""
    names = set(_FSSPEC_OPTIONS)
    try:
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for name, parameter in inspect.signature(init).parameters.items():
                if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) and name != "self":
                    names.add(name)
    except (TypeError, ValueError):  # a builtin or an object without a signature
        return None
    return names


def check_options(protocol: str, cls: type, options: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming each of ``options`` that the ``protocol`` backend does not take."""
    accepted = _accepted_options(cls)
    if accepted is None:
        return
    unknown = sorted(str(k) for k in options if str(k) not in accepted)
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(accepted), n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    takes = ", ".join(sorted(accepted - _FSSPEC_OPTIONS)) or "none of its own"
    raise ConfigError(f"the {protocol}:// backend ({cls.__name__}) takes no storage option {', '.join(hints)}; "
                      f"it takes: {takes}")


def secrets_in(options: Mapping[str, Any] | None) -> list[str]:
    """Every string in ``options`` (recursively) stored under a key that looks like a credential."""
    found: list[str] = []

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                name = str(k)
                walk(v, secret or is_secret_name(name))
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v, secret)
        elif secret and isinstance(value, str) and len(value) >= 4:
            found.append(value)
            # A connection string carries its secrets as key=value pairs.
            found.extend(part.split("=", 1)[1] for part in value.split(";") if "=" in part and len(part) > 8)

    walk(options or {}, False)
    return sorted(set(found), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret and any user:password part of a URL replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", text)


def resolve(
    target: str,
    *,
    filesystem: AbstractFileSystem | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[AbstractFileSystem, str]:
    """The filesystem and root path that ``target`` names.

    With ``filesystem``, ``target`` is a path on it (its protocol prefix, if any, is stripped). Otherwise ``target``
    is a URL (``s3://bucket/prefix``, ``gs://...``, ``az://...``, ``memory://...``, ``file://...`` or a local path)
    and ``storage_options`` go to the backend. Raises :class:`ConfigError` for an option the backend does not take
    (a typo would otherwise be ignored) or a URL it cannot open, :class:`MissingBackend` when its package is not
    installed.
    """
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(f"target must be a non-empty URL or path; got {target!r}")
    if filesystem is not None:
        if storage_options:
            raise ConfigError("pass either a filesystem or storage_options, not both")
        if not isinstance(filesystem, AbstractFileSystem):
            raise ConfigError(f"filesystem must be an fsspec filesystem; got {type(filesystem).__name__}")
        root = filesystem._strip_protocol(target)
        return filesystem, str(root).rstrip("/") or str(root)
    protocol = target.split("://", 1)[0].lower() if "://" in target else "file"
    try:
        if storage_options and "::" not in target:  # (a chained URL sends options to several backends)
            check_options(protocol, fsspec.get_filesystem_class(protocol), storage_options)
        fs, root = fsspec.core.url_to_fs(target, **dict(storage_options or {}))
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        hint = (f"install it from the cio_sync checkout: pip install -e '.[{extra}]' (a built package: "
                f"pip install 'cio_sync[{extra}]')" if extra else f"install the fsspec backend for {protocol!r}")
        raise MissingBackend(f"cannot open {protocol}:// URLs: its backend is not installed; {hint}") from exc
    except ValueError as exc:
        raise ConfigError(f"cannot open {redact(target, secrets_in(storage_options))}: {exc}") from None
    return fs, str(root).rstrip("/") or str(root)


def display_url(fs: AbstractFileSystem, root: str) -> str:
    """A readable URL for ``root`` on ``fs``, with any ``user:password@`` part masked."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return root
    return redact(f"{protocol}://{root.lstrip('/')}", ())
