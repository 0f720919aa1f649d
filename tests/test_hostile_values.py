"""Values no file, spool or workspace state can hold: refused by ``write()`` on every intake path with an
InvalidCall naming the field and the key, and never harming what was accepted before or after them.

The values: lone surrogates (in a name or a value, at any depth), NaN and infinities, integers beyond 64 bits,
bytes and objects JSON has no form for, keys of other types, and nesting deeper than the documented limit (254
levels, the call itself being the first).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cio_sync
from cio_sync.cli import main
from tests.faults import published_ids

ROOT = Path(__file__).resolve().parent.parent
#: The documented nesting limit (docs/advanced.md, "What is accepted").
LIMIT = 254
NAN, INF = float("nan"), float("inf")


def nested(levels: int, leaf: Any = 1) -> Any:
    """A value of ``levels`` nested arrays around ``leaf``."""
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


def cycle() -> dict[str, Any]:
    value: dict[str, Any] = {"a": 1}
    value["self"] = value
    return value


def good(call_id: str) -> dict[str, Any]:
    """A call every path accepts: its id is the messageId (Advanced files) and the trait ``n`` (Standard files)."""
    return {"type": "identify", "userId": f"user-{call_id}", "messageId": call_id, "traits": {"n": call_id}}


IDENTIFY = {"type": "identify", "userId": "u1", "messageId": "bad", "traits": {"plan": "pro"}}
TRACK = {"type": "track", "userId": "u1", "messageId": "bad", "event": "Ordered", "properties": {"total": 9.5}}

#: (id, call, the field the error names, words the message must hold: the reason and, where there is one, the key).
HOSTILE: list[tuple[str, dict[str, Any], str, list[str]]] = [
    ("trait-name-surrogate", {**IDENTIFY, "traits": {"pl\ud800an": "pro"}}, "traits",
     ["trait 'pl\\ud800an'", "not valid Unicode"]),
    ("trait-value-surrogate", {**IDENTIFY, "traits": {"plan": "pro\udfff"}}, "traits",
     ["trait 'plan'", "not valid Unicode"]),
    ("nested-name-surrogate", {**TRACK, "properties": {"item": {"\ud800": 1}}}, "properties",
     ["property 'item'['\\ud800']", "not valid Unicode"]),
    ("surrogate-in-a-list", {**TRACK, "context": {"page": {"tags": ["ok", "\udc00"]}}}, "context",
     ["key 'page'['tags'][1]", "not valid Unicode"]),
    ("integration-name-surrogate", {**TRACK, "integrations": {"\ud800x": True}}, "integrations",
     ["'\\ud800x'", "not valid Unicode"]),
    ("extra-name-surrogate", {**TRACK, "\ud800key": 1}, "\\ud800key", ["name of this field", "not valid Unicode"]),
    ("extra-value-surrogate", {**TRACK, "writeKey": "k\ud800"}, "writeKey", ["not valid Unicode"]),
    ("trait-nan", {**IDENTIFY, "traits": {"score": NAN}}, "traits", ["trait 'score'", "nan"]),
    ("nested-infinity", {**TRACK, "properties": {"prices": [1.0, INF]}}, "properties", ["property 'prices'[1]", "inf"]),
    ("deep-negative-infinity", {**TRACK, "context": {"a": {"b": {"c": -INF}}}}, "context",
     ["key 'a'['b']['c']", "-inf"]),
    ("trait-nan-beside-a-null", {**IDENTIFY, "traits": {"plan": None, "score": NAN}}, "traits", ["trait 'score'"]),
    ("version-nan", {**TRACK, "version": NAN}, "version", ["nan"]),
    ("channel-infinity", {**TRACK, "channel": INF}, "channel", ["inf"]),
    ("extra-nan", {**TRACK, "score": NAN}, "score", ["nan"]),
    ("nan-as-a-name", {**IDENTIFY, "traits": {NAN: 1}}, "traits", ["name", "nan"]),
    ("trait-beyond-64-bits", {**IDENTIFY, "traits": {"n": 2**64}}, "traits", ["trait 'n'", "64 bits"]),
    ("nested-below-64-bits", {**TRACK, "properties": {"a": [{"b": -(2**63) - 1}]}}, "properties",
     ["property 'a'[0]['b']", "64 bits"]),
    ("version-beyond-64-bits", {**TRACK, "version": 2**70}, "version", ["64 bits"]),
    ("trait-bytes", {**IDENTIFY, "traits": {"avatar": b"\x89PNG"}}, "traits", ["trait 'avatar'", "bytes"]),
    ("extra-bytes", {**TRACK, "blob": b"x"}, "blob", ["bytes"]),
    ("an-object", {**TRACK, "properties": {"o": object()}}, "properties", ["property 'o'", "object"]),
    ("a-set", {**TRACK, "properties": {"s": {1, 2}}}, "properties", ["property 's'", "set"]),
    ("a-tuple-as-a-name", {**IDENTIFY, "traits": {("a", "b"): 1}}, "traits", ["name", "tuple"]),
    ("one-level-too-deep", {**IDENTIFY, "traits": {"a": nested(LIMIT - 1)}}, "traits",
     ["trait 'a'", f"deeper than {LIMIT} levels"]),
    ("extra-one-level-too-deep", {**TRACK, "x": nested(LIMIT)}, "x", [f"deeper than {LIMIT} levels"]),
    ("far-too-deep", {**TRACK, "properties": {"a": nested(10_000)}}, "properties",
     ["property 'a'", f"deeper than {LIMIT} levels"]),
    ("a-cycle", {**TRACK, "properties": cycle()}, "properties", [f"deeper than {LIMIT} levels"]),
]


def _advanced(root: Path, fmt: str = "parquet") -> cio_sync.AdvancedSink:
    return cio_sync.AdvancedSink(str(root / "advanced"), format=fmt, flush_interval=None)


def _standard(root: Path, state: bool = True) -> cio_sync.StandardSink:
    return cio_sync.StandardSink(str(root / "standard"), workspace_id=7, state=root / "ws.sqlite" if state else None,
                                 flush_interval=None)


#: Every way a dict call comes in: a sink (or two) on folders under a root.
PATHS: dict[str, Callable[[Path], Any]] = {
    "advanced-parquet": _advanced,
    "advanced-csv": lambda root: _advanced(root, "csv"),
    "advanced-json": lambda root: _advanced(root, "json"),
    "standard": _standard,
    "pipeline": lambda root: cio_sync.Pipeline(advanced=_advanced(root), standard=_standard(root)),
    "pipeline-json": lambda root: cio_sync.Pipeline(advanced=_advanced(root, "json"), standard=_standard(root)),
}


def landed(root: Path) -> dict[str, Counter[str]]:
    """The ids each sink published under ``root``, with how many times each."""
    found = {"advanced": published_ids(root / "advanced"),
             "standard": published_ids(root / "standard", "attribute_value")}
    return {sink: ids for sink, ids in found.items() if (root / sink).exists()}


def assert_refused(caught: pytest.ExceptionInfo[cio_sync.InvalidCall], field: str, words: list[str]) -> None:
    error = caught.value
    assert error.field == field
    for word in words:
        assert word in str(error), (word, str(error))
    str(error).encode("utf-8")  # the message itself can be printed and logged


@pytest.mark.parametrize(("call", "field", "words"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_a_value_no_file_can_hold_is_refused_on_every_path_naming_the_key_and_harms_nothing_else(
        tmp_path: Path, call: dict[str, Any], field: str, words: list[str]) -> None:
    for path, make in PATHS.items():
        root = tmp_path / path
        root.mkdir()
        sink = make(root)
        sink.write(good("before"))
        with pytest.raises(cio_sync.InvalidCall) as caught:
            sink.write(call)
        assert_refused(caught, field, words)
        sink.write(good("after"))
        sink.flush()
        sink.close()
        for ids in landed(root).values():
            assert ids == Counter({"before": 1, "after": 1}), path


@pytest.mark.parametrize("row", [False, True], ids=["parse_call", "parse_call-row"])
@pytest.mark.parametrize(("call", "field", "words"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_parse_call_refuses_what_no_file_can_hold_for_custom_sinks_too(call: dict[str, Any], field: str,
                                                                       words: list[str], row: bool) -> None:
    with pytest.raises(cio_sync.InvalidCall) as caught:
        cio_sync.parse_call(call, row=row)
    assert_refused(caught, field, words)


#: Calls sent as JSON text that no file can hold: (id, the text, words of the reason).
HOSTILE_TEXT: list[tuple[str, str | bytes, str]] = [
    # A run of 20 digits sends the text to the reading that keeps such integers exact (the json module), which
    # reads a lone surrogate escape as a lone surrogate.
    ("surrogate-escape-beside-a-long-number",
     '{"type":"identify","userId":"u1","traits":{"pl\\ud800an":"pro","big":12345678901234567890}}', "surrogate"),
    ("a-str-holding-a-lone-surrogate", '{"type":"track","userId":"u1","event":"Ordered\ud800"}', "surrogate"),
    ("one-level-too-deep", '{"type":"track","userId":"u1","event":"E","properties":{"a":'
     + "[" * (LIMIT - 1) + "]" * (LIMIT - 1) + "}}", f"deeper than {LIMIT} levels"),
    ("five-thousand-levels", '{"type":"track","userId":"u1","event":"E","properties":{"a":'
     + "[" * 5000 + "]" * 5000 + "}}", f"deeper than {LIMIT} levels"),
]

TEXT_PATHS = ["advanced-parquet", "advanced-json", "standard", "pipeline"]


@pytest.mark.parametrize(("text", "words"), [h[1:] for h in HOSTILE_TEXT], ids=[h[0] for h in HOSTILE_TEXT])
def test_a_call_sent_as_json_that_no_file_can_hold_is_refused_on_every_path_and_harms_nothing_else(
        tmp_path: Path, text: str, words: str) -> None:
    for path in TEXT_PATHS:
        for payload in (text.encode("utf-8", "surrogatepass"), text):
            root = tmp_path / f"{path}-{type(payload).__name__}"
            root.mkdir()
            sink = PATHS[path](root)
            sink.write(orjson.dumps(good("before")))
            with pytest.raises(cio_sync.InvalidCall, match=words):
                sink.write(payload)
            sink.write(orjson.dumps(good("after")))
            sink.close()
            for ids in landed(root).values():
                assert ids == Counter({"before": 1, "after": 1}), root.name


def test_the_nesting_limit_is_254_levels_on_every_path(tmp_path: Path) -> None:
    at_limit = {**good("deep"), "traits": {"n": "deep", "a": nested(LIMIT - 2)}}  # the call, traits, 252 arrays
    beyond = {**good("deeper"), "traits": {"n": "deeper", "a": nested(LIMIT - 1)}}
    for path, make in PATHS.items():
        for as_json in (False, True):
            root = tmp_path / f"{path}-{as_json}"
            root.mkdir()
            sink = make(root)
            sink.write(orjson.dumps(at_limit) if as_json else at_limit)
            with pytest.raises(cio_sync.InvalidCall, match=f"deeper than {LIMIT} levels"):
                sink.write(json.dumps(beyond) if as_json else beyond)  # orjson itself cannot write it
            sink.close()
            for ids in landed(root).values():
                assert (ids["deep"], ids["deeper"]) == (1, 0), root.name


@pytest.mark.parametrize("path", ["advanced-parquet", "standard", "pipeline"])
def test_write_many_refuses_the_bad_call_by_its_index_and_accepts_the_others(tmp_path: Path, path: str) -> None:
    sink = PATHS[path](tmp_path)
    calls = [good("g0"), {**IDENTIFY, "traits": {"pl\ud800an": 1}}, good("g1"),
             {**TRACK, "properties": {"a": NAN}}, good("g2")]
    with pytest.raises(cio_sync.InvalidCalls) as caught:
        sink.write_many(calls)
    assert [e.index for e in caught.value.errors] == [1, 3]
    assert caught.value.accepted == 3
    sink.close()
    for ids in landed(tmp_path).values():
        assert ids == Counter({"g0": 1, "g1": 1, "g2": 1})


def test_a_batch_payload_refuses_its_bad_calls_by_index_and_keeps_the_others(tmp_path: Path) -> None:
    deep = '{"type":"track","userId":"u1","event":"E","properties":{"a":' + "[" * 300 + "]" * 300 + "}}"
    escaped = '{"type":"identify","userId":"u1","traits":{"\\udfff":1},"n":123456789012345678901234}'
    batch = ('{"sentAt":"2026-01-01T00:00:00Z","batch":[' + ",".join(
        [orjson.dumps(good("g0")).decode(), deep, orjson.dumps(good("g1")).decode(), escaped,
         orjson.dumps(good("g2")).decode()]) + "]}").encode()
    for path in ("advanced-parquet", "standard", "pipeline"):
        root = tmp_path / path
        root.mkdir()
        sink = PATHS[path](root)
        with pytest.raises(cio_sync.InvalidCalls) as caught:
            sink.write_many(batch)
        assert [e.index for e in caught.value.errors] == [1, 3], path
        sink.close()
        for ids in landed(root).values():
            assert ids == Counter({"g0": 1, "g1": 1, "g2": 1}), path


@pytest.mark.parametrize("mode", ["advanced", "standard"])
def test_replay_reports_each_bad_line_by_number_and_replays_the_rest(tmp_path: Path, mode: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    lines = [
        orjson.dumps(good("g0")),
        b'{"type":"identify","userId":"u1","traits":{"pl\\ud800an":"pro","big":12345678901234567890}}',
        orjson.dumps(good("g1")),
        b'{"type":"track","userId":"u1","event":"E","properties":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}",
        b'{"type":"identify","userId":"u1","traits":{"a":"\xed\xa0\x80"}}',  # a surrogate's bytes: not UTF-8
        orjson.dumps(good("g2")),
    ]
    source = tmp_path / "calls.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    assert main(["replay", str(source), "--to", str(out), "--mode", mode, "--state", str(tmp_path / "ws.sqlite")]) == 1
    captured = capsys.readouterr()
    assert "replayed 3 calls" in captured.out
    assert "3 rejected" in captured.out
    for number in (2, 4, 5):
        assert f"line {number}:" in captured.err
    column = "messageId" if mode == "advanced" else "attribute_value"
    assert published_ids(out, column) == Counter({"g0": 1, "g1": 1, "g2": 1})


def test_a_record_value_no_file_can_hold_is_refused_by_index_and_the_others_are_recorded(tmp_path: Path) -> None:
    sink = _standard(tmp_path)
    rows = [
        {"delivery_id": "d0", "headers": {"X-Id": "0"}},
        {"delivery_id": "d1", "headers": {"X-Score": NAN}},
        {"delivery_id": "d2", "headers": '{"X-Id": "2"}'},
        {"delivery_id": "d3", "headers": '{"a":' + "[" * 300 + "]" * 300 + "}"},
        {"delivery_id": "d4", "headers": {"X-\ud800": "4"}},
        {"delivery_id": "d5", "subject": "Hi\ud800"},
        {"delivery_id": nested(10_000)},  # the wrong type, and too deep even to show in full
    ]
    with pytest.raises(cio_sync.InvalidRecords) as caught:
        sink.record_many("delivery_contents", rows)
    assert [(e.index, e.column) for e in caught.value.errors] == [(1, "headers"), (3, "headers"), (4, "headers"),
                                                                 (5, "subject"), (6, "delivery_id")]
    assert "nan" in str(caught.value.errors[0])
    assert f"deeper than {LIMIT - 1} levels" in str(caught.value.errors[1])
    sink.close()
    files = sorted((tmp_path / "standard").glob("delivery_contents_*.parquet"))
    recorded = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert sorted((r["delivery_id"], r["headers"]) for r in recorded) == [("d0", '{"X-Id":"0"}'),
                                                                          ("d2", '{"X-Id": "2"}')]


def test_a_refused_call_kept_as_a_dead_letter_never_stops_a_flush(tmp_path: Path) -> None:
    sink = cio_sync.AdvancedSink(str(tmp_path / "advanced"), flush_interval=None, keep_rejected=True)
    sink.write(good("before"))
    for bad in ({**TRACK, "properties": {("a", "b"): 1}}, {**TRACK, "properties": {"a": nested(5000)}},
                {**TRACK, "properties": {"a": NAN}}):
        with pytest.raises(cio_sync.InvalidCall):
            sink.write(bad)
    sink.write(good("after"))
    sink.flush()
    sink.close()
    assert published_ids(tmp_path / "advanced") == Counter({"before": 1, "after": 1})
    letters = [json.loads(line) for f in (tmp_path / "advanced" / "_cio_sync" / "dead_letters" / "rejected").iterdir()
               for line in f.read_text().splitlines()]
    assert len(letters) == 3
    assert all("reason" in letter and "input" in letter for letter in letters)


def test_a_call_made_without_parse_call_is_checked_before_the_standard_sink_applies_it(tmp_path: Path) -> None:
    with _standard(tmp_path) as sink:
        sink.write(good("g0"))
        data = {**IDENTIFY, "traits": {"pl\ud800an": "pro"}, "receivedAt": datetime.now(UTC)}
        with pytest.raises(cio_sync.InvalidCall, match="trait 'pl\\\\ud800an'"):
            sink.write_call(cio_sync.Call("identify", data, {"receivedAt": data["receivedAt"]}))
        sink.write(good("g1"))
    assert published_ids(tmp_path / "standard", "attribute_value") == Counter({"g0": 1, "g1": 1})


def test_naming_a_person_by_an_id_no_person_can_have_is_an_unknown_person(tmp_path: Path) -> None:
    with _standard(tmp_path) as sink:
        sink.write(good("g0"))
        for act in (sink.delete_person, sink.suppress_person, sink.unsuppress_person, sink.person):
            with pytest.raises(cio_sync.UnknownPerson):
                act("user-\ud800")
            with pytest.raises(cio_sync.UnknownPerson):
                act(cio_id="\udfff")
        sink.write(good("g1"))
    assert published_ids(tmp_path / "standard", "attribute_value") == Counter({"g0": 1, "g1": 1})


# -- after an exit or a crash, and a restart -------------------------------------------------------------------


def _child(function: str, *args: Any) -> Any:
    result = Path(tempfile.mkstemp(suffix=".json")[1])
    try:
        # The PYTHONPATH this test runs under first, so the child imports the same cio_sync as the test.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p])}
        code = "import sys; from tests.validation_scenarios import run_and_exit; run_and_exit(*sys.argv[1:])"
        done = subprocess.run([sys.executable, "-c", code, function, json.dumps(args), str(result)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        text = result.read_text()
        return json.loads(text) if text.strip() else None
    finally:
        result.unlink(missing_ok=True)


SESSIONS = {
    "standard": ["surrogate-name", "nan"],
    "advanced": ["nan", "deep-bytes"],
    "pipeline": ["surrogate-name", "nan", "deep-bytes"],
}


@pytest.mark.parametrize(("ending", "commit_every"), [("exit", 1000), ("crash", 1)])
@pytest.mark.parametrize("mode", list(SESSIONS))
def test_after_a_refused_call_every_accepted_call_is_published_once_across_an_exit_and_a_restart(
        tmp_path: Path, mode: str, ending: str, commit_every: int) -> None:
    paths = {"advanced": str(tmp_path / "advanced"), "standard": str(tmp_path / "standard"),
             "state": str(tmp_path / "ws.sqlite"), "spool": str(tmp_path / "spool")}
    report = _child("session", mode, paths, SESSIONS[mode], ending, commit_every)
    _child("reopen_and_close", mode, paths)
    every = dict(Counter({f"g{i}": 1 for i in range(6)}))
    outcome: dict[str, Any] = {"hostile": report["hostile"], "refused": report["refused"]}
    expected: dict[str, Any] = {"hostile": ["InvalidCall"] * len(SESSIONS[mode]), "refused": []}
    if mode in ("advanced", "pipeline"):
        outcome["advanced"], expected["advanced"] = dict(published_ids(tmp_path / "advanced")), every
    if mode in ("standard", "pipeline"):
        outcome["standard"] = dict(published_ids(tmp_path / "standard", "attribute_value"))
        expected["standard"] = every
    assert outcome == expected


# -- any value at all ------------------------------------------------------------------------------------------


hostile_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(codec=None, categories=None), max_size=6),  # lone surrogates included
    st.lists(st.sampled_from(["a", "é", "\ud800", "\udfff", "null", "[", "{"]), max_size=4).map("".join),
    st.binary(max_size=4), st.sampled_from([object(), frozenset({1})]),
)
names = st.one_of(st.text(st.characters(codec=None, categories=None), max_size=5), st.integers(0, 3),
                  st.sampled_from(["\ud800", "a\udc00", "null"]))


def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.tuples(inner) | st.dictionaries(names, inner, max_size=3)


# Leaves, and arrays nested at the edge of the limit and past it.
hostile_values = st.recursive(hostile_leaves | st.integers(LIMIT - 4, LIMIT + 2).map(nested), containers,
                              max_leaves=10)


def holdable(value: Any, level: int) -> bool:
    """This test's own oracle: whether JSON text can hold ``value`` nested at ``level`` (the call is level 1)."""
    if isinstance(value, str):
        return not any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return level <= LIMIT and all(holdable(v, level + 1) for v in value)
    if isinstance(value, dict):
        return level <= LIMIT and all(holdable(k, level) and holdable(v, level + 1) for k, v in value.items())
    return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["traits", "properties", "context", "version", "custom"]), hostile_values)
def test_any_value_is_refused_exactly_when_json_cannot_hold_it_and_kept_as_sent_otherwise(where: str,
                                                                                         value: Any) -> None:
    call: dict[str, Any] = {"type": "identify", "userId": "u1", "messageId": "m1", "traits": {"plan": "pro"}}
    call[where] = {"v": value} if where in ("traits", "properties", "context") else value
    expected = holdable(call[where], 2)
    if where == "version":  # a string or a number, by the spec's type rule
        number_or_text = isinstance(value, str | int | float) and not isinstance(value, bool)
        expected = expected and (value is None or number_or_text)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for sink in (_advanced(root, "json"), _standard(root, state=False)):
            refused: cio_sync.InvalidCall | None = None
            try:
                sink.write(call)
            except cio_sync.InvalidCall as exc:
                refused = exc
            assert (refused is None) == expected, str(refused)
            str(refused).encode("utf-8")  # a message that can be printed and logged
            sink.close()  # never raises, whatever was refused
        if expected:
            [path] = (root / "advanced").glob("*.json")
            sent = json.loads(json.dumps(call[where]))  # as JSON holds it: tuples as arrays, names as text
            assert orjson.loads(path.read_bytes())[where] == sent
