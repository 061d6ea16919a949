"""The agent's settings that its background threads need, checked once by ``Agent``."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pathlib import Path  # pathlib costs the game ~7 ms to import: the threads pay it

__all__ = ["BackgroundSettings"]


class BackgroundSettings(NamedTuple):
    """Settings of the recorder and the uplink (times in seconds)."""

    data_dir: str | None
    in_memory: bool
    owner_token: str
    checkpoint_interval: float
    max_session_age_ms: int
    reserve_points: int
    mirror_interval: float | None
    max_store_bytes: int
    retention_s: float
    keyring: bool | None

    def store_dir(self) -> Path | None:
        """The directory of the store and the saved login; None when in memory."""
        if self.in_memory:
            return None
        from pathlib import Path

        from .store import default_data_dir

        return Path(self.data_dir) if self.data_dir else default_data_dir()
