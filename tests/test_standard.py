"""StandardSink contract: diffs only, fixed schemas, names and sequences, restarts — over memory, local and S3."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cio_sync
from tests.conftest import Storage

WORKSPACE = 111528
NAME = re.compile(r"^(?P<table>[a-z_]+)_v(?P<version>\d+)_(?P<workspace>\d+)_(?P<sequence>\d+)\.parquet$")

S, I, B, T = pa.string(), pa.int64(), pa.bool_(), pa.timestamp("us", tz="UTC")  # noqa: E741
# The columns and types of shared/SCHEMAS.md ("Version 4"; actions is cio_sync's own table, version 1), in file
# order, written out here independently of the implementation.
L = pa.list_(pa.string())
CONTRACT: dict[str, list[tuple[str, pa.DataType]]] = {
    "people": [("workspace_id", I), ("customer_id", S), ("internal_customer_id", S), ("deleted", B),
               ("suppressed", B), ("created_at", T), ("updated_at", T), ("email_addr", S)],
    "attributes": [("workspace_id", I), ("internal_customer_id", S), ("attribute_name", S), ("attribute_value", S),
                   ("timestamp", T)],
    "campaigns": [("workspace_id", I), ("campaign_id", I), ("name", S), ("created_at", T), ("updated_at", T),
                  ("version", I), ("topic_names", L)],
    "actions": [("workspace_id", I), ("action_id", I), ("campaign_id", I), ("broadcast_id", I),
                ("action_type", S), ("name", S), ("version", I), ("created_at", T), ("updated_at", T)],
    "broadcasts": [("workspace_id", I), ("broadcast_id", I), ("name", S), ("created_at", T), ("updated_at", T),
                   ("topic_names", L)],
    "subjects": [("workspace_id", I), ("subject_name", S), ("internal_customer_id", S), ("campaign_type", S),
                 ("campaign_id", I), ("event_id", S), ("trigger_id", I), ("started_campaign_at", T),
                 ("created_at", T), ("seq_num", I)],
    "outputs": [("workspace_id", I), ("output_id", S), ("subject_name", S), ("output_type", S), ("action_id", I),
                ("explanation", S), ("delivery_id", S), ("draft", B), ("link_tracked", B), ("split_test_index", I),
                ("delay_ends_at", T), ("branch_index", I), ("manual_segment_id", I),
                ("add_to_manual_segment", B), ("created_at", T), ("seq_num", I)],
    "deliveries": [("workspace_id", I), ("delivery_id", S), ("internal_customer_id", S), ("subject_id", S),
                   ("event_id", S), ("delivery_type", S), ("campaign_id", I), ("action_id", I),
                   ("newsletter_id", I), ("content_id", I), ("trigger_id", I), ("created_at", T),
                   ("transactional_message_id", I), ("seq_num", I)],
    "delivery_contents": [("workspace_id", I), ("delivery_id", S), ("campaign_id", I), ("action_id", I),
                          ("newsletter_id", I), ("content_id", I), ("from", S), ("reply_to", S), ("bcc", S),
                          ("recipient", S), ("subject", S), ("body", S), ("body_amp", S), ("body_plain", S),
                          ("preheader", S), ("url", S), ("method", S), ("headers", S), ("type", S)],
    "metrics": [("event_id", S), ("workspace_id", I), ("delivery_id", S), ("metric", S), ("created_at", T),
                ("reason", S), ("link_id", I), ("link_url", S), ("seq_num", I), ("proxied", B), ("prefetched", B),
                ("machine", B), ("user_agent", S), ("email_client", S), ("inbox_domain", S), ("inbox_provider", S),
                ("mx_host", S)],
}
#: The version of each table's files: 4, as Customer.io's exports; actions is cio_sync's own, version 1.
VERSION = {name: "1" if name == "actions" else "4" for name in CONTRACT}


def sink_for(storage: Storage, state: Any = None, **kwargs: Any) -> cio_sync.StandardSink:
    kwargs.setdefault("flush_interval", None)
    return cio_sync.StandardSink(storage.url, workspace_id=WORKSPACE, state=state,
                                 storage_options=storage.storage_options, **kwargs)


def tables(storage: Storage, scratch: Path, *, earlier: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Every row of every Standard file, by table, in sequence order (files read by pyarrow from a local copy);
    with ``earlier``, version-1 files (rows an earlier release left in a state's outbox) may be among them."""
    storage.download(scratch)
    found: dict[str, list[tuple[int, list[dict[str, Any]]]]] = {}
    for name in storage.data_files():
        match = NAME.match(name)
        assert match, name
        assert int(match["workspace"]) == WORKSPACE
        assert match["version"] in (VERSION[match["table"]], "1" if earlier else None), name
        rows = pq.read_table(scratch / name).to_pylist()
        found.setdefault(match["table"], []).append((int(match["sequence"]), rows))
    return {t: [r for _, rows in sorted(files, key=lambda f: f[0]) for r in rows] for t, files in found.items()}


