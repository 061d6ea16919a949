"""The player's consent: ``pending`` uploads nothing, ``granted`` uploads at once,
``denied`` records nothing and deletes what was not uploaded; kept in the store."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_helpers import OWNER, all_sessions, session_record, store_at
from pds_harness import Account, PdsServer

from anisota_agent import CONSENT_STATES, Agent
from anisota_agent.cli import main
from anisota_agent.store import DB_FILENAME, Store

COLLECTION = "net.anisota.beta.game.session"


def logged_in(data_dir: Path, pds: PdsServer, account: Account, **options: object) -> Agent:
    agent = Agent("1.0", data_dir=data_dir, **options).start()  # type: ignore[arg-type]
    agent.login(account.handle, account.password, pds_url=pds.url)
    assert agent.flush()
    assert agent.status().account is not None, agent.status().auth_problem
    return agent


def play(agent: Agent, count: int) -> list[str]:
    """``count`` short sessions, ended; their rkeys."""
    rkeys = []
    for _ in range(count):
        rkey = agent.start_session(entry_point="direct")
        assert rkey is not None
        agent.page("/garden")
        agent.end_session("user_initiated")
        rkeys.append(rkey)
    return rkeys


def wait_for(what: Callable[[], bool], seconds: float) -> bool:
    """Poll ``what`` until it holds or ``seconds`` pass; whether it held."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(0.05)  # a poll's pace, not a wait for a thread: the deadline decides
    return what()


def remote_rkeys(pds: PdsServer, account: Account) -> set[str]:
    return {item["uri"].rsplit("/", 1)[1] for item in pds.list_records(account)}


