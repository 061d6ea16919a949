"""Field-by-field tests of the records the agent writes, with time driven by freezegun."""

from __future__ import annotations

import json
from pathlib import Path

from agent_helpers import stored, stored_record
from freezegun import freeze_time

from anisota_agent import Agent, SystemClock
from anisota_agent.checks import MAX_URI_LEN
from anisota_agent.clock import is_valid_tid
from anisota_agent.lexicon import validate_record
from anisota_agent.records import (
    MAX_FEATURE_LEN,
    MAX_FEATURES,
    MAX_LINKED_URIS,
    MAX_PAGES,
    MAX_RELATED_SESSIONS,
    MAX_ROUTE_LEN,
    SessionContext,
    SessionState,
    build_record,
    dominant_condition,
    expire_record,
)

START = "2026-11-24T10:00:00.000Z"


def test_full_session_record_field_by_field(tmp_path: Path) -> None:
    with freeze_time(START) as frozen:
        agent = Agent("2.1.0", data_dir=tmp_path).start()
        rkey = agent.start_session(
            entry_point="login",
            authentication_method="oauth",
            is_new_user=True,
            referrer="https://bsky.app/profile/alice?utm_source=x#top",
        )
        assert rkey is not None and is_valid_tid(rkey)
        frozen.tick(1.5)
        agent.page("/home")
        agent.page("/garden")
        agent.page("/home")  # a revisit keeps first-visit order and adds nothing
        agent.feature("specimen-lens")
        agent.feature("specimen-lens")
        agent.action("postsViewed", count=3)
        agent.action("postsViewed")
        agent.action("levelUps")
        agent.progress(1000, level=3)
        agent.progress(1250, level=4)
        agent.response(100)
        agent.response(201, ok=False)
        agent.response(50.5)
        agent.link_log("at://did:plc:abc/net.anisota.beta.game.log/3lbyzq2a3v22c")
        agent.link_progress("at://did:plc:abc/net.anisota.beta.game.progress/3lbyzq2a3v22d")
        frozen.tick(2.25)
        agent.touch()
        frozen.tick(10)
        assert agent.end_session("logout") == rkey
        assert agent.flush()
        agent.close()

    record = stored_record(tmp_path, rkey)
    assert record == {
        "$type": "net.anisota.beta.game.session",
        "status": "ended",
        "endReason": "logout",
        "platform": "desktop",
        "clientVersion": "2.1.0",
        "startedAt": START,
        "createdAt": START,
        "lastActivityAt": "2026-11-24T10:00:03.750Z",
        "endedAt": "2026-11-24T10:00:13.750Z",
        "updatedAt": "2026-11-24T10:00:13.750Z",
        "duration": 13_750,
        "sessionContext": {
            "entryPoint": "login",
            "authenticationMethod": "oauth",
            "isNewUser": True,
            "referrer": "https://bsky.app/profile/alice",
        },
        "activitySummary": {
            # 3 pages + 2 features + 3 actions + 2 progress + 3 responses + 2 links + touch
            "totalEvents": 16,
            "pagesVisited": ["/home", "/garden"],
            "gameActions": {
                "levelUps": 1,
                "feedsLoaded": 0,
                "postsViewed": 4,
                "itemsCollected": 0,
                "specimensCollected": 0,
                "dailyRewardsClaimed": 0,
            },
            "currentXP": 1250,
            "currentLevel": 4,
            "xpGainedThisSession": 250,
        },
        "metadata": {
            "features": ["specimen-lens"],
            "networkCondition": "unknown",
            # (100 + 201 + 50.5) / 3 = 117.17 -> 117
            "performanceMetrics": {"averageResponseTime": 117, "errorCount": 1},
        },
        "relatedLogUris": ["at://did:plc:abc/net.anisota.beta.game.log/3lbyzq2a3v22c"],
        "relatedProgressUris": ["at://did:plc:abc/net.anisota.beta.game.progress/3lbyzq2a3v22d"],
    }
    assert stored(tmp_path, rkey).outbox == "local"


def test_referrer_query_kept_when_host_opts_in(tmp_path: Path) -> None:
    with Agent("1.0", data_dir=tmp_path) as agent:
        rkey = agent.start_session(referrer="https://example.com/a?b=1#c", keep_referrer_query=True)
        assert rkey is not None and agent.flush(sync=False)
    referrer = stored_record(tmp_path, rkey)["sessionContext"]["referrer"]
    assert referrer == "https://example.com/a?b=1#c"


