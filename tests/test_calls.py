"""Call intake: what is accepted, and a clear InvalidCall naming the field for each class of bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cio_sync
import cio_sync.intake.calls
from cio_sync.intake.calls import call_document, call_row, parse_call
from cio_sync.schemas.tables import CALL_COLUMNS

OK: dict[str, dict[str, Any]] = {
    "identify": {"type": "identify", "userId": "42", "traits": {"plan": "pro"}},
    "track": {"type": "track", "anonymousId": "a1", "event": "Order Completed", "properties": {"revenue": 9.5}},
    "page": {"type": "page", "userId": "42", "name": "Home", "category": "Marketing"},
    "screen": {"type": "screen", "userId": "42", "name": "Feed"},
    "group": {"type": "group", "userId": "42", "groupId": "acme", "traits": {"employees": 12}},
    "alias": {"type": "alias", "userId": "42", "previousId": "anon-1"},
}


@pytest.mark.parametrize("call_type", list(OK))
def test_valid_calls_of_every_type_are_accepted(call_type: str) -> None:
    call = parse_call(OK[call_type])
    assert call.type == call_type
    assert call.message_id
    assert call.received_at.tzinfo is not None


@pytest.mark.parametrize("as_", ["dict", "str", "bytes", "bytearray"])
def test_a_call_may_be_a_dict_json_text_or_json_bytes(as_: str) -> None:
    call = OK["track"]
    given_call: Any = {
        "dict": call,
        "str": orjson.dumps(call).decode(),
        "bytes": orjson.dumps(call),
        "bytearray": bytearray(orjson.dumps(call)),
    }[as_]
    assert parse_call(given_call).data["event"] == "Order Completed"


def test_the_callers_dict_is_not_modified() -> None:
    call = dict(OK["identify"])
    parse_call(call)
    assert call == OK["identify"]


def test_a_message_id_sent_by_the_caller_is_kept_and_a_missing_one_is_set() -> None:
    assert parse_call({**OK["track"], "messageId": "m-1"}).message_id == "m-1"
    first, second = parse_call(OK["track"]).message_id, parse_call(OK["track"]).message_id
    assert first != second


def test_received_at_is_the_time_of_acceptance() -> None:
    before = datetime.now(UTC)
    call = parse_call({**OK["track"], "receivedAt": "1999-01-01T00:00:00Z"})
    assert before <= call.received_at <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-01T12:00:00Z", datetime(2026, 3, 1, 12, tzinfo=UTC)),
        ("2026-03-01T12:00:00.123+02:00", datetime(2026, 3, 1, 10, 0, 0, 123000, tzinfo=UTC)),
        ("2026-03-01T12:00:00-0500", datetime(2026, 3, 1, 17, tzinfo=UTC)),
        ("2026-03-01T12:00:00", datetime(2026, 3, 1, 12, tzinfo=UTC)),
        ("2026-03-01", datetime(2026, 3, 1, tzinfo=UTC)),
    ],
)
def test_timestamps_in_any_offset_are_stored_as_utc(text: str, expected: datetime) -> None:
    call = parse_call({**OK["track"], "timestamp": text, "originalTimestamp": text, "sentAt": text})
    assert call.times["timestamp"] == call.times["originalTimestamp"] == call.times["sentAt"] == expected


def test_datetime_objects_are_accepted_from_python_callers() -> None:
    moment = datetime(2026, 3, 1, 12, tzinfo=timezone(timedelta(hours=1)))
    call = parse_call({**OK["track"], "timestamp": moment})
    assert call.times["timestamp"] == datetime(2026, 3, 1, 11, tzinfo=UTC)


BAD: list[tuple[Any, str | None, str]] = [
    # (call, field named, words in the reason)
    ([1, 2], None, "dict"),
    (42, None, "dict"),
    (b"{nope", None, "not valid JSON"),
    ("[1, 2]", None, "JSON object"),
    ("", None, "not valid JSON"),
    ({"userId": "1"}, "type", "required"),
    ({"type": 3, "userId": "1"}, "type", "string"),
    ({"type": "purchase", "userId": "1"}, "type", "one of"),
    ({"type": "Track", "userId": "1", "event": "E"}, "type", "one of"),
    ({"type": "identify"}, "userId", "userId or anonymousId"),
    ({"type": "identify", "userId": ""}, "userId", "userId or anonymousId"),
    ({"type": "identify", "userId": None, "anonymousId": None}, "userId", "userId or anonymousId"),
    ({"type": "identify", "userId": 42}, "userId", "string"),
    ({"type": "identify", "anonymousId": ["a"]}, "anonymousId", "string"),
    ({"type": "identify", "userId": "1", "messageId": 7}, "messageId", "string"),
    ({"type": "identify", "userId": "1", "messageId": ""}, "messageId", "empty"),
    ({"type": "alias", "userId": "1"}, "previousId", "required"),
    ({"type": "alias", "previousId": "a"}, "userId", "required"),
    ({"type": "alias", "userId": "1", "previousId": 5}, "previousId", "string"),
    ({"type": "track", "userId": "1"}, "event", "required"),
    ({"type": "track", "userId": "1", "event": ""}, "event", "required"),
    ({"type": "track", "userId": "1", "event": {"name": "x"}}, "event", "string"),
    ({"type": "group", "userId": "1"}, "groupId", "required"),
    ({"type": "group", "userId": "1", "groupId": 12}, "groupId", "string"),
    ({"type": "page", "userId": "1", "name": 5}, "name", "string"),
    ({"type": "identify", "userId": "1", "traits": "plan=pro"}, "traits", "object"),
    ({"type": "identify", "userId": "1", "traits": ["a"]}, "traits", "object"),
    ({"type": "track", "userId": "1", "event": "E", "properties": 1}, "properties", "object"),
    ({"type": "track", "userId": "1", "event": "E", "context": "ctx"}, "context", "object"),
    ({"type": "track", "userId": "1", "event": "E", "integrations": [True]}, "integrations", "object"),
    ({"type": "page", "userId": "1", "traits": 3}, "traits", "object"),
    ({"type": "track", "userId": "1", "event": "E", "timestamp": "yesterday"}, "timestamp", "ISO-8601"),
    ({"type": "track", "userId": "1", "event": "E", "timestamp": 1700000000}, "timestamp", "ISO-8601"),
    ({"type": "track", "userId": "1", "event": "E", "sentAt": "2026-13-01T00:00:00Z"}, "sentAt", "ISO-8601"),
    ({"type": "track", "userId": "1", "event": "E", "originalTimestamp": True}, "originalTimestamp", "ISO-8601"),
    ({"type": "track", "userId": "1", "event": "E", "version": {"v": 1}}, "version", "string or a number"),
    ({"type": "track", "userId": "1", "event": "E", "channel": False}, "channel", "string or a number"),
]


@pytest.mark.parametrize(("call", "field", "words"), BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_each_class_of_bad_input_raises_invalid_call_naming_the_field(
    call: Any, field: str | None, words: str
) -> None:
    with pytest.raises(cio_sync.InvalidCall) as caught:
        parse_call(call)
    assert caught.value.field == field
    assert words in str(caught.value)
    if field is not None:
        assert field in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("row", [False, True])
def test_values_json_cannot_hold_are_refused_by_parse_call(row: bool) -> None:
    from decimal import Decimal

    with pytest.raises(cio_sync.InvalidCall, match="trait 'price'") as caught:
        parse_call({"type": "identify", "userId": "1", "traits": {"price": Decimal("1.5")}}, row=row)
    assert caught.value.field == "traits"


def test_a_call_made_without_parse_call_is_still_checked_when_its_row_or_document_is_built() -> None:
    from decimal import Decimal

    now = datetime.now(UTC)
    data = {"type": "identify", "userId": "1", "traits": {"price": Decimal("1.5")}, "messageId": "m", "receivedAt": now}
    call = cio_sync.Call("identify", data, {"receivedAt": now})
    with pytest.raises(cio_sync.InvalidCall, match="traits"):
        call_row(call)
    with pytest.raises(cio_sync.InvalidCall, match="traits"):
        call_document(call)


@pytest.mark.parametrize("row", [False, True])
def test_integers_beyond_64_bits_are_rejected_not_truncated(row: bool) -> None:
    with pytest.raises(cio_sync.InvalidCall, match="traits"):
        parse_call({"type": "identify", "userId": "1", "traits": {"big": 2**70}}, row=row)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
call_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["identify", "track", "page", "screen", "group", "alias", "x"]) | json_values,
        "userId": st.text(max_size=5) | json_values,
        "anonymousId": st.text(max_size=5),
        "previousId": st.text(max_size=5),
        "groupId": st.text(max_size=5),
        "event": st.text(max_size=5) | json_values,
        "traits": json_values,
        "properties": json_values,
        "timestamp": st.text(max_size=30) | st.datetimes().map(lambda d: d.isoformat()),
        "extra": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(call_like, json_values, st.binary(max_size=64), st.text(max_size=64)))
def test_any_input_is_either_accepted_or_rejected_with_invalid_call(payload: Any) -> None:
    for candidate in (payload, orjson.dumps(payload) if not isinstance(payload, bytes) else payload):
        try:
            call = parse_call(candidate)
        except cio_sync.InvalidCall:
            continue
        row, size = call_row(call)
        assert size >= 0
        assert len(row) == len(CALL_COLUMNS[call.type])
        assert orjson.loads(call_document(call))["type"] == call.type


offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
moments = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=offsets)
spellings = st.sampled_from([
    lambda d: d.isoformat(),
    lambda d: d.isoformat(timespec="milliseconds"),
    lambda d: d.isoformat(sep=" ", timespec="seconds"),
    lambda d: d.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z",
    lambda d: d.replace(tzinfo=None).isoformat(),  # no offset: taken as UTC
    lambda d: d.strftime("%Y-%m-%dT%H:%M:%S%z"),  # offset without a colon
    lambda d: d.date().isoformat(),
])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(moments, spellings), min_size=1, max_size=6))
def test_timestamps_converted_by_column_equal_the_call_by_call_reading(cases: list[Any]) -> None:
    """Timestamps are checked when the call is written and converted a column at a time when the batch is encoded
    (Arrow's reader, Python's where Arrow's does not read the text): both must give the instant parse_time gives."""
    texts = [spell(moment) for moment, spell in cases]
    calls = [{"type": "track", "userId": "u", "event": "e", "timestamp": text} for text in texts]
    rows = [cio_sync.intake.calls.call_to_row(call, 0)[1] for call in calls]
    column = [row[CALL_SCHEMAS_NAMES["track"].index("timestamp")] for row in rows]
    got = cio_sync.intake.calls.time_array(column).to_pylist()
    assert got == [parse_call(call).times["timestamp"] for call in calls]


CALL_SCHEMAS_NAMES = {t: [name for name, _ in cols] for t, cols in CALL_COLUMNS.items()}


def test_the_row_of_a_call_holds_its_values_and_leaves_the_callers_dict_alone() -> None:
    call = {"type": "track", "userId": "u1", "event": "Ordered", "properties": {"total": 9.5, "sku": ["a", "é"]},
            "timestamp": "2026-11-30T10:00:00+01:00", "version": 2, "writeKey": "k", "messageId": "m1"}
    before = orjson.dumps(call)
    call_type, row, size = cio_sync.intake.calls.call_to_row(call, 1_000)
    assert orjson.dumps(call) == before
    cells = dict(zip(CALL_SCHEMAS_NAMES[call_type], row, strict=True))
    assert (cells["messageId"], cells["userId"], cells["event"]) == ("m1", "u1", "Ordered")
    assert orjson.loads(cells["properties"]) == call["properties"]
    assert cells["version"] == "2"
    assert orjson.loads(cells["extra"]) == {"writeKey": "k"}
    assert cells["receivedAt"] == 1_000
    assert size >= len(cells["properties"])
    at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=1_000)
    assert parse_call(call, received_at=at, row=True).row == row  # the same row by either path


