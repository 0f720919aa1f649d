"""Standard identify calls per second with the workspace state in SQLite and in PostgreSQL.

Run ``python -m bench.pgstate [--calls N] [--people N] [--url postgresql://...]``. Without ``--url`` it starts a
throwaway PostgreSQL (Debian's package, as the tests do) on 127.0.0.1 and turns ``fsync`` back on in it (the tests
run it off), so that a commit is as durable as PostgreSQL's defaults make it. For each backend and ``commit_every``
(1 and 1000) it writes the same identify calls (each person ``--calls / --people`` times, half of them changing
something) into a fresh state and a local target folder, and prints calls/s over ``write`` + ``close`` (which
publishes). Not a test: the figures depend on the machine and its disk.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cio_sync


def calls(count: int, people: int) -> Iterator[dict[str, Any]]:
    for i in range(count):
        person, round_ = i % people, i // people
        yield {"type": "identify", "userId": f"user-{person}",
               "traits": {"email": f"p{person}@example.com", "plan": ("free", "pro")[round_ % 2 == 1 and i % 2],
                          "visits": round_ // 2}}


def measure(state: str, folder: Path, count: int, people: int, commit_every: int, **options: Any) -> float:
    target = folder / f"target-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    with cio_sync.StandardSink(str(target), workspace_id=1, state=state, flush_interval=None,
                               commit_every=commit_every, **options) as sink:
        write = sink.write
        for call in calls(count, people):
            write(call)
    return count / (time.perf_counter() - start)


@contextlib.contextmanager
def postgres(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    import psycopg

    from tests import servers

    with servers.postgres() as server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET fsync = on")
            conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)
        yield server.dsn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--people", type=int, default=5_000)
    parser.add_argument("--url", help="a PostgreSQL server to use (default: start one)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-pgstate-"))
    try:
        with postgres(args.url) as url:
            for commit_every in (1, 1000):
                sqlite = measure(str(folder / f"state-{commit_every}.sqlite"), folder, args.calls, args.people,
                                 commit_every)
                pg = measure(url, folder, args.calls, args.people, commit_every,
                             state_schema=f"bench_{uuid.uuid4().hex[:8]}")
                print(f"commit_every={commit_every:<5} SQLite {sqlite:9,.0f} calls/s   PostgreSQL {pg:9,.0f} "
                      f"calls/s   ({pg / sqlite:.2f}x)", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