def customer_ids(found: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """Each person's id as sent (``customer_id``) by internal id, from their latest people row: version 4's
    attributes name a person by internal id only."""
    return {r["internal_customer_id"]: r["customer_id"] for r in found.get("people", [])}


def identify_calls(people: int) -> list[dict[str, Any]]:
    """Five identify calls per person; the second and fourth change nothing."""
    calls = []
    for k in range(5):
        for i in range(people):
            uid = f"user-{i}"
            if k in (0, 1):
                traits: dict[str, Any] = {"email": f"p{i}@example.com", "plan": "free", "age": 20 + i % 50}
            elif k in (2, 3):
                traits = {"plan": "pro", "address": {"city": "Lisboa", "zip": "1000"}}
            else:
                traits = {"age": None, "email": f"new{i}@example.com", "plan": "pro",
                          "address": {"zip": "1000", "city": "Lisboa"}}
            calls.append({"type": "identify", "userId": uid, "traits": traits})
    return calls


def expected_changes(calls: list[dict[str, Any]]) -> tuple[list[tuple[str, str, str | None]], list[tuple[str, Any]]]:
    """The attribute and people changes the calls make, computed here without the library."""
    profiles: dict[str, dict[str, str]] = {}
    emails: dict[str, str | None] = {}
    attributes: list[tuple[str, str, str | None]] = []
    people: list[tuple[str, Any]] = []
    for call in calls:
        uid = call["userId"]
        created = uid not in profiles
        profile = profiles.setdefault(uid, {})
        for name, value in call["traits"].items():
            text = None if value is None else value if isinstance(value, str) else orjson.dumps(
                value, option=orjson.OPT_SORT_KEYS).decode()
            if text is None:
                if name in profile:
                    del profile[name]
                    attributes.append((uid, name, None))
            elif profile.get(name) != text:
                profile[name] = text
                attributes.append((uid, name, text))
        email = profile.get("email")
        if created or email != emails.get(uid):
            emails[uid] = email
            people.append((uid, email))
    return attributes, people


def test_identify_calls_emit_exactly_the_changes(storage: Storage, scratch: Path) -> None:
    people = 1000
    calls = identify_calls(people)
    emitted = []
    with sink_for(storage, commit_every=100) as sink:
        emitted = [sink.write(call) for call in calls]
    # The second and fourth call of each person change nothing, and emit nothing.
    assert emitted[people:2 * people] == [0] * people
    assert emitted[3 * people:4 * people] == [0] * people
    got = tables(storage, scratch)
    want_attributes, want_people = expected_changes(calls)
    # Attributes name their person by internal id; people rows give the id it was sent with.
    ids = {(r["customer_id"], r["internal_customer_id"]) for r in got["people"]}
    customer = {cio: uid for uid, cio in ids}
    got_attributes = [(customer[r["internal_customer_id"]], r["attribute_name"], r["attribute_value"])
                      for r in got["attributes"]]
    assert sorted(got_attributes, key=repr) == sorted(want_attributes, key=repr)
    got_people = [(r["customer_id"], r["email_addr"]) for r in got["people"]]
    assert sorted(got_people, key=repr) == sorted(want_people, key=repr)
    # Internal ids are stable per person and unique between people.
    assert len(ids) == people
    assert len({cio for _, cio in ids}) == people
    assert set(got) == {"people", "attributes"}


def test_each_table_has_exactly_the_contract_schema_and_loads_in_duckdb(storage: Storage, scratch: Path) -> None:
    with sink_for(storage) as sink:
        sink.write({"type": "identify", "userId": "42", "traits": {"email": "a@example.com"}})
        sink.record("campaigns", {"campaign_id": 1, "name": "Welcome", "topic_names": ["news"]})
        sink.record("actions", {"action_id": 10, "campaign_id": 1, "action_type": "email", "name": "Hi"})
        sink.record("broadcasts", {"broadcast_id": 3, "name": "News"})
        sink.record("subjects", {"subject_name": "s1", "customer_id": "42", "campaign_id": 1,
                                 "campaign_type": "segment", "started_campaign_at": "2026-11-30T10:00:00Z"})
        sink.record("outputs", {"output_id": "o1", "subject_name": "s1", "output_type": "email", "action_id": 10,
                                "delivery_id": "d1", "draft": False})
        sink.record("deliveries", {"delivery_id": "d1", "customer_id": "42", "delivery_type": "email",
                                   "campaign_id": 1, "action_id": 10, "subject_id": "s1"})
        sink.record("delivery_contents", {"delivery_id": "d1", "type": "email", "subject": "Hi",
                                          "headers": {"X-Campaign": "1"}, "from": "team@example.com"})
        sink.record("metrics", {"event_id": "e1", "delivery_id": "d1", "metric": "opened"})
    storage.download(scratch)
    names = storage.data_files()
    by_table = {NAME.match(n)["table"]: n for n in names}  # type: ignore[index]
    assert set(by_table) == set(CONTRACT)
    con = duckdb.connect()
    for table, name in by_table.items():
        schema = pq.read_schema(scratch / name)
        assert [(f.name, f.type) for f in schema] == CONTRACT[table], table
        assert con.execute(f"SELECT count(*) FROM read_parquet('{scratch / name}')").fetchone() == (1,)
    deliveries = pq.read_table(scratch / by_table["deliveries"]).to_pylist()
    person = pq.read_table(scratch / by_table["people"]).to_pylist()[0]
    assert deliveries[0]["internal_customer_id"] == person["internal_customer_id"]
    assert deliveries[0]["workspace_id"] == WORKSPACE


def test_a_restarted_sink_continues_sequences_and_emits_nothing_it_knows(storage: Storage, tmp_path: Path,
                                                                        scratch: Path) -> None:
    state = tmp_path / "workspace.sqlite"
    calls = identify_calls(20)[:40]
    with sink_for(storage, state=state) as sink:
        for call in calls:
            sink.write(call)
        sink.record("campaigns", {"campaign_id": 7, "name": "Onboarding", "topic_names": ["news"]})
    first = storage.data_files()
    with sink_for(storage, state=state) as sink:
        assert [sink.write(call) for call in calls] == [0] * len(calls)
        assert sink.record("campaigns", {"campaign_id": 7, "name": "Onboarding", "topic_names": ["news"]}) == 0
        assert sink.write({"type": "identify", "userId": "user-1", "traits": {"plan": "enterprise"}}) == 1
        assert sink.record("campaigns", {"campaign_id": 7, "name": "Onboarding", "topic_names": []}) == 1
    after = storage.data_files()
    assert set(first) <= set(after)
    sequences: dict[str, list[int]] = {}
    for name in after:
        match = NAME.match(name)
        assert match
        sequences.setdefault(match["table"], []).append(int(match["sequence"]))
    new = [n for n in after if n not in first]
    for name in new:
        match = NAME.match(name)
        assert match
        assert int(match["sequence"]) == max(sequences[match["table"]])
        assert len(sequences[match["table"]]) == 2
    campaigns = tables(storage, scratch)["campaigns"]
    assert [(r["topic_names"], r["version"]) for r in campaigns] == [(["news"], 1), ([], 2)]


def test_sequences_are_never_reused_after_files_are_deleted(memory_storage: Storage) -> None:
    with sink_for(memory_storage) as sink:
        sink.write({"type": "identify", "userId": "1", "traits": {"a": 1}})
        [first] = [f for f in sink.flush() if f.table == "attributes"]
        memory_storage.fs.rm_file(f"{memory_storage.root}/{first.name}")
        sink.write({"type": "identify", "userId": "1", "traits": {"a": 2}})
        [second] = sink.flush()
    assert first.name != second.name
    seq = [int(NAME.match(f.name)["sequence"]) for f in (first, second)]  # type: ignore[index]
    assert seq[1] > seq[0]


def test_nested_and_non_string_traits_are_json_text_and_null_removes(memory_storage: Storage,
                                                                   scratch: Path) -> None:
    with sink_for(memory_storage) as sink:
        sink.write({"type": "identify", "userId": "1", "traits": {
            "n": 3, "f": 1.5, "b": True, "list": [1, "x"], "obj": {"b": 1, "a": 2}, "s": "text", "gone": None}})
        assert sink.write({"type": "identify", "userId": "1", "traits": {"obj": {"a": 2, "b": 1}}}) == 0
        assert sink.write({"type": "identify", "userId": "1", "traits": {"n": None, "never": None}}) == 1
    rows = {(r["attribute_name"], r["attribute_value"]) for r in tables(memory_storage, scratch)["attributes"]}
    assert rows == {("n", "3"), ("f", "1.5"), ("b", "true"), ("list", '[1,"x"]'), ("obj", '{"a":2,"b":1}'),
                    ("s", "text"), ("n", None)}


def test_anonymous_traits_wait_for_identification_then_merge(memory_storage: Storage, scratch: Path) -> None:
    with sink_for(memory_storage) as sink:
        assert sink.write({"type": "identify", "anonymousId": "anon-1", "traits": {"plan": "trial", "ref": "ad"}}) == 0
        emitted = sink.write({"type": "identify", "userId": "u1", "anonymousId": "anon-1",
                              "traits": {"plan": "pro"}})
        assert emitted == 3  # the person, plan=pro (the call wins), ref=ad (from the anonymous profile)
        assert sink.person("u1")["attributes"] == {"plan": "pro", "ref": "ad"}
        # Later anonymous calls with that id apply to the person.
        assert sink.write({"type": "identify", "anonymousId": "anon-1", "traits": {"color": "red"}}) == 1


def test_alias_merges_an_anonymous_profile_into_the_identified_person(memory_storage: Storage) -> None:
    with sink_for(memory_storage) as sink:
        sink.write({"type": "identify", "anonymousId": "a-9", "traits": {"source": "web"}})
        sink.write({"type": "identify", "userId": "u9", "traits": {"plan": "pro"}})
        assert sink.write({"type": "alias", "userId": "u9", "previousId": "a-9"}) == 1
        assert sink.person("u9")["attributes"] == {"plan": "pro", "source": "web"}


def test_alias_between_two_people_merges_and_deletes_the_secondary(memory_storage: Storage,
                                                                   scratch: Path) -> None:
    with sink_for(memory_storage) as sink:
        sink.write({"type": "identify", "userId": "old", "traits": {"email": "o@x.com", "a": 1}})
        sink.write({"type": "identify", "userId": "new", "traits": {"a": 2}})
        sink.write({"type": "alias", "userId": "new", "previousId": "old"})
        assert sink.person("new")["attributes"] == {"a": "2", "email": "o@x.com"}
        assert sink.person("new")["email"] == "o@x.com"
        with pytest.raises(cio_sync.UnknownPerson):
            sink.person("old")
    people = tables(memory_storage, scratch)["people"]
    [*_, gone] = [r for r in people if r["customer_id"] == "old"]
    assert (gone["deleted"], gone["email_addr"]) == (True, None)


def test_alias_to_a_new_id_renames_the_person(memory_storage: Storage) -> None:
    with sink_for(memory_storage) as sink:
        sink.write({"type": "identify", "userId": "temp-1", "traits": {"a": 1}})
        cio = sink.person("temp-1")["cio_id"]
        assert sink.write({"type": "alias", "userId": "final-1", "previousId": "temp-1"}) == 1
        assert sink.person("final-1")["cio_id"] == cio


def test_events_change_no_person(memory_storage: Storage) -> None:
    with sink_for(memory_storage) as sink:
        assert sink.write({"type": "track", "userId": "ghost", "event": "Clicked"}) == 0
        assert sink.write({"type": "page", "userId": "ghost", "name": "Home"}) == 0
        assert sink.write({"type": "group", "userId": "ghost", "groupId": "acme", "traits": {"x": 1}}) == 0
        with pytest.raises(cio_sync.UnknownPerson):
            sink.person("ghost")
        assert sink.stats.calls_accepted == 3
        assert sink.flush() == []


def test_delete_suppress_and_unsuppress_emit_people_rows(memory_storage: Storage, scratch: Path) -> None:
    with sink_for(memory_storage) as sink:
        sink.write({"type": "identify", "userId": "p", "traits": {"email": "p@x.com"}})
        first = sink.person("p")["cio_id"]
        assert sink.suppress_person("p") == 1
        assert sink.suppress_person("p") == 0  # suppressed already
        with pytest.raises(cio_sync.UnknownPerson):
            sink.person("p")  # the profile is deleted
        # The identifier is blocked: identify and alias calls for it are accepted and ignored, as Customer.io does.
        assert sink.write({"type": "identify", "userId": "p", "traits": {"plan": "pro"}}) == 0
        assert sink.write({"type": "alias", "userId": "p", "previousId": "anon-p"}) == 0
        assert sink.stats.calls_blocked == 2
        with pytest.raises(cio_sync.UnknownPerson):
            sink.person("p")
        assert sink.unsuppress_person("p") == 1
        with pytest.raises(cio_sync.UnknownPerson, match="no suppressed person"):
            sink.unsuppress_person("p")
        # Unsuppressing frees the identifier, and does not bring the profile back: a new person takes it.
        assert sink.write({"type": "identify", "userId": "p", "traits": {"email": "p2@x.com"}}) == 2
        second = sink.person("p")["cio_id"]
        assert second != first
        assert sink.person("p")["attributes"] == {"email": "p2@x.com"}
        assert sink.delete_person("p") == 1
        with pytest.raises(cio_sync.UnknownPerson):
            sink.delete_person("p")
        with pytest.raises(cio_sync.UnknownPerson):
            sink.suppress_person("nobody")
        # A deleted person's id can come back as a new person.
        assert sink.write({"type": "identify", "userId": "p", "traits": {"email": "p@x.com"}}) == 2
        third = sink.person("p")["cio_id"]
        assert len({first, second, third}) == 3
    rows = [(r["customer_id"], r["internal_customer_id"], r["deleted"], r["suppressed"], r["email_addr"])
            for r in tables(memory_storage, scratch)["people"]]
    assert rows == [
        ("p", first, False, False, "p@x.com"),
        ("p", first, True, True, None),  # suppressed: the profile deleted, no email on the row
        ("p", first, True, False, None),  # unsuppressed: the id is free, the profile stays deleted
        ("p", second, False, False, "p2@x.com"),
        ("p", second, True, False, None),  # deleted
        ("p", third, False, False, "p@x.com"),
    ]


def test_a_suppressed_identifier_stays_blocked_across_restarts(memory_storage: Storage, tmp_path: Path) -> None:
    state = tmp_path / "ws.sqlite"
    with sink_for(memory_storage, state=state) as sink:
        sink.write({"type": "identify", "userId": "p", "traits": {"email": "p@x.com"}})
        cio = sink.person("p")["cio_id"]
        sink.suppress_person(cio_id=cio)
    with sink_for(memory_storage, state=state) as again:
        assert again.write({"type": "identify", "userId": "p", "traits": {"email": "p@x.com"}}) == 0
        assert again.stats.calls_blocked == 1
        assert again.unsuppress_person(cio_id=cio) == 1
        assert again.write({"type": "identify", "userId": "p"}) == 1
        assert again.person("p")["cio_id"] != cio


def test_people_rows_order_by_updated_at(memory_storage: Storage, scratch: Path) -> None:
    with sink_for(memory_storage) as sink:
        for i in range(20):
            sink.write({"type": "identify", "userId": "p", "traits": {"email": f"{i}@x.com"}})
    people = tables(memory_storage, scratch)["people"]
    stamps = [r["updated_at"] for r in people]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)
    assert people[-1]["email_addr"] == "19@x.com"


