"""What the restart trials of tests/test_hostile_values.py run in a child process: a sink given good calls, then a
call holding values no file can hold, then more good calls, and then a normal exit (no close: the sink is flushed
at interpreter exit) or a crash (``os._exit``: nothing flushed).

Good calls are identify calls whose ``messageId`` and whose trait ``n`` are the call's id, so an Advanced file holds
the id as ``messageId`` and a Standard ``attributes`` file as ``attribute_value``.
"""

from __future__ import annotations

import os
from typing import Any

import cio_sync


def good(call_id: str) -> dict[str, Any]:
    return {"type": "identify", "userId": f"user-{call_id}", "messageId": call_id, "traits": {"n": call_id}}


def hostile(kind: str) -> Any:
    """A call no file can hold: with a lone surrogate as a trait's name (the value the Standard sink wedged on), with
    NaN inside a trait (orjson wrote it as null), or as JSON bytes nested 5,000 levels deep (msgspec raised
    RecursionError)."""
    if kind == "surrogate-name":
        return {"type": "identify", "userId": "user-bad", "messageId": "bad", "traits": {"pl\ud800an": "pro"}}
    if kind == "nan":
        return {"type": "identify", "userId": "user-bad", "messageId": "bad", "traits": {"score": float("nan")}}
    if kind == "deep-bytes":
        return (b'{"type":"identify","userId":"user-bad","messageId":"bad","traits":{"a":' + b"[" * 5000
                + b"]" * 5000 + b"}}")
    raise ValueError(kind)


def _open(mode: str, paths: dict[str, str], commit_every: int) -> Any:
    if mode == "advanced":
        return cio_sync.AdvancedSink(paths["advanced"], spool_dir=paths["spool"], flush_interval=None)
    standard = cio_sync.StandardSink(paths["standard"], workspace_id=7, state=paths["state"], flush_interval=None,
                                     commit_every=commit_every)
    if mode == "standard":
        return standard
    advanced = cio_sync.AdvancedSink(paths["advanced"], spool_dir=paths["spool"], flush_interval=None)
    return cio_sync.Pipeline(advanced=advanced, standard=standard)


def session(mode: str, paths: dict[str, str], kinds: list[str], ending: str, commit_every: int) -> dict[str, Any]:
    """Write good calls g0..g2, each hostile call of ``kinds``, good calls g3..g5; then end as ``ending`` says. The
    report lists the ids ``write()`` accepted and, for each hostile call, what ``write()`` raised."""
    sink = _open(mode, paths, commit_every)
    report: dict[str, Any] = {"accepted": [], "refused": [], "hostile": []}
    for index in range(6):
        if index == 3:
            for kind in kinds:
                try:
                    sink.write(hostile(kind))
                except Exception as exc:  # what a user's program sees: any exception is reported, not swallowed
                    report["hostile"].append(type(exc).__name__)
                else:
                    report["hostile"].append("accepted")
        call_id = f"g{index}"
        try:
            sink.write(good(call_id))
        except Exception as exc:
            report["refused"].append(f"{call_id}: {type(exc).__name__}")
        else:
            report["accepted"].append(call_id)
    if ending == "crash":
        report["_exit"] = True  # the runner exits with os._exit right after saving the report
    return report


def reopen_and_close(mode: str, paths: dict[str, str]) -> None:
    """Open the sink again on the same state file and spool (publishing what the last process left) and close it."""
    _open(mode, paths, 1).close()


def run_and_exit(function: str, args_json: str, result_path: str) -> None:
    """The child's entry point: run ``function`` of this module, save its JSON report, exit as it asks."""
    import json

    result = globals()[function](*json.loads(args_json))
    with open(result_path, "w") as f:
        json.dump(result, f)
    if isinstance(result, dict) and result.get("_exit"):
        os._exit(0)
