"""Pure record building: the allowed values, the bounds, and session state → record.

Nothing here does I/O or reads a clock; every time is passed in. The agent keeps
one :class:`SessionState` per live session (mutated under the agent's lock by the
host's calls) and turns a copy of it into a lexicon record with
:func:`build_record` on the recorder thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .clock import format_datetime, parse_datetime
from .lexicon import SESSION_NSID
from .network import CONDITIONS

__all__ = [
    "AUTHENTICATION_METHODS",
    "ENTRY_POINTS",
    "GAME_ACTIONS",
    "HOST_END_REASONS",
    "MAX_CLIENT_VERSION_LEN",
    "MAX_COUNT_PER_CALL",
    "MAX_FEATURES",
    "MAX_FEATURE_LEN",
    "MAX_LEVEL",
    "MAX_LINKED_URIS",
    "MAX_PAGES",
    "MAX_REFERRER_LEN",
    "MAX_RELATED_SESSIONS",
    "MAX_REQUEST_MS",
    "MAX_RESPONSE_MS",
    "MAX_ROUTE_LEN",
    "MAX_XP",
    "PLATFORMS",
    "SessionContext",
    "SessionState",
    "at_uri",
    "build_record",
    "clean_referrer",
    "dominant_condition",
    "expire_record",
    "round_half_up",
    "to_json",
]

# Allowed values, in the lexicon's own spelling.
PLATFORMS = ("web", "mobile", "desktop", "pwa")
ENTRY_POINTS = ("direct", "refresh", "login", "oauth_callback", "pwa_launch", "deep_link")
AUTHENTICATION_METHODS = ("oauth", "existing_session", "anonymous")
GAME_ACTIONS = (
    "levelUps",
    "feedsLoaded",
    "postsViewed",
    "itemsCollected",
    "specimensCollected",
    "dailyRewardsClaimed",
)
#: Reasons the host may give when it ends a session itself.
HOST_END_REASONS = ("logout", "user_initiated", "app_close", "device_switch")

# Bounds that keep the worst-case record near 14 KB (the PDS refuses bodies over
# 1 MB; a session record should stay a few KB). Strings over a size limit are
# refused at the call; lists stop growing at their cap and the overflow is counted.
MAX_CLIENT_VERSION_LEN = 64
MAX_REFERRER_LEN = 512
MAX_ROUTE_LEN = 128
MAX_PAGES = 32
MAX_FEATURE_LEN = 48
MAX_FEATURES = 32
MAX_LINKED_URIS = 16
MAX_RELATED_SESSIONS = 16
MAX_COUNT_PER_CALL = 1_000_000
MAX_RESPONSE_MS = 3_600_000
#: The longest request :meth:`Agent.report_request` takes (a day): kept as MAX_RESPONSE_MS.
MAX_REQUEST_MS = 86_400_000
MAX_XP = 2**53 - 1
MAX_LEVEL = 1_000_000


def clean_referrer(referrer: str, keep_query: bool) -> str:
    """Drop the query string and fragment of a referrer unless the host opts in."""
    if keep_query:
        return referrer
    from urllib.parse import urlsplit, urlunsplit  # only needed at session start

    parts = urlsplit(referrer)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class SessionContext(NamedTuple):
    """What the host said when the session started."""

    entry_point: str | None = None
    authentication_method: str | None = None
    is_new_user: bool | None = None
    referrer: str | None = None


class SessionState:
    """One session as it is being recorded.

    Times are monotonic nanoseconds; wall times are derived from the wall clock
    read once at start, so a wall-clock step during the session cannot make
    ``endedAt`` precede ``startedAt`` or distort ``duration``. Not thread-safe:
    the agent mutates it under its lock. (A plain class with slots rather than a
    dataclass: attribute access is on the game's hot path, and the import must
    stay cheap.)
    """

    __slots__ = (
        "actions",
        "asleep_offset_ns",
        "awaiting_login",
        "background_ns",
        "background_since_mono_ns",
        "client_version",
        "condition",
        "condition_ns",
        "condition_since_mono_ns",
        "context",
        "current_level",
        "current_xp",
        "did",
        "end_reason",
        "ended_mono_ns",
        "error_count",
        "expires_mono_ns",
        "features",
        "first_xp",
        "last_activity_mono_ns",
        "log_uris",
        "pages",
        "parent_rkey",
        "platform",
        "progress_uris",
        "response_count",
        "response_total_ms",
        "rkey",
        "started_mono_ns",
        "started_wall_ms",
        "status",
        "total_events",
    )

    def __init__(
        self,
        rkey: str,
        client_version: str,
        platform: str,
        context: SessionContext,
        started_wall_ms: int,
        started_mono_ns: int,
        did: str | None = None,
    ) -> None:
        self.rkey = rkey
        self.client_version = client_version
        self.platform = platform
        self.context = context
        self.started_wall_ms = started_wall_ms
        self.started_mono_ns = started_mono_ns
        self.did = did
        self.last_activity_mono_ns = started_mono_ns
        self.total_events = 0
        # Insertion-ordered dicts serve as ordered sets: unique, first-seen order.
        self.pages: dict[str, None] = {}
        self.features: dict[str, None] = {}
        self.actions: dict[str, int] = {}
        self.first_xp: int | None = None
        self.current_xp: int | None = None
        self.current_level: int | None = None
        self.response_count = 0
        self.response_total_ms = 0.0
        self.error_count = 0
        self.log_uris: dict[str, None] = {}
        self.progress_uris: dict[str, None] = {}
        self.parent_rkey: str | None = None
        self.condition = "unknown"
        self.condition_since_mono_ns = started_mono_ns
        self.condition_ns: dict[str, int] = {}
        self.status = "active"
        self.end_reason: str | None = None
        self.ended_mono_ns: int | None = None
        #: The tag of the login under way when it started or ended, if any: the
        #: session belongs to the account that login yields.
        self.awaiting_login: str | None = None
        #: Time spent in the background before the current stretch (local only:
        #: the lexicon has no field for it, so it is never in the record).
        self.background_ns = 0
        #: When the game's window went to the background, while it is there.
        self.background_since_mono_ns: int | None = None
        # Bounds the agent's hot path compares against (set by the agent).
        self.expires_mono_ns = 2**63
        self.asleep_offset_ns = 2**63

    def wall_ms(self, mono_ns: int) -> int:
        """The wall time (epoch ms) of a monotonic instant of this session."""
        return self.started_wall_ms + max(0, mono_ns - self.started_mono_ns) // 1_000_000

    def set_condition(self, condition: str, mono_ns: int) -> None:
        """Switch the network condition, banking the time spent in the old one."""
        if condition == self.condition:
            return
        # A change noticed late may predate the last one (or the start): clamp.
        mono_ns = max(mono_ns, self.condition_since_mono_ns)
        held = mono_ns - self.condition_since_mono_ns
        self.condition_ns[self.condition] = self.condition_ns.get(self.condition, 0) + held
        self.condition = condition
        self.condition_since_mono_ns = mono_ns

    def to_background(self, mono_ns: int) -> None:
        """The game's window went to the background at ``mono_ns``."""
        if self.background_since_mono_ns is None:
            self.background_since_mono_ns = max(mono_ns, self.started_mono_ns)

    def to_foreground(self, mono_ns: int) -> None:
        """The window is back in front: bank the time it spent behind."""
        since = self.background_since_mono_ns
        if since is not None:
            self.background_ns += max(0, mono_ns - since)
            self.background_since_mono_ns = None

    def background_ms(self, until_mono_ns: int) -> int:
        """Milliseconds in the background up to ``until_mono_ns`` (or the end)."""
        total = self.background_ns
        since = self.background_since_mono_ns
        if since is not None:
            until = until_mono_ns if self.ended_mono_ns is None else self.ended_mono_ns
            total += max(0, until - since)
        return total // 1_000_000

    def attribute(self, tag: str, did: str | None) -> None:
        """Give the session to ``did`` if it was recorded under the login tagged ``tag``.

        None: that login failed; the session awaits it no more (no account's).
        """
        if self.did is None and self.awaiting_login == tag:
            self.did = did
            self.awaiting_login = None

    def finish(self, status: str, reason: str, mono_ns: int) -> None:
        """Mark the session ended at ``mono_ns`` (never before its start)."""
        self.status = status
        self.end_reason = reason
        self.ended_mono_ns = max(mono_ns, self.started_mono_ns)
        # Ended while behind: the stretch counts up to the end (none after an
        # end dated at the moment it went there).
        self.to_foreground(self.ended_mono_ns)

    def copy(self) -> SessionState:
        """A copy safe to read on another thread while this one keeps changing."""
        clone = object.__new__(SessionState)
        for name in self.__slots__:
            value = getattr(self, name)
            # The containers are the only mutable parts; copying them is enough
            # and keeps the time spent under the host's lock to microseconds.
            setattr(clone, name, dict(value) if isinstance(value, dict) else value)
        return clone


