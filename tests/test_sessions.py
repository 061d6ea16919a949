"""The session book's rules, driven directly: no thread, no lock, no SQLite, no freezegun."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anisota_agent.clock import format_datetime
from anisota_agent.records import SessionContext, SessionState, build_record
from anisota_agent.sessions import SUSPEND_THRESHOLD_NS, Apply, SessionBook
from anisota_agent.settings import Settings

MINUTE = 60.0
START_WALL_NS = 1_795_514_400_000_000_000  # 2026-11-24T10:00:00Z


class ManualClock:
    """A wall and a monotonic clock that move only when told to."""

    def __init__(self) -> None:
        self.wall = START_WALL_NS
        self.mono = 5_000_000_000

    def wall_ns(self) -> int:
        return self.wall

    def monotonic_ns(self) -> int:
        return self.mono

    def advance(self, seconds: float) -> None:
        """Time passes, counted by both clocks (play, or a suspend the clock counts)."""
        self.wall += int(seconds * 1e9)
        self.mono += int(seconds * 1e9)

    def sleep_unseen(self, seconds: float) -> None:
        """The machine sleeps and the monotonic clock does not count it."""
        self.wall += int(seconds * 1e9)


class Book:
    """A book under test, with its clock, network condition and wake-ups in reach."""

    def __init__(self, **settings: Any) -> None:
        self.clock = ManualClock()
        self.condition = "unknown"
        self.changes = 0
        options: dict[str, Any] = {
            "inactivity_timeout": 10 * MINUTE,
            "continuation_window": 20 * MINUTE,
        }
        self.book = SessionBook(
            Settings.checked(client_version="1.0", **(options | settings)),
            self.clock,
            lambda: self.condition,
            self._changed,
        )

    def _changed(self) -> None:
        self.changes += 1

    def begin(self, **context: Any) -> SessionState:
        return self.book.begin(SessionContext(**context))

    def finished(self) -> list[SessionState]:
        return self.book.collect().finished


@pytest.fixture
def t() -> Book:
    return Book()


# -- beginning and ending ------------------------------------------------------------


def test_begin_starts_a_live_session_with_the_settings_and_the_condition(t: Book) -> None:
    t.condition = "slow"
    session = t.begin(entry_point="direct")
    assert t.book.live is session and session.status == "active"
    assert session.client_version == "1.0" and session.platform == "desktop"
    assert session.context.entry_point == "direct" and session.condition == "slow"
    assert session.started_wall_ms == START_WALL_NS // 1_000_000
    assert session.parent_rkey is None and t.changes == 1


def test_begin_while_live_ends_the_running_one_as_user_initiated(t: Book) -> None:
    first = t.begin()
    t.clock.advance(30)
    second = t.begin()
    assert first.rkey != second.rkey and t.book.live is second
    assert (first.status, first.end_reason) == ("ended", "user_initiated")
    assert first.ended_mono_ns == second.started_mono_ns
    assert t.finished() == [first]


def test_end_returns_the_rkey_once_then_none(t: Book) -> None:
    session = t.begin()
    t.clock.advance(5)
    assert t.book.end("ended", "logout") == session.rkey
    assert t.book.end("ended", "logout") is None
    assert t.book.live is None and session.ended_mono_ns == t.clock.mono
    assert t.finished() == [session] and t.changes == 2


def test_an_explicit_end_is_not_resumed_by_activity(t: Book) -> None:
    t.begin()
    t.book.end("ended", "user_initiated")
    t.clock.advance(60)
    assert t.book.active(t.clock.mono) is None
    assert t.book.dropped() == {"calls_without_session": 1}


def test_activity_counts_events_and_moves_the_last_activity(t: Book) -> None:
    session = t.begin()
    t.clock.advance(42)
    assert t.book.active(t.clock.mono) is session
    assert session.total_events == 1 and session.last_activity_mono_ns == t.clock.mono


def test_a_disabled_book_counts_no_call_without_session() -> None:
    t = Book(enabled=False)
    assert t.book.active(t.clock.mono) is None and t.book.dropped() == {}


# -- inactivity and continuation ---------------------------------------------------------


def test_inactivity_ends_the_session_at_its_last_activity(t: Book) -> None:
    session = t.begin()
    t.clock.advance(60)
    t.book.active(t.clock.mono)
    last = t.clock.mono
    t.clock.advance(10 * MINUTE + 1)
    assert t.book.end_if_idle() == float("inf")
    assert (session.status, session.end_reason) == ("ended", "inactivity")
    assert session.ended_mono_ns == last


def test_end_if_idle_says_when_to_look_again(t: Book) -> None:
    t.begin()
    t.clock.advance(4 * MINUTE)
    assert t.book.end_if_idle() == pytest.approx(6 * MINUTE)
    t.book.active(t.clock.mono)
    assert t.book.end_if_idle() == pytest.approx(10 * MINUTE)


def test_activity_inside_the_window_starts_a_linked_continuation(t: Book) -> None:
    first = t.begin(entry_point="login", is_new_user=True, referrer="https://example.com/")
    t.clock.advance(10 * MINUTE + 1)
    t.book.end_if_idle()
    t.clock.advance(9 * MINUTE)  # 19 min after the end (the last activity)
    second = t.book.active(t.clock.mono)
    assert second is not None and second.parent_rkey == first.rkey
    # Same entry and auth; never a new user again, and no referrer of its own.
    assert second.context == SessionContext(entry_point="login", is_new_user=False)
    assert second.total_events == 1


def test_activity_after_the_window_starts_a_plain_session(t: Book) -> None:
    first = t.begin()
    t.clock.advance(10 * MINUTE + 1)
    t.book.end_if_idle()
    t.clock.advance(20 * MINUTE + 1)
    second = t.book.active(t.clock.mono)
    assert second is not None and second.rkey != first.rkey and second.parent_rkey is None


def test_the_window_counts_from_the_last_activity_not_from_the_check(t: Book) -> None:
    """The end is dated at the last activity; the window runs from there."""
    first = t.begin()
    t.clock.advance(25 * MINUTE)  # nobody checked meanwhile
    second = t.book.active(t.clock.mono)  # the call ends the old session itself
    assert (first.end_reason, first.ended_mono_ns) == ("inactivity", first.started_mono_ns)
    # 25 min after the last activity: past the 20-min window, though only 15 min
    # past the moment the session went idle.
    assert second is not None and second.parent_rkey is None


def test_a_call_long_after_the_window_ends_and_starts_plain(t: Book) -> None:
    first = t.begin()
    t.clock.advance(31 * MINUTE)
    second = t.book.active(t.clock.mono)
    assert first.end_reason == "inactivity" and second is not None
    assert second.parent_rkey is None
    assert [s.rkey for s in t.finished()] == [first.rkey]


def test_a_new_user_stays_unknown_in_a_continuation_when_unknown(t: Book) -> None:
    t.begin()
    t.clock.advance(11 * MINUTE)
    second = t.book.active(t.clock.mono)
    assert second is not None and second.context.is_new_user is None


# -- suspend and maximum age ---------------------------------------------------------------


def test_a_suspend_the_clock_counts_is_inactivity_from_the_last_activity(t: Book) -> None:
    session = t.begin()
    t.book.active(t.clock.mono)
    last = t.clock.mono
    t.clock.advance(3600)  # asleep, counted (CLOCK_BOOTTIME)
    after = t.book.active(t.clock.mono)
    assert session.end_reason == "inactivity" and session.ended_mono_ns == last
    assert after is not None and after.parent_rkey is None  # an hour > 10 + 20 min


def test_a_suspend_the_clock_did_not_count_is_caught_by_the_wall_clock(t: Book) -> None:
    session = t.begin()
    t.clock.advance(30)
    t.book.active(t.clock.mono)
    last = t.clock.mono
    t.clock.sleep_unseen(SUSPEND_THRESHOLD_NS / 1e9 + 1)
    t.book.end_if_idle()
    assert (session.status, session.end_reason) == ("ended", "inactivity")
    assert session.ended_mono_ns == last


def test_a_short_wall_clock_step_is_not_a_suspend(t: Book) -> None:
    session = t.begin()
    t.clock.sleep_unseen(SUSPEND_THRESHOLD_NS / 1e9 - 1)
    t.book.end_if_idle()
    assert t.book.live is session


def test_a_session_past_the_maximum_age_expires_then_continues() -> None:
    t = Book(max_session_age=2 * 3600, inactivity_timeout=3600)
    first = t.begin()
    for _ in range(5):  # active all along, 30 min apart
        t.clock.advance(30 * MINUTE)
        t.book.active(t.clock.mono)
    t.book.end_if_idle()
    assert (first.status, first.end_reason) == ("expired", "timeout")
    second = t.book.active(t.clock.mono)
    assert second is not None and second.parent_rkey == first.rkey


def test_a_session_past_the_maximum_age_ends_at_its_last_activity() -> None:
    """Noticed at 70 s, a 60 s maximum age ends the session at its last activity (59 s)."""
    t = Book(max_session_age=60, inactivity_timeout=3600)
    session = t.begin()
    t.clock.advance(59)
    t.book.active(t.clock.mono)
    t.clock.advance(11)
    t.book.end_if_idle()
    assert session.status == "expired"
    record = build_record(session, t.clock.mono)
    assert record["duration"] == 59_000
    assert record["endedAt"] == record["lastActivityAt"]


def test_a_call_past_the_maximum_age_is_left_to_the_idle_check(t: Book) -> None:
    """The hot path compares one deadline: the age is end_if_idle's to catch."""
    t = Book(max_session_age=3600, inactivity_timeout=3600)
    session = t.begin()
    t.clock.advance(50 * MINUTE)
    t.book.active(t.clock.mono)
    t.clock.advance(20 * MINUTE)
    assert t.book.active(t.clock.mono) is session
    t.book.end_if_idle()
    assert session.status == "expired"


