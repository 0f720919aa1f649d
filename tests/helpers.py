"""Helpers for reading back what the sinks wrote, with DuckDB as the independent reader."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson

ADVANCED_NAME = re.compile(
    r"^(?P<destination>\d+)\.(?P<action>\d+)\.(?P<position>\d+)\."
    r"(?P<type>identify|track|page|screen|group|alias)\.(?P<ext>parquet|csv|json)$"
)


def parse_advanced_name(name: str) -> dict[str, Any]:
    match = ADVANCED_NAME.match(name)
    assert match, f"{name!r} does not follow <destination>.<action>.<position>.<type>.<ext>"
    groups = match.groupdict()
    return {k: int(v) if k in ("destination", "action", "position") else v for k, v in groups.items()}


def duckdb_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    """Every row of one file, read by DuckDB, as dicts."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    if fmt == "parquet":
        relation = con.sql(f"SELECT * FROM read_parquet('{path}')")
    elif fmt == "csv":
        relation = con.sql(f"SELECT * FROM read_csv('{path}', header = true, all_varchar = true)")
    else:
        relation = con.sql(f"SELECT * FROM read_json('{path}', format = 'newline_delimited', "
                           "records = true, maximum_object_size = 16777216)")
    names = relation.columns
    return [dict(zip(names, row, strict=True)) for row in relation.fetchall()]


def duckdb_types(path: Path) -> dict[str, str]:
    con = duckdb.connect()
    return {name: str(kind) for name, kind, *_ in con.sql(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()}


def as_instant(value: Any) -> datetime | None:
    """A timestamp as sent or as read back (ISO text or datetime), as an aware UTC datetime."""
    if value is None or value == "":
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def as_object(value: Any) -> Any:
    """A nested object as read back (JSON text, or a JSON value) as Python data."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return orjson.loads(value)
    return value


def count_by(items: list[Any]) -> dict[Any, int]:
    return dict(Counter(items))


def group_positions(names: list[str]) -> dict[tuple[int, int], list[int]]:
    positions: dict[tuple[int, int], list[int]] = defaultdict(list)
    for name in names:
        parts = parse_advanced_name(name)
        positions[(parts["destination"], parts["action"])].append(parts["position"])
    return {k: sorted(v) for k, v in positions.items()}


def published(folder: Path) -> list[dict[str, Any]]:
    """Every row of every Parquet file an Advanced sink published directly in ``folder``, file by file."""
    import pyarrow.parquet as pq

    return [r for path in sorted(folder.glob("*.parquet")) for r in pq.read_table(path).to_pylist()]


def post(url: str, payload: Any, key: str, *, path: str = "/v1/batch", timeout: float = 10) -> int | None:
    """POST ``payload`` as JSON with ``key`` as the Basic-auth user name, as the client libraries send; the status,
    or ``None`` if no answer came (the server is down or died)."""
    import base64
    import urllib.error
    import urllib.request

    auth = base64.b64encode(f"{key}:".encode()).decode()
    request = urllib.request.Request(f"{url}{path}", data=orjson.dumps(payload), method="POST",
                                     headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:  # URLError is one
        return None