def dominant_condition(state: SessionState, until_mono_ns: int) -> str:
    """The condition held longest up to ``until_mono_ns``; ties go to the worse one."""
    held = dict(state.condition_ns)
    current = max(0, until_mono_ns - state.condition_since_mono_ns)
    held[state.condition] = held.get(state.condition, 0) + current
    # Iterating worst-first makes max() keep the worse of equal durations.
    return max(reversed(CONDITIONS), key=lambda name: held.get(name, 0))


def round_half_up(value: float) -> int:
    """Round a non-negative number to the nearest integer, halves upward."""
    return int(value + 0.5)


def build_record(
    state: SessionState, now_mono_ns: int, related_rkeys: Sequence[str] = ()
) -> dict[str, Any]:
    """The lexicon record for ``state`` as of ``now_mono_ns`` (its ``updatedAt``).

    ``related_rkeys``: the other sessions of the same local day on this device.
    Session uris need the account's DID, so without one they are left out.
    """
    end_ns = state.ended_mono_ns if state.ended_mono_ns is not None else now_mono_ns
    now_ns = max(now_mono_ns, end_ns)
    record: dict[str, Any] = {
        "$type": SESSION_NSID,
        "status": state.status,
        "platform": state.platform,
        "clientVersion": state.client_version,
        "startedAt": format_datetime(state.started_wall_ms),
        "createdAt": format_datetime(state.started_wall_ms),
        "updatedAt": format_datetime(state.wall_ms(now_ns)),
        "lastActivityAt": format_datetime(state.wall_ms(state.last_activity_mono_ns)),
        "activitySummary": _activity_summary(state),
        "metadata": _metadata(state, end_ns),
    }
    if state.ended_mono_ns is not None and state.end_reason is not None:
        record["endedAt"] = format_datetime(state.wall_ms(state.ended_mono_ns))
        record["endReason"] = state.end_reason
        record["duration"] = (state.ended_mono_ns - state.started_mono_ns) // 1_000_000
    context = _session_context(state.context)
    if context:
        record["sessionContext"] = context
    related = [at_uri(state.did, rkey) for rkey in related_rkeys] if state.did else []
    if state.did and state.parent_rkey:
        record["parentSessionUri"] = at_uri(state.did, state.parent_rkey)
    for key, uris in (
        ("relatedSessionUris", related[-MAX_RELATED_SESSIONS:]),
        ("relatedLogUris", list(state.log_uris)),
        ("relatedProgressUris", list(state.progress_uris)),
    ):
        if uris:
            record[key] = uris
    return record