# -- the account ---------------------------------------------------------------------------


def test_sessions_begin_with_the_known_account(t: Book) -> None:
    t.book.use_account("did:plc:alice")
    assert t.begin().did == "did:plc:alice"


def test_a_login_under_way_tags_the_live_session_and_new_ones(t: Book) -> None:
    live = t.begin()
    t.book.login_started("login:a")
    later = t.begin()
    assert live.awaiting_login == "login:a" and later.awaiting_login == "login:a"


def test_the_account_found_is_given_to_live_finished_and_collected_sessions(t: Book) -> None:
    t.book.login_started("login:a")
    collected_earlier = t.begin()
    t.book.collect()
    t.book.end("ended", "user_initiated")
    ended = t.book.live is None
    live = t.begin()
    t.book.account_found("login:a", "did:plc:alice")
    assert ended and live.did == "did:plc:alice" and live.awaiting_login is None
    collected = t.book.collect()
    assert [s.did for s in collected.finished] == ["did:plc:alice"]
    # The recorder attributes the ones it already holds or stored.
    assert collected.attributions == [("login:a", "did:plc:alice")]
    assert collected_earlier.did == "did:plc:alice" and collected_earlier.awaiting_login is None
    assert t.book.awaiting is None and t.book.did == "did:plc:alice"


