"""Inactivity, continuations, suspend and same-day related sessions (freezegun time)."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agent_helpers import stored, stored_record
from freezegun import freeze_time
from freezegun.api import FrozenDateTimeFactory

from anisota_agent import Agent, SystemClock

DID = "did:plc:inactivitytest0000000000"
MINUTE = 60.0


def uri(rkey: str) -> str:
    return f"at://{DID}/net.anisota.beta.game.session/{rkey}"


@pytest.fixture
def frozen() -> Iterator[FrozenDateTimeFactory]:
    with freeze_time("2026-11-24T10:00:00Z") as factory:
        assert isinstance(factory, FrozenDateTimeFactory)
        yield factory


def make_agent(data_dir: Path, **settings: float) -> Agent:
    agent = Agent(
        "1.0",
        data_dir=data_dir,
        inactivity_timeout=settings.get("timeout", 10 * MINUTE),
        continuation_window=settings.get("window", 20 * MINUTE),
    ).start()
    # The account is known, so parent and related sessions have uris; the PDS
    # is a closed loopback port, so nothing syncs.
    agent.use_auth(httpx.Auth(), did=DID, pds_url="http://127.0.0.1:9")
    return agent


def test_inactivity_ends_the_session_at_the_last_activity(
    tmp_path: Path, frozen: FrozenDateTimeFactory
) -> None:
    agent = make_agent(tmp_path)
    rkey = str(agent.start_session())
    frozen.tick(2 * MINUTE)
    agent.page("/garden")
    frozen.tick(10 * MINUTE + 1)  # just past the timeout, no call from the game
    assert agent.flush()  # the worker notices
    assert agent.status().session is None
    record = stored_record(tmp_path, rkey)
    assert (record["status"], record["endReason"]) == ("ended", "inactivity")
    assert record["endedAt"] == record["lastActivityAt"] == "2026-11-24T10:02:00.000Z"
    assert record["duration"] == 2 * 60_000
    agent.close()


def test_activity_inside_the_window_starts_a_continuation(
    tmp_path: Path, frozen: FrozenDateTimeFactory
) -> None:
    agent = make_agent(tmp_path)
    first = str(
        agent.start_session(entry_point="login", authentication_method="oauth", is_new_user=True)
    )
    agent.page("/a")
    frozen.tick(10 * MINUTE + 1)
    assert agent.flush()  # ended for inactivity, dated 10:00:00 (its last activity)
    frozen.tick(9 * MINUTE)  # 19 min after that end: inside the 20 min window
    agent.page("/b")  # the game's next call resumes play
    second = agent.status().session
    assert second is not None and second != first
    agent.close()
    record = stored_record(tmp_path, second)
    assert record["parentSessionUri"] == uri(first)
    assert record["activitySummary"]["pagesVisited"] == ["/b"]
    assert record["sessionContext"] == {
        "entryPoint": "login",
        "authenticationMethod": "oauth",
        "isNewUser": False,
    }
    assert stored_record(tmp_path, first)["endReason"] == "inactivity"


def test_activity_after_the_window_starts_a_plain_session(
    tmp_path: Path, frozen: FrozenDateTimeFactory
) -> None:
    agent = make_agent(tmp_path)
    first = str(agent.start_session())
    frozen.tick(10 * MINUTE + 1)
    assert agent.flush()
    frozen.tick(21 * MINUTE)  # past the window
    agent.action("postsViewed")
    second = agent.status().session
    assert second is not None and second != first
    agent.close()
    record = stored_record(tmp_path, second)
    assert "parentSessionUri" not in record
    assert record["activitySummary"]["gameActions"]["postsViewed"] == 1


def test_a_call_after_the_timeout_ends_the_old_session_itself(
    tmp_path: Path, frozen: FrozenDateTimeFactory
) -> None:
    """The game's call can arrive before the worker noticed the timeout."""
    agent = make_agent(tmp_path)
    first = str(agent.start_session())
    agent.touch()
    frozen.tick(11 * MINUTE)
    agent.touch()
    second = agent.status().session
    assert second not in (None, first)
    agent.close()
    ended = stored_record(tmp_path, first)
    assert ended["endedAt"] == "2026-11-24T10:00:00.000Z"
    assert ended["activitySummary"]["totalEvents"] == 1
    assert stored_record(tmp_path, str(second))["parentSessionUri"] == uri(first)


def test_suspend_is_inactivity_from_when_the_machine_slept(
    tmp_path: Path, frozen: FrozenDateTimeFactory
) -> None:
    """The agent's clock counts time asleep (CLOCK_BOOTTIME on Linux): a 2 h
    suspend is 2 h without activity, noticed by the game's first call on waking."""
    agent = make_agent(tmp_path, window=30 * MINUTE)
    first = str(agent.start_session())
    frozen.tick(90)
    agent.page("/before-sleep")
    frozen.tick(2 * 3600)  # asleep
    agent.page("/after-wake")
    second = agent.status().session
    agent.close()
    assert second not in (None, first)
    before = stored_record(tmp_path, first)
    assert (before["endReason"], before["endedAt"]) == ("inactivity", "2026-11-24T10:01:30.000Z")
    assert before["activitySummary"]["pagesVisited"] == ["/before-sleep"]
    after = stored_record(tmp_path, str(second))
    assert after["startedAt"] == "2026-11-24T12:01:30.000Z"
    assert "parentSessionUri" not in after  # 2 h away: past the 30 min window
    assert after["activitySummary"]["pagesVisited"] == ["/after-wake"]


