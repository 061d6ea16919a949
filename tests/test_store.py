"""The SQLite store: migrations, its bounds, and what pruning may drop."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from agent_helpers import seed, store_at

from anisota_agent import Agent
from anisota_agent.store import DB_FILENAME, Store, migrations

DID = "did:plc:storetest00000000000000000"


def test_migrations_apply_once_and_wal_is_on(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    Store.open(path).close()
    store = Store.open(path)  # a second start applies nothing again
    try:
        applied = [migration.name for migration in migrations.applied(store.db)]
        assert applied == ["m001_sessions", "m002_sync"]
        assert migrations.pending(store.db) == []
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert {"in_flight", "mirrored"} <= set(store.db.table("sessions").columns_dict)
    finally:
        store.close()


def test_prune_drops_synced_first_then_quarantined_then_unsynced(tmp_path: Path) -> None:
    store = Store.open(tmp_path / DB_FILENAME)
    try:
        rkeys = seed(store, DID, 12)
        for rkey in rkeys[:4]:
            store.mark_synced(rkey, f"at://{DID}/x/{rkey}", "cid", at=1_000.0)
        for rkey in rkeys[4:6]:
            store.quarantine(rkey, "refused")
        (one,) = store.db.execute("SELECT max(length(record)) FROM sessions").fetchone()
        dropped = store.prune(max_bytes=one * 5, max_age_s=1e9, now=2_000.0)
        left = {row.rkey: row.outbox for row in store.iter_sessions()}
    finally:
        store.close()
    # 4 synced and 2 quarantined go first; then the 1 oldest unsynced to fit 5.
    assert dropped == {"pruned_quarantined": 2, "pruned_unsynced": 1}
    assert list(left) == rkeys[7:]
    assert set(left.values()) == {"pending"}


def test_prune_by_age_keeps_unsynced_sessions(tmp_path: Path) -> None:
    store = Store.open(tmp_path / DB_FILENAME)
    try:
        rkeys = seed(store, DID, 3)
        store.mark_synced(rkeys[0], f"at://{DID}/x/{rkeys[0]}", "cid", at=1_000.0)
        dropped = store.prune(max_bytes=10**9, max_age_s=86400, now=1_000.0 + 2 * 86400)
        left = [row.rkey for row in store.iter_sessions()]
    finally:
        store.close()
    assert dropped == {}
    assert left == rkeys[1:]


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
    assert row is not None and row.outbox == "pending"
