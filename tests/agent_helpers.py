"""Helpers shared by the tests: what an agent stored, sessions to sync, fixed auth."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from anisota_agent.checks import MAX_URI_LEN
from anisota_agent.clock import TidGenerator
from anisota_agent.lexicon import validate_record
from anisota_agent.records import (
    MAX_FEATURE_LEN,
    MAX_FEATURES,
    MAX_LINKED_URIS,
    MAX_PAGES,
    MAX_ROUTE_LEN,
    SessionContext,
    SessionState,
    build_record,
)
from anisota_agent.store import DB_FILENAME, Owner, Store, StoredSession

#: The owner of sessions a test queues directly in a store (no agent records them).
OWNER = Owner(os.getpid(), 0.0, "test")
_TIDS = TidGenerator()


@contextmanager
def store_at(data_dir: Path) -> Iterator[Store]:
    """The store an agent keeps in ``data_dir``, opened for the test and closed after."""
    store = Store.open(data_dir / DB_FILENAME)
    try:
        yield store
    finally:
        store.close()


def stored(data_dir: Path, rkey: str) -> StoredSession:
    """The session row an agent wrote to ``data_dir``; fails the test if absent."""
    with store_at(data_dir) as store:
        row = store.get(rkey)
    assert row is not None, f"session {rkey} is not in the store"
    return row


def stored_record(data_dir: Path, rkey: str) -> dict[str, Any]:
    """The record of a stored session, checked against the lexicon."""
    record = stored(data_dir, rkey).record
    validate_record(record)
    return record


def all_sessions(data_dir: Path) -> list[StoredSession]:
    """Every session in the store at ``data_dir``."""
    with store_at(data_dir) as store:
        return list(store.iter_sessions())


def session_record(did: str, index: int, *, large: bool = False) -> tuple[str, dict[str, Any]]:
    """A finished session's rkey and record, built as the agent builds it."""
    state = SessionState(
        rkey=_TIDS.next(),
        client_version="1.4.2",
        platform="desktop",
        context=SessionContext(entry_point="direct", authentication_method="existing_session"),
        started_wall_ms=1_795_514_400_000 + index * 60_000,
        started_mono_ns=0,
        did=did,
    )
    state.total_events = index
    state.pages = {f"/garden/{index % 5}": None, "/inventory": None}
    state.actions = {"itemsCollected": index % 3}
    if large:  # every list at its cap, every string at its length limit: ~13 KB
        state.pages = {f"/{i:02d}".ljust(MAX_ROUTE_LEN, "p"): None for i in range(MAX_PAGES)}
        state.features = {f"{i:02d}".ljust(MAX_FEATURE_LEN, "f"): None for i in range(MAX_FEATURES)}
        for uris, kind in ((state.log_uris, "log"), (state.progress_uris, "progress")):
            for i in range(MAX_LINKED_URIS):
                uri = f"at://{did}/net.anisota.beta.game.{kind}/{i:02d}"
                uris[uri.ljust(MAX_URI_LEN, "x")] = None
    state.finish("ended", "logout", (index + 1) * 1_000_000_000)
    return state.rkey, build_record(state, (index + 1) * 1_000_000_000)


def seed(store: Store, did: str, count: int, *, large: bool = False) -> list[str]:
    """``count`` finished sessions of ``did`` queued for sync; their rkeys, oldest first."""
    rkeys = []
    for index in range(count):
        rkey, record = session_record(did, index, large=large)
        assert store.finalize(rkey, did, record, OWNER, "2026-11-24")
        rkeys.append(rkey)
    return rkeys


class Bearer(httpx.Auth):
    """A host's own auth, reduced to a fixed access token."""

    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


def race(threads: list[threading.Thread]) -> None:
    """Start and join ``threads`` with a tiny switch interval, so they interleave hard."""
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(old_interval)


def fake_keyring(monkeypatch: Any) -> dict[tuple[str, str], str]:
    """Install an in-memory ``keyring`` module; returns its secrets by (service, user)."""
    import types

    secrets: dict[tuple[str, str], str] = {}

    class PasswordDeleteError(Exception):
        pass

    class Backend:
        pass

    def delete_password(service: str, username: str) -> None:
        if secrets.pop((service, username), None) is None:
            raise PasswordDeleteError

    fake = types.ModuleType("keyring")
    fake.errors = types.SimpleNamespace(PasswordDeleteError=PasswordDeleteError)  # type: ignore[attr-defined]
    fake.get_keyring = Backend  # type: ignore[attr-defined]
    fake.get_password = lambda s, u: secrets.get((s, u))  # type: ignore[attr-defined]
    fake.set_password = lambda s, u, p: secrets.__setitem__((s, u), p)  # type: ignore[attr-defined]
    fake.delete_password = delete_password  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "keyring", fake)
    return secrets


def run_python(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``script`` in a fresh interpreter (a game process of its own); its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


class SteppedClock:
    """The real clocks, which a test may step forward (past a backoff or a timeout).

    Both the wall and the monotonic clock move together, so an agent given this
    clock sees ordinary time that sometimes jumps ahead, as after a long wait.
    """

    def __init__(self) -> None:
        self._offset_ns = 0
        self._lock = threading.Lock()

    def wall_ns(self) -> int:
        return time.time_ns() + self._offset_ns

    def monotonic_ns(self) -> int:
        return time.monotonic_ns() + self._offset_ns

    def step(self, seconds: float) -> None:
        with self._lock:
            self._offset_ns += int(seconds * 1e9)


@contextmanager
def logged(message: str) -> Iterator[threading.Event]:
    """An event set when the ``anisota_agent`` logger emits ``message`` (exactly)."""
    seen = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == message:
                seen.set()

    logger = logging.getLogger("anisota_agent")
    handler, level = Watch(), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level or logging.WARNING, logging.INFO))
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
