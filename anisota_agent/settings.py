"""The agent's settings: checked once, in seconds, and read by every part that needs them."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from .checks import (
    check_bool,
    check_choice,
    check_int,
    check_optional_bool,
    check_path,
    check_seconds,
    check_text,
)
from .records import MAX_CLIENT_VERSION_LEN, PLATFORMS

if TYPE_CHECKING:
    from pathlib import Path  # pathlib costs the game ~7 ms to import: the threads pay it

__all__ = ["CONSENT_STATES", "DEFAULT_CONSENT", "Guard", "Settings", "tracking_disabled_by_env"]

_DAY = 24 * 3600.0

DEFAULT_CHECKPOINT_INTERVAL = 5.0
DEFAULT_MAX_SESSION_AGE = 24 * 3600.0
DEFAULT_INACTIVITY_TIMEOUT = 30 * 60.0
DEFAULT_CONTINUATION_WINDOW = 30 * 60.0
#: Adobe's convention: a new session after 300 s in the background (Braze closes
#: one 10 s after the app leaves the foreground; GA4 ends one after 30 min of
#: inactivity, the inactivity timeout's default).
DEFAULT_BACKGROUND_TIMEOUT = 300.0
DEFAULT_CLOSE_TIMEOUT = 2.0
DEFAULT_WRITE_RESERVE = 1000
DEFAULT_MAX_STORE_BYTES = 20_000_000  # of records: about 20,000 typical sessions
DEFAULT_RETENTION_DAYS = 30.0
DEFAULT_SLOW_THRESHOLD_MS = 2000.0

#: The player's consent to upload: ``granted`` (record and upload), ``pending``
#: (record locally, upload nothing until granted), ``denied`` (record nothing,
#: delete what was not uploaded).
CONSENT_STATES = ("granted", "pending", "denied")
#: The consent of a player who has not chosen, unless the host passes another.
DEFAULT_CONSENT = "granted"

#: ``Agent(before_record=...)``: a finished record in, the record to store and
#: upload out (or None: keep the session local, never uploaded).
Guard = Callable[[dict[str, Any]], Any]


def tracking_disabled_by_env() -> bool:
    """True when the environment asks not to be tracked (``DO_NOT_TRACK=1``)."""
    return os.environ.get("DO_NOT_TRACK", "").strip().lower() in ("1", "true", "yes")


class Settings(NamedTuple):
    """Every setting of one agent, checked; durations in seconds.

    Built by :meth:`checked` from :class:`~anisota_agent.Agent`'s arguments (see
    there for what each means and its bounds).
    """

    client_version: str
    platform: str
    enabled: bool
    data_dir: str | None
    in_memory: bool
    checkpoint_interval: float
    inactivity_timeout: float
    continuation_window: float
    background_timeout: float
    max_session_age: float
    write_reserve: int
    mirror_interval: float | None
    slow_threshold_ms: float
    max_store_bytes: int
    retention_days: float
    keyring: bool | None
    #: The ``httpx`` transport every request to the PDS goes through (None: httpx's own).
    transport: Any = None
    #: The consent when the player has not chosen (their choice, kept in the store, wins).
    consent: str = DEFAULT_CONSENT
    #: The guard every finished record goes through before it is stored final.
    before_record: Guard | None = None

    @classmethod
    def checked(
        cls,
        *,
        client_version: object,
        platform: object = "desktop",
        enabled: object = True,
        data_dir: object = None,
        in_memory: object = False,
        checkpoint_interval: object = DEFAULT_CHECKPOINT_INTERVAL,
        inactivity_timeout: object = DEFAULT_INACTIVITY_TIMEOUT,
        continuation_window: object = DEFAULT_CONTINUATION_WINDOW,
        background_timeout: object = DEFAULT_BACKGROUND_TIMEOUT,
        max_session_age: object = DEFAULT_MAX_SESSION_AGE,
        write_reserve: object = DEFAULT_WRITE_RESERVE,
        mirror_interval: object = None,
        slow_threshold_ms: object = DEFAULT_SLOW_THRESHOLD_MS,
        max_store_bytes: object = DEFAULT_MAX_STORE_BYTES,
        retention_days: object = DEFAULT_RETENTION_DAYS,
        keyring: object = None,
        transport: object = None,
        consent: object = DEFAULT_CONSENT,
        before_record: object = None,
    ) -> Settings:
        """Check every value, naming the field of the first one out of bounds.

        The defaults are :class:`~anisota_agent.Agent`'s.
        """
        if transport is not None and not callable(getattr(transport, "handle_request", None)):
            raise TypeError(
                f"transport must be an httpx.BaseTransport; got {type(transport).__name__}"
            )
        if before_record is not None and not callable(before_record):
            raise TypeError(
                "before_record must be a callable taking a record and returning a record"
                f" or None; got {type(before_record).__name__}"
            )
        if before_record is not None and mirror_interval is not None:
            # A mirror puts the live session on the PDS before the guard has seen it.
            raise ValueError(
                "mirror_interval must be None when before_record is set: a mirror would"
                " publish the live session before the guard sees it"
            )
        in_memory = check_bool("in_memory", in_memory)
        if data_dir is not None:
            data_dir = check_path("data_dir", data_dir)
        return cls(
            client_version=check_text("client_version", client_version, MAX_CLIENT_VERSION_LEN),
            platform=check_choice("platform", platform, PLATFORMS),
            enabled=check_bool("enabled", enabled) and not tracking_disabled_by_env(),
            data_dir=None if in_memory else data_dir,
            in_memory=in_memory,
            checkpoint_interval=check_seconds(
                "checkpoint_interval", checkpoint_interval, 0.01, 3600
            ),
            inactivity_timeout=check_seconds("inactivity_timeout", inactivity_timeout, 60, _DAY),
            continuation_window=check_seconds("continuation_window", continuation_window, 0, _DAY),
            background_timeout=check_seconds("background_timeout", background_timeout, 10, _DAY),
            max_session_age=check_seconds("max_session_age", max_session_age, 60, 7 * _DAY),
            write_reserve=check_int("write_reserve", write_reserve, 0, 1_000_000),
            mirror_interval=None
            if mirror_interval is None
            else check_seconds("mirror_interval", mirror_interval, 60, _DAY),
            slow_threshold_ms=check_seconds("slow_threshold_ms", slow_threshold_ms, 1, 600_000),
            max_store_bytes=check_int("max_store_bytes", max_store_bytes, 100_000, 2**40),
            retention_days=check_seconds("retention_days", retention_days, 1, 3650),
            keyring=check_optional_bool("keyring", keyring),
            transport=transport,
            consent=check_choice("consent", consent, CONSENT_STATES),
            before_record=before_record,
        )

    def store_dir(self) -> Path | None:
        """The directory of the store and the saved login; None when in memory."""
        if self.in_memory:
            return None
        from pathlib import Path

        from .store import default_data_dir

        return Path(self.data_dir) if self.data_dir else default_data_dir()
