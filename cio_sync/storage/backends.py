"""Resolving where files go: a URL plus ``storage_options``, or an fsspec filesystem plus a path.

Also the two rules about what storage errors may say: they name the backend extra to install when one is missing,
and they never carry credentials.
"""

from __future__ import annotations

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


def secrets_in(options: Mapping[str, Any] | None) -> list[str]:
    """Every string in ``options`` (recursively) stored under a key that looks like a credential."""
    found: list[str] = []

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                name = str(k)
                walk(v, secret or (bool(_SECRET_KEY.search(name)) and name not in _NOT_SECRET))
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
    and ``storage_options`` go to the backend.
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
        fs, root = fsspec.core.url_to_fs(target, **dict(storage_options or {}))
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'cio_sync[{extra}]'" if extra else f"install the fsspec backend for {protocol!r}"
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
