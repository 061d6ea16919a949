"""The agent facade: what a game calls.

Every host-facing call validates its arguments, updates the in-memory session
under one lock and returns: no I/O, no heavy import, no thread wake-up on the
hot path. Two background threads pick the changes up: the
:class:`~anisota_agent.recorder.Recorder` writes them to SQLite at once, the
:class:`~anisota_agent.uplink.UplinkWorker` logs in and syncs to the PDS.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from .clock import Clock, SystemClock, TidGenerator
from .network import NetworkMonitor, Transition
from .records import (
    AUTHENTICATION_METHODS,
    ENTRY_POINTS,
    GAME_ACTIONS,
    HOST_END_REASONS,
    MAX_CLIENT_VERSION_LEN,
    MAX_COUNT_PER_CALL,
    MAX_FEATURE_LEN,
    MAX_FEATURES,
    MAX_LEVEL,
    MAX_LINKED_URIS,
    MAX_PAGES,
    MAX_REFERRER_LEN,
    MAX_RESPONSE_MS,
    MAX_ROUTE_LEN,
    MAX_URI_LEN,
    MAX_XP,
    PLATFORMS,
    SessionContext,
    SessionState,
    check_at_uri,
    check_choice,
    check_did,
    check_int,
    check_pds_url,
    check_seconds,
    check_text,
    clean_referrer,
)
from .recovery import LIVE_OWNER_TOKENS
from .status import BackgroundStatus

if TYPE_CHECKING:
    import httpx

    from .recorder import Recorder, Work
    from .timing import Timed
    from .uplink import AuthRequest, UplinkWorker

logger = logging.getLogger("anisota_agent")

DEFAULT_CHECKPOINT_INTERVAL = 5.0
DEFAULT_MAX_SESSION_AGE = 24 * 3600.0
DEFAULT_INACTIVITY_TIMEOUT = 30 * 60.0
DEFAULT_CONTINUATION_WINDOW = 30 * 60.0
DEFAULT_CLOSE_TIMEOUT = 2.0
DEFAULT_WRITE_RESERVE = 1000
DEFAULT_MAX_STORE_BYTES = 20_000_000  # of records: about 20,000 typical sessions
DEFAULT_RETENTION_DAYS = 30.0
DEFAULT_SLOW_THRESHOLD_MS = 2000.0
#: The wall clock running this far ahead of the monotonic clock means the
#: machine slept and the monotonic clock did not count it (where no
#: suspend-aware clock exists), or the wall clock was stepped forward: either way
#: the player was not playing in between.
SUSPEND_THRESHOLD_NS = 60 * 1_000_000_000
_GAME_ACTION_SET = frozenset(GAME_ACTIONS)


class AgentStatus(NamedTuple):
    """A snapshot of what the agent is doing and what it has lost.

    Attributes:
        enabled, running: recording at all; the background threads started and not closed.
        store_path, store_mode: the SQLite file; ``sqlite``, ``memory`` (asked
            for, or after the file failed), ``starting`` or ``stopped``.
        session: the live session's record key, if any.
        outbox: sessions in the store by state (live, pending, synced, quarantined).
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


#: Every agent of this process, so a forked child can reset them all.
_AGENTS: weakref.WeakSet[Agent] = weakref.WeakSet()


def _reset_agents_in_child() -> None:
    for agent in list(_AGENTS):
        agent._forget_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_agents_in_child)


def tracking_disabled_by_env() -> bool:
    """True when the environment asks not to be tracked (``DO_NOT_TRACK=1``)."""
    return os.environ.get("DO_NOT_TRACK", "").strip().lower() in ("1", "true", "yes")


