"""The traffic every case is fed: generated once by the parent, read back by each child.

Generating sample calls costs more than writing them (~40k calls/s), so the parent generates the calls once,
pickles them, and each child unpickles them before its clock starts. The memory-growth runs cannot hold 10M calls,
so they stream: a pool of generated calls cycled lazily, each call a fresh copy with its own ``messageId``.
"""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Iterator
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import orjson

from cio_sync._sample import sample_calls

NESTED = ("traits", "properties", "context", "integrations")


def mixed_calls(count: int, seed: int = 42) -> list[dict[str, Any]]:
    """``count`` calls of all six types, the same for the same seed."""
    return list(sample_calls(count, seed=seed))


def identify_calls(count: int) -> list[dict[str, Any]]:
    """Identify calls from the sample traffic, about five per person, so many change something and many do not."""
    calls = []
    for call in sample_calls(count * 7, seed=43, people=max(1, count // 5)):
        if call["type"] == "identify":
            calls.append({**call, "userId": call.get("userId") or call["anonymousId"]})
            if len(calls) == count:
                break
    return calls


def save(calls: list[dict[str, Any]], path: Path) -> Path:
    """Pickle ``calls`` for the children (unpickling is ~10x faster than generating them again)."""
    with open(path, "wb") as f:
        pickle.dump(calls, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def load(path: str | Path, count: int | None = None) -> list[dict[str, Any]]:
    """The calls saved at ``path``, the first ``count`` of them if given."""
    with open(path, "rb") as f:
        calls: list[dict[str, Any]] = pickle.load(f)
    return calls if count is None else calls[:count]


def stream(pool: list[dict[str, Any]], count: int) -> Iterator[dict[str, Any]]:
    """``count`` calls cycled from ``pool``, each a new dict with a new ``messageId``, generated as they are read.

    The input then takes the same memory for 1M calls as for 10M, so peak RSS measures the sink alone. The nested
    objects are shared between copies: the sink serialises them per call anyway.
    """
    for n, call in enumerate(islice(cycle(pool), count)):
        yield {**call, "messageId": f"bench-{n}"}


def describe(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """What the traffic holds, to print above the table: the mix, the size, the awkward parts."""
    if not calls:
        return {"calls": 0}
    encoded = [orjson.dumps(c) for c in calls]
    drift: dict[str, set[str]] = {}
    for call in calls:
        for key in ("traits", "properties"):
            for name, value in (call.get(key) or {}).items():
                if value is not None:
                    drift.setdefault(f"{key}.{name}", set()).add(type(value).__name__)
    return {
        "calls": len(calls),
        "types": dict(Counter(c["type"] for c in calls).most_common()),
        "mean_json_bytes": round(sum(map(len, encoded)) / len(encoded)),
        "non_ascii_share": round(sum(1 for b in encoded if not b.isascii()) / len(encoded), 3),
        "drifting_fields": sorted(name for name, kinds in drift.items() if len(kinds) > 1),
    }