@pytest.mark.parametrize(
    ("table", "row", "column", "words"),
    [
        ("nope", {}, None, "unknown table"),
        ("people", {}, None, "unknown table"),
        ("campaigns", ["x"], None, "dict"),
        ("campaigns", {}, "campaign_id", "required"),
        ("campaigns", {"campaign_id": "5"}, "campaign_id", "integer"),
        ("campaigns", {"campaign_id": True}, "campaign_id", "integer"),
        ("campaigns", {"campaign_id": 1, "version": 3}, "version", "set by the sink"),
        ("campaigns", {"campaign_id": 1, "workspace_id": 3}, "workspace_id", "set by the sink"),
        ("campaigns", {"campaign_id": 1, "colour": "red"}, "colour", "not a column"),
        ("deliveries", {"delivery_id": "d"}, "delivery_type", "required"),
        ("deliveries", {"delivery_id": 5, "delivery_type": "email"}, "delivery_id", "string"),
        ("deliveries", {"delivery_id": "d", "delivery_type": "email", "created_at": "soon"}, "created_at",
         "ISO-8601"),
        ("outputs", {"output_id": "o", "subject_name": "s", "output_type": "email", "draft": "no"}, "draft",
         "true or false"),
        ("metrics", {"event_id": "e", "delivery_id": "d", "metric": "Opened"}, "metric", "lowercase word"),
        ("metrics", {"event_id": "e", "delivery_id": "d", "metric": "was opened"}, "metric", "lowercase word"),
        ("campaigns", {"campaign_id": 1, "topic_names": "news"}, "topic_names", "list of strings"),
        ("campaigns", {"campaign_id": 1, "topic_names": ["news", 3]}, "topic_names", "an item must be a string"),
        ("subjects", {"subject_name": "s", "campaign_id": 1, "customer_id": "nobody"}, "customer_id",
         "names no person"),
        ("metrics", {"event_id": "e", "delivery_id": "d"}, "metric", "required"),
        ("subjects", {"subject_name": "s"}, "campaign_id", "required"),
        ("delivery_contents", {"delivery_id": "d", "headers": "{not json"}, "headers", "JSON"),
    ],
)
def test_bad_records_name_the_table_and_column(memory_storage: Storage, table: str, row: Any, column: str | None,
                                               words: str) -> None:
    with sink_for(memory_storage) as sink:
        with pytest.raises(cio_sync.InvalidRecord) as caught:
            sink.record(table, row)
        assert isinstance(caught.value, ValueError)
        assert caught.value.column == column
        assert words in str(caught.value)
        if column:
            assert column in str(caught.value)
        assert sink.stats.calls_rejected == 1
        assert sink.record("metrics", {"event_id": "e", "delivery_id": "d", "metric": "sent"}) == 1