class Agent:
    """Records the game's play sessions and keeps them safe on disk.

    Typical use::

        agent = Agent(client_version="1.4.2").start()
        agent.start_session(entry_point="direct", authentication_method="oauth")
        agent.page("/garden")
        agent.action("specimensCollected")
        agent.close()

    Args:
        client_version: the game's version, stored in every record.
        platform: one of ``web``, ``mobile``, ``desktop`` (default), ``pwa``.
        data_dir: where the SQLite store lives; default: the platform's user data
            dir (``ANISOTA_AGENT_DATA_DIR`` overrides it).
        in_memory: keep the store in memory only (nothing survives the process).
        enabled: ``False`` records nothing (as does ``DO_NOT_TRACK=1``).
        checkpoint_interval: seconds between checkpoints of the live session.
        inactivity_timeout: seconds without activity that end a session as
            ``inactivity`` (60 s to 24 h, default 30 min).
        continuation_window: seconds after an inactivity end within which new
            activity starts a continuation, linked by ``parentSessionUri``
            (0 to 24 h, default 30 min); later activity starts a plain session.
        max_session_age: seconds after which a session is expired
            (``expired``/``timeout``), by its own agent or by recovery.
        write_reserve: rate-limit points of the player's write budget the sync
            never spends, left for the game itself (default 1,000 of 5,000/h).
        mirror_interval: seconds between ``putRecord`` mirrors of the live
            session to the PDS (at least 60; default None: only finished
            sessions are written).
        slow_threshold_ms: request latency above which the network is ``slow``.
        max_store_bytes: the store's size bound (bytes of records); past it the
            oldest synced sessions go first, then quarantined, then unsynced
            ones (counted as lost).
        retention_days: synced and quarantined sessions older than this go.
        keyring: keep an app-password session in the OS keyring (``pip install
            keyring``) rather than a 0600 file; None (default) follows
            ``ANISOTA_AGENT_KEYRING=1``, as the CLI does.
        clock: the wall and monotonic clock (tests inject one).
    """

    def __init__(
        self,
        client_version: str,
        *,
        platform: str = "desktop",
        data_dir: str | os.PathLike[str] | None = None,
        in_memory: bool = False,
        enabled: bool = True,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
        inactivity_timeout: float = DEFAULT_INACTIVITY_TIMEOUT,
        continuation_window: float = DEFAULT_CONTINUATION_WINDOW,
        max_session_age: float = DEFAULT_MAX_SESSION_AGE,
        write_reserve: int = DEFAULT_WRITE_RESERVE,
        mirror_interval: float | None = None,
        slow_threshold_ms: float = DEFAULT_SLOW_THRESHOLD_MS,
        max_store_bytes: int = DEFAULT_MAX_STORE_BYTES,
        retention_days: float = DEFAULT_RETENTION_DAYS,
        keyring: bool | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.client_version = check_text("client_version", client_version, MAX_CLIENT_VERSION_LEN)
        self.platform = check_choice("platform", platform, PLATFORMS)
        day = 24 * 3600.0
        checkpoint_interval = check_seconds("checkpoint_interval", checkpoint_interval, 0.01, 3600)
        self._idle_ns = _ns(check_seconds("inactivity_timeout", inactivity_timeout, 60, day))
        self._window_ms = int(
            1000 * check_seconds("continuation_window", continuation_window, 0, day)
        )
        self._max_age_ns = _ns(check_seconds("max_session_age", max_session_age, 60, 7 * day))
        self._write_reserve = check_int("write_reserve", write_reserve, 0, 1_000_000)
        self._max_store_bytes = check_int("max_store_bytes", max_store_bytes, 100_000, 2**40)
        self._retention_s = 86400 * check_seconds("retention_days", retention_days, 1, 3650)
        self._keyring = _check_optional_bool("keyring", keyring)
        self._mirror_interval = (
            None
            if mirror_interval is None
            else check_seconds("mirror_interval", mirror_interval, 60, day)
        )
        self.enabled = enabled and not tracking_disabled_by_env()
        self._data_dir = None if in_memory or data_dir is None else os.fspath(data_dir)
        self._in_memory = in_memory
        self._checkpoint_interval = float(checkpoint_interval)
        self._clock = clock or SystemClock()
        self._mono = self._clock.monotonic_ns
        self._wall = self._clock.wall_ns
        self._slow_threshold_ms = check_seconds("slow_threshold_ms", slow_threshold_ms, 1, 600_000)
        self._network = self._new_network_monitor()
        self._tids = TidGenerator(clock=self._clock)
        self._lock = threading.Lock()
        self._session: SessionState | None = None
        # The last session that ended for inactivity: activity after it resumes play.
        self._resumable: SessionState | None = None
        self._finished: list[SessionState] = []
        # Changes the activity counter does not show (start, network, account).
        self._dirty = False
        self._collected_events = 0  # the live session's total_events at the last round
        self._dropped: Counter[str] = Counter()
        self._dropped_total: Counter[str] = Counter()
        # flush() callers waiting for a sync round, and for a recorder round only.
        self._waiters: list[threading.Event] = []
        self._recorded_waiters: list[threading.Event] = []
        self._stopping = False  # close() was called: no restart
        self._close_deadline: float | None = None
        self._purge = False
        self._did: str | None = None
        self._auth_requests: list[AuthRequest] = []
        # The tag of the login under way (a requested one, or the saved one being
        # resumed at start): sessions recorded meanwhile carry it and belong to the
        # account it yields (see SessionState.awaiting_login).
        self._awaiting: str | None = None
        # (tag, did) pairs found since the recorder's last round.
        self._attributions: list[tuple[str, str]] = []
        self._owner_token = os.urandom(16).hex()
        self._recorder: Recorder | None = None
        self._uplink: UplinkWorker | None = None
        self._status = BackgroundStatus()
        self._restart_in_child = False
        _AGENTS.add(self)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> Agent:
        """Start the background threads (opens the store, recovers crashed sessions).

        Returns the agent, so ``agent = Agent(...).start()`` reads well. Calling it
        again, or after :meth:`close`, is a no-op. A disabled agent starts no thread.
        """
        # The threads' modules load only when an agent starts (a light import).
        from .recorder import Recorder
        from .settings import BackgroundSettings
        from .uplink import RESUME_TAG, UplinkWorker

        with self._lock:
            if self._recorder is not None or self._stopping or not self.enabled:
                return self
            LIVE_OWNER_TOKENS.add(self._owner_token)
            if self._did is None and self._awaiting is None:
                self._awaiting = RESUME_TAG  # a saved login may be resumed at once
            self._status = BackgroundStatus()
            settings = BackgroundSettings(
                data_dir=self._data_dir,
                in_memory=self._in_memory,
                owner_token=self._owner_token,
                checkpoint_interval=self._checkpoint_interval,
                max_session_age_ms=self._max_age_ns // 1_000_000,
                reserve_points=self._write_reserve,
                mirror_interval=self._mirror_interval,
                max_store_bytes=self._max_store_bytes,
                retention_s=self._retention_s,
                keyring=self._keyring,
            )
            wall_s = self._wall_s
            uplink = UplinkWorker(self, settings, self._status, self._network, wall_s, self._mono_s)
            recorder = Recorder(self, settings, self._status, uplink, wall_s, self._mono_s)
            self._uplink, self._recorder = uplink, recorder
            recorder.start()
            uplink.start(recorder.ready, lambda: recorder.store, recorder.verify_file)
            atexit.register(self.close)
        return self

    def _forget_parent(self) -> None:
        """In a forked child: nothing of the parent's threads, session or connections.

        The parent's lock may have been held by one of its threads at the fork, and
        its threads do not exist here: start over with fresh state. The
        child's first ``start_session`` starts its own threads (and store
        connection). A saved app-password login is resumed from its file; a host's
        own ``use_auth`` is not carried over (its single-use refresh tokens must
        not be shared between processes).
        """
        self._lock = threading.Lock()
        self._restart_in_child = self._recorder is not None and not self._stopping
        self._recorder = None
        self._uplink = None
        self._status = BackgroundStatus()
        self._stopping = False
        self._close_deadline = None
        self._session = None
        self._resumable = None
        self._finished = []
        self._waiters = []
        self._recorded_waiters = []
        self._dirty = False
        self._purge = False
        self._auth_requests = []
        self._attributions = []
        self._awaiting = None
        self._dropped = Counter()
        self._dropped_total = Counter()
        LIVE_OWNER_TOKENS.discard(self._owner_token)
        self._owner_token = os.urandom(16).hex()
        self._tids = TidGenerator(clock=self._clock)  # a new random clock id
        self._network = self._new_network_monitor()

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> bool:
        """End the session as ``app_close``, checkpoint it, and stop the background threads.

        Returns within about ``timeout`` seconds whatever the disk does; True if
        everything was written in time. Safe to call twice.
        """
        self.end_session("app_close")
        with self._lock:
            recorder = self._recorder
            if recorder is None or self._stopping:
                self._stopping = True
                return recorder is None or recorder.join(0)
            self._stopping = True
            # The last sync must leave time to close the store within the timeout.
            self._close_deadline = self._wall_s() + timeout * 0.8
        atexit.unregister(self.close)
        recorder.wake.set()
        done = recorder.join(timeout)
        LIVE_OWNER_TOKENS.discard(self._owner_token)
        if not done:
            logger.warning("agent threads did not finish within %.1f s", timeout)
        return done

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Agent:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        import asyncio

        # close() waits (boundedly) for the threads: not on the event loop's thread.
        await asyncio.to_thread(self.close)

    def flush(self, timeout: float = 5.0, *, sync: bool = True) -> bool:
        """Ask for a round now and wait for it (blocks the caller).

        The recorder writes everything to the store, then (unless ``sync=False``)
        the uplink syncs what is due to the PDS (unless offline or backing off).
        For tests, tools and moments where the game can afford to wait; the
        recording calls never need it. True if the round(s) finished within
        ``timeout`` seconds.
        """
        done = threading.Event()
        with self._lock:
            recorder = self._recorder
            if recorder is None or self._stopping:
                return False
            (self._waiters if sync else self._recorded_waiters).append(done)
        recorder.wake.set()
        return done.wait(timeout)

    def purge(self) -> None:
        """Delete every session and counter in the store (the player's data)."""
        with self._lock:
            self._purge = True
            self._finished.clear()
            self._session = None
        self._wake()

    # -- the account -------------------------------------------------------------

    def use_auth(self, auth: httpx.Auth, *, did: str, pds_url: str) -> None:
        """Sync as the host's own session: any ``httpx.Auth`` (its OAuth/DPoP session).

        ``did`` is the account's DID; ``pds_url`` its PDS (``https://``, or
        ``http://`` to a loopback address). Sessions from now on belong to this
        account; a live session of another account is invalidated (account switch).
        """
        from .uplink import AuthRequest

        with self._refusals():
            if not callable(getattr(auth, "sync_auth_flow", None)):
                raise TypeError(f"auth must be an httpx.Auth; got {type(auth).__name__}")
            check_did("did", did)
            url = check_pds_url(pds_url)
        with self._lock:
            self._auth_requests.append(AuthRequest(kind="host", did=did, pds_url=url, auth=auth))
            self._awaiting = None
            self._set_account_locked(did)
        self._wake_uplink()

    def login(self, identifier: str, password: str, *, pds_url: str) -> None:
        """Log in with an app password, on the uplink's thread (this call does no I/O).

        A login the network keeps from the PDS is retried with backoff (at most a
        minute apart, at once when the network comes back) until the PDS answers;
        a refusal (wrong password) stops it, with the reason in
        ``status().auth_problem``. The password is held in memory only until then;
        the refresh token is kept in a 0600 file in the data dir (or the OS
        keyring), never the password. Sessions started or ended while the login is
        under way belong to the account it yields.
        """
        from .uplink import AuthRequest

        with self._refusals():
            check_text("identifier", identifier, 2048)
            check_text("password", password, 1024)
            url = check_pds_url(pds_url)
        tag = f"login:{url} {identifier}"
        with self._lock:
            self._auth_requests.append(
                AuthRequest(
                    kind="password", pds_url=url, identifier=identifier, password=password, tag=tag
                )
            )
            self._awaiting = tag
            session = self._session
            if session is not None and session.did is None:
                session.awaiting_login = tag  # the first to log in while it runs
                self._dirty = True
        self._wake_uplink()

    def logout(self) -> None:
        """End the session as ``logout`` and forget the account's credentials."""
        from .uplink import AuthRequest

        self.end_session("logout")
        with self._lock:
            self._auth_requests.append(AuthRequest(kind="logout"))
            self._did = None
            self._awaiting = None
        self._wake_uplink()

    def _take_auth_requests(self) -> list[AuthRequest]:
        """The account changes asked for since the uplink's last look (called by it)."""
        with self._lock:
            requests, self._auth_requests = self._auth_requests, []
        return requests

    def _has_auth_requests(self) -> bool:
        """Whether an account change waits for the uplink (read without the lock)."""
        return bool(self._auth_requests)

    def _account_found(self, tag: str, did: str | None) -> None:
        """The login tagged ``tag`` yielded ``did`` (None: it failed or was dropped).

        Every session recorded under it is that account's, wherever it is by
        now: live, finished in memory, or already in the store (the recorder's
        next round moves those).
        """
        with self._lock:
            if self._awaiting == tag:
                self._awaiting = None
            if did is None:
                return
            self._attributions.append((tag, did))
            for state in self._finished:
                if state.did is None and state.awaiting_login == tag:
                    state.did = did
            self._set_account_locked(did)
        self._wake()

    def _set_account_locked(self, did: str) -> None:
        self._did = did
        session = self._session
        if session is None or session.did == did:
            return
        if session.did is None:
            session.did = did  # recorded while the login was under way: it is theirs
            session.awaiting_login = None
            self._dirty = True
        else:
            logger.warning("account switched during session %s: invalidated", session.rkey)
            self._end_locked("invalidated", "forced_end", self._mono())

    # -- sessions ----------------------------------------------------------------

    def start_session(
        self,
        *,
        entry_point: str | None = None,
        authentication_method: str | None = None,
        is_new_user: bool | None = None,
        referrer: str | None = None,
        keep_referrer_query: bool = False,
    ) -> str | None:
        """Start a new session and return its record key (a TID).

        A session already running is ended first as ``user_initiated``. Returns
        None when tracking is disabled.
        """
        with self._refusals():
            context = SessionContext(
                entry_point=None
                if entry_point is None
                else check_choice("entry_point", entry_point, ENTRY_POINTS),
                authentication_method=None
                if authentication_method is None
                else check_choice(
                    "authentication_method", authentication_method, AUTHENTICATION_METHODS
                ),
                is_new_user=_check_optional_bool("is_new_user", is_new_user),
                referrer=None
                if referrer is None
                else clean_referrer(
                    check_text("referrer", referrer, MAX_REFERRER_LEN), keep_referrer_query
                ),
            )
        if not self.enabled:
            return None
        if self._restart_in_child:
            self._restart_in_child = False
            self.start()
        with self._lock:
            if self._session is not None:
                logger.warning("start_session while %s is active: ending it", self._session.rkey)
                self._end_locked("ended", "user_initiated", self._mono())
            rkey = self._begin_locked(context, self._mono(), parent_rkey=None).rkey
        self._wake()
        return rkey

    def end_session(self, reason: str = "user_initiated") -> str | None:
        """End the current session with the host's reason.

        ``reason``: ``logout``, ``user_initiated``, ``app_close`` or
        ``device_switch``. Returns the ended session's record key, or None when no
        session was running (ending twice is harmless).
        """
        with self._refusals():
            check_choice("reason", reason, HOST_END_REASONS)
        return self._end("ended", reason)

    def invalidate(self) -> str | None:
        """End the current session as ``invalidated``/``forced_end``.

        For an account switch, revoked auth or detected tampering. Returns the
        session's record key, or None when no session was running.
        """
        return self._end("invalidated", "forced_end")

    def _end(self, status: str, reason: str) -> str | None:
        with self._lock:
            rkey = self._end_locked(status, reason, self._mono())
        if rkey is not None:
            self._wake()
        return rkey

    def _begin_locked(
        self, context: SessionContext, mono_ns: int, parent_rkey: str | None
    ) -> SessionState:
        session = SessionState(
            rkey=self._tids.next(),
            client_version=self.client_version,
            platform=self.platform,
            context=context,
            started_wall_ms=self._wall() // 1_000_000,
            started_mono_ns=mono_ns,
            did=self._did,
        )
        session.parent_rkey = parent_rkey
        session.awaiting_login = self._awaiting if self._did is None else None
        session.condition = self._network.condition
        session.expires_mono_ns = mono_ns + self._max_age_ns
        # wall - mono beyond this means the wall clock ran ahead: the machine slept.
        session.asleep_offset_ns = (
            session.started_wall_ms * 1_000_000 - mono_ns + SUSPEND_THRESHOLD_NS
        )
        self._session = session
        self._resumable = None
        self._dirty = True
        return session

    def _end_locked(self, status: str, reason: str, at_mono_ns: int) -> str | None:
        session = self._session
        if session is None:
            return None
        session.finish(status, reason, at_mono_ns)
        self._finished.append(session)
        self._session = None
        self._resumable = session if reason in ("inactivity", "timeout") else None
        self._dirty = False
        return session.rkey

    def _end_if_idle_locked(self, now_ns: int) -> bool:
        """End the live session if it went idle, slept, or outlived the maximum age."""
        session = self._session
        if session is None:
            return False
        if now_ns > session.expires_mono_ns:
            self._end_locked("expired", "timeout", now_ns)
        elif (
            now_ns - session.last_activity_mono_ns > self._idle_ns
            or self._wall() - now_ns > session.asleep_offset_ns
        ):
            # Dated at the last activity: the player left then, not when we noticed.
            self._end_locked("ended", "inactivity", session.last_activity_mono_ns)
        else:
            return False
        return True

    def _resume_locked(self, now_ns: int) -> SessionState | None:
        """Activity after an inactivity end: a continuation within the window, else a new one."""
        previous = self._resumable
        if previous is None or previous.ended_mono_ns is None:
            return None
        # Wall time, not monotonic: a machine that slept has been away all along.
        away_ms = self._wall() // 1_000_000 - previous.wall_ms(previous.ended_mono_ns)
        parent = previous.rkey if away_ms <= self._window_ms else None
        # Same entry and auth as before; never a new user's first session again.
        was_new = previous.context.is_new_user
        context = previous.context._replace(
            is_new_user=None if was_new is None else False, referrer=None
        )
        session = self._begin_locked(context, now_ns, parent_rkey=parent)
        self._wake()
        return session

    # -- activity (the hot path) -----------------------------------------------------

    def touch(self) -> None:
        """The player is here: counts as activity without recording anything else."""
        with self._lock:
            self._active()

    def page(self, route: str) -> None:
        """Record a visit to a page or route (unique routes, in first-visit order)."""
        if type(route) is not str or not 0 < len(route) <= MAX_ROUTE_LEN:
            with self._refusals():
                check_text("route", route, MAX_ROUTE_LEN)
        with self._lock:
            session = self._active()
            if session is not None and route not in session.pages:
                self._add_unique(session.pages, route, MAX_PAGES, "pages_over_cap")

    def feature(self, name: str) -> None:
        """Record the use of a named feature (unique names, first-use order)."""
        if type(name) is not str or not 0 < len(name) <= MAX_FEATURE_LEN:
            with self._refusals():
                check_text("feature", name, MAX_FEATURE_LEN)
        with self._lock:
            session = self._active()
            if session is not None and name not in session.features:
                self._add_unique(session.features, name, MAX_FEATURES, "features_over_cap")

    def action(self, kind: str, count: int = 1) -> None:
        """Count a game action: one of the lexicon's ``gameActions`` names.

        ``kind``: ``levelUps``, ``feedsLoaded``, ``postsViewed``,
        ``itemsCollected``, ``specimensCollected`` or ``dailyRewardsClaimed``;
        ``count``: 1 to 1,000,000.
        """
        if type(kind) is not str or kind not in _GAME_ACTION_SET:
            with self._refusals():
                check_choice("kind", kind, GAME_ACTIONS)
        if type(count) is not int or not 1 <= count <= MAX_COUNT_PER_CALL:
            with self._refusals():
                check_int("count", count, 1, MAX_COUNT_PER_CALL)
        with self._lock:
            session = self._active()
            if session is not None:
                session.actions[kind] = session.actions.get(kind, 0) + count

    def progress(self, xp: int, level: int | None = None) -> None:
        """Report the player's total XP (and level); the first report is the baseline."""
        if type(xp) is not int or not 0 <= xp <= MAX_XP:
            with self._refusals():
                check_int("xp", xp, 0, MAX_XP)
        if level is not None and (type(level) is not int or not 1 <= level <= MAX_LEVEL):
            with self._refusals():
                check_int("level", level, 1, MAX_LEVEL)
        with self._lock:
            session = self._active()
            if session is not None:
                if session.first_xp is None:
                    session.first_xp = xp
                session.current_xp = xp
                if level is not None:
                    session.current_level = level

    def response(self, ms: float, ok: bool = True) -> None:
        """Record one measured API response: its time in ms and whether it succeeded."""
        if not (type(ms) is float or type(ms) is int) or not 0 <= ms <= MAX_RESPONSE_MS:
            with self._refusals():
                _reject_number("ms", ms, 0, MAX_RESPONSE_MS)
        if ok is not True and ok is not False:
            with self._refusals():
                raise TypeError(f"ok must be a bool; got {type(ok).__name__}")
        with self._lock:
            session = self._active()
            if session is not None:  # inline, not count_response(): the hot path
                session.response_count += 1
                session.response_total_ms += ms
                if not ok:
                    session.error_count += 1

    def link_log(self, uri: str) -> None:
        """Link a ``net.anisota.beta.game.log`` record (its at-uri) to the session."""
        if type(uri) is not str or not 6 <= len(uri) <= MAX_URI_LEN or uri[:5] != "at://":
            with self._refusals():
                check_at_uri("uri", uri)
        with self._lock:
            session = self._active()
            if session is not None and uri not in session.log_uris:
                self._add_unique(session.log_uris, uri, MAX_LINKED_URIS, "log_uris_over_cap")

    def link_progress(self, uri: str) -> None:
        """Link a ``net.anisota.beta.game.progress`` record (its at-uri) to the session."""
        if type(uri) is not str or not 6 <= len(uri) <= MAX_URI_LEN or uri[:5] != "at://":
            with self._refusals():
                check_at_uri("uri", uri)
        with self._lock:
            session = self._active()
            if session is not None and uri not in session.progress_uris:
                self._add_unique(
                    session.progress_uris, uri, MAX_LINKED_URIS, "progress_uris_over_cap"
                )

    def _active(self) -> SessionState | None:
        """The live session, with this call counted as activity (lock held).

        Ends a session that went idle, and resumes play in a new one (a
        continuation when recent enough). One clock read, one comparison: the
        clock counts time asleep, so a suspend is inactivity like any other; the
        maximum age, and a sleep the clock could not count, are the recorder's to
        catch (within one checkpoint interval). The recorder finds the change from
        ``total_events``.
        """
        now = self._mono()
        session = self._session
        if session is None or now - session.last_activity_mono_ns > self._idle_ns:
            if self._end_if_idle_locked(now):
                self._wake()
            session = self._resume_locked(now)
            if session is None:
                if self.enabled:
                    self._dropped["calls_without_session"] += 1
                return None
        session.total_events += 1
        session.last_activity_mono_ns = now
        return session

    @contextmanager
    def _refusals(self) -> Iterator[None]:
        """Count a call refused for bad input (``status().dropped["refused_calls"]``).

        The error still reaches the host, at the call that gave the bad value.
        """
        try:
            yield
        except (TypeError, ValueError):
            with self._lock:
                self._dropped["refused_calls"] += 1
            raise

    def _add_unique(self, items: dict[str, None], item: str, cap: int, overflow: str) -> None:
        """Add a new item to a capped list, or count it as dropped (lock held)."""
        if len(items) < cap:
            items[item] = None
        else:
            self._dropped[overflow] += 1

    # -- the host's HTTP traffic ------------------------------------------------------

    def report_request(self, elapsed_ms: float, outcome: str) -> None:
        """Record one of the game's own requests: its time and how it ended.

        ``outcome``: ``ok`` (an answer), ``server_error`` (5xx, 408, 429) or
        ``network_error`` (no answer). It counts as a measured response of the
        live session (anything but ``ok`` is an error) and informs the network
        condition, but is not player activity: a game polling its API in the
        background still goes inactive. The timing helpers below call it for you.
        """
        with self._refusals():
            self._network.observe_request(elapsed_ms, outcome)  # validates both
        with self._lock:
            session = self._session
            if session is not None:
                session.count_response(min(elapsed_ms, MAX_RESPONSE_MS), outcome == "ok")
                self._dirty = True

    def httpx_event_hooks(self, *, asynchronous: bool = False) -> dict[str, list[Any]]:
        """``event_hooks`` for the game's ``httpx.Client`` (or ``AsyncClient``) that time
        every request. Event hooks never see a request that got no answer: use
        :meth:`timed_transport` to count those too."""
        from . import timing

        factory = timing.async_event_hooks if asynchronous else timing.event_hooks
        return dict(factory(self.report_request))

    def timed_transport(self, inner: httpx.BaseTransport | None = None) -> httpx.BaseTransport:
        """A transport for the game's ``httpx.Client`` that times every request,
        failures included (wraps ``inner``, default ``httpx.HTTPTransport()``)."""
        from .timing import TimedTransport

        return TimedTransport(self.report_request, inner)

    def async_timed_transport(
        self, inner: httpx.AsyncBaseTransport | None = None
    ) -> httpx.AsyncBaseTransport:
        """Like :meth:`timed_transport`, for ``httpx.AsyncClient``."""
        from .timing import AsyncTimedTransport

        return AsyncTimedTransport(self.report_request, inner)

    def timed(self) -> Timed:
        """A context manager and decorator (sync or async) that times any call.

        An exception counts as an error (``network_error`` for ``OSError`` and
        httpx transport errors, else ``server_error``) and is re-raised.
        """
        from .timing import Timed

        return Timed(self.report_request)

    # -- the background threads' side----------------------------------------------------------

    def _wake(self) -> None:
        recorder = self._recorder
        if recorder is not None:
            recorder.wake.set()

    def _wake_uplink(self) -> None:
        uplink = self._uplink
        if uplink is not None:
            uplink.wake.set()

    def _wall_s(self) -> float:
        return self._wall() / 1e9

    def _collect(self) -> Work:
        """Hand the recorder what changed since its last round (called by it)."""
        from .recorder import Work

        with self._lock:
            session = self._session
            changed = session is not None and (
                self._dirty or session.total_events != self._collected_events
            )
            work = Work(
                live=session.copy() if session is not None and changed else None,
                finished=self._finished,
                attributions=self._attributions,
                dropped=dict(self._dropped),
                waiters=self._waiters,
                recorded=self._recorded_waiters,
                now_mono_ns=self._mono(),
                stopping=self._stopping,
                purge=self._purge,
                deadline=self._close_deadline,
            )
            self._attributions = []
            self._dropped_total.update(self._dropped)
            self._dropped.clear()
            self._finished = []
            self._waiters = []
            self._recorded_waiters = []
            self._dirty = False
            self._collected_events = session.total_events if session is not None else 0
            self._purge = False
        return work

    def _new_network_monitor(self) -> NetworkMonitor:
        # Probes back off from 1 s to at most 3 s while the PDS is unreachable,
        # so a restored link is noticed (and the queue synced) within 5 s.
        return NetworkMonitor(
            now=self._mono_s,
            slow_threshold_ms=self._slow_threshold_ms,
            probe_min_interval=1.0,
            probe_max_interval=3.0,
            on_change=self._on_network_change,
        )

    def _mono_s(self) -> float:
        return self._mono() / 1e9

    def _on_network_change(self, change: Transition) -> None:
        """Bank the live session's time in each condition, the moment it changes.

        Called by the monitor (outside its own lock) on whichever thread observed
        the change; back online, it wakes the uplink so the queue syncs in seconds.
        """
        with self._lock:
            session = self._session
            if session is not None:
                # The monitor's condition now, not change.new: two threads' changes
                # can arrive out of order, and the latest state is what holds.
                session.set_condition(self._network.condition, int(change.at * 1e9))
                self._dirty = True
        if change.reconnected:
            self._wake_uplink()

    def _end_idle(self) -> float:
        """Recorder's check: end an idle session; returns seconds until the next check is due."""
        with self._lock:
            now = self._mono()
            self._end_if_idle_locked(now)
            session = self._session
            if session is None:
                return float("inf")
            idle_deadline = session.last_activity_mono_ns + self._idle_ns
            return max(0.0, (min(idle_deadline, session.expires_mono_ns) - now) / 1e9)

    def status(self) -> AgentStatus:
        """What the agent is doing and what it dropped; reads no file."""
        running = self._recorder is not None
        seen = self._status.snapshot()
        with self._lock:
            dropped = dict(self._dropped_total + self._dropped)
            session = self._session.rkey if self._session is not None else None
        return AgentStatus(
            enabled=self.enabled,
            running=running and not self._stopping,
            store_path=seen.store_path,
            store_mode=seen.store_mode if running else "stopped",
            session=session,
            outbox=seen.outbox,
            dropped=dropped,
            last_error=seen.last_error,
            recovered=seen.recovered,
            counters=seen.counters,
            network=self._network.condition,
            account=seen.account,
            auth_problem=seen.auth_problem,
            last_sync_at=seen.last_sync_at,
            next_sync_at=seen.next_sync_at,
            sync_error=seen.sync_error,
        )


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def _check_optional_bool(name: str, value: object) -> bool | None:
    if value is None or type(value) is bool:
        return value
    raise TypeError(f"{name} must be a bool or None; got {type(value).__name__}")


def _reject_number(name: str, value: object, minimum: float, maximum: float) -> None:
    if type(value) not in (int, float):
        raise TypeError(f"{name} must be an int or float; got {type(value).__name__}")
    raise ValueError(f"{name} must be between {minimum} and {maximum}; got {value!r}")
