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