def test_a_failed_login_leaves_its_sessions_local(t: Book) -> None:
    t.book.login_started("login:a")
    session = t.begin()
    t.book.account_found("login:a", None)
    assert session.did is None and t.book.did is None and t.book.awaiting is None
    assert session.awaiting_login is None  # it awaits nothing any more: local once ended
    # The recorder releases those it holds or stored too.
    assert t.book.collect().attributions == [("login:a", None)]


def test_an_older_login_found_late_does_not_clear_the_newer_one(t: Book) -> None:
    t.book.login_started("login:a")
    t.book.login_started("login:b")
    t.book.account_found("login:a", None)
    assert t.book.awaiting == "login:b"


def test_a_session_of_another_login_is_not_taken(t: Book) -> None:
    t.book.login_started("login:a")
    t.begin()
    t.book.end("ended", "user_initiated")
    t.book.account_found("login:b", "did:plc:bob")
    assert [s.did for s in t.book.collect().finished] == [None]


def test_switching_account_invalidates_the_live_session(t: Book) -> None:
    t.book.use_account("did:plc:alice")
    session = t.begin()
    t.book.use_account("did:plc:bob")
    assert (session.status, session.end_reason) == ("invalidated", "forced_end")
    assert t.book.live is None and t.book.did == "did:plc:bob"


