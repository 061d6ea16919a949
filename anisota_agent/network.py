"""The network condition: ``online``, ``slow``, ``offline`` or ``unknown``.

:class:`NetworkMonitor` turns cheap signals into one condition. It does no I/O
itself: the uplink feeds it interface readings (:func:`interfaces_up`) and probe
results, the response-timing hooks (:mod:`anisota_agent.timing`) feed it the
outcome of every instrumented request, and time comes from an injected
monotonic clock. Every ``observe_*`` call does O(1) work, because it runs on
the host's request path, on any thread: one small lock, and not even that for
the usual request (an answer in time while steadily ``online``).

Signals:

- **interfaces**: whether any non-loopback interface is up with an IP address.
- **requests**: ``ok`` (an answer), ``server_error`` (an HTTP answer that is a
  failure: the network works even if the server is sick) or ``network_error``
  (no answer at all: connect, DNS, TLS, timeout).
- **probes**: a ``GET /xrpc/_health`` of the PDS the uplink sends when in doubt,
  reported with its elapsed time, or None when it failed.

Rules (defaults in brackets):

1. ``unknown`` until the first answer or failure decides: interfaces merely
   being up prove nothing (a captive portal, a router without uplink).
2. All non-loopback interfaces down: ``offline`` at once. It is the strongest
   local signal and overrides any answer seen meanwhile (which could only come
   from a loopback server or a stale reading). When an interface comes back,
   the old failures describe the old path: the condition becomes ``unknown``
   and a probe is due at once.
3. ``offline_after`` [3] consecutive network errors (requests and failed
   probes alike) make it ``offline``. Any answer (``ok``, ``server_error``, a
   successful probe) resets the streak and makes it ``online`` (or ``slow``)
   at once: one answer proves the path works, so alternating single good and
   bad results never go offline.
4. Latency, from the last ``window`` [5] ``ok`` requests: it turns ``slow``
   when at least ``votes`` [4] of them took longer than ``slow_threshold_ms``
   [2000 ms], and back to ``online`` only when at least ``votes`` of them took
   less than ``recover_ratio`` [0.75] x the threshold. Otherwise it stays as it
   was. A median would flip on every sample of an alternating fast/slow series
   (3 of 5, then 2 of 5); a 4-of-5 vote cannot, and one stray sample never
   flips it. ``server_error`` answers and probes give no latency sample: a 504
   after an upstream timeout says nothing about the player's link, and a probe
   runs on a cold connection (DNS, TCP, TLS), which would overstate latency.
   Going offline forgets the samples (the next path may differ).

Probes (``probe_due``/``next_probe_at``) are only wanted in doubt:

- never while the interfaces are down (nothing to learn; rule 2 probes as soon
  as they come back);
- in doubt (``unknown``, ``offline``, or a network error since the last
  answer): due at once when nothing was observed yet or the interfaces just
  came back, otherwise ``probe_min_interval`` [5 s] after the last request
  outcome or probe, so the host's own traffic answers the question instead
  whenever it flows; after ``n`` consecutive failed probes the next waits
  ``probe_min_interval * 2**(n-1)``, capped at ``probe_max_interval`` [300 s]:
  5, 10, 20, 40, 80, 160, 300, 300 s...;
- ``online``/``slow`` with no request outcome for ``stale_after`` [300 s]:
  one probe to confirm (None disables it).

Transitions are queued as :class:`Transition` (time, old, new) for
:meth:`NetworkMonitor.pop_transitions`, so the session can bank the exact time
spent in each condition, and optionally reported to ``on_change``, e.g. to wake
the uplink so it syncs within seconds of coming back online.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

logger = logging.getLogger("anisota_agent")

__all__ = [
    "CONDITIONS",
    "OUTCOMES",
    "NetworkMonitor",
    "Transition",
    "interfaces_up",
]

#: The conditions a monitor reports (the lexicon's ``networkCondition`` values),
#: best to worst: a record's tie in time held goes to the worse one.
CONDITIONS = ("online", "unknown", "slow", "offline")
#: What a measured request can end as; see the module docstring.
OUTCOMES = ("ok", "server_error", "network_error")
_OUTCOMES = frozenset(OUTCOMES)

DEFAULT_SLOW_THRESHOLD_MS = 2000.0
DEFAULT_RECOVER_RATIO = 0.75
DEFAULT_WINDOW = 5
DEFAULT_VOTES = 4
DEFAULT_OFFLINE_AFTER = 3
DEFAULT_PROBE_MIN_INTERVAL = 5.0
DEFAULT_PROBE_MAX_INTERVAL = 300.0
DEFAULT_STALE_AFTER = 300.0
#: Transitions kept for :meth:`NetworkMonitor.pop_transitions`; the uplink pops
#: them every few seconds, the cap only matters if it stopped doing so.
MAX_PENDING_TRANSITIONS = 256

_SLOW, _MIDDLE, _FAST = 1, 0, -1
_INF = math.inf


class Transition(NamedTuple):
    """A change of condition at ``at`` (the monitor's monotonic seconds)."""

    at: float
    old: str
    new: str

    @property
    def reconnected(self) -> bool:
        """True when this change found the PDS reachable again: time to sync."""
        return self.old in ("offline", "unknown") and self.new in ("online", "slow")


def interfaces_up() -> bool | None:
    """True if any non-loopback interface is up; None if psutil cannot tell.

    An interface counts when psutil reports it up (on Linux: running, i.e. it
    has a carrier) and it has at least one IPv4/IPv6 address that is not a
    loopback one; ``lo`` and interfaces with only loopback addresses (``lo0``
    on macOS, Windows' loopback pseudo-interface) or no IP at all are ignored.
    Costs about 0.1 ms; meant for the uplink, every few seconds.
    """
    try:
        import psutil  # here, not at the top: the package import stays light

        stats = psutil.net_if_stats()
        addresses = psutil.net_if_addrs()
    except Exception as error:  # psutil unsupported here, /proc unreadable, ...
        logger.debug("cannot read network interfaces: %s", error)
        return None
    return any(
        stat.isup and name != "lo" and _has_non_loopback_ip(addresses.get(name, ()))
        for name, stat in stats.items()
    )


def _has_non_loopback_ip(addresses: Iterable[object]) -> bool:
    """Whether any of psutil's ``snicaddr`` entries is a non-loopback IP."""
    import ipaddress
    import socket

    for entry in addresses:
        if getattr(entry, "family", None) not in (socket.AF_INET, socket.AF_INET6):
            continue  # a MAC (AF_PACKET/AF_LINK) carries no IP traffic
        try:  # IPv6 link-local addresses carry a "%scope" suffix
            ip = ipaddress.ip_address(str(getattr(entry, "address", "")).split("%", 1)[0])
        except ValueError:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_loopback:
            return True
    return False


class NetworkMonitor:
    """Thread-safe network condition from injected signals (rules: module docstring).

    Args:
        now: monotonic seconds (e.g. ``time.monotonic``); transitions carry it.
        slow_threshold_ms: latency above which a request counts as slow.
        recover_ratio: a request under ``recover_ratio * slow_threshold_ms``
            counts as fast; between the two it votes for neither.
        window: how many recent ``ok`` requests vote on latency.
        votes: how many of them must agree to change the latency state (more
            than half the window, so both sides can never win at once).
        offline_after: consecutive network errors that mean ``offline``.
        probe_min_interval: first probe backoff, and the quiet time after any
            request outcome before a probe is due.
        probe_max_interval: the longest wait between failed probes.
        stale_after: seconds without any request outcome after which an
            ``online``/``slow`` condition is confirmed by a probe (None: never).
        on_change: called with each :class:`Transition` right after it happens,
            on the observing thread, outside the lock; it must be quick and not
            raise (``uplink.wake.set`` is ideal). Calls from different threads may
            arrive out of order: :meth:`pop_transitions` is the ordered record.
    """

    def __init__(
        self,
        *,
        now: Callable[[], float],
        slow_threshold_ms: float = DEFAULT_SLOW_THRESHOLD_MS,
        recover_ratio: float = DEFAULT_RECOVER_RATIO,
        window: int = DEFAULT_WINDOW,
        votes: int = DEFAULT_VOTES,
        offline_after: int = DEFAULT_OFFLINE_AFTER,
        probe_min_interval: float = DEFAULT_PROBE_MIN_INTERVAL,
        probe_max_interval: float = DEFAULT_PROBE_MAX_INTERVAL,
        stale_after: float | None = DEFAULT_STALE_AFTER,
        on_change: Callable[[Transition], None] | None = None,
    ) -> None:
        _check_settings(
            slow_threshold_ms,
            recover_ratio,
            window,
            votes,
            offline_after,
            probe_min_interval,
            probe_max_interval,
            stale_after,
        )
        self._now = now
        self._slow_ms = float(slow_threshold_ms)
        self._fast_ms = float(slow_threshold_ms) * recover_ratio
        self._window = window
        self._votes = votes
        self._offline_after = offline_after
        self._probe_min = float(probe_min_interval)
        self._probe_max = float(probe_max_interval)
        self._stale_after = stale_after
        self._on_change = on_change
        self._lock = threading.Lock()
        self._created_at = now()
        self._condition = "unknown"
        self._interfaces: bool | None = None
        self._reachable = False  # an answer arrived since the last offline/start
        self._errors = 0  # consecutive network errors
        self._samples: deque[int] = deque(maxlen=window)  # _SLOW/_MIDDLE/_FAST
        self._slow_votes = 0
        self._fast_votes = 0
        self._slow = False
        self._last_outcome_at: float | None = None
        self._failed_probes = 0
        self._last_failed_probe_at: float | None = None
        self._transitions: deque[Transition] = deque(maxlen=MAX_PENDING_TRANSITIONS)
        self.dropped_transitions = 0
        # Online, no error streak, no failed probe and the window all fast: then
        # a fast answer changes nothing (observe_request's path without the lock).
        self._steady = False

    # -- signals (any thread, O(1)) ----------------------------------------------

    def observe_interfaces(self, up: bool | None) -> None:
        """Record an :func:`interfaces_up` reading (None: psutil could not tell)."""
        if up is not None and type(up) is not bool:
            raise TypeError(f"up must be a bool or None; got {type(up).__name__}")
        with self._lock:
            came_back = up is True and self._interfaces is False
            self._interfaces = up
            if came_back:  # a new path: old outcomes say nothing about it, probe at once
                self._errors = 0
                self._reset_probes()
                self._last_outcome_at = None
            change = self._update(self._now())
        self._notify(change)

    def observe_request(self, elapsed_ms: float, outcome: str, now: float | None = None) -> None:
        """Record one measured request: ``ok``, ``server_error`` or ``network_error``.

        ``now``: the monitor's clock, if the caller has just read it (it saves a
        reading; a change of condition reads it again under the lock, in order).
        """
        if self._steady and outcome == "ok" and 0 <= elapsed_ms < self._fast_ms:
            # The usual request, from any of the host's threads, without the lock:
            # in a steady state another fast answer changes nothing but the time
            # of the last outcome (an atomic store). Four game threads then never
            # queue up behind a lock whose holder the interpreter switched away from.
            self._last_outcome_at = self._now() if now is None else now
            return
        if outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}; got {outcome!r}")
        if not 0 <= elapsed_ms < _INF:  # also refuses NaN
            raise ValueError(f"elapsed_ms must be a finite number >= 0; got {elapsed_ms!r}")
        with self._lock:
            now = self._now()
            self._last_outcome_at = now
            if outcome == "network_error":
                self._errors += 1
            else:
                self._answered()
                if outcome == "ok":
                    self._sample(elapsed_ms)
            change = self._update(now)
        self._notify(change)

    def observe_probe(self, elapsed_ms: float | None, *, counted: bool = False) -> None:
        """Record a probe of the PDS: its elapsed ms, or None when it got no answer.

        ``counted=True`` says the probe's request was already reported through
        :meth:`observe_request` (it went through an instrumented client): then a
        failure only advances the probe backoff instead of counting as a second
        network error (a success changes nothing more; its latency, from a cold
        connection, has then already been sampled).
        """
        if elapsed_ms is not None and not 0 <= elapsed_ms < math.inf:
            raise ValueError(f"elapsed_ms must be None or finite >= 0; got {elapsed_ms!r}")
        with self._lock:
            now = self._now()
            self._last_outcome_at = now
            if elapsed_ms is None:
                if not counted:
                    self._errors += 1
                self._failed_probes += 1
                self._last_failed_probe_at = now
            else:
                self._answered()
            change = self._update(now)
        self._notify(change)

    # -- reading ------------------------------------------------------------------

    @property
    def condition(self) -> str:
        """The current condition, one of :data:`CONDITIONS`."""
        with self._lock:
            return self._condition

    def pop_transitions(self) -> list[Transition]:
        """The transitions since the last call, oldest first (and forget them)."""
        with self._lock:
            transitions = list(self._transitions)
            self._transitions.clear()
        return transitions

    def next_probe_at(self) -> float | None:
        """When a probe is wanted (monotonic seconds, maybe past), or None: no probe."""
        with self._lock:
            return self._next_probe()

    def probe_due(self) -> bool:
        """True when the uplink should probe the PDS now."""
        with self._lock:
            due = self._next_probe()
            return due is not None and self._now() >= due

    # -- internals (lock held) --------------------------------------------------------

    def _answered(self) -> None:
        """An answer arrived: the path works (unless the interfaces say otherwise)."""
        self._errors = 0
        self._failed_probes = 0
        self._last_failed_probe_at = None
        if self._interfaces is not False:
            self._reachable = True

    def _reset_probes(self) -> None:
        self._failed_probes = 0
        self._last_failed_probe_at = None

    def _sample(self, elapsed_ms: float) -> None:
        """Add an ``ok`` latency to the window and let the votes decide.

        Only the side that just gained a vote can newly reach a majority, so it
        is the only one to check (inlined: this runs on every host request).
        """
        samples = self._samples
        if len(samples) == self._window:
            evicted = samples[0]  # about to fall out of the window
            if evicted == _SLOW:
                self._slow_votes -= 1
            elif evicted == _FAST:
                self._fast_votes -= 1
        if elapsed_ms > self._slow_ms:
            samples.append(_SLOW)
            self._slow_votes += 1
            if self._slow_votes >= self._votes:
                self._slow = True
        elif elapsed_ms < self._fast_ms:
            samples.append(_FAST)
            self._fast_votes += 1
            if self._fast_votes >= self._votes:
                self._slow = False
        else:
            samples.append(_MIDDLE)

    def _derive(self) -> str:
        if self._interfaces is False or self._errors >= self._offline_after:
            return "offline"
        if not self._reachable:
            return "unknown"
        return "slow" if self._slow else "online"

    def _update(self, now: float) -> Transition | None:
        """Apply the rules; queue and return the transition if the condition changed."""
        new = self._derive()
        self._steady = (
            new == "online"
            and not self._errors
            and not self._failed_probes
            and self._fast_votes == self._window
        )
        if new == self._condition:
            return None
        transition = Transition(now, self._condition, new)
        self._condition = new
        if new == "offline":  # the next path may differ: start its evidence afresh
            self._reachable = False
            self._samples.clear()
            self._slow_votes = self._fast_votes = 0
            self._slow = False
        if len(self._transitions) == MAX_PENDING_TRANSITIONS:
            self.dropped_transitions += 1
        self._transitions.append(transition)
        return transition

    def _next_probe(self) -> float | None:
        if self._interfaces is False:
            return None
        last = self._last_outcome_at
        if self._condition in ("unknown", "offline") or self._errors:
            due = self._created_at if last is None else last + self._probe_min
            if self._last_failed_probe_at is not None:
                due = max(due, self._last_failed_probe_at + self._backoff())
            return due
        if self._stale_after is None or last is None:
            return None
        return last + self._stale_after

    def _backoff(self) -> float:
        """The wait after the latest of ``n`` consecutive failed probes."""
        doublings = max(0, min(self._failed_probes - 1, 30))  # 2**30 * 5 s: past any cap
        return min(self._probe_min * (1 << doublings), self._probe_max)

    # -- outside the lock ---------------------------------------------------------

    def _notify(self, change: Transition | None) -> None:
        if change is None or self._on_change is None:
            return
        try:
            self._on_change(change)
        except Exception:  # a listener's bug must not fail the host's request
            logger.exception("network on_change callback failed")


def _check_settings(
    slow_threshold_ms: float,
    recover_ratio: float,
    window: int,
    votes: int,
    offline_after: int,
    probe_min_interval: float,
    probe_max_interval: float,
    stale_after: float | None,
) -> None:
    """Refuse settings that would make the rules meaningless."""
    if not 0 < slow_threshold_ms < math.inf:
        raise ValueError(f"slow_threshold_ms must be > 0; got {slow_threshold_ms!r}")
    if not 0 < recover_ratio <= 1:
        raise ValueError(f"recover_ratio must be in (0, 1]; got {recover_ratio!r}")
    if window < 1 or not window // 2 < votes <= window:
        raise ValueError(f"votes must be a majority of window; got {votes!r} of {window!r}")
    if offline_after < 1:
        raise ValueError(f"offline_after must be >= 1; got {offline_after!r}")
    if not 0 < probe_min_interval <= probe_max_interval < math.inf:
        raise ValueError(
            "need 0 < probe_min_interval <= probe_max_interval; "
            f"got {probe_min_interval!r}, {probe_max_interval!r}"
        )
    if stale_after is not None and not 0 < stale_after < math.inf:
        raise ValueError(f"stale_after must be > 0 or None; got {stale_after!r}")