def test_record_many_keeps_the_good_rows_and_lists_the_bad(memory_storage: Storage) -> None:
    with sink_for(memory_storage) as sink:
        with pytest.raises(cio_sync.InvalidRecords) as caught:
            sink.record_many("metrics", [
                {"event_id": "1", "delivery_id": "d", "metric": "sent"},
                {"event_id": "2", "delivery_id": "d", "metric": "No pe"},
                {"event_id": "3", "delivery_id": "d", "metric": "opened"},
            ])
        assert [e.index for e in caught.value.errors] == [1]
        assert caught.value.emitted == 2
        [written] = sink.flush()
        assert written.rows == 2


def test_seq_num_and_times_default_and_person_ids_are_filled(memory_storage: Storage, scratch: Path) -> None:
    with sink_for(memory_storage) as sink:
        sink.write({"type": "identify", "userId": "42"})
        cio = sink.person("42")["cio_id"]
        sink.record("subjects", {"subject_name": "s1", "internal_customer_id": cio, "campaign_id": 1})
        sink.record("subjects", {"subject_name": "s2", "customer_id": "42", "campaign_id": 1,
                                 "seq_num": 99, "created_at": "2026-01-01T00:00:00+01:00"})
        sink.record("metrics", {"event_id": "e", "delivery_id": "d", "metric": "clicked"})
    got = tables(memory_storage, scratch)
    s1, s2 = got["subjects"]
    assert (s1["internal_customer_id"], s2["internal_customer_id"]) == (cio, cio)
    assert "customer_id" not in s1
    assert s2["seq_num"] == 99
    assert s2["created_at"].isoformat() == "2025-12-31T23:00:00+00:00"
    assert s1["seq_num"] < got["metrics"][0]["seq_num"]
    assert s1["created_at"] is not None


