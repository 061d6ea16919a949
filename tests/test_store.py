"""The SQLite store: migrations, its totals, its bounds, what pruning may drop, two threads."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import OWNER, race, run_python, seed, session_record, store_at
from sqlite_utils import Database

from anisota_agent import Agent
from anisota_agent.migrations import migrations
from anisota_agent.store import (
    DB_FILENAME,
    MIGRATION_SET,
    MIGRATIONS,
    OUTBOX_STATES,
    Owner,
    Store,
    atomic,
    pending_migrations,
)

DID = "did:plc:storetest00000000000000000"
OTHER_DID = "did:plc:storetest11111111111111111"
DAY = "2026-11-24"


def recount(store: Store) -> dict[str, tuple[int, int]]:
    """(sessions, bytes) by outbox, counted from the rows themselves."""
    rows = store.db.execute(
        "SELECT outbox, count(*), sum(length(record)) FROM sessions GROUP BY outbox"
    ).fetchall()
    return {outbox: (count, size) for outbox, count, size in rows}


def totals(store: Store) -> dict[str, tuple[int, int]]:
    """(sessions, bytes) by outbox as the trigger-kept table holds them (empty ones left out)."""
    rows = store.db.execute("SELECT outbox, sessions, bytes FROM outbox_totals").fetchall()
    return {outbox: (count, size) for outbox, count, size in rows if count or size}


def assert_totals_exact(store: Store) -> None:
    """The totals table, outbox_counts() and record_bytes_total() all match a recount."""
    counted = recount(store)
    assert totals(store) == counted
    assert store.outbox_counts() == {
        **dict.fromkeys(OUTBOX_STATES, 0),
        **{outbox: count for outbox, (count, _) in counted.items()},
    }
    assert store.record_bytes_total() == sum(size for _, size in counted.values())
    (mismatched,) = store.db.execute(
        "SELECT count(*) FROM sessions WHERE record_bytes != length(record)"
    ).fetchone()
    assert mismatched == 0


def database(store: Store) -> Database:
    """The store's connection as sqlite-utils sees it (the store itself never does)."""
    return Database(store.db, execute_plugins=False)


def one_record_bytes(store: Store) -> int:
    (size,) = store.db.execute("SELECT max(record_bytes) FROM sessions").fetchone()
    return int(size)


# -- the schema -----------------------------------------------------------------------