def test_the_same_account_again_keeps_the_session(t: Book) -> None:
    t.book.use_account("did:plc:alice")
    session = t.begin()
    t.book.use_account("did:plc:alice")
    assert t.book.live is session


def test_a_session_recorded_before_the_host_auth_becomes_its_accounts(t: Book) -> None:
    session = t.begin()
    t.book.use_account("did:plc:alice")
    assert t.book.live is session and session.did == "did:plc:alice"


def test_after_logout_sessions_have_no_account(t: Book) -> None:
    t.book.use_account("did:plc:alice")
    t.book.logged_out()
    assert t.begin().did is None and t.book.awaiting is None


# -- what the recorder collects ------------------------------------------------------------


def test_collect_copies_the_live_session_only_when_it_changed(t: Book) -> None:
    session = t.begin()
    first = t.book.collect()
    assert first.live is not None and first.live is not session
    assert t.book.collect().live is None  # nothing new
    t.book.active(t.clock.mono)
    assert t.book.collect().live is not None
    t.book.calls.append((SessionBook.on_response, 120.0, False, None))  # not activity: a change
    assert t.book.collect().live is not None
    t.book.network_changed("offline", t.clock.mono)
    changed = t.book.collect().live
    assert changed is not None and changed.condition == "offline"


def test_collect_hands_each_finished_session_once(t: Book) -> None:
    session = t.begin()
    t.book.end("ended", "user_initiated")
    assert t.book.collect().finished == [session]
    assert t.book.collect().finished == []


def test_the_collected_copy_does_not_change_with_the_live_session(t: Book) -> None:
    session = t.begin()
    session.pages["/a"] = None
    copy = t.book.collect().live
    session.pages["/b"] = None
    assert copy is not None and list(copy.pages) == ["/a"]


def test_dropped_calls_are_handed_once_and_totalled(t: Book) -> None:
    t.book.active(t.clock.mono)
    t.book.drop("refused_calls")
    assert t.book.collect().dropped == {"calls_without_session": 1, "refused_calls": 1}
    t.book.drop("refused_calls")
    assert t.book.collect().dropped == {"refused_calls": 1}
    assert t.book.dropped() == {"calls_without_session": 1, "refused_calls": 2}


def test_a_capped_list_stops_growing_and_counts_the_overflow(t: Book) -> None:
    session = t.begin()
    for index in range(3):
        t.book.add_unique(session.pages, f"/{index}", 2, "pages_over_cap")
    assert list(session.pages) == ["/0", "/1"] and t.book.dropped() == {"pages_over_cap": 1}


def test_a_timed_request_is_not_activity(t: Book) -> None:
    session = t.begin()
    t.clock.advance(9 * MINUTE)
    t.book.calls.append((SessionBook.on_response, 50.0, True, None))
    t.clock.advance(2 * MINUTE)
    t.book.end_if_idle()
    assert session.end_reason == "inactivity" and session.response_count == 1


def test_network_time_is_banked_per_condition(t: Book) -> None:
    t.condition = "online"
    session = t.begin()
    t.clock.advance(10)
    t.book.network_changed("offline", t.clock.mono)
    t.clock.advance(30)
    t.book.end("ended", "user_initiated")
    record = build_record(session, t.clock.mono)
    assert session.condition_ns == {"online": 10_000_000_000}
    assert record["metadata"]["networkCondition"] == "offline"


def test_clear_forgets_live_finished_and_resumable_sessions(t: Book) -> None:
    t.begin()
    t.clock.advance(11 * MINUTE)
    t.book.end_if_idle()
    t.begin()
    t.book.clear()
    assert t.book.live is None and t.book.collect().finished == []
    t.clock.advance(60)
    assert t.book.active(t.clock.mono) is None  # nothing to resume


