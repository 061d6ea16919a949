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
#: Network conditions from best to worst; a tie in time held goes to the worse one.
NETWORK_CONDITIONS = ("online", "unknown", "slow", "offline")

# Bounds that keep the worst-case record near 14 KB (the PDS refuses bodies over
# 1 MB; a session record should stay a few KB). Strings over a size limit are
# refused at the call; lists stop growing at their cap and the overflow is counted.
MAX_CLIENT_VERSION_LEN = 64
MAX_REFERRER_LEN = 512
MAX_ROUTE_LEN = 128
MAX_PAGES = 32
MAX_FEATURE_LEN = 48
MAX_FEATURES = 32
MAX_URI_LEN = 200
MAX_LINKED_URIS = 16
MAX_RELATED_SESSIONS = 16
MAX_COUNT_PER_CALL = 1_000_000
MAX_RESPONSE_MS = 3_600_000
MAX_XP = 2**53 - 1
MAX_LEVEL = 1_000_000


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise naming the field."""
    if value in allowed and type(value) is str:
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(allowed)}; got {value!r}")
    raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def check_text(name: str, value: object, max_len: int) -> str:
    """Return a non-empty ``str`` of at most ``max_len`` characters, else raise."""
    if type(value) is not str:
        raise TypeError(f"{name} must be a str; got {type(value).__name__}")
    if not value or len(value) > max_len:
        raise ValueError(f"{name} must be 1 to {max_len} characters; got {len(value)}")
    return value


def check_int(name: str, value: object, minimum: int, maximum: int) -> int:
    """Return an ``int`` (not a bool) within ``[minimum, maximum]``, else raise."""
    if type(value) is not int:
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}; got {value}")
    return value


def check_seconds(name: str, value: object, minimum: float, maximum: float) -> float:
    """Return a duration in seconds within ``[minimum, maximum]``, else raise."""
    if type(value) not in (int, float):
        raise TypeError(f"{name} must be a number of seconds; got {type(value).__name__}")
    seconds = float(value)  # type: ignore[arg-type]
    if not minimum <= seconds <= maximum:
        raise ValueError(f"{name} must be between {minimum:g} and {maximum:g} s; got {value!r}")
    return seconds


def check_at_uri(name: str, value: object) -> str:
    """Return an ``at://`` uri of at most :data:`MAX_URI_LEN` characters, else raise."""
    uri = check_text(name, value, MAX_URI_LEN)
    if not uri.startswith("at://") or len(uri) < 6:
        raise ValueError(f"{name} must be an at:// uri; got {uri!r}")
    return uri


def check_did(name: str, value: object) -> str:
    """Return a DID (``did:<method>:<id>``), else raise naming the field."""
    did = check_text(name, value, 2048)
    method, _, rest = did.removeprefix("did:").partition(":")
    if not did.startswith("did:") or not method.isalnum() or not method.islower() or not rest:
        raise ValueError(f"{name} must be a DID like did:plc:… or did:web:…; got {did!r}")
    return did


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1``."""
    import ipaddress  # only when a PDS URL is given

    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_pds_url(url: object) -> str:
    """Validate a PDS base URL and return it without a trailing slash.

    Only ``https`` is accepted, except ``http`` to a loopback host (a local dev
    PDS): tokens must never cross a network in clear text.

    Raises:
        TypeError: not a str.
        ValueError: another scheme, plain http to a remote host, a URL with
            credentials, a query or a fragment.
    """
    from urllib.parse import urlsplit

    if not isinstance(url, str):
        raise TypeError(f"pds_url must be a str, not {type(url).__name__}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"pds_url must be https://host; got {url!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            f"pds_url: refusing plain http to a non-loopback PDS ({parts.hostname}): use https"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("pds_url must not carry credentials, a query or a fragment")
    return url.strip().rstrip("/")


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

    def count_response(self, ms: float, ok: bool) -> None:
        """One measured response: its time, and whether it was an error."""
        self.response_count += 1
        self.response_total_ms += ms
        if not ok:
            self.error_count += 1

    def finish(self, status: str, reason: str, mono_ns: int) -> None:
        """Mark the session ended at ``mono_ns`` (never before its start)."""
        self.status = status
        self.end_reason = reason
        self.ended_mono_ns = max(mono_ns, self.started_mono_ns)

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
    return max(reversed(NETWORK_CONDITIONS), key=lambda name: held.get(name, 0))


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


def at_uri(did: str, rkey: str) -> str:
    """The at-uri of a session record."""
    return f"at://{did}/{SESSION_NSID}/{rkey}"