def _slow_row(payload: bytes) -> tuple[str, tuple[Any, ...]] | None:
    try:
        call_type, row, _ = cio_sync.intake.calls.call_to_row(orjson.loads(payload), 7)
    except (cio_sync.InvalidCall, orjson.JSONDecodeError):
        return None
    return call_type, row


def _without_generated_id(call_type: str, row: tuple[Any, ...], sent: Any) -> tuple[Any, ...]:
    return row[1:] if isinstance(sent, dict) and sent.get("messageId") is None else row


@settings(max_examples=400, deadline=None)
@given(call_like | st.builds(lambda c, m: {**c, "_metadata": m}, call_like, json_values))
def test_calls_sent_as_json_give_the_rows_their_dicts_give(payload: Any) -> None:
    """JSON bytes are read without building the nested objects; whatever that reading accepts, the reading of the
    same call as a dict accepts with the same row, and what the dict reading refuses is refused for bytes too."""
    data = orjson.dumps(payload)
    expected = _slow_row(data)
    try:
        call_type, row, _ = cio_sync.intake.calls.call_to_row(data, 7)
    except cio_sync.InvalidCall:
        assert expected is None
        return
    assert expected is not None
    assert call_type == expected[0]
    assert _without_generated_id(call_type, row, payload) == _without_generated_id(call_type, expected[1], payload)