def test_the_record_of_an_inactivity_end_is_dated_at_the_last_activity(t: Book) -> None:
    session = t.begin()
    t.clock.advance(59)
    t.book.active(t.clock.mono)
    t.clock.advance(11 * MINUTE)
    t.book.end_if_idle()
    record = build_record(session, t.clock.mono)
    assert record["duration"] == 59_000
    assert record["endedAt"] == format_datetime(START_WALL_NS // 1_000_000 + 59_000)


# -- settling the queue of activity calls ------------------------------------------

QUEUED: dict[str, tuple[Apply, Any, Any]] = {
    "touch": (SessionBook.on_touch, None, None),
    "page": (SessionBook.on_page, "/garden", None),
    "feature": (SessionBook.on_feature, "lens", None),
    "action": (SessionBook.on_action, "postsViewed", 2),
    "progress": (SessionBook.on_progress, 1200, 4),
    "response": (SessionBook.on_response, 42.5, False),
    "log": (SessionBook.on_log, "at://did:plc:abc/net.anisota.beta.game.log/3lbyzq2a3v22c", None),
}


def queue(t: Book, kind: str, late_ns: int = 0) -> None:
    """Queue a call as a game thread does: its instant read ``late_ns`` before it lands."""
    apply, first, second = QUEUED[kind]
    t.book.calls.append((apply, first, second, t.clock.mono - late_ns))


def queue_request(t: Book) -> None:
    t.book.calls.append((SessionBook.on_response, 80.0, True, None))


def sessions_seen(t: Book) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    """Every session the book has recorded, as the record shows it (parents by
    position), and the calls it dropped."""
    sessions = t.book.collect().finished
    if t.book.live is not None:
        sessions = [*sessions, t.book.live]
    rkeys = [session.rkey for session in sessions]
    return [
        (
            build_record(session, t.clock.mono) | {"parentSessionUri": None},
            None if session.parent_rkey is None else rkeys.index(session.parent_rkey),
            session.last_activity_mono_ns,
        )
        for session in sessions
    ], t.book.dropped()


def test_a_batch_within_the_timeout_is_applied_at_once_to_the_live_session(
    t: Book, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = t.begin()
    t.clock.advance(9 * MINUTE)
    queue(t, "page")
    queue(t, "action", late_ns=2_000_000)  # read the clock before the first, landed after
    queue_request(t)
    queue(t, "response")
    monkeypatch.setattr(t.book, "_settle_one_by_one", None)  # would fail if called
    assert t.book.collect().live is not None
    assert session.total_events == 3  # the timed request is not activity
    assert session.last_activity_mono_ns == t.clock.mono
    assert (session.response_count, session.error_count) == (2, 1)
    assert list(session.pages) == ["/garden"] and session.actions == {"postsViewed": 2}


def test_a_timed_request_alone_in_a_batch_is_a_change_to_collect(t: Book) -> None:
    session = t.begin()
    t.book.collect()
    queue_request(t)
    assert t.book.collect().live is not None
    assert session.total_events == 0 and session.response_count == 1


def test_a_batch_past_the_timeout_ends_and_resumes_each_call_at_its_instant(t: Book) -> None:
    first = t.begin()
    t.clock.advance(11 * MINUTE)
    queue(t, "page")  # the player came back: a continuation, dated by the call
    t.clock.advance(30)
    settled = t.finished()
    assert settled == [first] and first.end_reason == "inactivity"
    second = t.book.live
    assert second is not None and second.parent_rkey == first.rkey
    assert second.started_mono_ns == t.clock.mono - 30_000_000_000


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from([*QUEUED, "request"]), st.integers(0, 3_000_000)),
            st.sampled_from(["settle", "behind", "in front", "end"]),
            st.floats(0, 13 * MINUTE),  # time passing
        ),
        max_size=60,
    )
)
def test_settling_a_batch_at_once_records_what_one_call_at_a_time_does(
    steps: list[Any],
) -> None:
    """The batch fast path against the rule it shortcuts: each call at its instant."""
    batched, reference = Book(), Book()
    for book in (batched, reference):
        book.begin()
    for step in steps:
        for book in (batched, reference):
            if book is reference:  # nothing waits for settle() to find
                book.book._settle_one_by_one(len(book.book.calls))
            if isinstance(step, float):
                book.clock.advance(step)
            elif isinstance(step, tuple):
                kind, late_ns = step
                if kind == "request":
                    queue_request(book)
                else:
                    queue(book, kind, late_ns)
            elif step == "settle":
                book.book.settle()
            elif step == "end":
                book.book.end("ended", "user_initiated")
            else:
                book.book.set_foreground(step == "in front")
    reference.book._settle_one_by_one(len(reference.book.calls))
    assert sessions_seen(batched) == sessions_seen(reference)