def test_state_belongs_to_one_workspace_and_one_sink(memory_storage: Storage, tmp_path: Path) -> None:
    state = tmp_path / "ws.sqlite"
    sink = sink_for(memory_storage, state=state)
    with pytest.raises(cio_sync.StateError, match="in use"):
        sink_for(memory_storage, state=state)
    sink.close()
    with pytest.raises(cio_sync.StateError, match="workspace"):
        cio_sync.StandardSink(memory_storage.url, workspace_id=1, state=state)


def forget(sink: cio_sync.StandardSink) -> None:
    """Make ``sink`` vanish as if its process had died: no final flush at exit, its state lock released."""
    from cio_sync.publish.publisher import _OPEN

    _OPEN.discard(sink._publisher)
    sink.state.close()


def test_a_crash_after_upload_before_cleanup_does_not_publish_twice(local_storage: Storage, tmp_path: Path) -> None:
    state = tmp_path / "ws.sqlite"
    sink = sink_for(local_storage, state=state)
    sink.write({"type": "identify", "userId": "1", "traits": {"a": 1}})

    def crash(batch: Any) -> None:
        raise KeyboardInterrupt("killed after the upload, before the outbox was cleared")

    sink._publisher.store.published = crash  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        sink.flush()
    uploaded = local_storage.data_files()
    assert len(uploaded) == 2  # both files (and their manifest) landed; the process died before the cleanup
    forget(sink)

    before = {name: local_storage.read(name) for name in uploaded}
    with sink_for(local_storage, state=state) as again:
        assert again.write({"type": "identify", "userId": "1", "traits": {"a": 1}}) == 0
    # The recovered batches were recognised as published, not written again.
    assert local_storage.data_files() == uploaded
    assert {name: local_storage.read(name) for name in uploaded} == before


