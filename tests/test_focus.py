"""The game's window in the background: ``set_foreground`` and ``background_timeout``.

Time is the agent's injected clock, moved by the test; the recorder's rounds
are asked for with ``flush()``, never waited for with a sleep.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from agent_helpers import stored, stored_record

from anisota_agent import Agent
from anisota_agent.cli import main

#: 2026-11-24T10:00:00Z, the wall clock when a test starts.
START_WALL_NS = 1_795_514_400 * 1_000_000_000


class ManualClock:
    """A wall and a monotonic clock that move only when the test says."""

    def __init__(self) -> None:
        self.mono_ns = 7_000 * 1_000_000_000
        self.wall_offset_ns = START_WALL_NS - self.mono_ns

    def monotonic_ns(self) -> int:
        return self.mono_ns

    def wall_ns(self) -> int:
        return self.mono_ns + self.wall_offset_ns

    def advance(self, seconds: float) -> None:
        self.mono_ns += int(seconds * 1e9)

    def iso(self) -> str:
        """The wall clock now, as the record writes it."""
        moment = datetime.fromtimestamp(self.wall_ns() // 1_000_000 / 1000, timezone.utc)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ms_between(earlier: str, later: str) -> float:
    """Milliseconds from one record datetime to another."""
    parse = datetime.fromisoformat
    return (parse(later.replace("Z", "+00:00")) - parse(earlier.replace("Z", "+00:00"))) / (
        datetime.resolution * 1000
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def agent(tmp_path: Path, clock: ManualClock) -> Iterator[Agent]:
    with Agent("1.0", data_dir=tmp_path, clock=clock, background_timeout=300.0).start() as agent:
        yield agent


def test_background_past_the_timeout_ends_at_the_moment_it_went_there(
    agent: Agent, clock: ManualClock, tmp_path: Path
) -> None:
    rkey = str(agent.start_session())
    clock.advance(40)
    agent.page("/garden")
    clock.advance(5)
    went_behind = clock.iso()
    agent.set_foreground(False)
    clock.advance(299)
    assert agent.flush(sync=False)
    assert agent.status().session == rkey  # not yet: 299 s behind
    clock.advance(2)
    assert agent.flush(sync=False)
    assert agent.status().session is None
    record = stored_record(tmp_path, rkey)
    assert (record["status"], record["endReason"]) == ("ended", "inactivity")
    assert abs(ms_between(went_behind, record["endedAt"])) <= 50
    assert record["duration"] == 45_000  # the time behind is not the session's
    assert stored(tmp_path, rkey).background_ms == 0


def test_back_before_the_timeout_keeps_the_session_and_its_duration_counts_it(
    agent: Agent, clock: ManualClock, tmp_path: Path
) -> None:
    rkey = str(agent.start_session())
    clock.advance(10)
    agent.set_foreground(False)
    clock.advance(290)
    agent.set_foreground(True)
    assert agent.status().session == rkey
    clock.advance(200)  # the return is the player's presence: 200 s later, still here
    agent.page("/back")
    clock.advance(1)
    agent.set_foreground(False)
    clock.advance(60)
    agent.end_session("user_initiated")
    assert agent.flush(sync=False)
    record = stored_record(tmp_path, rkey)
    assert record["endReason"] == "user_initiated"
    assert record["duration"] == 561_000  # every second, the 350 s behind included
    assert stored(tmp_path, rkey).background_ms == 350_000


def test_the_live_session_stores_its_background_time_so_far(
    agent: Agent, clock: ManualClock, tmp_path: Path
) -> None:
    rkey = str(agent.start_session())
    agent.set_foreground(False)
    clock.advance(12.5)
    assert agent.flush(sync=False)
    assert stored(tmp_path, rkey).background_ms == 12_500


def test_calls_made_behind_count_but_do_not_keep_the_session(
    agent: Agent, clock: ManualClock, tmp_path: Path
) -> None:
    """A minimized game whose loop keeps calling still leaves after the timeout."""
    rkey = str(agent.start_session())
    went_behind = clock.iso()
    agent.set_foreground(False)
    for _ in range(10):
        clock.advance(40)
        agent.touch()
    assert agent.status().session is None  # the call at 400 s found it over
    agent.touch()  # behind, no session: resumes nothing
    assert agent.status().session is None
    assert agent.flush(sync=False)
    record = stored_record(tmp_path, rkey)
    assert record["endReason"] == "inactivity" and record["endedAt"] == went_behind
    assert record["activitySummary"]["totalEvents"] == 7  # the calls within the 300 s
    assert agent.status().dropped["calls_without_session"] == 4


def test_a_background_poller_of_timed_requests_does_not_keep_the_session(
    agent: Agent, clock: ManualClock, tmp_path: Path
) -> None:
    rkey = str(agent.start_session())
    went_behind = clock.iso()
    agent.set_foreground(False)
    client = httpx.Client(
        transport=agent.timed_transport(httpx.MockTransport(lambda _: httpx.Response(200)))
    )

    def poll() -> None:  # the game's poller thread: a request every 20 s, for 400 s
        for _ in range(20):
            clock.advance(20)
            client.get("https://api.example/feed")
            agent.report_request(15.0, "ok")

    poller = threading.Thread(target=poll)
    poller.start()
    poller.join()
    client.close()
    assert agent.flush(sync=False)
    assert agent.status().session is None
    record = stored_record(tmp_path, rkey)
    assert record["endReason"] == "inactivity" and record["endedAt"] == went_behind
    assert "averageResponseTime" in record["metadata"]["performanceMetrics"]


def test_timed_requests_in_front_are_not_activity_either(
    tmp_path: Path, clock: ManualClock
) -> None:
    with Agent("1.0", data_dir=tmp_path, clock=clock, inactivity_timeout=60.0).start() as agent:
        rkey = str(agent.start_session())
        left = clock.iso()
        for _ in range(10):
            clock.advance(10)
            agent.report_request(20.0, "ok")
        assert agent.flush(sync=False)
        assert agent.status().session is None
    record = stored_record(tmp_path, rkey)
    assert record["endReason"] == "inactivity" and record["endedAt"] == left


def test_coming_back_after_a_background_end_resumes_in_a_continuation(
    agent: Agent, clock: ManualClock, tmp_path: Path
) -> None:
    first = str(agent.start_session())
    agent.set_foreground(False)
    clock.advance(400)
    assert agent.flush(sync=False)
    assert agent.status().session is None
    agent.set_foreground(True)
    second = agent.status().session
    assert second not in (None, first)
    agent.end_session("logout")
    assert agent.flush(sync=False)
    assert stored_record(tmp_path, str(second))["startedAt"] == clock.iso()


def test_focus_events_with_no_session_only_note_the_state(
    agent: Agent, clock: ManualClock, tmp_path: Path
) -> None:
    for foreground in (False, True, True, False):
        agent.set_foreground(foreground)
    assert agent.status().session is None
    assert agent.status().dropped.get("calls_without_session", 0) == 0
    rkey = str(agent.start_session())  # started behind: the background clock runs at once
    clock.advance(301)
    assert agent.flush(sync=False)
    record = stored_record(tmp_path, rkey)
    assert record["endReason"] == "inactivity" and record["duration"] == 0


def test_a_game_that_never_reports_focus_has_only_the_inactivity_timeout(
    agent: Agent, clock: ManualClock
) -> None:
    rkey = agent.start_session()
    for _ in range(4):
        clock.advance(600)
        agent.touch()
    assert agent.flush(sync=False)
    assert agent.status().session == rkey


@pytest.mark.parametrize("bad", [1, 0, None, "yes", 1.0])
def test_set_foreground_refuses_what_is_not_a_bool(agent: Agent, bad: object) -> None:
    rkey = agent.start_session()
    with pytest.raises(TypeError, match="foreground must be a bool"):
        agent.set_foreground(bad)  # type: ignore[arg-type]
    assert agent.status().session == rkey
    assert agent.status().dropped["refused_calls"] == 1


def test_background_timeout_bounds(tmp_path: Path) -> None:
    for good in (10, 10.0, 86_400):
        Agent("1.0", in_memory=True, background_timeout=good)
    for bad in (9.99, 0, -1, 86_401, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="background_timeout"):
            Agent("1.0", in_memory=True, background_timeout=bad)
    with pytest.raises(TypeError, match="background_timeout"):
        Agent("1.0", in_memory=True, background_timeout="300")  # type: ignore[arg-type]


def test_the_cli_shows_the_background_time_and_the_record_has_none(
    agent: Agent, clock: ManualClock, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rkey = str(agent.start_session())
    agent.set_foreground(False)
    clock.advance(42.5)
    agent.set_foreground(True)
    agent.end_session("logout")
    assert agent.flush(sync=False)
    capsys.readouterr()
    assert main(["--data-dir", str(tmp_path), "sessions"]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert "BACKGROUND" in header.split() and "42.5s" in line.split()
    assert main(["--data-dir", str(tmp_path), "sessions", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backgroundMs"] == 42_500
    assert main(["--data-dir", str(tmp_path), "show", rkey]) == 0
    shown = capsys.readouterr()
    assert "background" not in shown.out.lower()  # stdout: the record as uploaded
    assert "42.5s in the background" in shown.err and "not uploaded" in shown.err
