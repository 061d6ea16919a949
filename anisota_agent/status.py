"""What the agent is doing: :class:`AgentStatus`, and the board its threads write it on.

Each fact has one owner, and one name everywhere (here, in the store's ``status.*``
meta keys the CLI reads, and in :class:`~anisota_agent.sync.SyncStatus`):

- the agent: ``enabled``, ``running``, ``session``, ``dropped``, ``network``,
  ``consent``;
- the recorder: ``store_path``, ``store_mode``, ``counters``, ``last_error``,
  ``recovered``; the store: ``outbox``, published by the thread that changed it
  (the recorder each round, the uplink after a sync pass);
- the uplink: ``account``, ``auth_problem``; its sync engine:
  ``last_sync_at``, ``next_sync_at``, ``sync_error``.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

__all__ = [
    "BACKGROUND_FACTS",
    "STATUS_META_PREFIX",
    "SYNC_FACTS",
    "AgentStatus",
    "StatusBoard",
    "saved_status",
]

#: The store keeps the facts the CLI shows under ``status.<name>`` meta keys.
STATUS_META_PREFIX = "status."


class AgentStatus(NamedTuple):
    """A snapshot of what the agent is doing and what it has lost.

    Attributes:
        enabled, running: recording at all; the background threads started and not closed.
        store_path, store_mode: the SQLite file; ``sqlite``, ``memory`` (asked
            for, or after the file failed), ``starting`` or ``stopped``.
        session: the live session's record key, if any.
        outbox: sessions in the store by state (live, pending, local, synced,
            quarantined, withheld, deleted), as of the recorder's or the uplink's
            last round.
        dropped: calls this agent refused or cut short (by kind), since it started.
        counters: losses and failures the background threads counted (failed checkpoints,
            pruned sessions, ...), also kept in the store.
        last_error: the store's last failure.
        recovered: sessions of dead processes this agent expired at start.
        network: ``online``, ``offline``, ``slow`` or ``unknown``.
        account, auth_problem: the account syncing (no secrets), and why syncing
            stopped for it (revoked, deactivated, a failed login).
        last_sync_at, next_sync_at, sync_error: the sync's last success (Unix
            time), its next attempt when waiting (backoff, budget), its last error.
        consent: the player's consent in force: ``granted``, ``pending`` (recorded
            locally, nothing uploaded) or ``denied`` (nothing recorded).
    """

    enabled: bool
    running: bool
    store_path: str | None
    store_mode: str
    session: str | None
    outbox: dict[str, int]
    dropped: dict[str, int]
    last_error: str | None
    recovered: int
    counters: dict[str, int]
    network: str
    account: str | None
    auth_problem: str | None
    last_sync_at: float | None
    next_sync_at: float | None
    sync_error: str | None
    consent: str


#: The facts of :class:`AgentStatus` the background threads own, with their values
#: before the threads have said anything.
BACKGROUND_FACTS: dict[str, Any] = {
    "store_path": None,
    "store_mode": "starting",
    "outbox": {},
    "counters": {},
    "last_error": None,
    "recovered": 0,
    "account": None,
    "auth_problem": None,
    "last_sync_at": None,
    "next_sync_at": None,
    "sync_error": None,
}


#: The facts a sync engine owns (:meth:`anisota_agent.sync.SyncStatus.facts`).
SYNC_FACTS = ("auth_problem", "last_sync_at", "next_sync_at", "sync_error")


def saved_status(meta: dict[str, Any]) -> dict[str, Any]:
    """The facts of ``status()`` a store keeps for the CLI: the sync's and ``network``."""
    return {name: meta.get(STATUS_META_PREFIX + name) for name in (*SYNC_FACTS, "network")}


class StatusBoard:
    """The background threads' facts, written by their owners and read by ``status()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._facts = dict(BACKGROUND_FACTS)

    def update(self, **facts: Any) -> None:
        """Set some facts at once (names of :data:`BACKGROUND_FACTS`)."""
        unknown = facts.keys() - BACKGROUND_FACTS.keys()
        if unknown:
            raise KeyError(f"not a background fact: {', '.join(sorted(unknown))}")
        with self._lock:
            self._facts.update(facts)

    def add_counts(self, counts: dict[str, int]) -> None:
        """Add to the counters of losses and failures."""
        with self._lock:
            counters = dict(self._facts["counters"])
            for name, value in counts.items():
                counters[name] = counters.get(name, 0) + value
            self._facts["counters"] = counters

    def facts(self) -> dict[str, Any]:
        """A copy of every fact (dicts are replaced, never changed in place)."""
        with self._lock:
            return dict(self._facts)
