"""The agent facade: what a game calls.

Every host-facing call validates its arguments and returns: an activity call
queues itself for the in-memory session without a lock, the others change it
under one lock; no I/O, no heavy import, no thread wake-up on the hot path.
Two background threads pick the changes up: the
:class:`~anisota_agent.recorder.Recorder` writes them to SQLite at once, the
:class:`~anisota_agent.uplink.UplinkWorker` logs in and syncs to the PDS.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .checks import (
    check_at_uri,
    check_bool,
    check_choice,
    check_clock,
    check_did,
    check_int,
    check_number,
    check_optional_bool,
    check_pds_url,
    check_text,
)
from .clock import Clock, SystemClock
from .network import OUTCOMES, NetworkMonitor, Transition
from .records import (
    AUTHENTICATION_METHODS,
    ENTRY_POINTS,
    GAME_ACTIONS,
    HOST_END_REASONS,
    MAX_COUNT_PER_CALL,
    MAX_FEATURE_LEN,
    MAX_LEVEL,
    MAX_REFERRER_LEN,
    MAX_REQUEST_MS,
    MAX_RESPONSE_MS,
    MAX_ROUTE_LEN,
    MAX_XP,
    SessionContext,
    clean_referrer,
)
from .recovery import LIVE_OWNER_TOKENS
from .sessions import SETTLE_AT, Apply, SessionBook
from .settings import (
    CONSENT_STATES,
    DEFAULT_BACKGROUND_TIMEOUT,
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_CONSENT,
    DEFAULT_CONTINUATION_WINDOW,
    DEFAULT_INACTIVITY_TIMEOUT,
    DEFAULT_MAX_SESSION_AGE,
    DEFAULT_MAX_STORE_BYTES,
    DEFAULT_RETENTION_DAYS,
    DEFAULT_SLOW_THRESHOLD_MS,
    DEFAULT_WRITE_RESERVE,
    Guard,
    Settings,
)
from .status import AgentStatus, StatusBoard

if TYPE_CHECKING:
    import httpx

    from .recorder import Recorder, Work
    from .timing import Timed
    from .uplink import AuthRequest, UplinkWorker

__all__ = [
    "Agent",
]

logger = logging.getLogger("anisota_agent")


#: Every agent of this process, so a forked child can reset them all.
_AGENTS: weakref.WeakSet[Agent] = weakref.WeakSet()


def _reset_agents_in_child() -> None:
    for agent in list(_AGENTS):
        agent._forget_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_agents_in_child)


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
        background_timeout: seconds the game's window may stay in the background
            (see :meth:`set_foreground`) before its session ends as
            ``inactivity``, dated at the moment it went there (10 s to 24 h,
            default 300 s); a game that never reports its window has only the
            inactivity timeout.
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
        transport: the ``httpx.BaseTransport`` every request to the PDS goes
            through (logins, syncs, probes); default: httpx's own. Tests put
            faults in the network here.
        clock: the wall and monotonic clock (tests inject one).
        consent: the player's consent until they choose (``granted``, the
            default; ``pending``: record locally, upload nothing; ``denied``:
            record nothing). The player's choice (:meth:`set_consent`, or
            ``anisota-agent consent``) is kept in the store and wins over this
            argument on every later start.
        before_record: a guard, ``fn(record) -> record | None``, called on the
            recorder's thread with a deep copy of each finished record before it
            is stored final: the record it returns (validated like any other) is
            what is stored and uploaded; None keeps the session local, never
            uploaded (outbox ``withheld``), as does a guard that raises or
            returns anything but a valid record (counted in
            ``status().counters``, logged). Not with ``mirror_interval``.
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
        background_timeout: float = DEFAULT_BACKGROUND_TIMEOUT,
        max_session_age: float = DEFAULT_MAX_SESSION_AGE,
        write_reserve: int = DEFAULT_WRITE_RESERVE,
        mirror_interval: float | None = None,
        slow_threshold_ms: float = DEFAULT_SLOW_THRESHOLD_MS,
        max_store_bytes: int = DEFAULT_MAX_STORE_BYTES,
        retention_days: float = DEFAULT_RETENTION_DAYS,
        keyring: bool | None = None,
        transport: httpx.BaseTransport | None = None,
        clock: Clock | None = None,
        consent: str = DEFAULT_CONSENT,
        before_record: Guard | None = None,
    ) -> None:
        self._settings = Settings.checked(
            client_version=client_version,
            platform=platform,
            enabled=enabled,
            data_dir=data_dir,
            in_memory=in_memory,
            checkpoint_interval=checkpoint_interval,
            inactivity_timeout=inactivity_timeout,
            continuation_window=continuation_window,
            background_timeout=background_timeout,
            max_session_age=max_session_age,
            write_reserve=write_reserve,
            mirror_interval=mirror_interval,
            slow_threshold_ms=slow_threshold_ms,
            max_store_bytes=max_store_bytes,
            retention_days=retention_days,
            keyring=keyring,
            transport=transport,
            consent=consent,
            before_record=before_record,
        )
        self._clock = SystemClock() if clock is None else check_clock(clock)
        self._start_over()
        _AGENTS.add(self)

    def _start_over(self) -> None:
        """Every piece of state of one run: made new at first, and in a forked child."""
        self._lock = threading.Lock()
        self._network = NetworkMonitor(
            now=self._mono_s,
            slow_threshold_ms=self._settings.slow_threshold_ms,
            # Probes back off from 1 s to at most 3 s while the PDS is unreachable,
            # so a restored link is noticed (and the queue synced) within 5 s.
            probe_min_interval=1.0,
            probe_max_interval=3.0,
            on_change=self._on_network_change,
        )
        self._book = SessionBook(
            self._settings, self._clock, lambda: self._network.condition, self._wake
        )
        # The hot path's clock and queue, bound once.
        self._now = self._clock.monotonic_ns
        self._calls = self._book.calls
        # flush() callers waiting for a sync round, and for a recorder round only.
        self._waiters: list[threading.Event] = []
        self._recorded_waiters: list[threading.Event] = []
        self._stopping = False  # close() was called: no restart
        self._close_deadline: float | None = None
        self._purge = False
        self._auth_requests: list[AuthRequest] = []
        self._owner_token = os.urandom(16).hex()
        self._recorder: Recorder | None = None
        self._uplink: UplinkWorker | None = None
        self._status = StatusBoard()
        self._restart_in_child = False
        # The consent in force (the host's default until the recorder has read the
        # player's stored choice), and a choice of the player's for the recorder.
        self._consent = self._settings.consent
        self._consent_asked: str | None = None
        self._book.recording = self._consent != "denied"

    @property
    def client_version(self) -> str:
        """The game's version, stored in every record."""
        return self._settings.client_version

    @property
    def platform(self) -> str:
        """The platform stored in every record."""
        return self._settings.platform

    @property
    def enabled(self) -> bool:
        """Whether the agent records anything (``enabled`` and no ``DO_NOT_TRACK``)."""
        return self._settings.enabled

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> Agent:
        """Start the background threads (opens the store, recovers crashed sessions).

        Returns the agent, so ``agent = Agent(...).start()`` reads well. Calling it
        again, or after :meth:`close`, is a no-op. A disabled agent starts no thread.
        """
        # The threads' modules load only when an agent starts (a light import).
        from .recorder import Recorder
        from .uplink import RESUME_TAG, UplinkWorker

        with self._lock:
            if self._recorder is not None or self._stopping or not self.enabled:
                return self
            LIVE_OWNER_TOKENS.add(self._owner_token)
            if self._book.did is None and self._book.awaiting is None:
                self._book.login_started(RESUME_TAG)  # a saved login may be resumed at once
            uplink = UplinkWorker(self, self._settings, self._status, self._clock, self._network)
            recorder = Recorder(
                self, self._settings, self._status, self._clock, self._owner_token, uplink
            )
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
        restart = self._recorder is not None and not self._stopping
        consent = self._consent  # the player's choice is the child's too
        LIVE_OWNER_TOKENS.discard(self._owner_token)
        self._start_over()
        self._restart_in_child = restart
        self._consent = consent
        self._book.recording = consent != "denied"

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> bool:
        """End the session as ``app_close``, checkpoint it, and stop the background threads.

        Returns within about ``timeout`` seconds whatever the disk does; True if
        everything was written in time. Safe to call twice.
        """
        with self._refusals():
            timeout = check_number("timeout", timeout, 0, 3600)
        self.end_session("app_close")
        with self._lock:
            recorder = self._recorder
            if recorder is None or self._stopping:
                self._stopping = True
                return recorder is None or recorder.join(0)
            self._stopping = True
            # The last sync must leave time to close the store within the timeout.
            self._close_deadline = self._clock.wall_ns() / 1e9 + timeout * 0.8
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
        ``timeout`` seconds (0 to 3,600).
        """
        with self._refusals():
            timeout = check_number("timeout", timeout, 0, 3600)
            sync = check_bool("sync", sync)
        done = threading.Event()
        with self._lock:
            recorder = self._recorder
            if recorder is None or self._stopping:
                return False
            (self._waiters if sync else self._recorded_waiters).append(done)
        recorder.wake.set()
        return done.wait(timeout)

    # -- consent -------------------------------------------------------------------

    def set_consent(self, state: str) -> None:
        """The player's consent: ``granted``, ``pending`` or ``denied``; kept in the store.

        ``pending`` records locally and uploads nothing; back to ``granted``, what
        was recorded meanwhile uploads at once (within seconds when online).
        ``denied`` records nothing from now on (the live session is dropped,
        ``start_session()`` returns None) and deletes every local session not
        yet uploaded; those already on the PDS stay there (``anisota-agent
        purge --remote`` deletes them). Cheap and non-blocking: the recorder
        keeps the choice and deletes. A disabled agent (``enabled=False``,
        ``DO_NOT_TRACK``) records nothing whatever the consent, and keeps none.
        """
        with self._refusals():
            state = check_choice("consent", state, CONSENT_STATES)
        with self._lock:
            self._consent = state
            self._consent_asked = state
            self._apply_consent(state)
        self._wake()
        if state == "granted":
            self._wake_uplink()

    def _apply_consent(self, state: str) -> None:
        """Under the lock: whether the book records; a denial drops what it holds."""
        self._book.settle()  # what was done before the choice is recorded as before
        self._book.recording = state != "denied"
        if state == "denied":
            self._book.clear()

    def _consent_loaded(self, state: str) -> None:
        """The consent the recorder found in the store (called by it).

        A choice the player made since (not yet handed to the recorder) is newer
        and stays.
        """
        with self._lock:
            if self._consent_asked is not None or state == self._consent:
                return
            self._consent = state
            self._apply_consent(state)

    def _uploads_allowed(self) -> bool:
        """Whether the player's consent lets anything leave (read by the uplink)."""
        return self._consent == "granted"

    def purge(self) -> None:
        """Delete every session and counter in the store (the player's data)."""
        with self._lock:
            self._purge = True
            self._book.clear()
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
            self._book.use_account(did)
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
        request = AuthRequest(
            kind="password", pds_url=url, identifier=identifier, password=password, tag=tag
        )
        with self._lock:
            self._auth_requests.append(request)
            self._book.login_started(tag)
        self._wake_uplink()

    def logout(self) -> None:
        """End the session as ``logout`` and forget the account's credentials."""
        from .uplink import AuthRequest

        self.end_session("logout")
        with self._lock:
            self._auth_requests.append(AuthRequest(kind="logout"))
            self._book.logged_out()
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

        Called by the uplink; see :meth:`SessionBook.account_found`. The
        recorder's next round moves the sessions it already stored.
        """
        with self._lock:
            self._book.account_found(tag, did)
        if did is not None:
            self._wake()

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
        None when tracking is disabled, or while the player's consent is ``denied``.
        """
        with self._refusals():
            keep_query = check_bool("keep_referrer_query", keep_referrer_query)
            context = SessionContext(
                entry_point=None
                if entry_point is None
                else check_choice("entry_point", entry_point, ENTRY_POINTS),
                authentication_method=None
                if authentication_method is None
                else check_choice(
                    "authentication_method", authentication_method, AUTHENTICATION_METHODS
                ),
                is_new_user=check_optional_bool("is_new_user", is_new_user),
                referrer=None
                if referrer is None
                else clean_referrer(check_text("referrer", referrer, MAX_REFERRER_LEN), keep_query),
            )
        if not self.enabled or self._consent == "denied":
            return None
        if self._restart_in_child:
            self._restart_in_child = False
            self.start()
        with self._lock:
            self._book.settle()
            live = self._book.live
            if live is not None:
                logger.warning("start_session while %s is active: ending it", live.rkey)
            return self._book.begin(context).rkey

    def end_session(self, reason: str = "user_initiated") -> str | None:
        """End the current session with the host's reason.

        ``reason``: ``logout``, ``user_initiated``, ``app_close`` or
        ``device_switch``. Returns the ended session's record key, or None when no
        session was running (ending twice is harmless).
        """
        with self._refusals():
            check_choice("reason", reason, HOST_END_REASONS)
        with self._lock:
            return self._book.end("ended", reason)

    def invalidate(self) -> str | None:
        """End the current session as ``invalidated``/``forced_end``.

        For an account switch, revoked auth or detected tampering. Returns the
        session's record key, or None when no session was running.
        """
        with self._lock:
            return self._book.end("invalidated", "forced_end")

    # -- activity (the hot path) -----------------------------------------------------
    #
    # Each call tests its arguments inline, then queues itself for the book: no
    # lock, no I/O, no wake-up. The inline test passes the usual good values only
    # (calling a checker would cost as much as the rest of the call); anything else
    # goes to the checkers, which pass what the test is too strict for (an int
    # ``ms``, non-ASCII text) or raise naming the field, counted as refused.

    def touch(self) -> None:
        """The player is here: counts as activity without recording anything else."""
        self._queue(SessionBook.on_touch, None, None)

    def page(self, route: str) -> None:
        """Record a visit to a page or route (unique routes, in first-visit order)."""
        if type(route) is not str or not 0 < len(route) <= MAX_ROUTE_LEN or not route.isascii():
            with self._refusals():
                check_text("route", route, MAX_ROUTE_LEN)
        self._queue(SessionBook.on_page, route, None)

    def feature(self, name: str) -> None:
        """Record the use of a named feature (unique names, first-use order)."""
        if type(name) is not str or not 0 < len(name) <= MAX_FEATURE_LEN or not name.isascii():
            with self._refusals():
                check_text("feature", name, MAX_FEATURE_LEN)
        self._queue(SessionBook.on_feature, name, None)

    def action(self, kind: str, count: int = 1) -> None:
        """Count a game action: one of the lexicon's ``gameActions`` names.

        ``kind``: ``levelUps``, ``feedsLoaded``, ``postsViewed``,
        ``itemsCollected``, ``specimensCollected`` or ``dailyRewardsClaimed``;
        ``count``: 1 to 1,000,000.
        """
        if (
            type(kind) is not str
            or kind not in GAME_ACTIONS
            or type(count) is not int
            or not 1 <= count <= MAX_COUNT_PER_CALL
        ):
            with self._refusals():
                check_choice("kind", kind, GAME_ACTIONS)
                check_int("count", count, 1, MAX_COUNT_PER_CALL)
        self._queue(SessionBook.on_action, kind, count)

    def progress(self, xp: int, level: int | None = None) -> None:
        """Report the player's total XP (and level); the first report is the baseline."""
        if (
            type(xp) is not int
            or not 0 <= xp <= MAX_XP
            or (level is not None and (type(level) is not int or not 1 <= level <= MAX_LEVEL))
        ):
            with self._refusals():
                check_int("xp", xp, 0, MAX_XP)
                if level is not None:
                    check_int("level", level, 1, MAX_LEVEL)
        self._queue(SessionBook.on_progress, xp, level)

    def response(self, ms: float, ok: bool = True) -> None:
        """Record one measured API response: its time in ms and whether it succeeded."""
        if type(ms) is not float or not 0 <= ms <= MAX_RESPONSE_MS or type(ok) is not bool:
            with self._refusals():
                check_number("ms", ms, 0, MAX_RESPONSE_MS)
                check_bool("ok", ok)
        self._queue(SessionBook.on_response, ms, ok)

    def link_log(self, uri: str) -> None:
        """Link a ``net.anisota.beta.game.log`` record (its at-uri) to the session."""
        try:  # no inline test: the uri's syntax is a pattern
            check_at_uri("uri", uri)
        except (TypeError, ValueError):
            self._refused()
            raise
        self._queue(SessionBook.on_log, uri, None)

    def link_progress(self, uri: str) -> None:
        """Link a ``net.anisota.beta.game.progress`` record (its at-uri) to the session."""
        try:  # no inline test: the uri's syntax is a pattern
            check_at_uri("uri", uri)
        except (TypeError, ValueError):
            self._refused()
            raise
        self._queue(SessionBook.on_progress_link, uri, None)

    def _queue(self, apply: Apply, first: Any, second: Any) -> None:
        """Queue an activity call for the book, stamped now; settle a long queue.

        The book applies the queue under the lock whenever anything reads or
        changes the sessions (a recorder round, ``status()``, ``end_session()``,
        ...), so nothing is ever seen out of order; a caller settles it itself
        only when nobody did for :data:`~anisota_agent.sessions.SETTLE_AT` calls.
        """
        calls = self._calls
        calls.append((apply, first, second, self._now()))
        if len(calls) >= SETTLE_AT:
            self._settle_queue()

    def _settle_queue(self) -> None:
        with self._lock:
            self._book.settle()

    def set_foreground(self, foreground: bool) -> None:
        """The game's window went to the background (``False``) or came back (``True``).

        Call it from the window's focus and minimize events (or let
        :mod:`anisota_agent.integrations` do it). A session whose window stays
        in the background longer than ``background_timeout`` ends as
        ``ended``/``inactivity`` with ``endedAt`` = the moment it went there;
        coming back before that keeps the session, and the time behind counts
        in its ``duration`` like any short pause (the store keeps how much of it
        was behind; the record has no field for it). Calls made meanwhile still
        count in the session but are not the player's presence, and resume no
        session once it ended; coming back is presence, and resumes play after
        an inactivity end. With no session running it only notes the state
        (a session started behind starts its background clock at once).
        Cheap: no I/O, no thread woken (unless it begins or ends a session).
        """
        try:
            check_bool("foreground", foreground)
        except TypeError:
            self._refused()
            raise
        with self._lock:
            self._book.set_foreground(foreground)

    def _refused(self) -> None:
        """Count a call refused for bad input (``status().dropped["refused_calls"]``).

        The error still reaches the host, at the call that gave the bad value.
        """
        with self._lock:
            self._book.drop("refused_calls")

    @contextmanager
    def _refusals(self) -> Iterator[None]:
        """:meth:`_refused` for the calls off the hot path."""
        try:
            yield
        except (TypeError, ValueError):
            self._refused()
            raise

    # -- the host's HTTP traffic ------------------------------------------------------

    def report_request(self, elapsed_ms: float, outcome: str) -> None:
        """Record one of the game's own requests: its time and how it ended.

        ``elapsed_ms``: 0 to 86,400,000 (a day; the record keeps at most an
        hour). ``outcome``: ``ok`` (an answer), ``server_error`` (5xx, 408, 429)
        or ``network_error`` (no answer). It counts as a measured response of the
        live session (anything but ``ok`` is an error) and informs the network
        condition, but is not player activity: a game polling its API in the
        background still goes inactive. The timing helpers below call it for you.
        """
        ms = elapsed_ms
        if (
            type(ms) is not float
            or not 0 <= ms <= MAX_RESPONSE_MS
            or type(outcome) is not str
            or outcome not in OUTCOMES
        ):
            with self._refusals():
                check_number("elapsed_ms", elapsed_ms, 0, MAX_REQUEST_MS)
                check_choice("outcome", outcome, OUTCOMES)
            ms = min(elapsed_ms, MAX_RESPONSE_MS)  # the record keeps at most an hour
        # The monitor's clock read here, as a bare function: its own is a method.
        self._network.observe_request(elapsed_ms, outcome, self._now() / 1e9)
        calls = self._calls
        # Queued with no instant: not activity.
        calls.append((SessionBook.on_response, ms, outcome == "ok", None))
        if len(calls) >= SETTLE_AT:
            self._settle_queue()

    def httpx_event_hooks(self, *, asynchronous: bool = False) -> dict[str, list[Any]]:
        """``event_hooks`` for the game's ``httpx.Client`` (or ``AsyncClient``) that time
        every request. Event hooks never see a request that got no answer: use
        :meth:`timed_transport` to count those too."""
        from . import timing

        with self._refusals():
            check_bool("asynchronous", asynchronous)
        factory = timing.async_event_hooks if asynchronous else timing.event_hooks
        return dict(factory(self.report_request))

    def timed_transport(self, inner: httpx.BaseTransport | None = None) -> httpx.BaseTransport:
        """A transport for the game's ``httpx.Client`` that times every request,
        failures included (wraps ``inner``, default ``httpx.HTTPTransport()``)."""
        from .timing import TimedTransport

        with self._refusals():
            return TimedTransport(self.report_request, inner)

    def async_timed_transport(
        self, inner: httpx.AsyncBaseTransport | None = None
    ) -> httpx.AsyncBaseTransport:
        """Like :meth:`timed_transport`, for ``httpx.AsyncClient``."""
        from .timing import AsyncTimedTransport

        with self._refusals():
            return AsyncTimedTransport(self.report_request, inner)

    def timed(self) -> Timed:
        """A context manager and decorator (sync or async) that times any call.

        An exception counts as an error (``network_error`` for ``OSError`` and
        httpx transport errors, else ``server_error``) and is re-raised.
        """
        from .timing import Timed

        return Timed(self.report_request)

    # -- the background threads' side ----------------------------------------------

    def _wake(self) -> None:
        recorder = self._recorder
        if recorder is not None:
            recorder.wake.set()

    def _wake_uplink(self) -> None:
        uplink = self._uplink
        if uplink is not None:
            uplink.wake.set()

    def _mono_s(self) -> float:
        return self._clock.monotonic_ns() / 1e9

    def _collect(self) -> Work:
        """Hand the recorder what changed since its last round (called by it)."""
        from .recorder import Work

        with self._lock:
            work = Work(
                sessions=self._book.collect(),
                waiters=self._waiters,
                recorded=self._recorded_waiters,
                stopping=self._stopping,
                purge=self._purge,
                deadline=self._close_deadline,
                consent=self._consent_asked,
            )
            self._waiters = []
            self._recorded_waiters = []
            self._purge = False
            self._consent_asked = None
        return work

    def _end_idle(self) -> float:
        """Recorder's check: end an idle session; returns seconds until the next check is due."""
        with self._lock:
            return self._book.end_if_idle()

    def _on_network_change(self, change: Transition) -> None:
        """Bank the live session's time in each condition, the moment it changes.

        Called by the monitor (outside its own lock) on whichever thread observed
        the change; back online, it wakes the uplink so the queue syncs in seconds.
        """
        with self._lock:
            # The monitor's condition now, not change.new: two threads' changes
            # can arrive out of order, and the latest state is what holds.
            self._book.network_changed(self._network.condition, int(change.at * 1e9))
        if change.reconnected:
            self._wake_uplink()

    def status(self) -> AgentStatus:
        """What the agent is doing and what it dropped; reads no file."""
        running = self._recorder is not None
        facts = self._status.facts()
        if not running:
            facts["store_mode"] = "stopped"
        with self._lock:
            dropped = self._book.dropped()
            live = self._book.live
        return AgentStatus(
            enabled=self.enabled,
            running=running and not self._stopping,
            session=live.rkey if live is not None else None,
            dropped=dropped,
            network=self._network.condition,
            consent=self._consent,
            **facts,
        )
