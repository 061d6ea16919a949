"""Clocks, AT Protocol datetimes and TIDs.

Everything here is pure standard library so it is cheap to import and easy to
drive from tests: time comes from a :class:`Clock`, never from a global call
buried in the logic.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from datetime import datetime, timezone

__all__ = [
    "Clock",
    "SystemClock",
    "TidGenerator",
    "format_datetime",
    "is_valid_tid",
    "parse_datetime",
    "tid_to_datetime_us",
]


class Clock(Protocol):
    """A source of wall-clock and monotonic time, in nanoseconds."""

    def wall_ns(self) -> int:
        """Nanoseconds since the Unix epoch (may jump, e.g. on NTP steps)."""
        ...

    def monotonic_ns(self) -> int:
        """Nanoseconds from an arbitrary origin; never goes backwards."""
        ...


def suspend_aware_monotonic_ns() -> Callable[[], int]:
    """A monotonic clock that keeps counting while the machine sleeps, where one exists.

    With it, a suspended machine simply shows up as time without activity: a
    sleep longer than the inactivity timeout ends the session at its last
    activity, as if the player had walked away then. Linux: ``CLOCK_BOOTTIME``;
    macOS: ``CLOCK_MONOTONIC`` (``time.monotonic`` there stops during sleep);
    elsewhere ``time.monotonic_ns`` (on Windows it counts through sleep).
    """
    if sys.platform.startswith("linux") and hasattr(time, "CLOCK_BOOTTIME"):
        return functools.partial(time.clock_gettime_ns, time.CLOCK_BOOTTIME)
    if sys.platform == "darwin" and hasattr(time, "clock_gettime_ns"):
        return functools.partial(time.clock_gettime_ns, time.CLOCK_MONOTONIC)
    return time.monotonic_ns


#: The id of ``time.monotonic_ns`` as this module found it: a different one later
#: is a test's fake. (An id, because freezegun swaps every module attribute that
#: *is* the real function, ours included.)
_SYSTEM_MONOTONIC_NS_ID = id(time.monotonic_ns)


class SystemClock:
    """The real clocks of this process.

    ``wall_ns`` is ``time.time_ns``; ``monotonic_ns`` is
    :func:`suspend_aware_monotonic_ns`. Both are bound when the clock is made,
    as plain functions: they sit on the game's hot path, where a Python-level
    wrapper would double the cost of an activity call. A freezegun freeze active
    when the clock (or the agent) is made drives both (its fake
    ``time.monotonic_ns`` wins); one started later does not. Beware that
    freezegun's default ignore list contains ``threading`` and ``queue``: a call
    made within five stack frames of a ``threading.py`` frame gets the *real*
    time; tests that freeze time for a worker thread should configure
    freezegun's ignore list.
    """

    def __init__(self, monotonic_ns: Callable[[], int] | None = None) -> None:
        """Use ``monotonic_ns`` instead of the system monotonic clock if given.

        This lets a test move the monotonic clock independently of a
        freezegun-driven wall clock (freezegun ties the two together).
        """
        if monotonic_ns is None:
            faked = id(time.monotonic_ns) != _SYSTEM_MONOTONIC_NS_ID
            monotonic_ns = time.monotonic_ns if faked else suspend_aware_monotonic_ns()
        #: Nanoseconds since the Unix epoch (``time.time_ns``).
        self.wall_ns: Callable[[], int] = time.time_ns
        #: Monotonic nanoseconds that include time asleep, where the OS can tell.
        self.monotonic_ns: Callable[[], int] = monotonic_ns


# --- Lexicon datetimes -------------------------------------------------------

# datetime is imported by the functions that use it: it costs ~1 ms to import,
# which the recorder's thread pays at the first record, not the package's import.


@functools.cache
def _epoch() -> datetime:
    """1970-01-01T00:00:00Z, the instant epoch milliseconds count from (made once)."""
    from datetime import datetime, timezone

    return datetime(1970, 1, 1, tzinfo=timezone.utc)


# RFC 3339 ∩ ISO 8601 as atproto uses it: whole seconds required, optional
# fraction, uppercase T and Z, numeric offset with a colon. [0-9] rather than
# \d because \d also matches non-ASCII digits; fullmatch so a trailing newline
# cannot slip past a `$`. A pattern, compiled (and cached) by re at its first use.
_DATETIME = (
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})"
    r"T(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})"
    r"(?:\.(?P<fraction>[0-9]+))?"
    r"(?P<tz>Z|[+-][0-9]{2}:[0-9]{2})"
)


def format_datetime(epoch_ms: int) -> str:
    """Format Unix epoch milliseconds as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC).

    Raises ValueError if the instant is outside years 1..9999.
    """
    from datetime import timedelta

    seconds, millis = divmod(epoch_ms, 1000)
    try:
        # Arithmetic from the epoch instead of fromtimestamp(): exact for
        # integers and free of platform limits on negative timestamps.
        dt = _epoch() + timedelta(seconds=seconds)
    except OverflowError as exc:
        raise ValueError(f"epoch_ms {epoch_ms!r} is outside years 1..9999") from exc
    # Explicit widths: strftime's %Y does not zero-pad years < 1000 on glibc.
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"
        f"T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}.{millis:03d}Z"
    )


def parse_datetime(s: str) -> int:
    """Parse a strict lexicon datetime into Unix epoch milliseconds.

    Accepts exactly what the atproto ``datetime`` format allows (see
    :func:`format_datetime` for the preferred form); fractional seconds beyond
    milliseconds are truncated. Raises ValueError naming the bad value.
    """
    from datetime import datetime, timedelta

    match = re.fullmatch(_DATETIME, s) if isinstance(s, str) else None
    if match is None or match["tz"] == "-00:00":
        raise ValueError(f"{s!r} is not a valid datetime (expected e.g. 2026-11-24T10:00:00.000Z)")
    try:
        dt = datetime(
            int(match["year"]),
            int(match["month"]),
            int(match["day"]),
            int(match["hour"]),
            int(match["minute"]),
            int(match["second"]),
            tzinfo=_parse_offset(match["tz"]),
        )
    except ValueError as exc:  # Feb 30, hour 25, second 60, offset +24:00, ...
        raise ValueError(f"{s!r} is not a valid datetime: {exc}") from exc
    millis = int((match["fraction"] or "0")[:3].ljust(3, "0"))
    # Subtracting aware datetimes never builds the UTC value, so offsets that
    # cross year 1 or 9999 still give a correct integer.
    return (dt - _epoch()) // timedelta(seconds=1) * 1000 + millis


def _parse_offset(tz: str) -> timezone:
    """Turn ``Z`` or ``±HH:MM`` into a timezone (ValueError if out of range)."""
    from datetime import timedelta, timezone

    if tz == "Z":
        return timezone.utc
    hours, minutes = int(tz[1:3]), int(tz[4:6])
    if minutes > 59:
        raise ValueError(f"offset minutes out of range in {tz!r}")
    offset = timedelta(hours=hours, minutes=minutes)
    return timezone(-offset if tz[0] == "-" else offset)  # rejects |offset| >= 24h


# --- TIDs --------------------------------------------------------------------

_TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
_TID_INDEX = {c: i for i, c in enumerate(_TID_ALPHABET)}
# First character carries bits 64..60 of a 65-bit field; bit 64 does not exist
# and bit 63 must be 0, so only the first 16 symbols may lead. Compiled at first use, by re.
_TID = r"[2-7a-j][2-7a-z]{12}"
_TID_LEN = 13
_CLOCK_ID_BITS = 10
_MAX_CLOCK_ID = (1 << _CLOCK_ID_BITS) - 1
_MAX_TIMESTAMP_US = (1 << 53) - 1


def is_valid_tid(s: str) -> bool:
    """True if ``s`` is a syntactically valid TID (13 chars, top bit 0)."""
    return isinstance(s, str) and re.fullmatch(_TID, s) is not None


def tid_to_datetime_us(tid: str) -> int:
    """Return the microseconds-since-epoch timestamp encoded in ``tid``."""
    if not is_valid_tid(tid):
        raise ValueError(f"{tid!r} is not a valid TID")
    value = 0
    for char in tid:
        value = (value << 5) | _TID_INDEX[char]
    return value >> _CLOCK_ID_BITS


def _encode_tid(timestamp_us: int, clock_id: int) -> str:
    """Encode the 64-bit TID integer as 13 base32-sortable characters."""
    value = (timestamp_us << _CLOCK_ID_BITS) | clock_id
    chars = []
    for _ in range(_TID_LEN):
        chars.append(_TID_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class TidGenerator:
    """Thread-safe generator of strictly increasing TIDs.

    Each TID is later than the previous one from this generator even if the
    wall clock steps backwards or two calls land in the same microsecond: the
    timestamp is then the previous one plus 1 µs, and catches up with the wall
    clock once it passes the last value again. Uniqueness across generators
    relies on distinct clock ids, so share one generator per process.
    """

    def __init__(self, clock: Clock | None = None, clock_id: int | None = None) -> None:
        """Use ``clock`` (default: SystemClock) and a 10-bit ``clock_id``.

        The clock id defaults to a random one so that TIDs from different
        processes writing to the same repo are unlikely to collide.
        """
        if clock_id is None:
            # os.urandom, not the secrets module: same entropy, no import cost.
            clock_id = int.from_bytes(os.urandom(2), "big") & _MAX_CLOCK_ID
        if isinstance(clock_id, bool) or not 0 <= clock_id <= _MAX_CLOCK_ID:
            raise ValueError(f"clock_id must be in 0..{_MAX_CLOCK_ID}, got {clock_id!r}")
        self._clock: Clock = clock if clock is not None else SystemClock()
        self.clock_id = clock_id
        self._last_us = -1
        self._lock = threading.Lock()

    def next(self) -> str:
        """Return a new TID, greater than every TID this generator returned."""
        with self._lock:
            timestamp_us = max(self._clock.wall_ns() // 1000, self._last_us + 1)
            if timestamp_us > _MAX_TIMESTAMP_US:
                raise OverflowError("TID timestamp exceeds 53 bits")
            self._last_us = timestamp_us
        return _encode_tid(timestamp_us, self.clock_id)