def test_migrations_apply_once_and_wal_is_on(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    Store.open(path).close()
    store = Store.open(path)  # a second start applies nothing again
    try:
        applied = [migration.name for migration in migrations.applied(database(store))]
        assert applied == list(MIGRATIONS)
        assert migrations.pending(database(store)) == []
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = set(database(store).table("sessions").columns_dict)
        assert {
            "in_flight",
            "mirrored",
            "record_bytes",
            "awaiting_login",
            "background_ms",
        } <= columns
        assert database(store).table("outbox_totals").exists()
        indexed = {tuple(index.columns) for index in database(store).table("sessions").indexes}
        assert {
            ("outbox", "synced_at"),
            ("outbox", "checkpointed_at"),
            ("outbox", "rkey"),
        } <= indexed
    finally:
        store.close()


def _m002_database(path: Path, rows: list[dict[str, Any]]) -> None:
    """A store file as the m002-era agent left it: its schema, its rows."""
    conn = Store._connect(path)
    database = Database(conn)
    migrations.apply(database, stop_before="m003_bounds")
    database.table("sessions").insert_all(rows)
    conn.close()


def test_several_openers_of_an_old_file_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    _m002_database(path, [])
    opened: list[Store] = []
    failures: list[BaseException] = []

    def open_it() -> None:
        try:
            opened.append(Store.open(path))
        except BaseException as failure:
            failures.append(failure)

    race([threading.Thread(target=open_it) for _ in range(4)])
    for store in opened:
        store.close()
    assert failures == []
    with store_at(tmp_path) as store:
        names = [migration.name for migration in migrations.applied(database(store))]
    assert names == list(MIGRATIONS)


def test_migration_m003_fills_sizes_and_totals_of_an_m002_store(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    rows = []
    for index, outbox in enumerate(["pending"] * 5 + ["synced"] * 3 + ["live", "quarantined"]):
        rkey, record = session_record(DID, index)
        rows.append(
            {
                "rkey": rkey,
                "did": DID,
                "status": record["status"],
                "outbox": outbox,
                "started_at": record["startedAt"],
                "local_day": DAY,
                "record": json.dumps(record, separators=(",", ":")),
                "owner_token": "old",
            }
        )
    _m002_database(path, rows)
    with store_at(tmp_path) as store:
        assert [m.name for m in migrations.applied(database(store))][-1] == MIGRATIONS[-1]
        counts = dict.fromkeys(OUTBOX_STATES, 0) | {"live": 1, "pending": 5, "synced": 3}
        counts["quarantined"] = 1
        assert store.outbox_counts() == counts
        assert store.record_bytes_total() == sum(len(row["record"]) for row in rows)
        assert_totals_exact(store)
        # The triggers work on the migrated rows from then on.
        store.mark_synced(rows[0]["rkey"], "at://x", "cid", at=1.0)
        store.prune(max_bytes=0, max_age_s=1e9, now=2.0)
        assert_totals_exact(store)
        assert store.outbox_counts()["live"] == 1


def test_migration_m004_makes_the_ended_sessions_of_no_account_local(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    rows = []
    cases = [(DID, None), (None, "login:a"), (None, None), (None, None)]
    for index, (did, awaiting) in enumerate(cases):
        rkey, record = session_record(DID, index)
        text = json.dumps(record, separators=(",", ":"))
        rows.append(
            {
                "rkey": rkey,
                "did": did,
                "status": record["status"],
                "outbox": "pending",
                "started_at": record["startedAt"],
                "local_day": DAY,
                "record": text,
                "record_bytes": len(text),
                "awaiting_login": awaiting,
            }
        )
    conn = Store._connect(path)
    database = Database(conn)
    migrations.apply(database, stop_before="m004_local")
    database.table("sessions").insert_all(rows)
    conn.close()
    with store_at(tmp_path) as store:
        outboxes = [store.get(row["rkey"]).outbox for row in rows]  # type: ignore[union-attr]
        assert outboxes == ["pending", "pending", "local", "local"]
        assert (store.outbox_counts()["pending"], store.outbox_counts()["local"]) == (2, 2)
        assert_totals_exact(store)


def test_migration_m006_gives_older_sessions_no_background_time(tmp_path: Path) -> None:
    rkey, record = session_record(DID, 0)
    text = json.dumps(record, separators=(",", ":"))
    conn = Store._connect(tmp_path / DB_FILENAME)
    database = Database(conn)
    migrations.apply(database, stop_before="m006_background")
    row = {"rkey": rkey, "did": DID, "status": "ended", "outbox": "pending"}
    row |= {"started_at": record["startedAt"], "local_day": DAY, "record": text}
    database.table("sessions").insert(row)
    conn.close()
    with store_at(tmp_path) as store:
        stored = store.get(rkey)
        assert stored is not None and stored.background_ms == 0
        assert stored.record == record  # the record is untouched: no field for it there


def test_background_time_is_kept_beside_the_record_and_carried_between_stores(
    tmp_path: Path,
) -> None:
    rkey, record = session_record(DID, 1)
    with store_at(tmp_path) as store:
        assert store.checkpoint(rkey, DID, record, OWNER, DAY, background_ms=1_200)
        assert store.get(rkey).background_ms == 1_200  # type: ignore[union-attr]
        assert store.finalize(rkey, DID, record, OWNER, DAY, background_ms=4_500)
        row = store.get(rkey)
        assert row is not None and row.background_ms == 4_500 and row.record == record
        memory = Store(None)
        memory.absorb(store.rows())
        assert memory.get(rkey).background_ms == 4_500  # type: ignore[union-attr]
        memory.close()


def test_the_store_knows_the_names_the_migrations_module_defines() -> None:
    """store.MIGRATIONS decides "pending" without importing the migrations: no drift."""
    defined = migrations.pending(Database(memory=True, execute_plugins=False))
    assert tuple(migration.name for migration in defined) == MIGRATIONS
    assert migrations.name == MIGRATION_SET


def test_pending_is_read_from_sqlite_utils_own_bookkeeping(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    _m002_database(path, [])
    conn = Store._connect(path)
    try:
        assert pending_migrations(conn) == list(MIGRATIONS[2:])
        assert [m.name for m in migrations.pending(Database(conn, execute_plugins=False))] == list(
            MIGRATIONS[2:]
        )
    finally:
        conn.close()
    with store_at(tmp_path) as store:
        assert pending_migrations(store.db) == []
        # Another set's migrations in the same table are not ours.
        store.db.execute(
            "INSERT INTO _sqlite_migrations(migration_set, name, applied_at)"
            " VALUES ('another_app', 'm004_future', 'x')"
        )
        assert pending_migrations(store.db) == []
        store.db.execute("DELETE FROM _sqlite_migrations WHERE name = 'm002_sync'")
        assert pending_migrations(store.db) == ["m002_sync"]
    assert pending_migrations(Store(None).db) == []  # everything applied at creation
    empty = sqlite3.connect(":memory:")
    assert pending_migrations(empty) == list(MIGRATIONS)  # no bookkeeping table: all pending
    empty.close()


_OPEN_CURRENT_STORE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from anisota_agent.store import Owner, Store
    store = Store.open(Path(sys.argv[1]))
    record = {"status": "active", "startedAt": "2026-11-24T10:00:00.000Z",
              "lastActivityAt": "2026-11-24T10:00:01.000Z"}
    assert store.checkpoint("3lbnewsession2a", None, record, Owner(1, 0.0, "t"), "2026-11-24")
    assert store.verify() is None
    store.close()
    watched = ("sqlite_utils", "click", "dateutil", "pluggy", "anisota_agent.migrations")
    print(sorted(name for name in watched if name in sys.modules))
    """
)


def test_opening_a_current_store_imports_no_sqlite_utils(tmp_path: Path) -> None:
    """A game's first write must not wait ~70 ms for sqlite-utils' imports."""
    path = tmp_path / DB_FILENAME
    with store_at(tmp_path) as store:
        seed(store, DID, 3)
    assert run_python(_OPEN_CURRENT_STORE, str(path)).strip() == "[]"
    # The same in a file that is behind: then the migrations are imported, and applied.
    behind = tmp_path / "behind" / DB_FILENAME
    behind.parent.mkdir()
    _m002_database(behind, [])
    imported = run_python(_OPEN_CURRENT_STORE, str(behind)).strip()
    assert "'anisota_agent.migrations'" in imported and "'sqlite_utils'" in imported
    with store_at(behind.parent) as store:
        assert [m.name for m in migrations.applied(database(store))] == list(MIGRATIONS)


def test_atomic_nests_as_savepoints_and_rolls_back_only_its_block() -> None:
    store = Store(None)
    conn = store.db
    with atomic(conn):
        conn.execute("INSERT INTO counters(name, value) VALUES ('outer', 1)")
        with pytest.raises(ZeroDivisionError), atomic(conn):
            conn.execute("INSERT INTO counters(name, value) VALUES ('inner', 1)")
            raise ZeroDivisionError
        with atomic(conn, immediate=True):  # a savepoint too: already in a transaction
            conn.execute("INSERT INTO counters(name, value) VALUES ('kept', 1)")
        assert conn.in_transaction
    assert not conn.in_transaction
    assert store.counters() == {"outer": 1, "kept": 1}
    with pytest.raises(sqlite3.IntegrityError), atomic(conn):
        conn.execute("INSERT INTO counters(name, value) VALUES ('gone', 1)")
        conn.execute("INSERT INTO counters(name, value) VALUES ('outer', 2)")  # duplicate key
    assert not conn.in_transaction
    assert store.counters() == {"outer": 1, "kept": 1}
    # An error that ended the whole transaction itself is raised as it was (not
    # hidden under "no such savepoint").
    with pytest.raises(ZeroDivisionError), atomic(conn), atomic(conn):
        conn.execute("INSERT INTO counters(name, value) VALUES ('lost', 1)")
        conn.execute("ROLLBACK")  # as a RAISE(ROLLBACK) trigger or a full disk would
        raise ZeroDivisionError
    assert not conn.in_transaction
    assert store.counters() == {"outer": 1, "kept": 1}
    # Outside a block, a statement commits by itself (autocommit).
    conn.execute("INSERT INTO counters(name, value) VALUES ('alone', 1)")
    assert not conn.in_transaction
    store.close()


def test_no_statement_of_a_round_scans_the_sessions(tmp_path: Path) -> None:
    """Every statement the recorder's and the uplink's rounds run is an index range."""
    with store_at(tmp_path) as store:
        rkeys = seed(store, DID, 20)
        store.mark_synced(rkeys[0], "at://x", "cid", at=1.0)
        store.quarantine(rkeys[1], "refused")
        ran: list[str] = []
        store.db.set_trace_callback(ran.append)
        rkey, record = session_record(DID, 30)
        store.checkpoint(rkey, None, record, OWNER, DAY, awaiting_login="t")
        store.related_rkeys(DAY, DID, rkey)
        store.finalize(rkey, None, record, OWNER, DAY, awaiting_login="t")
        store.attribute("t", DID)
        store.prune(one_record_bytes(store) * 10, 3600, now=1e10, max_rows=5)
        store.outbox_counts()
        store.record_bytes_total()
        due = store.due_for_sync(DID, 1e10, limit=3)
        store.count_due(DID, 1e10)
        store.mark_in_flight([row.rkey for row in due])
        store.retry_later([due[0].rkey], "boom", 5.0, in_flight=True)
        store.mark_synced(due[1].rkey, "at://y", "cid", at=2.0)
        store.db.set_trace_callback(None)
        statements = {sql for sql in ran if sql.split()[0] not in _TRANSACTION_WORDS}
        assert len(statements) > 10
        for sql in statements:
            plan = [row[3] for row in store.db.execute(f"EXPLAIN QUERY PLAN {sql}")]
            assert not [step for step in plan if step.startswith("SCAN sessions")], (sql, plan)
            assert not [step for step in plan if "TEMP B-TREE" in step], (sql, plan)


def test_count_due_counts_what_due_for_sync_would_return(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        rkeys = seed(store, DID, 12)
        seed(store, "did:plc:someoneelse", 4)
        store.mark_synced(rkeys[0], "at://x", "cid", at=1.0)
        store.quarantine(rkeys[1], "refused")
        store.retry_later(rkeys[2:5], "boom", 50.0, in_flight=True)
        assert store.count_due(DID, 10.0) == 7 == len(store.due_for_sync(DID, 10.0, limit=100))
        assert store.count_due(DID, 50.0) == 10 == len(store.due_for_sync(DID, 50.0, limit=100))
        assert store.count_due("did:plc:nobody", 50.0) == 0


_TRANSACTION_WORDS = {"BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"}


# -- the totals the triggers keep -------------------------------------------------------


def test_totals_stay_exact_through_every_write(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        rkeys = seed(store, DID, 8)
        assert_totals_exact(store)
        live_rkey, live = session_record(DID, 99)
        owner = Owner(os.getpid(), 0.0, "live-owner")
        assert store.checkpoint(live_rkey, DID, live, owner, DAY)
        live["activitySummary"]["pagesVisited"].append("/a-longer-record-now")
        assert store.checkpoint(live_rkey, DID, live, owner, DAY)  # a bigger record
        assert_totals_exact(store)
        store.mark_synced(rkeys[0], "at://a", "cid", at=1.0)
        store.quarantine(rkeys[1], "refused")
        store.mark_in_flight(rkeys[2:4])
        store.retry_later(rkeys[2:4], "boom", 5.0, in_flight=True)
        assert_totals_exact(store)
        (stale,) = store.live_sessions()
        expired = {**stale.record, "status": "expired", "endReason": "timeout", "extra": "x" * 99}
        assert store.expire(stale, expired, None)
        assert_totals_exact(store)
        moved = store.rows(("pending",))
        with store_at(tmp_path / "other") as other:
            assert other.absorb(moved) == len(moved)
            assert_totals_exact(other)
        store.prune(max_bytes=one_record_bytes(store) * 4, max_age_s=1e9, now=10.0)
        assert_totals_exact(store)
        assert store.purge() > 0
        assert_totals_exact(store)
        assert store.outbox_counts() == dict.fromkeys(OUTBOX_STATES, 0)


@pytest.mark.parametrize("seed_value", range(12))
def test_totals_match_a_recount_after_any_sequence_of_writes(
    tmp_path: Path, seed_value: int
) -> None:
    """A property, over seeded random sequences of every kind of write."""
    rng = random.Random(seed_value)
    owner = Owner(os.getpid(), 0.0, "prop")
    with store_at(tmp_path) as store:
        rkeys: list[str] = []
        for step in range(60):
            action = rng.choice(
                ["checkpoint", "finalize", "sync", "quarantine", "expire", "absorb", "prune"]
            )
            if action in ("checkpoint", "finalize") or not rkeys:
                if rkeys and rng.random() < 0.5:
                    rkey = rng.choice(rkeys)  # a write of a known session (maybe refused)
                else:
                    rkey = session_record(DID, step)[0]
                    rkeys.append(rkey)
                record = session_record(DID, rng.randrange(50))[1]
                record["activitySummary"]["pagesVisited"] = ["/p"] * rng.randrange(10)
                write = store.finalize if action == "finalize" else store.checkpoint
                write(rkey, rng.choice([DID, None]), record, owner, DAY)
            elif action == "sync":
                store.mark_synced(rng.choice(rkeys), "at://x", "cid", at=rng.uniform(0, 100))
            elif action == "quarantine":
                store.quarantine(rng.choice(rkeys), "refused")
            elif action == "expire":
                for stale in store.live_sessions()[:1]:
                    store.expire(stale, {**stale.record, "status": "expired"}, None)
            elif action == "absorb":
                picked = rng.sample(store.rows(), k=min(3, len(store.rows())))
                for row in picked:
                    row["outbox"] = rng.choice(OUTBOX_STATES)
                    record = session_record(DID, rng.randrange(50))[1]
                    record["activitySummary"]["pagesVisited"] = ["/q"] * rng.randrange(30)
                    row["record"] = json.dumps(record)
                    row["checkpointed_at"] = rng.choice([None, 0.0, 1e12])
                store.absorb(picked)
            else:
                store.prune(
                    rng.randrange(20_000),
                    rng.uniform(0, 200),
                    now=100.0,
                    max_rows=rng.randrange(1, 5),
                )
            assert_totals_exact(store)


def test_two_processes_sharing_the_file_keep_the_totals_exact(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os, sys
        sys.path.insert(0, sys.argv[2])
        from pathlib import Path
        from agent_helpers import seed
        from anisota_agent.store import Store
        store = Store.open(Path(sys.argv[1]))
        rkeys = seed(store, "did:plc:second", 40)
        for rkey in rkeys[:10]:
            store.mark_synced(rkey, "at://x", "cid", at=1.0)
        store.prune(max_bytes=10**9, max_age_s=10, now=1e9)
        store.close()
        """
    )
    with store_at(tmp_path) as store:
        seed(store, DID, 30)
        tests_dir = str(Path(__file__).parent)
        run_python(script, str(tmp_path / DB_FILENAME), tests_dir)
        assert store.outbox_counts()["pending"] == 60  # 30 + 30, the 10 synced pruned by age
        assert_totals_exact(store)


# -- pruning ----------------------------------------------------------------------------


def test_prune_drops_synced_first_then_quarantined_then_unsynced(tmp_path: Path) -> None:
    store = Store.open(tmp_path / DB_FILENAME)
    try:
        rkeys = seed(store, DID, 12)
        for rkey in rkeys[:4]:
            store.mark_synced(rkey, f"at://{DID}/x/{rkey}", "cid", at=1_000.0)
        for rkey in rkeys[4:6]:
            store.quarantine(rkey, "refused")
        one = one_record_bytes(store)
        dropped, more = store.prune(max_bytes=one * 5, max_age_s=1e9, now=2_000.0)
        left = {row.rkey: row.outbox for row in store.iter_sessions()}
        assert_totals_exact(store)
    finally:
        store.close()
    # 4 synced and 2 quarantined go first; then the 1 oldest unsynced to fit 5.
    assert dropped == {"pruned_quarantined": 2, "pruned_unsynced": 1}
    assert more is False
    assert list(left) == rkeys[7:]
    assert set(left.values()) == {"pending"}


def test_prune_by_age_keeps_unsynced_sessions(tmp_path: Path) -> None:
    store = Store.open(tmp_path / DB_FILENAME)
    try:
        rkeys = seed(store, DID, 3)
        store.mark_synced(rkeys[0], f"at://{DID}/x/{rkeys[0]}", "cid", at=1_000.0)
        dropped, more = store.prune(max_bytes=10**9, max_age_s=86400, now=1_000.0 + 2 * 86400)
        left = [row.rkey for row in store.iter_sessions()]
    finally:
        store.close()
    assert (dropped, more) == ({}, False)
    assert left == rkeys[1:]


def test_prune_by_age_drops_old_quarantined_sessions_as_losses(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        rkeys = seed(store, DID, 4)
        store.quarantine(rkeys[0], "refused")
        store.quarantine(rkeys[1], "refused")
        (now,) = store.db.execute("SELECT max(checkpointed_at) FROM sessions").fetchone()
        dropped, more = store.prune(max_bytes=10**9, max_age_s=3600, now=now + 7200)
        assert (dropped, more) == ({"pruned_quarantined": 2}, False)
        assert [row.rkey for row in store.iter_sessions()] == rkeys[2:]


def test_prune_never_drops_live_sessions_and_says_when_nothing_more_can_go(
    tmp_path: Path,
) -> None:
    with store_at(tmp_path) as store:
        for index in range(5):
            rkey, record = session_record(DID, index)
            assert store.checkpoint(rkey, DID, record, OWNER, DAY)
        seed(store, DID, 3)
        dropped, more = store.prune(max_bytes=0, max_age_s=0, now=1e12, max_rows=3)
        # The budget ran out exactly as the last prunable session went: only live ones left.
        assert (dropped, more) == ({"pruned_unsynced": 3}, False)
        assert store.outbox_counts()["live"] == 5
        assert store.prune(max_bytes=0, max_age_s=0, now=1e12) == ({}, False)


def test_prune_deletes_at_most_max_rows_per_call_and_continues(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        rkeys = seed(store, DID, 30)
        for rkey in rkeys[:12]:
            store.mark_synced(rkey, "at://x", "cid", at=1.0)
        one = one_record_bytes(store)
        rounds: list[tuple[dict[str, int], bool, int]] = []
        more = True
        while more:
            dropped, more = store.prune(max_bytes=one * 5, max_age_s=1e9, now=2.0, max_rows=7)
            rounds.append((dropped, more, sum(store.outbox_counts().values())))
            assert_totals_exact(store)
        assert rounds == [
            ({}, True, 23),  # 7 synced
            ({"pruned_unsynced": 2}, True, 16),  # 5 synced, then the 2 oldest pending
            ({"pruned_unsynced": 7}, True, 9),
            ({"pruned_unsynced": 4}, False, 5),  # fits: done
        ]
        assert [row.rkey for row in store.iter_sessions()] == rkeys[25:]
        assert store.record_bytes_total() <= one * 5


def test_prune_by_age_is_bounded_by_max_rows_too(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        rkeys = seed(store, DID, 10)
        for rkey in rkeys:
            store.mark_synced(rkey, "at://x", "cid", at=1.0)
        assert store.prune(10**9, max_age_s=10, now=100.0, max_rows=4) == ({}, True)
        assert store.prune(10**9, max_age_s=10, now=100.0, max_rows=4) == ({}, True)
        assert store.prune(10**9, max_age_s=10, now=100.0, max_rows=4) == ({}, False)
        assert store.outbox_counts()["synced"] == 0


def test_the_agent_prunes_on_start_and_counts_the_losses(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        seed(store, DID, 300)
    agent = Agent("1.0", data_dir=tmp_path, max_store_bytes=100_000).start()
    assert agent.flush()
    counters = agent.status().counters
    agent.close()
    assert counters["pruned_unsynced"] > 0
    with sqlite3.connect(tmp_path / DB_FILENAME) as db:
        (total,) = db.execute("SELECT sum(length(record)) FROM sessions").fetchone()
    assert total <= 100_000


# -- accounts ---------------------------------------------------------------------------


def test_a_write_never_forgets_a_known_account(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        rkey, record = session_record(DID, 0)
        assert store.checkpoint(rkey, None, record, OWNER, DAY, awaiting_login="login-1")
        assert store.get(rkey).awaiting_login == "login-1"  # type: ignore[union-attr]
        assert store.attribute("login-1", DID) == 1
        # The recorder's copy still says no account: the store keeps the one it knows.
        assert store.checkpoint(rkey, None, record, OWNER, DAY, awaiting_login="login-1")
        assert store.finalize(rkey, None, record, OWNER, DAY, awaiting_login="login-1")
        row = store.get(rkey)
        assert row is not None
        assert (row.did, row.awaiting_login, row.outbox) == (DID, None, "pending")


def test_attribute_gives_the_login_its_unsynced_sessions_only(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        made = {}
        cases = [
            ("ours-live", None, "t1", False),
            ("ours-pending", None, "t1", True),
            ("ours-synced", None, "t1", True),
            ("other-login", None, "t2", True),
            ("no-login", None, None, True),
            ("has-did", OTHER_DID, "t1", True),
        ]
        for index, (name, did, tag, final) in enumerate(cases):
            rkey, record = session_record(DID, index)
            write = store.finalize if final else store.checkpoint
            assert write(rkey, did, record, OWNER, DAY, awaiting_login=tag)
            made[name] = rkey
        # A session synced while unattributed cannot happen through the sync, but a
        # synced row must never change account whatever put it there.
        store.db.execute(
            "UPDATE sessions SET outbox = 'synced', awaiting_login = 't1' WHERE rkey = ?",
            [made["ours-synced"]],
        )
        assert store.attribute("t1", DID) == 2
        dids = {name: store.get(rkey).did for name, rkey in made.items()}  # type: ignore[union-attr]
        assert dids == {
            "ours-live": DID,
            "ours-pending": DID,
            "ours-synced": None,
            "other-login": None,
            "no-login": None,
            "has-did": OTHER_DID,
        }
        assert store.get(made["ours-pending"]).awaiting_login is None  # type: ignore[union-attr]
        assert store.get(made["other-login"]).awaiting_login == "t2"  # type: ignore[union-attr]
        assert store.attribute("t1", DID) == 0
        outboxes = {name: store.get(rkey).outbox for name, rkey in made.items()}  # type: ignore[union-attr]
        assert (outboxes["other-login"], outboxes["no-login"]) == ("pending", "local")
        # The other login fails: its ended session stays here, never uploaded.
        assert store.attribute("t2", None) == 1
        assert store.get(made["other-login"]).outbox == "local"  # type: ignore[union-attr]


# -- moving sessions between stores ------------------------------------------------------


def test_rows_and_absorb_move_sessions_between_stores(tmp_path: Path) -> None:
    with store_at(tmp_path) as file_store:
        rkeys = seed(file_store, DID, 6)
        file_store.mark_synced(rkeys[0], "at://x", "cid", at=1.0)
        file_store.quarantine(rkeys[1], "refused")
        memory = Store(None)
        unsynced = file_store.rows(("live", "pending", "quarantined"))
        assert [row["rkey"] for row in unsynced] == rkeys[1:]
        assert memory.absorb(unsynced) == 5
        assert [row["rkey"] for row in file_store.rows()] == rkeys
        assert memory.get(rkeys[1]).last_error == "refused"  # type: ignore[union-attr]
        counts = dict.fromkeys(OUTBOX_STATES, 0) | {"pending": 4, "quarantined": 1}
        assert memory.outbox_counts() == counts
        assert memory.absorb([]) == 0
        assert_totals_exact(memory)


def test_absorb_never_replaces_a_synced_session_nor_a_newer_one(tmp_path: Path) -> None:
    with store_at(tmp_path) as target:
        rkeys = seed(target, DID, 4)
        target.mark_synced(rkeys[0], "at://kept", "cid-kept", at=1.0)
        incoming = {row["rkey"]: row for row in target.rows()}
        for row in incoming.values():
            row.update(outbox="pending", last_error="from the copy")
        incoming[rkeys[1]]["checkpointed_at"] += 100  # the copy is newer: it wins
        incoming[rkeys[2]]["checkpointed_at"] -= 100  # the copy is stale: the row here stays
        incoming[rkeys[3]].update(outbox="synced", uri="at://new", checkpointed_at=0.0)
        brand_new_rkey, record = session_record(DID, 50)
        incoming[brand_new_rkey] = {
            **incoming[rkeys[1]],
            "rkey": brand_new_rkey,
            "record": json.dumps(record),
        }
        assert target.absorb(list(incoming.values())) == 3
        rows = {row.rkey: row for row in target.iter_sessions()}
        assert (rows[rkeys[0]].outbox, rows[rkeys[0]].uri) == ("synced", "at://kept")
        assert rows[rkeys[1]].last_error == "from the copy"
        assert rows[rkeys[2]].last_error is None
        assert (rows[rkeys[3]].outbox, rows[rkeys[3]].uri) == ("synced", "at://new")
        assert rows[brand_new_rkey].outbox == "pending"
        assert_totals_exact(target)


def test_absorb_takes_rows_of_an_older_schema(tmp_path: Path) -> None:
    rkey, record = session_record(DID, 1)
    old_row = {
        "rkey": rkey,
        "did": DID,
        "status": "ended",
        "outbox": "pending",
        "started_at": record["startedAt"],
        "record": json.dumps(record),
        "attempts": None,
        "a_column_since_removed": 1,
    }
    with store_at(tmp_path) as store:
        assert store.absorb([old_row]) == 1
        row = store.get(rkey)
        assert row is not None
        assert (row.attempts, row.in_flight, row.mirrored) == (0, False, False)
        assert_totals_exact(store)


# -- two threads, one store ---------------------------------------------------------------


def test_adopt_switches_the_database_under_a_thread_that_keeps_writing(tmp_path: Path) -> None:
    store = Store.open(tmp_path / DB_FILENAME)
    written: list[str] = []
    failures: list[BaseException] = []
    count = 200

    def recorder() -> None:
        try:
            for index in range(count):
                rkey, record = session_record(DID, index)
                assert store.finalize(rkey, DID, record, OWNER, DAY)
                written.append(rkey)
                store.outbox_counts()
                store.related_rkeys(DAY, DID, rkey)
        except BaseException as failure:
            failures.append(failure)

    def switcher() -> None:
        try:
            for index in range(20):
                target = Store(None) if index % 2 == 0 else Store.open(tmp_path / f"{index}.db")
                store.adopt(target, carry=("live", "pending", "quarantined"))
                store.prune(10**9, 1e9, now=0.0)
        except BaseException as failure:
            failures.append(failure)

    race([threading.Thread(target=recorder), threading.Thread(target=switcher)])
    try:
        assert failures == []
        assert store.path == tmp_path / "19.db"
        # Every session written before, during and after the switches is in the last store.
        assert [row["rkey"] for row in store.rows()] == written
        assert len(written) == count
        assert_totals_exact(store)
    finally:
        store.close()


def test_an_adopted_store_is_spent_and_closing_it_leaves_the_adopter_working(
    tmp_path: Path,
) -> None:
    store = Store(None)
    fresh = Store.open(tmp_path / DB_FILENAME)
    store.adopt(fresh)
    fresh.close()
    with pytest.raises(sqlite3.ProgrammingError):
        fresh.outbox_counts()
    seed(store, DID, 2)
    assert store.path == tmp_path / DB_FILENAME
    store.close()
    with store_at(tmp_path) as again:
        assert again.outbox_counts()["pending"] == 2


def test_iter_sessions_pages_through_everything_in_order(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        rkeys = seed(store, DID, 23)
        assert [row.rkey for row in store.iter_sessions(page=5)] == rkeys
        assert [row.rkey for row in store.iter_sessions(page=23)] == rkeys


def test_a_damaged_store_is_moved_aside_and_recording_goes_on(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    with store_at(tmp_path) as store:
        seed(store, DID, 200)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[4096 * 3 : 4096 * 3 + 512] = b"\xff" * 512  # a page in the middle, not the header
    path.write_bytes(bytes(data))
    agent = Agent("1.0", data_dir=tmp_path).start()
    rkey = str(agent.start_session())
    agent.close()
    assert len(list(tmp_path.glob(f"{DB_FILENAME}.corrupt-*"))) == 1
    with store_at(tmp_path) as store:
        row = store.get(rkey)
    assert row is not None and row.outbox == "local"  # recorded on, with no account


def _schema(conn: sqlite3.Connection) -> list[tuple[str, str, str | None]]:
    return conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()


def test_a_new_store_gets_exactly_the_schema_the_migrations_make(tmp_path: Path) -> None:
    """schema.sql (no sqlite-utils import) and the migrations agree, to the letter."""
    from anisota_agent import migrations

    made = Store(tmp_path / "new.sqlite3")
    migrated = sqlite3.connect(":memory:", isolation_level=None)
    migrated.execute("BEGIN IMMEDIATE")
    migrations.apply(migrated)
    migrated.execute("COMMIT")
    try:
        assert _schema(made.db) == _schema(migrated)
        assert not pending_migrations(made.db)
        shipped = (Path(migrations.__file__).with_name("schema.sql")).read_text()
        assert shipped == migrations.schema(), "regenerate anisota_agent/schema.sql"
    finally:
        made.close()
        migrated.close()


def test_related_sessions_are_the_newest_few_of_the_day_oldest_first(tmp_path: Path) -> None:
    """A day of many sessions costs a write no more than the few a record lists."""
    from anisota_agent.records import MAX_RELATED_SESSIONS

    with store_at(tmp_path) as store:
        rkeys = seed(store, DID, MAX_RELATED_SESSIONS + 25)
        related = store.related_rkeys("2026-11-24", DID, exclude=rkeys[-1])
    assert related == rkeys[-1 - MAX_RELATED_SESSIONS : -1]


def test_mark_deleted_takes_the_accounts_pending_and_synced_sessions_for_good(
    tmp_path: Path,
) -> None:
    with store_at(tmp_path) as store:
        pending = seed(store, DID, 2)
        synced = seed(store, DID, 1)
        store.mark_synced(synced[0], "at://x", "cid", at=1.0)
        refused = seed(store, DID, 1)
        store.quarantine(refused[0], "refused")
        live_rkey, live_record = session_record(DID, 9)
        assert store.checkpoint(live_rkey, DID, live_record, OWNER, DAY)
        other = seed(store, OTHER_DID, 1)
        copies = store.rows()  # as a memory store or a salvage holds them

        assert store.mark_deleted(DID) == 3
        outbox = {row["rkey"]: row["outbox"] for row in store.rows()}
        assert {outbox[rkey] for rkey in pending + synced} == {"deleted"}
        assert (outbox[refused[0]], outbox[live_rkey], outbox[other[0]]) == (
            "quarantined",
            "live",
            "pending",
        )
        assert store.due_for_sync(DID, float("inf"), limit=10) == []
        assert store.outbox_counts()["deleted"] == 3
        # A copy taken before cannot queue them again, nor a second mark count them.
        store.absorb(copies)
        assert {row["outbox"] for row in store.rows() if row["rkey"] in pending} == {"deleted"}
        assert store.mark_deleted(DID) == 0
        assert_totals_exact(store)
        # Over its size, the store drops them before anything else.
        dropped, _ = store.prune(max_bytes=1, max_age_s=1e9, now=2.0, max_rows=3)
        assert dropped == {} and store.outbox_counts()["deleted"] == 0
        assert_totals_exact(store)