def test_a_crash_before_commit_loses_the_change_and_its_rows_together(memory_storage: Storage,
                                                                      tmp_path: Path, scratch: Path) -> None:
    state = tmp_path / "ws.sqlite"
    sink = sink_for(memory_storage, state=state, commit_every=1000)
    sink.write({"type": "identify", "userId": "1", "traits": {"a": 1}})
    sink.state._db.close()  # the process dies before the commit
    forget(sink)
    with sink_for(memory_storage, state=state) as again:
        assert again.write({"type": "identify", "userId": "1", "traits": {"a": 1}}) == 2
    assert len(tables(memory_storage, scratch)["attributes"]) == 1


def lifecycle(sink: cio_sync.StandardSink) -> tuple[list[int], dict[str, Any]]:
    """Renames, merges, deletions, re-identification and anonymous profiles, one after another; what each call
    emitted and how the workspace ends up."""
    emitted = [
        sink.write({"type": "identify", "userId": "a", "traits": {"email": "a@x.com", "n": 1}}),
        sink.write({"type": "identify", "userId": "b", "traits": {"n": 2, "gone": "soon"}}),
        sink.write({"type": "identify", "anonymousId": "anon", "traits": {"ref": "ad"}}),
        sink.write({"type": "alias", "userId": "a2", "previousId": "a"}),  # a is now known as a2
        sink.write({"type": "identify", "userId": "a", "traits": {"n": 3}}),  # a new person called a
        sink.write({"type": "identify", "userId": "b", "anonymousId": "anon", "traits": {"gone": None}}),
        sink.write({"type": "alias", "userId": "b", "previousId": "a"}),  # merges the new a into b
        sink.delete_person("a2"),
        sink.write({"type": "identify", "userId": "a2", "traits": {"email": "again@x.com"}}),
        sink.suppress_person("b"),
        sink.write({"type": "identify", "userId": "b", "traits": {"n": 9}}),
        sink.unsuppress_person("b"),
    ]
    people: dict[str, dict[str, Any] | None] = {}
    for uid in ("a", "a2", "b"):
        try:
            person = sink.person(uid)
        except cio_sync.UnknownPerson:
            people[uid] = None
        else:
            people[uid] = {k: v for k, v in person.items() if k != "cio_id"}
    return emitted, people


def test_many_steps_between_commits_see_each_others_changes(memory_storage: Storage, tmp_path: Path) -> None:
    with sink_for(memory_storage, state=tmp_path / "one.sqlite") as sink:
        expected = lifecycle(sink)
    with sink_for(memory_storage, state=tmp_path / "many.sqlite", commit_every=1000) as sink:
        assert lifecycle(sink) == expected
    with sink_for(memory_storage, state=tmp_path / "small.sqlite", commit_every=1000) as sink:
        sink.state._cache_size = 1  # people fall out of the in-memory view between steps
        assert lifecycle(sink) == expected
    assert expected[1]["a"] is None
    assert expected[1]["a2"] is not None


def fail_in_the_middle(sink: cio_sync.StandardSink) -> None:
    """Make the next call fail after it changed the person's attributes, before its step ends."""
    def fail(*args: Any) -> Any:
        del sink._sync_email
        raise RuntimeError("failed in the middle of a step")

    sink._sync_email = fail  # type: ignore[method-assign,assignment]


@pytest.mark.parametrize(("commit_every", "cache_size"), [(1, None), (1000, None), (1000, 1)])
def test_a_step_failing_midway_leaves_neither_state_nor_rows(memory_storage: Storage, tmp_path: Path,
                                                             scratch: Path, commit_every: int,
                                                             cache_size: int | None) -> None:
    state = tmp_path / "ws.sqlite"
    with sink_for(memory_storage, state=state, commit_every=commit_every) as sink:
        if cache_size is not None:
            sink.state._cache_size = cache_size
        assert sink.write({"type": "identify", "userId": "1", "traits": {"a": 1}}) == 2
        fail_in_the_middle(sink)
        with pytest.raises(RuntimeError):
            sink.write({"type": "identify", "userId": "1", "traits": {"a": 2, "b": 1}})
        fail_in_the_middle(sink)
        with pytest.raises(RuntimeError):
            sink.write({"type": "identify", "userId": "2", "traits": {"a": 2}})
        assert sink.person("1")["attributes"] == {"a": "1"}
        with pytest.raises(cio_sync.UnknownPerson):
            sink.person("2")
        assert sink.write({"type": "identify", "userId": "1", "traits": {"c": 3}}) == 1
    with sink_for(memory_storage, state=state) as again:
        assert again.person("1")["attributes"] == {"a": "1", "c": "3"}
        with pytest.raises(cio_sync.UnknownPerson):
            again.person("2")
    found = tables(memory_storage, scratch)
    assert [(r["attribute_name"], r["attribute_value"]) for r in found["attributes"]] == [("a", "1"), ("c", "3")]
    assert [r["customer_id"] for r in found["people"]] == ["1"]