def _activity_summary(state: SessionState) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "totalEvents": state.total_events,
        "pagesVisited": list(state.pages),
        "gameActions": {name: state.actions.get(name, 0) for name in GAME_ACTIONS},
    }
    if state.current_xp is not None and state.first_xp is not None:
        summary["currentXP"] = state.current_xp
        summary["xpGainedThisSession"] = max(0, state.current_xp - state.first_xp)
    if state.current_level is not None:
        summary["currentLevel"] = state.current_level
    return summary


def _metadata(state: SessionState, until_mono_ns: int) -> dict[str, Any]:
    performance = {"errorCount": state.error_count}
    if state.response_count:
        performance["averageResponseTime"] = round_half_up(
            state.response_total_ms / state.response_count
        )
    return {
        "features": list(state.features),
        "networkCondition": dominant_condition(state, until_mono_ns),
        "performanceMetrics": performance,
    }


def _session_context(context: SessionContext) -> dict[str, Any]:
    fields = {
        "entryPoint": context.entry_point,
        "authenticationMethod": context.authentication_method,
        "isNewUser": context.is_new_user,
        "referrer": context.referrer,
    }
    return {key: value for key, value in fields.items() if value is not None}


def expire_record(record: dict[str, Any], now_wall_ms: int) -> dict[str, Any]:
    """A crashed or over-age ``active`` record as ``expired``/``timeout``.

    It ends at its last activity: whatever came after the last checkpoint is
    unknown, and the player cannot have played past their last recorded action.
    """
    expired = dict(record)
    started_ms = parse_datetime(record["startedAt"])
    last_ms = max(parse_datetime(record.get("lastActivityAt", record["startedAt"])), started_ms)
    expired.update(
        status="expired",
        endReason="timeout",
        endedAt=format_datetime(last_ms),
        duration=last_ms - started_ms,
        updatedAt=format_datetime(max(now_wall_ms, last_ms)),
    )
    return expired


def to_json(value: Any) -> str:
    """The one JSON text of a record or a request body: compact, ASCII, no NaN.

    ASCII (other characters escaped), so that any ``str`` survives SQLite and the
    wire as it is. Raises ``ValueError`` for NaN or infinity, which no record
    may hold.
    """
    import json  # here, not at the top: ~1 ms that the package's import need not pay

    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def at_uri(did: str, rkey: str) -> str:
    """The at-uri of a session record."""
    return f"at://{did}/{SESSION_NSID}/{rkey}"