def test_suspend_the_clock_did_not_count_is_caught_by_the_worker(tmp_path: Path) -> None:
    """Where the monotonic clock stops during suspend, the wall clock runs ahead of
    it; the worker's next round sees that and ends the session when it slept."""
    mono = [50_000_000_000]
    with freeze_time("2026-11-24T10:00:00Z") as frozen:
        agent = Agent(
            "1.0",
            data_dir=tmp_path,
            clock=SystemClock(monotonic_ns=lambda: mono[0]),
            continuation_window=30 * MINUTE,
        ).start()
        agent.use_auth(httpx.Auth(), did=DID, pds_url="http://127.0.0.1:9")
        first = str(agent.start_session())
        mono[0] += 90_000_000_000
        frozen.tick(90)
        agent.page("/before-sleep")
        frozen.tick(2 * 3600)  # asleep: only the wall clock moves
        assert agent.flush()  # the worker's round after waking
        assert agent.status().session is None
        agent.page("/after-wake")
        second = agent.status().session
        agent.close()
    assert second not in (None, first)
    before = stored_record(tmp_path, first)
    assert (before["endReason"], before["endedAt"]) == ("inactivity", "2026-11-24T10:01:30.000Z")
    assert "parentSessionUri" not in stored_record(tmp_path, str(second))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CLOCK_BOOTTIME is Linux's")
def test_the_system_clock_counts_time_asleep() -> None:
    clock = SystemClock()
    assert isinstance(clock.monotonic_ns, functools.partial)
    assert clock.monotonic_ns.args == (time.CLOCK_BOOTTIME,)
    without_sleep = time.monotonic_ns()
    assert clock.monotonic_ns() >= without_sleep  # boot time also counts suspends


def test_related_sessions_are_the_same_local_day(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        with freeze_time("2026-11-24T22:00:00Z") as frozen:
            agent = make_agent(tmp_path)
            a = str(agent.start_session())
            agent.end_session("logout")
            frozen.tick(3600)
            b = str(agent.start_session())
            agent.end_session("logout")
            frozen.tick(3600)  # 2026-11-25T00:00:00Z: a new local day
            c = str(agent.start_session())
            agent.end_session("logout")
            agent.close()
    finally:
        monkeypatch.undo()
        time.tzset()
    assert "relatedSessionUris" not in stored_record(tmp_path, a)
    assert stored_record(tmp_path, b)["relatedSessionUris"] == [uri(a)]
    assert "relatedSessionUris" not in stored_record(tmp_path, c)
    assert stored(tmp_path, c).record["startedAt"] == "2026-11-25T00:00:00.000Z"


def test_session_without_an_account_has_no_uris(
    tmp_path: Path, frozen: FrozenDateTimeFactory
) -> None:
    agent = Agent("1.0", data_dir=tmp_path, inactivity_timeout=MINUTE).start()
    first = str(agent.start_session())
    frozen.tick(MINUTE + 1)
    agent.touch()
    second = str(agent.status().session)
    agent.close()
    assert stored(tmp_path, second).did is None
    assert "parentSessionUri" not in stored_record(tmp_path, second)
    assert stored_record(tmp_path, first)["endReason"] == "inactivity"


def test_inactivity_settings_are_bounded() -> None:
    with pytest.raises(ValueError, match="inactivity_timeout must be between 60 and 86,400 s"):
        Agent("1.0", inactivity_timeout=5)
    with pytest.raises(ValueError, match="continuation_window"):
        Agent("1.0", continuation_window=-1)
    with pytest.raises(TypeError, match="inactivity_timeout must be a number"):
        Agent("1.0", inactivity_timeout="30")  # type: ignore[arg-type]


def test_a_session_past_the_maximum_age_is_split_into_a_continuation(
    tmp_path: Path, frozen: FrozenDateTimeFactory
) -> None:
    agent = Agent("1.0", data_dir=tmp_path, max_session_age=3600, inactivity_timeout=3600).start()
    agent.use_auth(httpx.Auth(), did=DID, pds_url="http://127.0.0.1:9")
    first = str(agent.start_session())
    for _ in range(4):  # an hour of steady play
        frozen.tick(15 * MINUTE)
        agent.touch()
    frozen.tick(1)
    assert agent.flush()  # the worker enforces the maximum age
    agent.touch()
    second = agent.status().session
    agent.close()
    expired = stored_record(tmp_path, first)
    assert (expired["status"], expired["endReason"]) == ("expired", "timeout")
    assert expired["duration"] == 3600 * 1000  # dated at the last touch, not the check
    assert stored_record(tmp_path, str(second))["parentSessionUri"] == uri(first)
