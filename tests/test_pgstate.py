"""The Standard sink's workspace state in PostgreSQL (``state="postgresql://..."``), against a real server: the
Standard behaviour tests run again on it, plus what only it has (schemas, fencing, a server that dies)."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import cio_sync
from tests import servers
from tests import test_standard as standard
from tests.conftest import Storage

WORKSPACE = standard.WORKSPACE


@pytest.fixture(autouse=True)
def pg(postgres_server: servers.PostgresServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """The server's URL; and the Standard tests' ``sink_for`` opens PostgreSQL states: a state file's path names
    one schema (the same path, the same schema, as a file would be reopened), ``None`` (memory) a new one."""
    opened = standard.sink_for
    test = uuid.uuid4().hex[:8]

    def sink_for(storage: Storage, state: Any = None, **kwargs: Any) -> cio_sync.StandardSink:
        name = uuid.uuid4().hex[:12] if state is None else hashlib.sha1(str(state).encode()).hexdigest()[:12]
        return opened(storage, state=postgres_server.dsn, state_schema=f"t{test}_{name}", **kwargs)

    monkeypatch.setattr(standard, "sink_for", sink_for)
    return postgres_server.dsn


# -- the Standard behaviour, on PostgreSQL ---------------------------------------------------------------------


def test_identify_calls_emit_exactly_the_changes(memory_storage: Storage, scratch: Path) -> None:
    standard.test_identify_calls_emit_exactly_the_changes(memory_storage, scratch)


def test_a_restarted_sink_continues_and_emits_nothing_it_knows(memory_storage: Storage, tmp_path: Path,
                                                                scratch: Path) -> None:
    standard.test_a_restarted_sink_continues_sequences_and_emits_nothing_it_knows(memory_storage, tmp_path, scratch)


def test_nested_traits_and_null_removes(memory_storage: Storage, scratch: Path) -> None:
    standard.test_nested_and_non_string_traits_are_json_text_and_null_removes(memory_storage, scratch)


def test_anonymous_traits_then_merge(memory_storage: Storage, scratch: Path) -> None:
    standard.test_anonymous_traits_wait_for_identification_then_merge(memory_storage, scratch)


def test_alias_merges_and_renames(memory_storage: Storage, scratch: Path) -> None:
    standard.test_alias_merges_an_anonymous_profile_into_the_identified_person(memory_storage)
    standard.test_alias_between_two_people_merges_and_deletes_the_secondary(memory_storage, scratch)
    standard.test_alias_to_a_new_id_renames_the_person(memory_storage)


def test_delete_suppress_unsuppress_and_blocked_across_restarts(memory_storage: Storage, scratch: Path,
                                                                tmp_path: Path) -> None:
    standard.test_delete_suppress_and_unsuppress_emit_people_rows(memory_storage, scratch)
    standard.test_a_suppressed_identifier_stays_blocked_across_restarts(memory_storage, tmp_path)


def test_many_steps_between_commits_see_each_others_changes(memory_storage: Storage,
                                                            tmp_path: Path) -> None:
    standard.test_many_steps_between_commits_see_each_others_changes(memory_storage, tmp_path)


@pytest.mark.parametrize(("commit_every", "cache_size"), [(1, None), (1000, 1)])
def test_a_step_failing_midway_leaves_neither_state_nor_rows(memory_storage: Storage, tmp_path: Path,
                                                             scratch: Path, commit_every: int,
                                                             cache_size: int | None) -> None:
    standard.test_a_step_failing_midway_leaves_neither_state_nor_rows(memory_storage, tmp_path, scratch,
                                                                      commit_every, cache_size)


def test_a_step_failing_after_its_rows_reached_the_state_leaves_no_rows(memory_storage: Storage,
                                                                       tmp_path: Path, scratch: Path) -> None:
    standard.test_a_step_failing_after_its_rows_reached_the_state_leaves_no_rows(memory_storage, tmp_path,
                                                                                 scratch, 1000)


def test_a_crash_after_upload_before_cleanup_does_not_publish_twice(local_storage: Storage,
                                                                    tmp_path: Path) -> None:
    standard.test_a_crash_after_upload_before_cleanup_does_not_publish_twice(local_storage, tmp_path)


def test_a_crash_before_commit_loses_the_change_and_its_rows_together(memory_storage: Storage,
                                                                      tmp_path: Path, scratch: Path) -> None:
    standard.test_a_crash_before_commit_loses_the_change_and_its_rows_together(memory_storage, tmp_path, scratch)


@pytest.mark.parametrize("commit_every", [1, 1000])
def test_rows_committed_before_a_crash_are_published_after_the_restart(memory_storage: Storage,
                                                                      tmp_path: Path, scratch: Path,
                                                                      commit_every: int) -> None:
    standard.test_rows_committed_before_a_crash_are_published_after_the_restart(memory_storage, tmp_path, scratch,
                                                                               commit_every)


def test_people_falling_out_of_the_cache_give_the_same_files(memory_storage: Storage, tmp_path: Path,
                                                            scratch: Path) -> None:
    standard.test_people_falling_out_of_the_cache_give_the_same_files(memory_storage, tmp_path, scratch, 1)


def test_a_retried_message_id_is_applied_once_across_a_restart(memory_storage: Storage,
                                                               scratch: Path) -> None:
    call = {"type": "identify", "userId": "u", "traits": {"plan": "pro"}, "messageId": "m-1"}
    with standard.sink_for(memory_storage, state="ws", dedupe_window=3600) as sink:
        assert sink.write(call) == 2
        assert sink.write({"type": "identify", "userId": "u", "traits": {"plan": "max"}, "messageId": "m-2"}) == 1
        assert sink.write(call) == 0  # the retry does not undo the later change
        assert sink.stats.calls_duplicate == 1
    with standard.sink_for(memory_storage, state="ws", dedupe_window=3600) as again:
        assert again.write(call) == 0
        assert again.person("u")["attributes"] == {"plan": "max"}
    values = [r["attribute_value"] for r in standard.tables(memory_storage, scratch)["attributes"]]
    assert values == ["pro", "max"]


# -- what only a PostgreSQL state has ----------------------------------------------------------------------------


def _sink(storage: Storage, url: str, **kwargs: Any) -> cio_sync.StandardSink:
    kwargs.setdefault("flush_interval", None)
    kwargs.setdefault("workspace_id", WORKSPACE)
    return cio_sync.StandardSink(storage.url, state=url, storage_options=storage.storage_options, **kwargs)


def _people(url: str, schema: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute(sql.SQL("SELECT id FROM {}.people WHERE deleted = 0").format(
            sql.Identifier(schema)))}


def test_two_states_in_two_schemas_of_one_database_do_not_interfere(pg: str, memory_storage: Storage,
                                                                    scratch: Path) -> None:
    one = Storage(memory_storage.kind, f"{memory_storage.url}/one", memory_storage.storage_options)
    two = Storage(memory_storage.kind, f"{memory_storage.url}/two", memory_storage.storage_options)
    schema = f"s{uuid.uuid4().hex[:8]}"
    # Both open transactions at once (nothing committed for 1000 calls), on people with the same ids: if one
    # state's rows or locks were the other's, the second would wait for the first (the test would hang) or see
    # its people.
    a = _sink(one, f"{pg}?schema={schema}_a", commit_every=1000)
    b = _sink(two, pg, state_schema=f'{schema} "b"; DROP SCHEMA public; --', commit_every=1000)
    for i in range(50):
        assert a.write({"type": "identify", "userId": f"p{i}", "traits": {"side": "a"}}) == 2
        assert b.write({"type": "identify", "userId": f"p{i}", "traits": {"side": "b", "n": i}}) == 3
    assert b.write({"type": "identify", "userId": "only-b", "traits": {}}) == 1
    a.close()
    b.close()
    assert _people(pg, f"{schema}_a") == {f"p{i}" for i in range(50)}
    assert _people(pg, f'{schema} "b"; DROP SCHEMA public; --') == {f"p{i}" for i in range(50)} | {"only-b"}
    found_a, found_b = standard.tables(one, scratch / "a"), standard.tables(two, scratch / "b")
    assert {r["attribute_value"] for r in found_a["attributes"]} == {"a"}
    assert len(found_b["attributes"]) == 100
    # The default schema is per workspace; a schema of another workspace is refused by name.
    with _sink(one, pg, workspace_id=5) as other:
        assert other.state.schema == "cio_sync_5"  # type: ignore[attr-defined]
    with pytest.raises(cio_sync.StateError, match=f"belongs to workspace {WORKSPACE}, not 5"):
        _sink(one, f"{pg}?schema={schema}_a", workspace_id=5)


def test_a_higher_epoch_fences_the_first_owner(pg: str, memory_storage: Storage, scratch: Path) -> None:
    url = f"{pg}?schema=f{uuid.uuid4().hex[:8]}"
    first = _sink(memory_storage, url, commit_every=1000)
    first.state.take_ownership(1)
    first.write({"type": "identify", "userId": "kept", "traits": {"a": 1}})
    first.state.set_position(10)
    first.commit()
    first.write({"type": "identify", "userId": "lost", "traits": {"a": 2}})
    first.state.set_position(11)

    with pytest.raises(cio_sync.Fenced, match="owned by epoch 1, not 0"):
        _sink(memory_storage, url, state_epoch=0)  # lower than the stored one: refused as it opens
    second = _sink(memory_storage, url, commit_every=1, state_epoch=2)  # owner before it publishes anything
    assert second.state.position == 10
    with pytest.raises(cio_sync.Fenced, match="owned by epoch 2, not 1"):
        first.commit()
    with pytest.raises(cio_sync.Fenced):  # and it stays fenced: it writes nothing more
        first.write({"type": "identify", "userId": "later", "traits": {"a": 3}})
    with pytest.raises(cio_sync.Fenced):
        first.flush()
    with pytest.raises(cio_sync.Fenced):
        first.close()  # it lets the state go all the same, and publishes nothing
    assert first.closed
    # Nothing of the failed commit is visible to the new owner, in the state or in files.
    assert second.state.position == 10
    with pytest.raises(cio_sync.UnknownPerson):
        second.person("lost")
    assert second.person("kept")["attributes"] == {"a": "1"}
    assert second.write({"type": "identify", "userId": "kept", "traits": {"a": 5}}) == 1
    second.state.set_position(12)
    second.close()
    customers = {r["customer_id"] for r in standard.tables(memory_storage, scratch)["people"]}
    assert customers == {"kept"}
    with _sink(memory_storage, url) as third:
        assert third.state.position == 12
        assert third.person("kept")["attributes"] == {"a": "5"}


@pytest.mark.parametrize("commit_every", [1, 1000])
def test_a_session_ended_by_the_server_loses_nothing_accepted(pg: str, memory_storage: Storage, scratch: Path,
                                                              commit_every: int) -> None:
    schema = f"e{uuid.uuid4().hex[:8]}"
    sink = _sink(memory_storage, f"{pg}?schema={schema}", commit_every=commit_every)
    for i in range(10):
        assert sink.write({"type": "identify", "userId": f"u{i}", "traits": {"n": i}}) == 2
    sink.state._apply_staged()  # the calls since the last commit are in an open transaction of the server's
    with psycopg.connect(pg, autocommit=True) as admin:  # which the server ends (as a failover or a DBA would)
        ended = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                              (f"cio_sync {schema}",)).fetchall()
    assert ended == [(True,)]
    if commit_every == 1:  # no transaction was open: the next call just connects again
        assert sink.write({"type": "identify", "userId": "next", "traits": {"n": 0}}) == 2
    else:  # the call that finds the transaction gone is refused; those before it are not lost
        with pytest.raises(cio_sync.StorageError, match=r"127\.0\.0\.1:\d+/postgres \(schema e"):
            sink.write({"type": "identify", "userId": "next", "traits": {"n": 0}})
    for i in range(10, 20):  # the sink goes on, on a new connection, with the open transaction written again
        assert sink.write({"type": "identify", "userId": f"u{i}", "traits": {"n": i}}) == 2
    sink.close()
    found = standard.tables(memory_storage, scratch)
    want = [f"u{i}" for i in range(20)] + (["next"] if commit_every == 1 else [])
    assert sorted(r["customer_id"] for r in found["people"]) == sorted(want)
    assert len(found["attributes"]) == len(want)


def test_a_bad_url_or_schema_is_refused_by_name(pg: str, memory_storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(cio_sync.ConfigError, match="not a PostgreSQL URL"):
        _sink(memory_storage, "postgresql://u:sekret@127.0.0.1:notaport/db")
    with pytest.raises(cio_sync.ConfigError, match="state schema"):
        _sink(memory_storage, pg, state_schema="x" * 64)
    with pytest.raises(cio_sync.ConfigError, match="name it once"):
        _sink(memory_storage, f"{pg}?schema=a", state_schema="b")
    with pytest.raises(cio_sync.ConfigError, match="PostgreSQL"):
        _sink(memory_storage, str(tmp_path / "ws.sqlite"), state_schema="b")
    port = servers.free_port()
    with pytest.raises(cio_sync.StorageError) as refused:
        _sink(memory_storage, f"postgresql://postgres:sekret@127.0.0.1:{port}/somedb")
    assert f"127.0.0.1:{port}/somedb" in str(refused.value)
    assert "sekret" not in str(refused.value)


@pytest.mark.parametrize("commit_every", [1, 4])
def test_the_server_killed_mid_run_then_restarted(memory_storage: Storage, scratch: Path,
                                                  commit_every: int) -> None:
    try:
        server_cm = servers.postgres()
        server = server_cm.__enter__()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        sink = _sink(memory_storage, f"{server.dsn}?schema=k", commit_every=commit_every, max_rows=7)
        accepted: list[str] = []
        errors: list[str] = []

        def refused(error: cio_sync.StorageError) -> None:
            """Note a refusal; the calls it says were undone (accepted since the last commit) are sent again."""
            errors.append(str(error))
            undone = re.search(r"the (\d+) call\(s\) or record\(s\) accepted since its last commit", str(error))
            if undone:
                resend.extend(accepted[-int(undone[1]):])
                del accepted[-int(undone[1]):]

        def send(user: str) -> None:
            try:
                sink.write({"type": "identify", "userId": user, "traits": {"n": user}})
            except cio_sync.StorageError as exc:
                refused(exc)
            else:
                accepted.append(user)

        resend: list[str] = []
        for i in range(41):
            send(f"u{i}")
        server.kill()
        for i in range(41, 46):
            send(f"u{i}")
        assert len(errors) == 5  # every call while the server is down is refused, none accepted
        where = server.dsn.split("@", 1)[1]  # host:port/db
        assert all(where in error for error in errors), errors[0]
        with pytest.raises(cio_sync.StorageError) as failed:
            sink.flush()
        refused(failed.value)
        # At most the calls since the last commit are undone (none with commit_every=1; none either when they were
        # only staged in memory yet: they are committed once the server is back).
        assert len(resend) <= 41 % commit_every
        server.restart()
        for user in resend:
            send(user)
        for i in range(46, 90):
            send(f"u{i}")
        assert len(errors) == 6  # the sink went on as soon as the server was back
        sink.close()
        found = standard.tables(memory_storage, scratch)
        people = [r["customer_id"] for r in found["people"]]
        assert sorted(people) == sorted(accepted)  # every accepted call in exactly one file, once
        assert len(found["attributes"]) == len(accepted)
        assert len(accepted) == 90 - 5
    finally:
        server_cm.__exit__(None, None, None)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_ownership_and_position_on_both_backends(pg: str, memory_storage: Storage, tmp_path: Path,
                                                 backend: str) -> None:
    url = str(tmp_path / "ws.sqlite") if backend == "sqlite" else f"{pg}?schema=o{uuid.uuid4().hex[:8]}"
    with _sink(memory_storage, url) as sink:
        assert (sink.state.position, sink.state.epoch) == (0, None)
        sink.state.take_ownership(3)
        sink.write({"type": "identify", "userId": "u", "traits": {"a": 1}})
        with pytest.raises(cio_sync.StateError, match="take ownership before"):
            sink.state.set_position(1) or sink.state.take_ownership(4)
        sink.commit()
        assert sink.state.position == 1
        with pytest.raises(cio_sync.ConfigError):
            sink.state.set_position(-1)
    with _sink(memory_storage, url) as again:
        assert again.state.position == 1
        with pytest.raises(cio_sync.Fenced, match="owned by epoch 3, not 2"):
            again.state.take_ownership(2)
        again.state.take_ownership(3)  # the same owner, after a restart
        again.state.set_position(7)
    with _sink(memory_storage, url) as third:
        assert third.state.position == 7


def test_a_schema_whose_state_was_lost_or_that_holds_other_tables_is_refused(pg: str,
                                                                             memory_storage: Storage) -> None:
    schema = f"l{uuid.uuid4().hex[:8]}"
    with _sink(memory_storage, f"{pg}?schema={schema}") as sink:
        sink.write({"type": "identify", "userId": "u", "traits": {"a": 1}})
    with psycopg.connect(pg, autocommit=True) as admin:
        admin.execute(sql.SQL("DELETE FROM {}.meta").format(sql.Identifier(schema)))
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(f"{schema}_other")))
        admin.execute(sql.SQL("CREATE TABLE {}.orders (id int)").format(sql.Identifier(f"{schema}_other")))
    with pytest.raises(cio_sync.StateError, match="tables but no metadata"):
        _sink(memory_storage, f"{pg}?schema={schema}")
    with _sink(memory_storage, f"{pg}?schema={schema}", new_workspace=True) as fresh, \
            pytest.raises(cio_sync.UnknownPerson):
        fresh.person("u")  # a new workspace: nothing of the old tables is left
    with pytest.raises(cio_sync.StateError, match="holds tables but no cio_sync state"):
        _sink(memory_storage, f"{pg}?schema={schema}_other")