STATE_FORMAT_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE people (cio_id TEXT PRIMARY KEY, id TEXT, email TEXT, deleted INTEGER NOT NULL DEFAULT 0,
    suppressed INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
CREATE UNIQUE INDEX people_by_id ON people (id) WHERE deleted = 0;
CREATE TABLE attributes (cio_id TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (cio_id, name))
    WITHOUT ROWID;
CREATE TABLE anonymous (anonymous_id TEXT PRIMARY KEY, cio_id TEXT, traits TEXT);
CREATE TABLE definitions (kind TEXT NOT NULL, id INTEGER NOT NULL, digest TEXT NOT NULL, version INTEGER NOT NULL,
    created_at INTEGER NOT NULL, PRIMARY KEY (kind, id)) WITHOUT ROWID;
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, row BLOB NOT NULL,
    size INTEGER NOT NULL, at INTEGER, batch INTEGER);
CREATE INDEX outbox_by_batch ON outbox (batch, tbl);
CREATE TABLE batches (id INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, rows INTEGER NOT NULL, name TEXT,
    data BLOB, nbytes INTEGER NOT NULL DEFAULT 0, first_at INTEGER, last_at INTEGER);
"""


# Format 2: the outbox packs many rows into one entry; attributes are still one row per attribute.
STATE_FORMAT_2 = STATE_FORMAT_1.replace("at INTEGER, batch INTEGER);",
                                        "at INTEGER, batch INTEGER, rows INTEGER, last_at INTEGER);")


@pytest.mark.parametrize("fmt", [1, 2])
def test_a_state_of_an_earlier_format_is_upgraded_and_its_rows_published(memory_storage: Storage, tmp_path: Path,
                                                                         scratch: Path, fmt: int) -> None:
    import sqlite3

    state = tmp_path / "ws.sqlite"
    db = sqlite3.connect(state)
    db.executescript(STATE_FORMAT_1 if fmt == 1 else STATE_FORMAT_2)
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("format", str(fmt)), ("workspace_id", str(WORKSPACE)),
                                                      ("schema_version", "1"), ("seq_num", "0")])
    db.execute("INSERT INTO people VALUES ('c1', 'u1', 'a@x.com', 0, 0, 1000, 1000)")
    db.execute("INSERT INTO people VALUES ('c2', 'u2', NULL, 0, 0, 1000, 1000)")
    db.executemany("INSERT INTO attributes VALUES (?, ?, ?)", [
        ("c1", "plan", "pro"), ("c1", "email", "a@x.com"), ("c1", "tags", '["a","b"]'), ("c2", "plan", "free")])
    if fmt == 1:
        db.execute("INSERT INTO outbox (tbl, row, size, at) VALUES ('attributes', ?, 40, 1000)",
                   (orjson.dumps([WORKSPACE, "c1", "u1", "plan", "pro", 1000]),))
    else:
        db.execute("INSERT INTO outbox (tbl, row, size, at, last_at, rows) VALUES ('attributes', ?, 40, 1000, 1000, 1)",
                   (orjson.dumps([[WORKSPACE, "c1", "u1", "plan", "pro", 1000]]),))
    db.commit()
    db.close()
    with sink_for(memory_storage, state=state, commit_every=1000) as sink:
        assert sink.person("u1")["attributes"] == {"plan": "pro", "email": "a@x.com", "tags": '["a","b"]'}
        assert sink.person("u2")["attributes"] == {"plan": "free"}
        assert sink.write({"type": "identify", "userId": "u1", "traits": {"plan": "max", "n": 1,
                                                                          "tags": ["a", "b"]}}) == 2
        assert sink.write({"type": "identify", "userId": "u2", "traits": {"plan": "free"}}) == 0
    found = tables(memory_storage, scratch, earlier=True)["attributes"]
    assert [(r["attribute_name"], r["attribute_value"]) for r in found] == [("plan", "pro"), ("plan", "max"),
                                                                            ("n", "1")]
    # The row the earlier release left in the outbox is published as it was written, in a version-1 file whose
    # sequence is below the version-4 file's.
    assert [("external_customer_id" in r, "version") for r in found] == [(True, "version"), (False, "version"),
                                                                       (False, "version")]
    names = sorted(memory_storage.data_files(), key=lambda n: int(NAME.match(n)["sequence"]))  # type: ignore[index]
    assert [NAME.match(n)["version"] for n in names] == ["1", "4"]  # type: ignore[index]
    with sink_for(memory_storage, state=state) as again:  # the upgraded state opens as it is
        assert again.person("u1")["attributes"] == {"plan": "max", "email": "a@x.com", "tags": '["a","b"]',
                                                    "n": "1"}


def test_a_state_of_a_later_format_is_refused(memory_storage: Storage, tmp_path: Path) -> None:
    import sqlite3

    state = tmp_path / "ws.sqlite"
    sink_for(memory_storage, state=state).close()
    db = sqlite3.connect(state)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'format'")
    db.commit()
    db.close()
    with pytest.raises(cio_sync.StateError, match="format 99"):
        sink_for(memory_storage, state=state)


@pytest.mark.parametrize("cache_size", [1, 7])
def test_people_falling_out_of_the_cache_give_the_same_files(memory_storage: Storage, tmp_path: Path,
                                                            scratch: Path, cache_size: int) -> None:
    calls = identify_calls(50)
    calls.insert(120, {"type": "alias", "userId": "user-3", "previousId": "user-4"})  # a merge between people

    def written(commit_every: int, cache: int | None) -> tuple[list[Any], list[Any], list[Any]]:
        label = f"{commit_every}-{cache}"
        storage = Storage(memory_storage.kind, f"{memory_storage.url}/{label}", memory_storage.storage_options)
        with sink_for(storage, state=tmp_path / f"{label}.sqlite", commit_every=commit_every) as sink:
            if cache is not None:
                sink.state._cache_size = cache  # people are evicted and reloaded, also between commits
            for call in calls:
                sink.write(call)
            views = [sink.person(f"user-{i}")["attributes"] for i in (0, 3, 49)]
        found = tables(storage, scratch / label)
        ids = customer_ids(found)
        return ([(ids[r["internal_customer_id"]], r["attribute_name"], r["attribute_value"])
                 for r in found["attributes"]],
                [(r["customer_id"], r["email_addr"], r["deleted"]) for r in found["people"]], views)

    expected = written(1, None)
    assert written(1000, cache_size) == expected
    assert written(1, cache_size) == expected


def _identify_2_fails_after(sink: cio_sync.StandardSink, then: Callable[[], object]) -> None:
    """Person 1 is created; identifying person 2 buffers its rows, runs ``then`` and fails; person 1 changes again."""
    assert sink.write({"type": "identify", "userId": "1", "traits": {"a": 1}}) == 2
    publisher = sink._publisher
    append_rows = publisher.append_rows

    def buffer_then_fail(rows: Any) -> set[str]:
        append_rows(rows)
        then()
        raise RuntimeError("failed after the step's rows were buffered")

    publisher.append_rows = buffer_then_fail  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        sink.write({"type": "identify", "userId": "2", "traits": {"a": 2}})
    publisher.append_rows = append_rows  # type: ignore[method-assign]
    assert sink.write({"type": "identify", "userId": "1", "traits": {"b": 1}}) == 1


def test_a_step_failing_after_its_rows_filled_a_batch_leaves_neither_state_nor_rows(
        memory_storage: Storage, tmp_path: Path, scratch: Path) -> None:
    with sink_for(memory_storage, state=tmp_path / "ws.sqlite", commit_every=1000, max_rows=2) as sink:
        # The step's rows fill both tables' batches, then the step fails.
        _identify_2_fails_after(sink, lambda: None)
        with pytest.raises(cio_sync.UnknownPerson):
            sink.person("2")
    found = tables(memory_storage, scratch)
    assert customer_ids(found) == {r["internal_customer_id"]: "1" for rows in found.values() for r in rows}
    assert sorted((r["attribute_name"], r["attribute_value"]) for r in found["attributes"]) == [("a", "1"),
                                                                                                ("b", "1")]


@pytest.mark.parametrize("commit_every", [1, 1000])
def test_a_step_failing_after_its_rows_reached_the_state_leaves_no_rows(memory_storage: Storage, tmp_path: Path,
                                                                       scratch: Path, commit_every: int) -> None:
    with sink_for(memory_storage, state=tmp_path / "ws.sqlite", commit_every=commit_every) as sink:
        # The step's rows reach SQLite (under the step's savepoint), then the step fails.
        _identify_2_fails_after(sink, sink.state._apply_staged)
    found = tables(memory_storage, scratch)
    assert customer_ids(found) == {r["internal_customer_id"]: "1" for rows in found.values() for r in rows}
    assert [(r["attribute_name"], r["attribute_value"]) for r in found["attributes"]] == [("a", "1"), ("b", "1")]


def test_a_trait_that_cannot_be_json_is_refused_by_name_and_changes_nothing(memory_storage: Storage) -> None:
    with sink_for(memory_storage) as sink:
        with pytest.raises(cio_sync.InvalidCall, match="trait 'big'"):
            sink.write({"type": "identify", "userId": "1", "traits": {"plan": "pro", "big": 2**70}})
        with pytest.raises(cio_sync.UnknownPerson):
            sink.person("1")


@pytest.mark.parametrize("commit_every", [1, 1000])
def test_rows_committed_before_a_crash_are_published_after_the_restart(memory_storage: Storage, tmp_path: Path,
                                                                      scratch: Path, commit_every: int) -> None:
    # Enough rows that a commit's outbox entry is large (stored compressed) with commit_every=1000.
    calls = identify_calls(200)
    state = tmp_path / "ws.sqlite"
    sink = sink_for(memory_storage, state=state, commit_every=commit_every)
    for call in calls[:600]:
        sink.write(call)
    sink.commit()
    forget(sink)  # the process dies: the rows are only in the state's outbox
    with sink_for(memory_storage, state=state, commit_every=commit_every) as again:
        for call in calls[600:]:
            again.write(call)
    found = tables(memory_storage, scratch)
    want_attributes, want_people = expected_changes(calls)
    ids = customer_ids(found)
    got = [(ids[r["internal_customer_id"]], r["attribute_name"], r["attribute_value"]) for r in found["attributes"]]
    assert sorted(got, key=repr) == sorted(want_attributes, key=repr)
    assert len(found["people"]) == len(want_people)
