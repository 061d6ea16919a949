"""Helpers shared by the agent tests: reading what an agent stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anisota_agent.lexicon import validate_record
from anisota_agent.store import DB_FILENAME, Store, StoredSession


def stored(data_dir: Path, rkey: str) -> StoredSession:
    """The session row an agent wrote to ``data_dir``; fails the test if absent."""
    store = Store.open(data_dir / DB_FILENAME)
    try:
        row = store.get(rkey)
    finally:
        store.close()
    assert row is not None, f"session {rkey} is not in the store"
    return row


def stored_record(data_dir: Path, rkey: str) -> dict[str, Any]:
    """The record of a stored session, checked against the lexicon."""
    record = stored(data_dir, rkey).record
    validate_record(record)
    return record


def all_sessions(data_dir: Path) -> list[StoredSession]:
    """Every session in the store at ``data_dir``."""
    store = Store.open(data_dir / DB_FILENAME)
    try:
        return list(store.iter_sessions())
    finally:
        store.close()


def seed_pending(
    data_dir: Path | None, did: str, count: int, store: Store | None = None
) -> list[str]:
    """``count`` finished sessions of ``did``, queued for sync as a game would leave them."""
    import os

    from anisota_agent.clock import TidGenerator
    from anisota_agent.records import SessionContext, SessionState, build_record
    from anisota_agent.store import Owner

    own = store is None
    if store is None:
        assert data_dir is not None
        store = Store.open(data_dir / DB_FILENAME)
    tids = TidGenerator()
    owner = Owner(os.getpid(), 0.0, "seed")
    rkeys = []
    try:
        for i in range(count):
            state = SessionState(
                rkey=tids.next(),
                client_version="seed",
                platform="desktop",
                context=SessionContext(entry_point="direct"),
                started_wall_ms=1_795_514_400_000 + i * 1000,
                started_mono_ns=0,
                did=did,
            )
            state.pages = {f"/page{i % 7}": None}
            state.finish("ended", "logout", 600_000_000)
            record = build_record(state, 600_000_000)
            store.finalize(state.rkey, did, record, owner, "2026-11-24")
            rkeys.append(state.rkey)
    finally:
        if own:
            store.close()
    return rkeys
