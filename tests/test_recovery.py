"""Crash recovery with real processes: SIGKILL a recording game, recover its session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import stored, stored_record
from freezegun import freeze_time

from anisota_agent import Agent

# A game that records a session, checkpoints it, says its rkey, then plays on
# until its stdin closes (or it is killed).
_GAME = textwrap.dedent(
    """
    import sys
    from anisota_agent import Agent
    agent = Agent("1.0", data_dir=sys.argv[1]).start()
    rkey = agent.start_session(entry_point="direct")
    agent.page("/garden")
    agent.action("specimensCollected", count=3)
    assert agent.flush()
    print(rkey, flush=True)
    sys.stdin.read()
    """
)


class Game:
    """A real game process recording into ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _GAME, str(data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.rkey = self.process.stdout.readline().strip()
        assert self.rkey, "the game process did not start a session"

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def games(tmp_path: Path) -> Iterator[list[Game]]:
    started: list[Game] = []
    yield started
    for game in started:
        game.stop()


def test_killed_session_expires_at_last_activity_and_live_one_is_left(
    tmp_path: Path, games: list[Game]
) -> None:
    crashed = Game(tmp_path)
    running = Game(tmp_path)
    games.extend([crashed, running])
    before = stored_record(tmp_path, crashed.rkey)
    assert before["status"] == "active"
    crashed.kill()

    agent = Agent("1.0", data_dir=tmp_path).start()
    assert agent.flush()
    assert agent.status().recovered == 1

    expired = stored_record(tmp_path, crashed.rkey)
    assert (expired["status"], expired["endReason"]) == ("expired", "timeout")
    assert expired["endedAt"] == before["lastActivityAt"]
    assert expired["activitySummary"] == before["activitySummary"]
    assert stored(tmp_path, crashed.rkey).outbox == "local"  # no account: never uploaded

    still_live = stored(tmp_path, running.rkey)
    assert (still_live.outbox, still_live.record["status"]) == ("live", "active")
    agent.close()


def test_session_of_a_closed_agent_in_this_process_is_recovered(tmp_path: Path) -> None:
    """An earlier agent in this same process died without closing (same pid)."""
    first = Agent("1.0", data_dir=tmp_path).start()
    rkey = first.start_session()
    assert first.flush()
    # Simulate the agent's death without close(): its token leaves the live set.
    from anisota_agent.recovery import LIVE_OWNER_TOKENS

    LIVE_OWNER_TOKENS.discard(first._owner_token)
    second = Agent("1.0", data_dir=tmp_path).start()
    assert second.flush()
    assert stored_record(tmp_path, str(rkey))["status"] == "expired"
    second.close()
    LIVE_OWNER_TOKENS.add(first._owner_token)
    first.close()
    assert first.status().counters == {"sessions_taken_over": 1}


def test_session_older_than_max_age_expires_even_with_a_live_owner(
    tmp_path: Path, games: list[Game]
) -> None:
    running = Game(tmp_path)
    games.append(running)
    with freeze_time("2031-01-01T00:00:00Z"):
        agent = Agent("1.0", data_dir=tmp_path, max_session_age=3600).start()
        assert agent.flush()
        agent.close()
    assert stored_record(tmp_path, running.rkey)["status"] == "expired"


def test_a_process_start_reads_as_psutil_tells_it() -> None:
    """The recorder's own reading (no psutil import) and psutil's agree, so an
    owner recorded by one is recognised by the other."""
    import psutil

    from anisota_agent.recovery import process_started

    for pid in (os.getpid(), os.getppid(), 1):
        assert abs(process_started(pid) - psutil.Process(pid).create_time()) < 1e-6


def test_a_process_that_is_gone_is_not_an_owner() -> None:
    from anisota_agent.recovery import owner_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not owner_alive(child.pid, 0.0, "token")
