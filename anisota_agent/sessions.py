"""The session book: the rules of a play session, as a pure object.

It begins and ends sessions, ends them for inactivity, a game left in the
background, a suspend or the maximum age, starts continuations, attributes
sessions to the account a login yields, and hands the recorder what changed
(:meth:`SessionBook.collect`). Time comes from the injected clock; there is no
lock, no thread and no I/O here: the :class:`~anisota_agent.Agent` calls it
under its own lock, except for the activity calls, which game threads append
to :attr:`SessionBook.calls` without it and the book applies in order before
anything else (:meth:`SessionBook.settle`).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from .clock import Clock, TidGenerator
from .records import (
    MAX_FEATURES,
    MAX_LINKED_URIS,
    MAX_PAGES,
    SessionContext,
    SessionState,
)
from .settings import Settings

__all__ = ["SETTLE_AT", "SUSPEND_THRESHOLD_NS", "Apply", "Call", "Collected", "SessionBook"]

#: A :class:`SessionBook` method that applies an activity call's two arguments to
#: the session it counts in, taken from the class (a plain function: no bound
#: method to make on the game's thread).
Apply = Callable[["SessionBook", SessionState, Any, Any], None]
#: An activity call waiting in :attr:`SessionBook.calls`: the method that applies
#: it, its two arguments, and the monotonic instant it was made (None for a call
#: that is not the player's activity: a timed request).
Call = tuple[Apply, Any, Any, "int | None"]
#: A caller that finds this many calls waiting applies them itself (under the
#: agent's lock): the queue stays small when nothing else settles it.
SETTLE_AT = 256

#: The wall clock running this far ahead of the monotonic clock means the
#: machine slept and the monotonic clock did not count it (where no
#: suspend-aware clock exists), or the wall clock was stepped forward: either way
#: the player was not playing in between.
SUSPEND_THRESHOLD_NS = 60 * 1_000_000_000
#: End reasons after which new activity resumes play (a continuation, in the window).
RESUMABLE_REASONS = ("inactivity", "timeout")


class Collected:
    """What changed since the last :meth:`SessionBook.collect`.

    A plain class with slots: a NamedTuple would cost the package's import ~0.3 ms.
    """

    __slots__ = ("attributions", "dropped", "finished", "live", "now_mono_ns")

    def __init__(
        self,
        live: SessionState | None,
        finished: list[SessionState],
        attributions: list[tuple[str, str | None]],
        dropped: dict[str, int],
        now_mono_ns: int,
    ) -> None:
        #: A copy of the live session, if it changed (None: nothing new, or none live).
        self.live = live
        #: Sessions ended since, oldest first.
        self.finished = finished
        #: (login tag, did): sessions recorded under that login belong to ``did``
        #: (None: the login failed, they belong to no account).
        self.attributions = attributions
        #: Calls refused or cut short since, by kind.
        self.dropped = dropped
        #: The monotonic instant of the collection (the records' ``updatedAt``).
        self.now_mono_ns = now_mono_ns


class SessionBook:
    """The live session, the ones just finished, and the account they belong to.

    Args:
        settings: the agent's (client version, platform, timeouts, window, max age).
        clock: the wall and monotonic clock.
        condition: the network condition now (a new session starts in it).
        on_change: called when a session begins or ends (the agent wakes its
            recorder), with the agent's lock held: it must only signal.
    """

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        condition: Callable[[], str],
        on_change: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._on_change = on_change
        self._mono = clock.monotonic_ns
        self._wall = clock.wall_ns
        self._tids = TidGenerator(clock=clock)
        self._condition = condition
        # Compared on the hot path: integers, converted once.
        self._idle_ns = int(settings.inactivity_timeout * 1e9)
        self._window_ms = int(settings.continuation_window * 1000)
        self._background_ns = int(settings.background_timeout * 1e9)
        self._max_age_ns = int(settings.max_session_age * 1e9)
        #: The session being recorded, if any.
        self.live: SessionState | None = None
        # The last session that ended for inactivity: activity after it resumes play.
        self._resumable: SessionState | None = None
        self._finished: list[SessionState] = []
        # Changes the activity counter does not show (start, network, account).
        self._dirty = False
        self._collected_events = 0  # the live session's total_events at the last collect
        self._dropped: Counter[str] = Counter()
        self._dropped_collected: Counter[str] = Counter()
        #: The account new sessions belong to, if known.
        self.did: str | None = None
        #: The tag of the login under way (a requested one, or the saved one being
        #: resumed at start): sessions recorded meanwhile carry it and belong to the
        #: account it yields (see :attr:`SessionState.awaiting_login`).
        self.awaiting: str | None = None
        self._attributions: list[tuple[str, str | None]] = []
        #: False while the player's consent is ``denied``: nothing is recorded, and
        #: a call with no session is no loss to count.
        self.recording = True
        #: Whether the game's window is in front (as the game last said; a game
        #: that never says stays in front, and only the inactivity timeout applies).
        self.foreground = True
        #: Activity calls made since the last :meth:`settle`, oldest first. Game
        #: threads append to it without the lock (``deque.append`` is atomic), so
        #: threads calling at once never queue on the lock for an activity call;
        #: every method below applies them first, in order, each at its instant.
        self.calls: deque[Call] = deque()

    def settle(self) -> None:
        """Apply the activity calls waiting in :attr:`calls` (under the agent's lock).

        What is queued by now, not what game threads append meanwhile: those that
        find the queue long wait on the lock for this batch, then settle their own.
        """
        count = len(self.calls)
        if not count:
            return
        session = self.live
        # The clock read after the count: every call counted read it before.
        if (
            session is None
            or not self.foreground
            or self._mono() - session.last_activity_mono_ns > self._idle_ns
        ):
            self._settle_one_by_one(count)
            return
        # In play, in front, and no call past the inactivity timeout: none of them
        # ends or resumes a session (the window moves only under the lock), so
        # each applies to this one, and the activity is counted once for all.
        popleft = self.calls.popleft
        last = session.last_activity_mono_ns
        events = 0
        for _ in range(count):
            apply, first, second, at = popleft()
            if at is None:  # a timed request: a change the activity count does not show
                self._dirty = True
            else:
                events += 1
                if at > last:
                    last = at
            apply(self, session, first, second)
        session.total_events += events
        session.last_activity_mono_ns = last

    def _settle_one_by_one(self, count: int) -> None:
        """:meth:`settle` when a call may end or resume a session: each at its instant."""
        popleft = self.calls.popleft
        for _ in range(count):
            apply, first, second, at = popleft()
            if at is None:
                session = self.live
                self._dirty = True
            else:
                session = self.active(at)
            if session is not None:
                apply(self, session, first, second)

    # -- beginning and ending --------------------------------------------------

    def begin(self, context: SessionContext, parent_rkey: str | None = None) -> SessionState:
        """Start a new session (ending a live one as ``ended``/``user_initiated``)."""
        self.settle()
        return self._begin(context, parent_rkey, self._mono())

    def _begin(self, context: SessionContext, parent_rkey: str | None, now_ns: int) -> SessionState:
        """Begin at ``now_ns``: now, or the instant of the queued call that resumes play."""
        # The wall clock as it read then (the two clocks move together while awake).
        wall_ns = self._wall() - (self._mono() - now_ns)
        self._end("ended", "user_initiated", now_ns)
        session = SessionState(
            rkey=self._tids.next(),
            client_version=self._settings.client_version,
            platform=self._settings.platform,
            context=context,
            started_wall_ms=wall_ns // 1_000_000,
            started_mono_ns=now_ns,
            did=self.did,
        )
        session.parent_rkey = parent_rkey
        if not self.foreground:  # started behind: the background clock runs from the start
            session.to_background(now_ns)
        session.awaiting_login = self.awaiting if self.did is None else None
        session.condition = self._condition()
        session.expires_mono_ns = now_ns + self._max_age_ns
        # wall - mono beyond this means the wall clock ran ahead: the machine slept.
        session.asleep_offset_ns = (
            session.started_wall_ms * 1_000_000 - now_ns + SUSPEND_THRESHOLD_NS
        )
        self.live = session
        self._resumable = None
        self._dirty = True
        self._on_change()
        return session

    def end(self, status: str, reason: str, at_mono_ns: int | None = None) -> str | None:
        """End the live session (now, or at ``at_mono_ns``); its rkey, or None if none ran."""
        self.settle()
        return self._end(status, reason, at_mono_ns)

    def _end(self, status: str, reason: str, at_mono_ns: int | None = None) -> str | None:
        session = self.live
        if session is None:
            return None
        session.finish(status, reason, self._mono() if at_mono_ns is None else at_mono_ns)
        self._finished.append(session)
        self.live = None
        self._resumable = session if reason in RESUMABLE_REASONS else None
        self._dirty = False
        self._on_change()
        return session.rkey

    def end_if_idle(self) -> float:
        """End the live session if it went idle, slept, or outlived the maximum age.

        Returns the seconds until the next check is due (infinity when no
        session is live).
        """
        self.settle()
        now_ns = self._mono()
        self._end_if_idle(now_ns, self._wall())
        session = self.live
        if session is None:
            return float("inf")
        deadline, _ = self._away_deadline(session)
        return max(0.0, (min(deadline, session.expires_mono_ns) - now_ns) / 1e9)

    def _away_deadline(self, session: SessionState) -> tuple[int, int]:
        """When the session ends if nothing changes, and the moment it is then dated at.

        The first of two deadlines: the inactivity timeout after the last
        activity, and the background timeout after the window went behind.
        """
        idle = (session.last_activity_mono_ns + self._idle_ns, session.last_activity_mono_ns)
        since = session.background_since_mono_ns
        if since is None:
            return idle
        return min(idle, (since + self._background_ns, since))

    def _end_if_idle(self, now_ns: int, wall_ns: int | None) -> bool:
        """End the live session if it is over at ``now_ns``; True if it ended.

        ``wall_ns``: the wall clock at ``now_ns``, for a sleep the monotonic
        clock did not count; None for a queued call, whose moment's wall time
        is not known (:meth:`end_if_idle`, every recorder round, catches it).
        """
        session = self.live
        if session is None:
            return False
        deadline, left_at = self._away_deadline(session)
        if now_ns > session.expires_mono_ns:
            # As recovery dates a crashed one: the last activity is the last sure fact.
            self._end("expired", "timeout", session.last_activity_mono_ns)
        elif now_ns > deadline:
            # Dated when the player left (the last activity, or the moment the
            # window went behind), not when we noticed.
            self._end("ended", "inactivity", left_at)
        elif wall_ns is not None and wall_ns - now_ns > session.asleep_offset_ns:
            # Asleep at some unknown moment: behind already, or after the last activity.
            since = session.background_since_mono_ns
            self._end(
                "ended", "inactivity", session.last_activity_mono_ns if since is None else since
            )
        else:
            return False
        return True

    def _resume(self, now_ns: int) -> SessionState | None:
        """Activity at ``now_ns`` after an inactivity end: a continuation within the
        window, else a new one."""
        previous = self._resumable
        if previous is None or previous.ended_mono_ns is None:
            return None
        # Wall time, not monotonic: a machine that slept has been away all along.
        wall_ns = self._wall() - (self._mono() - now_ns)
        away_ms = wall_ns // 1_000_000 - previous.wall_ms(previous.ended_mono_ns)
        parent = previous.rkey if away_ms <= self._window_ms else None
        # Same entry and auth as before; never a new user's first session again.
        was_new = previous.context.is_new_user
        context = previous.context._replace(
            is_new_user=None if was_new is None else False, referrer=None
        )
        return self._begin(context, parent, now_ns)

    # -- activity (the hot path, applied by settle) ------------------------------

    def active(self, now: int) -> SessionState | None:
        """The live session, with a call made at ``now`` (monotonic ns) counted as activity.

        Ends a session that went idle, and resumes play in a new one (a
        continuation when recent enough). One comparison and one flag in front:
        the clock counts time asleep, so a suspend is inactivity like any other;
        the maximum age, and a sleep the clock could not count, are caught by
        :meth:`end_if_idle`; a window behind takes the slow path. :meth:`collect`
        finds the change from ``total_events``. Game threads read the clock
        before their calls reach the queue, so ``now`` may be a little older
        than another thread's last activity: it never moves that back.
        """
        session = self.live
        if (
            session is None
            or now - session.last_activity_mono_ns > self._idle_ns
            or not self.foreground
        ):
            return self._active_rarely(now)
        session.total_events += 1
        if now > session.last_activity_mono_ns:
            session.last_activity_mono_ns = now
        return session

    # The activity calls, as :meth:`settle` applies them to the session they count in.

    def on_touch(self, session: SessionState, _first: None, _second: None) -> None:
        """``touch()``: activity, nothing else."""

    def on_page(self, session: SessionState, route: str, _second: None) -> None:
        """``page(route)``: unique routes, in first-visit order."""
        if route not in session.pages:
            self.add_unique(session.pages, route, MAX_PAGES, "pages_over_cap")

    def on_feature(self, session: SessionState, name: str, _second: None) -> None:
        """``feature(name)``: unique names, in first-use order."""
        if name not in session.features:
            self.add_unique(session.features, name, MAX_FEATURES, "features_over_cap")

    def on_action(self, session: SessionState, kind: str, count: int) -> None:
        """``action(kind, count)``: a game action's count."""
        session.actions[kind] = session.actions.get(kind, 0) + count

    def on_progress(self, session: SessionState, xp: int, level: int | None) -> None:
        """``progress(xp, level)``: the first report is the session's baseline."""
        if session.first_xp is None:
            session.first_xp = xp
        session.current_xp = xp
        if level is not None:
            session.current_level = level

    def on_response(self, session: SessionState, ms: float, ok: bool) -> None:
        """``response(ms, ok)``, and the requests timed by ``report_request()``."""
        session.response_count += 1
        session.response_total_ms += ms
        if not ok:
            session.error_count += 1

    def on_log(self, session: SessionState, uri: str, _second: None) -> None:
        """``link_log(uri)``: a linked log record, once."""
        if uri not in session.log_uris:
            self.add_unique(session.log_uris, uri, MAX_LINKED_URIS, "log_uris_over_cap")

    def on_progress_link(self, session: SessionState, uri: str, _second: None) -> None:
        """``link_progress(uri)``: a linked progress record, once."""
        if uri not in session.progress_uris:
            uris = session.progress_uris
            self.add_unique(uris, uri, MAX_LINKED_URIS, "progress_uris_over_cap")

    def _active_rarely(self, now: int) -> SessionState | None:
        """:meth:`active` with no session, an idle one, or the window behind.

        Behind, a call still counts in the live session (the game did it), but
        is not the player's presence: it moves neither the last activity nor
        the background deadline, and resumes no session (a minimized game whose
        loop keeps calling would otherwise start one every few minutes).
        """
        self._end_if_idle(now, None)
        session = self.live
        if session is None and self.foreground:
            session = self._resume(now)
        if session is None:
            if self._settings.enabled and self.recording:
                self._dropped["calls_without_session"] += 1
            return None
        session.total_events += 1
        if self.foreground and now > session.last_activity_mono_ns:
            session.last_activity_mono_ns = now
        return session

    def set_foreground(self, foreground: bool) -> None:
        """The game's window went to the background (False) or came back (True).

        Going behind starts the live session's background clock (and that of
        sessions begun while behind). Coming back before the background
        timeout keeps the session: the time behind is banked, and the return
        counts as the player's presence (the last activity, not an event).
        Coming back after an end for inactivity resumes play, as an activity
        call would. A repeated state changes nothing. Only signals the
        recorder when it begins or ends a session.
        """
        self.settle()
        if foreground is self.foreground:
            return
        self.foreground = foreground
        now = self._mono()
        session = self.live
        if not foreground:
            if session is not None:
                session.to_background(now)
                self._dirty = True
            return
        if session is not None and self._end_if_idle(now, self._wall()):
            session = None
        if session is None:
            self._resume(now)
            return
        session.to_foreground(now)
        session.last_activity_mono_ns = now
        self._dirty = True

    def add_unique(self, items: dict[str, None], item: str, cap: int, overflow: str) -> None:
        """Add a new item to a capped list of the live session, or count it as dropped."""
        if len(items) < cap:
            items[item] = None
        else:
            self._dropped[overflow] += 1

    def drop(self, kind: str) -> None:
        """Count a call refused or cut short (``status().dropped[kind]``)."""
        self._dropped[kind] += 1

    def network_changed(self, condition: str, at_mono_ns: int) -> None:
        """Bank the live session's time in the old condition; it is in ``condition`` now."""
        self.settle()
        session = self.live
        if session is not None:
            session.set_condition(condition, at_mono_ns)
            self._dirty = True

    # -- the account -------------------------------------------------------------

    def login_started(self, tag: str) -> None:
        """A login tagged ``tag`` is under way: what is recorded meanwhile awaits it."""
        self.settle()
        self.awaiting = tag
        session = self.live
        if session is not None and session.did is None:
            session.awaiting_login = tag  # the first to log in while it runs
            self._dirty = True

    def use_account(self, did: str) -> None:
        """Sessions from now on belong to ``did``; a live one of another account ends.

        A live session recorded while no account was known becomes ``did``'s; one
        of another account is ``invalidated``/``forced_end`` (an account switch).
        """
        self.settle()
        self.awaiting = None
        self._set_account(did)

    def account_found(self, tag: str, did: str | None) -> None:
        """The login tagged ``tag`` yielded ``did`` (None: it failed or was dropped).

        Every session recorded under it is that account's, wherever it is by
        now: live, finished here, or already collected (the attribution goes to
        the recorder with the next :meth:`collect`). When it failed they await
        nothing any more: no account's, they stay local.
        """
        self.settle()
        if self.awaiting == tag:
            self.awaiting = None
        self._attributions.append((tag, did))
        for state in self._finished:
            state.attribute(tag, did)
        session = self.live
        if did is not None:
            self._set_account(did)
        elif session is not None and session.awaiting_login == tag:
            session.attribute(tag, None)
            self._dirty = True

    def logged_out(self) -> None:
        """No account from now on (end the live session first)."""
        self.settle()
        self.did = None
        self.awaiting = None

    def _set_account(self, did: str) -> None:
        self.did = did
        session = self.live
        if session is None or session.did == did:
            return
        if session.did is None:
            session.did = did  # recorded while the login was under way: it is theirs
            session.awaiting_login = None
            self._dirty = True
        else:
            self._end("invalidated", "forced_end")

    # -- handing over --------------------------------------------------------------

    def collect(self) -> Collected:
        """What changed since the last collect: the live session's copy, the finished ones."""
        self.settle()
        session = self.live
        changed = session is not None and (
            self._dirty or session.total_events != self._collected_events
        )
        collected = Collected(
            live=session.copy() if session is not None and changed else None,
            finished=self._finished,
            attributions=self._attributions,
            dropped=dict(self._dropped),
            now_mono_ns=self._mono(),
        )
        self._finished = []
        self._attributions = []
        self._dropped_collected.update(self._dropped)
        self._dropped.clear()
        self._dirty = False
        self._collected_events = session.total_events if session is not None else 0
        return collected

    def dropped(self) -> dict[str, int]:
        """Every call refused or cut short since the book began, by kind."""
        self.settle()
        return dict(self._dropped_collected + self._dropped)

    def clear(self) -> None:
        """Forget every session, live and finished (the player purged their data)."""
        self.settle()
        self.live = None
        self._resumable = None
        self._finished = []