def test_nested_objects_sent_as_json_are_kept_as_sent() -> None:
    text = '{"type": "identify", "userId": "42", "traits": {"name": "Zo\\u00eb", "plan": "pro"}, "_metadata": {"a": 1}}'
    _, row, _ = cio_sync.intake.calls.call_to_row(text.encode(), 7)
    cells = dict(zip(CALL_SCHEMAS_NAMES["identify"], row, strict=True))
    assert cells["traits"] == '{"name": "Zo\\u00eb", "plan": "pro"}'
    assert orjson.loads(cells["traits"]) == {"name": "Zoë", "plan": "pro"}
    assert orjson.loads(cells["extra"]) == {"_metadata": {"a": 1}}


def test_integers_beyond_64_bits_inside_nested_json_are_kept_digit_for_digit() -> None:
    sent = b'{"type":"track","userId":"1","event":"e","properties":{"id":123456789012345678901234567890}}'
    _, row, _ = cio_sync.intake.calls.call_to_row(sent, 7)
    assert '{"id":123456789012345678901234567890}' in row


@pytest.mark.parametrize("payload", [
    b'{"type":"identify","userId":"1","traits":{"n":-9223372036854775809}}',
    b'{"type":"identify","userId":"1","version":-9223372036854775809}',
    b'{"type":"identify","userId":"1","anonymousId":"12345678901234567890","traits":{"s":1e999}}',
    b'{"type":"identify","userId":"1","traits":{"s":-1e400}}',
])
def test_numbers_a_dict_cannot_hold_exactly_are_refused_by_the_full_reading_never_altered(payload: bytes) -> None:
    with pytest.raises(cio_sync.InvalidCall):
        parse_call(payload, row=True)
