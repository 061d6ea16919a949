"""The host's ``before_record`` guard: what it returns is what is stored and uploaded;
None, a raise, garbage or an invalid record keep the session ``withheld``."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from agent_helpers import store_at, stored
from pds_harness import Account, PdsServer

from anisota_agent import Agent
from anisota_agent.clock import TidGenerator
from anisota_agent.records import SessionContext, SessionState, build_record
from anisota_agent.store import Owner

COLLECTION = "net.anisota.beta.game.session"
SECRET = "secret-handle-7f3a"
REFERRER = f"https://anisota.net/profile/{SECRET}"


def origin_only(record: dict[str, Any]) -> dict[str, Any]:
    """The README's example: keep only the referrer's origin."""
    context = record.get("sessionContext", {})
    if "referrer" in context:
        parts = urlsplit(context["referrer"])
        context["referrer"] = f"{parts.scheme}://{parts.netloc}"
    return record


def by_page(record: dict[str, Any]) -> Any:
    """A guard whose verdict the session's first page chooses."""
    page = record["activitySummary"]["pagesVisited"][0]
    if page == "/drop":
        record["sessionContext"]["referrer"] = "https://changed.example"  # on a copy
        return None
    if page == "/raise":
        raise RuntimeError(f"the guard failed on {REFERRER}")
    if page == "/garbage":
        return ["not", "a", "record"]
    if page == "/invalid":
        return record | {"status": "paused"}
    return origin_only(record)


def test_a_guard_that_edits_drops_raises_and_returns_garbage(
    tmp_path: Path, pds: PdsServer, account: Account, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="anisota_agent")
    agent = Agent("1.0", data_dir=tmp_path, before_record=by_page).start()
    agent.login(account.handle, account.password, pds_url=pds.url)
    rkeys = {}
    for page in ("/edit", "/drop", "/raise", "/garbage", "/invalid"):
        rkey = agent.start_session(entry_point="direct", referrer=REFERRER)
        assert rkey is not None
        agent.page(page)
        agent.end_session("user_initiated")
        rkeys[page] = rkey
    try:
        assert agent.flush()
        status = agent.status()
    finally:
        agent.close()
    assert status.outbox["synced"] == 1 and status.outbox["withheld"] == 4
    assert status.outbox["pending"] == 0
    assert {name: status.counters.get(name) for name in ("guard_withheld", "guard_errors")} == {
        "guard_withheld": 1,
        "guard_errors": 1,
    }
    assert status.counters["guard_invalid"] == 2
    # The edited record is what is stored and what is on the PDS.
    remote = pds.list_records(account)
    assert [item["uri"] for item in remote] == [f"at://{account.did}/{COLLECTION}/{rkeys['/edit']}"]
    edited = stored(tmp_path, rkeys["/edit"])
    assert edited.outbox == "synced"
    assert remote[0]["value"] == edited.record
    assert edited.record["sessionContext"]["referrer"] == "https://anisota.net"
    # The others stay local as recorded (the guard saw a copy), with the reason.
    for page, reason in (
        ("/drop", "before_record returned None"),
        ("/raise", "before_record raised RuntimeError"),
        ("/garbage", "before_record returned a list, not a record (a dict)"),
        ("/invalid", "before_record returned an invalid record (at status)"),
    ):
        row = stored(tmp_path, rkeys[page])
        assert (row.outbox, row.last_error) == ("withheld", reason), page
        assert row.record["sessionContext"]["referrer"] == REFERRER
    # Logged, and never with the record's content.
    messages = [record.getMessage() for record in caplog.records]
    assert any("before_record raised RuntimeError" in message for message in messages)
    assert any("not a record" in message for message in messages)
    assert not [message for message in messages if SECRET in message]


def test_the_guard_runs_on_the_recorder_and_a_slow_one_never_holds_the_game(
    tmp_path: Path,
) -> None:
    entered, release = threading.Event(), threading.Event()
    threads: list[str] = []

    def slow(record: dict[str, Any]) -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        entered.set()
        release.wait(10)
        return record

    agent = Agent("1.0", data_dir=tmp_path, before_record=slow).start()
    try:
        first = agent.start_session()
        agent.end_session()
        assert entered.wait(5)  # the guard is holding the recorder now
        # The game goes on meanwhile: every call returns, on this thread.
        second = agent.start_session()
        agent.page("/garden")
        agent.action("levelUps")
        assert agent.status().session == second
        release.set()
        assert agent.flush(sync=False)
    finally:
        release.set()
        agent.close()
    assert threads[0] == "anisota-recorder"
    assert threading.current_thread().name not in threads
    assert first is not None and stored(tmp_path, first).outbox == "local"


def test_a_crashed_sessions_expired_record_goes_through_the_guard(tmp_path: Path) -> None:
    """Recovery finishes a session too: its record is guarded like any other."""
    seen: list[str] = []

    def keep_local(record: dict[str, Any]) -> None:
        seen.append(record["status"])
        return None

    state = SessionState(
        rkey=TidGenerator().next(),
        client_version="1.0",
        platform="desktop",
        context=SessionContext(entry_point="direct", referrer=REFERRER),
        started_wall_ms=int(time.time() * 1000) - 60_000,
        started_mono_ns=0,
    )
    rkey = state.rkey
    dead = Owner(2**22 + 12345, 0.0, "dead")  # as a killed process leaves it: live
    with store_at(tmp_path) as store:
        assert store.checkpoint(rkey, None, build_record(state, 1_000_000), dead, "2026-11-24")
    agent = Agent("1.0", data_dir=tmp_path, before_record=keep_local).start()
    try:
        assert agent.flush(sync=False)
        assert agent.status().counters.get("guard_withheld") == 1
    finally:
        agent.close()
    assert seen == ["expired"]
    row = stored(tmp_path, rkey)
    assert (row.status, row.outbox) == ("expired", "withheld")


def test_a_guard_is_checked_and_cannot_be_combined_with_mirroring() -> None:
    with pytest.raises(TypeError, match="before_record must be a callable"):
        Agent("1.0", before_record="strip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mirror_interval must be None when before_record"):
        Agent("1.0", before_record=origin_only, mirror_interval=300)
