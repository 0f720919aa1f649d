"""The last mile: load the files of a prefix into a warehouse, each exactly once, and build current-state views.

The loader reads files, not sinks: it knows the file names and schemas of both modes (shared/SCHEMAS.md), so it
also loads exports named the way Customer.io names its own. Each file is loaded in one transaction together with
its entry in the load-state table ``_cio_sync_loaded``, so a rerun loads nothing twice and a load killed midway
loses nothing; ``delete_after_load`` deletes a file only after its rows are committed.

Files come from a bucket, so they are untrusted: every file is checked against its table's known schema before a
row of it reaches the warehouse, warehouse tables are created from the known schemas (never from a file), and a name
taken from a file becomes a column only when it is a plain identifier, always quoted. A file that cannot load is
quarantined: recorded in the load state with the reason, reported, skipped by later loads until they are asked to
retry it; the load goes on with the next file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import pyarrow.compute as pc
from fsspec import AbstractFileSystem

from cio_sync._errors import (
    ConfigError,
    StorageError,
)
from cio_sync.loader.files import _OWN_PREFIX, SourceFile, _Unloadable, classify, read_file
from cio_sync.loader.targets import LOADED, QUARANTINED, _Target, _target
from cio_sync.storage.backends import display_url, redact, resolve

log = logging.getLogger("cio_sync.loader")


#: Where manifests are, under a prefix; a quarantined manifest's entry in the load state is named under it.
MANIFESTS_FOLDER: Final = "_manifests"




_SHA256: Final = re.compile(r"[0-9a-fA-F]{64}")




@dataclass(frozen=True)
class QuarantinedFile:
    """A file (or manifest) that could not load: its name under the prefix, its table, and why.

    A manifest's name is ``_manifests/<name>.json`` and its table ``_manifests``.
    """

    name: str
    table: str
    reason: str


@dataclass
class LoadReport:
    """What a load did.

    ``quarantined`` lists the files this load could not load (each recorded in the load state with its reason, and
    not tried again by later loads unless they pass ``retry_quarantined=True``); ``files_still_quarantined`` counts
    the files an earlier load quarantined, which this one skipped.
    """

    source: str
    target: str
    files_loaded: int = 0
    rows_loaded: int = 0
    files_already_loaded: int = 0
    files_waiting: int = 0
    files_deleted: int = 0
    files_still_quarantined: int = 0
    tables: dict[str, int] = field(default_factory=dict)
    quarantined: list[QuarantinedFile] = field(default_factory=list)

    @property
    def files_quarantined(self) -> int:
        """How many files (and manifests) this load quarantined."""
        return len(self.quarantined)

    def __str__(self) -> str:
        tables = ", ".join(f"{t} +{n:,}" for t, n in sorted(self.tables.items())) or "nothing new"
        text = (f"loaded {self.files_loaded} files ({self.rows_loaded:,} rows) from {self.source} into "
                f"{self.target}: {tables}; {self.files_already_loaded} already loaded, {self.files_waiting} "
                f"waiting for their manifest, {self.files_deleted} deleted")
        if self.quarantined:
            text += f", {self.files_quarantined} quarantined"
        if self.files_still_quarantined:
            text += f", {self.files_still_quarantined} still quarantined by an earlier load"
        return text


def _list(fs: AbstractFileSystem, folder: str) -> list[str]:
    """The entries of ``folder`` (none if it does not exist); raises :class:`StorageError` naming it."""
    fs.invalidate_cache(folder)
    try:
        return [str(e) for e in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []
    except OSError as exc:
        shown = display_url(fs, folder)
        raise StorageError(f"cannot list {shown}: {redact(str(exc), ())}", path=shown) from exc


def list_files(fs: AbstractFileSystem, root: str) -> list[SourceFile]:
    """The loadable files directly under ``root``, in load order; raises :class:`StorageError` if it cannot be
    listed."""
    entries = _list(fs, root)
    files = [classify(e.rstrip("/").rsplit("/", 1)[-1]) for e in entries]
    return sorted(f for f in files if f is not None)


def _holding(fs: AbstractFileSystem, entries: list[str]) -> bool:
    """Whether a folder with ``entries`` is a prefix of either sink (or an export): it holds a file of theirs, or
    the folders they keep (a prefix whose files were all loaded and deleted keeps its counters)."""
    names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
    return bool(names & {_OWN_PREFIX, MANIFESTS_FOLDER}) or any(classify(n) is not None for n in names)


def require_files(fs: AbstractFileSystem, root: str) -> None:
    """Raise :class:`~cio_sync.ConfigError` when ``root`` does not exist or holds no file of either sink, naming
    the subfolders that do (as the demo writes one prefix per format and mode under one folder)."""
    where = display_url(fs, root)
    entries = _list(fs, root)
    if _holding(fs, entries):
        return
    found: list[str] = []
    for entry in sorted(entries):
        if len(found) >= 6:
            break
        try:
            if not fs.isdir(entry):
                continue
            inner = _list(fs, entry)
            if _holding(fs, inner):
                found.append(entry)
            else:
                found += [e for e in sorted(inner) if fs.isdir(e) and _holding(fs, _list(fs, e))]
        except OSError:  # an entry that went away or cannot be looked into is no hint
            continue
    missing = not entries and not fs.exists(root)
    what = f"{where} does not exist" if missing else f"no cio_sync files in {where}"
    if found:
        shown = [display_url(fs, f.rstrip("/")) for f in found[:6]]
        raise ConfigError(f"{what}; try {', '.join(shown[:-1]) + ' or ' if len(shown) > 1 else ''}{shown[-1]}")
    if missing:
        raise ConfigError(f"{what}; check the prefix")
    raise ConfigError(f"{what}: it holds no file of either sink nor of a Customer.io export; check the prefix")


def _read(fs: AbstractFileSystem, path: str, shown: str) -> bytes:
    try:
        return bytes(fs.cat_file(path))
    except OSError as exc:
        raise StorageError(f"cannot read {shown}: {redact(str(exc), ())}", path=shown) from exc


def manifest_files(document: Any) -> list[dict[str, Any]]:
    """The file entries of a parsed manifest (docs/manifests.md); raises ``_Unloadable`` saying what is wrong with a
    document of another shape: not an object, ``files`` not a list, an entry without a name, a size or checksum that
    is not one."""
    if not isinstance(document, dict):
        raise _Unloadable(f"is not a JSON object but {type(document).__name__}")
    files = document.get("files")
    if not isinstance(files, list):
        raise _Unloadable(f'its "files" is {type(files).__name__ if files is not None else "missing"}, not a list')
    for number, entry in enumerate(files):
        if not isinstance(entry, dict):
            raise _Unloadable(f"files[{number}] is not an object")
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise _Unloadable(f'files[{number}] has no "name"')
        size = entry.get("bytes")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise _Unloadable(f'files[{number}] ({entry["name"]!r}) has a "bytes" that is not a size: {size!r}')
        digest = entry.get("sha256")
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise _Unloadable(f'files[{number}] ({entry["name"]!r}) has a "sha256" that is not a SHA-256')
    return files


@dataclass
class _Manifests:
    """The manifests of a prefix: which files they list (name -> entry, manifest), and which of them read well."""

    paths: list[str] = field(default_factory=list)
    listed: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)  # readable manifest path -> the names it lists


def _manifests(fs: AbstractFileSystem, root: str, *, where: str, target: _Target, state: Mapping[str, str],
               retry: bool, report: LoadReport, tell: Callable[[QuarantinedFile], None] | None) -> _Manifests:
    """Every manifest under ``root/_manifests``; one that is unreadable or of the wrong shape is quarantined (its
    files then wait: a file is loaded only when a readable manifest lists it)."""
    folder = f"{root}/{MANIFESTS_FOLDER}"
    found = _Manifests(paths=sorted(p for p in _list(fs, folder) if p.endswith(".json")))
    for path in found.paths:
        name = f"{MANIFESTS_FOLDER}/{path.rsplit('/', 1)[-1]}"
        status = state.get(name)
        if status == QUARANTINED and not retry:
            report.files_still_quarantined += 1
            continue
        try:
            data = _read(fs, path, f"{where}/{name}")
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                continue  # deleted since the listing: by another loader that loaded all it lists
            raise
        try:
            try:
                document = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise _Unloadable(f"is not JSON: {exc}") from exc
            entries = manifest_files(document)
        except _Unloadable as exc:
            _quarantine(target, report, name, table=MANIFESTS_FOLDER, reason=f"manifest {exc.reason}",
                        replace=status is not None, tell=tell)
            continue
        if status is not None:
            target.forget(where, name)
        found.files[path] = [e["name"] for e in entries]
        for entry in entries:
            found.listed[entry["name"]] = (entry, name)
    return found


def _quarantine(target: _Target, report: LoadReport, name: str, *, table: str, reason: str, replace: bool,
                tell: Callable[[QuarantinedFile], None] | None) -> None:
    target.record(report.source, name, table, reason, replace=replace)
    file = QuarantinedFile(name, table, reason)
    report.quarantined.append(file)
    # A caller that is told of each quarantined file reports it itself; otherwise the log does.
    log.log(logging.INFO if tell else logging.WARNING, "quarantined %s/%s: %s", report.source, name, reason)
    if tell is not None:
        tell(file)


def load(
    source: str,
    into: str = "duckdb:///cio_sync.duckdb",
    *,
    storage_options: Mapping[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
    delete_after_load: bool = False,
    retry_quarantined: bool = False,
    progress: Callable[[SourceFile, int], None] | None = None,
    on_quarantine: Callable[[QuarantinedFile], None] | None = None,
) -> LoadReport:
    """Load every file of ``source`` not loaded before into ``into``; build the current-state views.

    ``source`` is a prefix written by either sink (or a Customer.io export), as a URL or a path; ``into`` is
    ``duckdb:///path.duckdb`` or ``postgresql://user:password@host:port/database``.
    Files load in position / sequence order, each in one transaction with its entry in
    ``_cio_sync_loaded``; a rerun loads nothing twice. Where the prefix has manifests (``_manifests/``), only
    files a manifest lists are loaded (the others belong to a sync still in progress) and their size and checksum
    are checked. With ``delete_after_load``, each file is deleted once its rows are committed, and each manifest
    once all its files are; ``_cio_sync/`` (the writers' counters) is never touched.

    Each file is checked against its table's known schema first. A file that cannot load (not a whole file of its
    format, a known column of another type family, a column name that is not a plain identifier, a size or checksum
    its manifest does not list, rows the warehouse refuses) and a manifest of the wrong shape are quarantined: their
    entry in ``_cio_sync_loaded`` has status ``quarantined`` and the reason, the report lists them, and the load goes
    on. Later loads skip them (never deleting them) unless ``retry_quarantined`` is true. Each is logged as a warning,
    or, with ``on_quarantine``, given to it as soon as it is recorded (and logged at info level only).

    Raises :class:`StorageError` naming the file or the database when the prefix cannot be read or the warehouse
    fails (a full disk, a lost connection): the file being loaded is rolled back, every file before it stays loaded.
    Raises :class:`ConfigError` for an unknown or malformed target or a source that holds no file of either sink,
    :class:`StorageError` when PostgreSQL cannot be reached.
    """
    fs, root = resolve(source, filesystem=filesystem, storage_options=storage_options)
    where = display_url(fs, root)
    require_files(fs, root)
    target = _target(into)
    report = LoadReport(where, redact(into, ()))
    try:
        state = target.state(where)
        manifests = _manifests(fs, root, where=where, target=target, state=state, retry=retry_quarantined,
                               report=report, tell=on_quarantine)
        for file in list_files(fs, root):
            path = f"{root}/{file.name}"
            status = state.get(file.name)
            if status == LOADED:
                report.files_already_loaded += 1
                if delete_after_load:
                    _delete(fs, path, report)
                continue
            if status == QUARANTINED and not retry_quarantined:
                report.files_still_quarantined += 1
                continue
            listed = manifests.listed.get(file.name)
            if manifests.paths and listed is None:
                report.files_waiting += 1
                continue
            data = _read(fs, path, f"{where}/{file.name}")
            try:
                if listed is not None:
                    _verify(data, *listed)
                table = read_file(data, file, target.columns(file.table))
                target.load(where, file, table, replace=status is not None)
            except _Unloadable as exc:
                _quarantine(target, report, file.name, table=file.table, reason=exc.reason, replace=status is not None,
                            tell=on_quarantine)
                continue
            report.files_loaded += 1
            report.rows_loaded += table.num_rows
            report.tables[file.table] = report.tables.get(file.table, 0) + table.num_rows
            if progress is not None:
                progress(file, table.num_rows)
            if delete_after_load:
                _delete(fs, path, report)
        target.build_views()
        if delete_after_load:
            _delete_finished_manifests(fs, root, manifests)
    finally:
        target.close()
    log.info("%s", report)
    return report


def _verify(data: bytes, entry: Mapping[str, Any], manifest: str) -> None:
    if entry.get("bytes") is not None and entry["bytes"] != len(data):
        raise _Unloadable(f"has {len(data)} bytes but {manifest} says {entry['bytes']}")
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"].lower():
        raise _Unloadable(f"does not match its checksum in {manifest}")


def _delete(fs: AbstractFileSystem, path: str, report: LoadReport) -> None:
    try:
        fs.rm_file(path)
        report.files_deleted += 1
    except FileNotFoundError:
        pass


def _delete_finished_manifests(fs: AbstractFileSystem, root: str, manifests: _Manifests) -> None:
    """Delete each readable manifest none of whose files is left (a quarantined file stays, so its manifest does)."""
    remaining = {f.name for f in list_files(fs, root)}
    for path, names in manifests.files.items():
        if not any(name in remaining for name in names):
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)


def inspect_prefix(source: str, *, storage_options: Mapping[str, Any] | None = None,
                   filesystem: AbstractFileSystem | None = None) -> dict[str, Any]:
    """What a prefix holds: per table its files, rows, schema versions, time range, and gaps in the numbering.

    A file that cannot be read under its table's schema is listed under ``"unreadable"`` with the reason (the
    reason a load would quarantine it for) instead of being counted. Raises :class:`~cio_sync.ConfigError` when
    ``source`` does not exist or holds no file of either sink (naming the subfolders that do).
    """
    fs, root = resolve(source, filesystem=filesystem, storage_options=storage_options)
    where = display_url(fs, root)
    require_files(fs, root)
    summary: dict[str, dict[str, Any]] = {}
    unreadable: list[dict[str, str]] = []
    for file in list_files(fs, root):
        data = _read(fs, f"{root}/{file.name}", f"{where}/{file.name}")
        try:
            rows = read_file(data, file)
        except _Unloadable as exc:
            unreadable.append({"name": file.name, "table": file.table, "reason": exc.reason})
            continue
        table = summary.setdefault(file.table, {"files": 0, "rows": 0, "bytes": 0, "numbers": [],
                                                "formats": set(), "first": None, "last": None})
        table["files"] += 1
        table["bytes"] += len(data)
        table["formats"].add(file.ext)
        table["numbers"].append((file.order[:-1], file.order[-1]))
        table["rows"] += rows.num_rows
        column = "receivedAt" if file.mode == "advanced" else next(
            (c for c in ("updated_at", "timestamp", "created_at") if c in rows.column_names), None)
        if column is not None and rows.num_rows:
            low, high = pc.min(rows.column(column)).as_py(), pc.max(rows.column(column)).as_py()
            table["first"] = low if table["first"] is None or (low and low < table["first"]) else table["first"]
            table["last"] = high if table["last"] is None or (high and high > table["last"]) else table["last"]
    result = {}
    for name, table in summary.items():
        gaps = []
        by_run: dict[Any, list[int]] = {}
        for run, number in table["numbers"]:
            by_run.setdefault(run, []).append(number)
        for run, numbers in by_run.items():
            numbers.sort()
            if run[0] == "advanced":
                expected = set(range(numbers[0], numbers[-1] + 1))
                gaps += [f"{run[1]}.{run[2]}.{n}" for n in sorted(expected - set(numbers))]
        result[name] = {k: v for k, v in table.items() if k != "numbers"} | {
            "formats": sorted(table["formats"]), "gaps": gaps}
    return {"source": where, "tables": result, "unreadable": unreadable}