def test_pending_uploads_nothing_and_granted_uploads_everything_within_5_s(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    agent = logged_in(tmp_path, pds, account, consent="pending")
    try:
        rkeys = play(agent, 3)
        assert agent.flush()  # a whole recorder and uplink round: nothing leaves
        assert pds.list_records(account) == []
        status = agent.status()
        assert status.consent == "pending"
        assert status.outbox["pending"] == 3 and status.outbox["synced"] == 0
        granted_at = time.monotonic()
        agent.set_consent("granted")
        assert wait_for(lambda: remote_rkeys(pds, account) == set(rkeys), 5.0)
        assert time.monotonic() - granted_at <= 5.0
        assert wait_for(lambda: agent.status().outbox["synced"] == 3, 5.0)
        assert agent.status().consent == "granted"
    finally:
        agent.close()
    assert {row.rkey: row.outbox for row in all_sessions(tmp_path)} == dict.fromkeys(
        rkeys, "synced"
    )


def test_denied_deletes_every_unsynced_session_and_records_nothing_more(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    agent = logged_in(tmp_path, pds, account)
    try:
        (uploaded,) = play(agent, 1)
        assert agent.flush()
        assert remote_rkeys(pds, account) == {uploaded}
        agent.set_consent("pending")
        play(agent, 2)  # stored, not uploaded
        live = agent.start_session()
        agent.page("/shop")
        assert agent.flush(sync=False)
        assert {row.outbox for row in all_sessions(tmp_path)} == {"synced", "pending", "live"}
        agent.set_consent("denied")
        assert agent.status().session is None  # the live session is dropped, not ended
        assert agent.start_session() is None
        agent.page("/garden")  # no session, and no loss to count: the player said no
        assert agent.flush()
        status = agent.status()
        assert status.consent == "denied"
        assert "calls_without_session" not in status.dropped
        assert status.outbox["synced"] == 1
        assert sum(status.outbox.values()) == 1
    finally:
        agent.close()
    rows = all_sessions(tmp_path)
    assert [(row.rkey, row.outbox) for row in rows] == [(uploaded, "synced")]
    assert live not in {row.rkey for row in rows}
    assert remote_rkeys(pds, account) == {uploaded}  # what was on the PDS stays there


def test_the_players_choice_is_kept_and_wins_over_the_hosts_default(tmp_path: Path) -> None:
    agent = Agent("1.0", data_dir=tmp_path, consent="pending").start()
    assert agent.flush(sync=False)
    assert agent.status().consent == "pending"  # the host's default: nobody chose
    agent.close()
    with store_at(tmp_path) as store:
        assert store.consent() == {"state": "pending", "by": "host"}
    agent = Agent("1.0", data_dir=tmp_path).start()  # the host's default changed
    assert agent.flush(sync=False)
    assert agent.status().consent == "granted"
    agent.set_consent("denied")
    assert agent.flush(sync=False)
    agent.close()
    agent = Agent("1.0", data_dir=tmp_path, consent="granted").start()
    try:
        assert agent.flush(sync=False)
        assert agent.status().consent == "denied"  # the player's choice wins
        assert agent.start_session() is None
    finally:
        agent.close()
    with store_at(tmp_path) as store:
        assert store.consent() == {"state": "denied", "by": "player"}
        assert store.sessions() == []


def test_sessions_recorded_before_a_stored_denial_is_read_are_dropped(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        store.set_consent("denied", "player")
    agent = Agent("1.0", data_dir=tmp_path).start()
    agent.start_session()  # may run before the recorder has read the store
    agent.end_session()
    try:
        assert agent.flush(sync=False)
        assert agent.status().consent == "denied"
        assert agent.start_session() is None
    finally:
        agent.close()
    assert all_sessions(tmp_path) == []


def test_the_cli_shows_and_sets_the_consent_and_a_running_agent_follows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--data-dir", str(tmp_path), "consent"]) == 0
    assert capsys.readouterr().out == "consent: granted (the default: nothing recorded yet)\n"
    agent = Agent("1.0", data_dir=tmp_path, consent="pending").start()
    try:
        play(agent, 2)
        assert agent.flush(sync=False)
        assert main(["--data-dir", str(tmp_path), "consent"]) == 0
        out = capsys.readouterr().out
        assert out == "consent: pending (the game's default: the player has not chosen)\n"
        assert main(["--data-dir", str(tmp_path), "status"]) == 0
        assert "consent:  pending (the game's default" in capsys.readouterr().out
        assert main(["--data-dir", str(tmp_path), "flush"]) == 1
        assert "consent is pending: nothing is uploaded" in capsys.readouterr().err
        assert main(["--data-dir", str(tmp_path), "consent", "denied"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("consent: denied (the player's choice)\ndeleted 2 session(s)")
        assert "purge --remote" in out
        assert agent.flush(sync=False)  # the recorder reads the store's choice each round
        assert agent.status().consent == "denied"
        assert agent.start_session() is None
    finally:
        agent.close()
    assert all_sessions(tmp_path) == []
    with pytest.raises(SystemExit) as usage:
        main(["--data-dir", str(tmp_path), "consent", "maybe"])
    assert usage.value.code == 2


def test_a_bad_consent_is_refused_naming_consent_and_the_allowed_values(tmp_path: Path) -> None:
    agent = Agent("1.0", in_memory=True).start()
    try:
        for bad, error in (("maybe", ValueError), ("GRANTED", ValueError), (1, TypeError)):
            with pytest.raises(error) as raised:
                agent.set_consent(bad)  # type: ignore[arg-type]
            assert "consent" in str(raised.value)
            assert all(state in str(raised.value) for state in CONSENT_STATES)
        assert agent.status().dropped["refused_calls"] == 3
        assert agent.status().consent == "granted"
    finally:
        agent.close()
    with pytest.raises(ValueError, match="consent must be one of granted, pending, denied"):
        Agent("1.0", consent="yes")


def test_do_not_track_and_enabled_false_win_over_any_consent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disabled = Agent("1.0", data_dir=tmp_path, enabled=False, consent="granted").start()
    disabled.set_consent("granted")
    assert disabled.start_session() is None
    disabled.close()
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    dnt = Agent("1.0", data_dir=tmp_path).start()
    dnt.set_consent("denied")
    assert dnt.status().consent == "denied" and not dnt.status().enabled
    dnt.close()
    assert not (tmp_path / DB_FILENAME).exists()  # no store opened, no choice kept


def test_a_denial_reaches_sessions_a_crashed_run_left_and_other_states(tmp_path: Path) -> None:
    did = "did:plc:consenttest0000000000000"
    with store_at(tmp_path) as store:
        rkeys = []
        for index, outbox in enumerate(("pending", "local", "quarantined", "withheld", "synced")):
            rkey, record = session_record(did, index)
            assert store.finalize(rkey, did, record, OWNER, "2026-11-24", withheld=False)
            rkeys.append(rkey)
            store.db.execute("UPDATE sessions SET outbox = ? WHERE rkey = ?", [outbox, rkey])
    agent = Agent("1.0", data_dir=tmp_path).start()
    try:
        agent.set_consent("denied")
        assert agent.flush(sync=False)
    finally:
        agent.close()
    store = Store.open(tmp_path / DB_FILENAME)
    try:
        assert [row.rkey for row in store.sessions()] == [rkeys[-1]]  # only the synced one
    finally:
        store.close()