def test_wall_clock_step_back_keeps_duration_and_order(tmp_path: Path) -> None:
    """The wall clock jumps an hour back mid-session; the monotonic clock does not."""
    mono = [10_000_000_000]
    with freeze_time(START) as frozen:
        clock = SystemClock(monotonic_ns=lambda: mono[0])
        agent = Agent("1.0", data_dir=tmp_path, clock=clock).start()
        rkey = agent.start_session()
        assert rkey is not None
        mono[0] += 60_000_000_000
        frozen.move_to("2026-11-24T09:01:00Z")  # NTP steps the wall clock back 1 h
        agent.page("/after-step")
        mono[0] += 30_000_000_000
        frozen.move_to("2026-11-24T09:01:30Z")
        agent.end_session("user_initiated")
        agent.close()
    record = stored_record(tmp_path, rkey)
    assert record["startedAt"] == START
    assert record["duration"] == 90_000
    assert record["lastActivityAt"] == "2026-11-24T10:01:00.000Z"
    assert record["endedAt"] == "2026-11-24T10:01:30.000Z"
    assert record["endedAt"] >= record["startedAt"]


def test_xp_gained_never_negative_and_level_optional(tmp_path: Path) -> None:
    with freeze_time(START):
        agent = Agent("1.0", data_dir=tmp_path).start()
        rkey = agent.start_session()
        assert rkey is not None
        agent.progress(500)
        agent.progress(300)  # XP spent: gained clamps at 0, current follows
        agent.end_session()
        agent.close()
    summary = stored_record(tmp_path, rkey)["activitySummary"]
    assert summary["currentXP"] == 300
    assert summary["xpGainedThisSession"] == 0
    assert "currentLevel" not in summary


def test_average_response_rounds_half_up() -> None:
    state = _state()
    state.response_count = 2
    state.response_total_ms = 101.0  # 50.5 -> 51 (Python's round() would give 50)
    record = build_record(state, state.started_mono_ns)
    assert record["metadata"]["performanceMetrics"] == {"averageResponseTime": 51, "errorCount": 0}
    validate_record(record)


def test_live_record_has_no_end_fields() -> None:
    state = _state()
    record = build_record(state, state.started_mono_ns + 5_000_000_000)
    assert record["status"] == "active"
    assert "endedAt" not in record and "duration" not in record and "endReason" not in record
    assert record["updatedAt"] == "2026-11-24T10:00:05.000Z"
    assert "averageResponseTime" not in record["metadata"]["performanceMetrics"]
    validate_record(record)


def test_network_condition_is_the_longest_held_ties_to_worse() -> None:
    state = _state()
    t0 = state.started_mono_ns
    state.set_condition("online", t0)
    state.set_condition("offline", t0 + 10)
    state.set_condition("online", t0 + 20)
    assert dominant_condition(state, t0 + 30) == "online"  # 20 vs 10
    assert dominant_condition(state, t0 + 20) == "offline"  # 10 vs 10: the worse one
    state.set_condition("slow", t0 + 30)
    assert dominant_condition(state, t0 + 60) == "slow"  # 30 vs 20 vs 10


def test_expire_record_ends_at_last_activity() -> None:
    state = _state()
    state.last_activity_mono_ns = state.started_mono_ns + 42_000_000_000
    live = build_record(state, state.started_mono_ns + 45_000_000_000)
    expired = expire_record(live, now_wall_ms=1_800_000_000_000)
    assert expired["status"] == "expired"
    assert expired["endReason"] == "timeout"
    assert expired["endedAt"] == expired["lastActivityAt"] == "2026-11-24T10:00:42.000Z"
    assert expired["duration"] == 42_000
    assert expired["updatedAt"] == "2027-01-15T08:00:00.000Z"
    validate_record(expired)


def test_worst_case_record_stays_small() -> None:
    """Every list at its cap and every string at its limit: still a few KB."""
    state = _state()
    state.pages = {f"/{i:03d}".ljust(MAX_ROUTE_LEN, "x"): None for i in range(MAX_PAGES)}
    state.features = {f"{i:03d}".ljust(MAX_FEATURE_LEN, "f"): None for i in range(MAX_FEATURES)}
    uri = "at://did:plc:" + "a" * MAX_URI_LEN
    state.log_uris = {uri[: MAX_URI_LEN - 3] + f"{i:03d}": None for i in range(MAX_LINKED_URIS)}
    state.progress_uris = dict(state.log_uris)
    state.did = "did:plc:" + "p" * 24
    state.parent_rkey = "3lbyzq2a3v22a"
    state.finish("ended", "logout", state.started_mono_ns + 1)
    related = [f"3lbyzq2a3v{i:03d}" for i in range(MAX_RELATED_SESSIONS + 5)]
    record = build_record(state, state.started_mono_ns + 1, related)
    assert len(record["relatedSessionUris"]) == MAX_RELATED_SESSIONS
    validate_record(record)
    size = len(json.dumps(record).encode())
    assert size < 16_384, size


def _state() -> SessionState:
    return SessionState(
        rkey="3lbyzq2a3v22c",
        client_version="1.0",
        platform="desktop",
        context=SessionContext(),
        started_wall_ms=1_795_514_400_000,  # 2026-11-24T10:00:00Z
        started_mono_ns=7_000_000_000,
    )
