"""What the background threads last saw, for ``Agent.status()`` to read without I/O.

One object, written by its owners under a lock: the recorder owns the store's
facts (path, mode, outbox, counters, last error, recovered), the uplink owns
the account's and the sync's (account, auth problem, last and next sync, sync
error).
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["BackgroundStatus"]


class BackgroundStatus:
    """The facts of ``status()`` that the background threads keep."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.store_path: str | None = None
        self.store_mode = "starting"
        self.outbox: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        self.last_error: str | None = None
        self.recovered = 0
        self.account: str | None = None
        self.auth_problem: str | None = None
        self.last_sync_at: float | None = None
        self.next_sync_at: float | None = None
        self.sync_error: str | None = None

    def update(self, **changes: Any) -> None:
        """Set some facts at once."""
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, value)

    def add_counts(self, counts: dict[str, int]) -> None:
        """Add to the counters of losses and failures."""
        with self._lock:
            for name, value in counts.items():
                self.counters[name] = self.counters.get(name, 0) + value

    def snapshot(self) -> BackgroundStatus:
        """A copy whose dicts the threads will not change."""
        clone = BackgroundStatus()
        with self._lock:
            for name, value in vars(self).items():
                if name != "_lock":
                    setattr(clone, name, dict(value) if isinstance(value, dict) else value)
        return clone
