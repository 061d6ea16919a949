"""The lifecycle API: misuse, bad input, opt-out, and what the game's thread may do."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_helpers import all_sessions, run_python, stored, stored_record
from freezegun import freeze_time

from anisota_agent import Agent
from anisota_agent.records import MAX_PAGES

URI = "at://did:plc:abc/net.anisota.beta.game.log/3lbyzq2a3v22c"

#: A PDS nothing answers on (loopback, port 9): no call below reaches one.
PDS = "http://127.0.0.1:9"

# (call, exception, words the message must contain)
BAD_CALLS: list[tuple[Callable[[Agent], Any], type[Exception], tuple[str, ...]]] = [
    (lambda a: a.page(""), ValueError, ("route", "1 to 128")),
    (lambda a: a.page("x" * 129), ValueError, ("route", "1 to 128")),
    (lambda a: a.page(7), TypeError, ("route", "str")),  # type: ignore[arg-type]
    (lambda a: a.feature("f" * 49), ValueError, ("feature", "48")),
    (lambda a: a.feature(None), TypeError, ("feature", "str")),  # type: ignore[arg-type]
    (lambda a: a.action("jumps"), ValueError, ("kind", "levelUps", "dailyRewardsClaimed")),
    (lambda a: a.action(3), TypeError, ("kind", "postsViewed")),  # type: ignore[arg-type]
    (lambda a: a.action("postsViewed", count=-1), ValueError, ("count", "1 and 1,000,000")),
    (lambda a: a.action("postsViewed", count=0), ValueError, ("count",)),
    (lambda a: a.action("postsViewed", count=True), TypeError, ("count", "int")),
    (lambda a: a.action("postsViewed", count=1.0), TypeError, ("count", "int")),  # type: ignore[arg-type]
    (lambda a: a.progress(-5), ValueError, ("xp",)),
    (lambda a: a.progress(10, level=0), ValueError, ("level", "between 1")),
    (lambda a: a.progress("10"), TypeError, ("xp", "int")),  # type: ignore[arg-type]
    (lambda a: a.response(-1), ValueError, ("ms", "between 0")),
    (lambda a: a.response(float("nan")), ValueError, ("ms",)),
    (lambda a: a.response("12"), TypeError, ("ms",)),  # type: ignore[arg-type]
    (lambda a: a.response(12, ok="yes"), TypeError, ("ok", "bool")),  # type: ignore[arg-type]
    (lambda a: a.link_log("https://example.com"), ValueError, ("uri", "at://")),
    (lambda a: a.link_progress("at://" + "x" * 300), ValueError, ("uri", "200")),
    (lambda a: a.end_session("crashed"), ValueError, ("reason", "logout", "app_close")),
    (lambda a: a.start_session(entry_point="door"), ValueError, ("entry_point", "deep_link")),
    (
        lambda a: a.start_session(authentication_method="password"),
        ValueError,
        ("authentication_method", "oauth", "anonymous"),
    ),
    (lambda a: a.start_session(is_new_user="no"), TypeError, ("is_new_user", "bool")),  # type: ignore[arg-type]
    (lambda a: a.start_session(referrer="r" * 600), ValueError, ("referrer", "512")),
    (
        lambda a: a.use_auth("token", did="did:plc:x", pds_url="https://pds.example"),  # type: ignore[arg-type]
        TypeError,
        ("auth", "httpx.Auth"),
    ),
    (
        lambda a: a.use_auth(httpx.Auth(), did="alice", pds_url="https://pds.example"),
        ValueError,
        ("did", "did:plc:"),
    ),
    (
        lambda a: a.login("alice.test", "pw", pds_url="http://pds.example"),
        ValueError,
        ("pds_url", "https"),
    ),
    # Text the record cannot carry as UTF-8 (a lone surrogate) is refused at the call.
    (lambda a: a.page("/\ud800"), ValueError, ("route", "UTF-8")),
    (lambda a: a.feature("\udfffx"), ValueError, ("feature", "UTF-8")),
    (lambda a: a.start_session(referrer="https://a.example/\ud800"), ValueError, ("referrer",)),
    (lambda a: a.login("a\ud800.test", "pw", pds_url=PDS), ValueError, ("identifier", "UTF-8")),
    (lambda a: a.login("alice.test", "pw\ud800", pds_url=PDS), ValueError, ("password", "UTF-8")),
    (lambda a: a.login("alice.test", "pw", pds_url="https://\ud800.x"), ValueError, ("pds_url",)),
    # A huge value: refused, and cut in the message.
    (lambda a: a.end_session("x" * 10_000_000), ValueError, ("reason", "10,000,000 characters")),
    (lambda a: a.page("x" * 10_000_000), ValueError, ("route", "10,000,000")),
    (lambda a: a.progress(10**5000), ValueError, ("xp", "bits")),
    # The game's own requests.
    (lambda a: a.report_request(None, "ok"), TypeError, ("elapsed_ms", "int or float")),  # type: ignore[arg-type]
    (lambda a: a.report_request(True, "ok"), TypeError, ("elapsed_ms",)),
    (lambda a: a.report_request(2**63, "ok"), ValueError, ("elapsed_ms", "86,400,000")),
    (lambda a: a.report_request(float("inf"), "ok"), ValueError, ("elapsed_ms",)),
    (lambda a: a.report_request(5, []), TypeError, ("outcome", "network_error")),  # type: ignore[arg-type]
    (lambda a: a.report_request(5, "timeout"), ValueError, ("outcome", "server_error")),
    (lambda a: a.flush("x"), TypeError, ("timeout",)),  # type: ignore[arg-type]
    (lambda a: a.flush(float("inf")), ValueError, ("timeout", "3,600")),
    (lambda a: a.flush(1, sync="no"), TypeError, ("sync", "bool")),  # type: ignore[arg-type]
    (lambda a: a.link_log("at://did:plc:x/net.anisota.beta.game.log/3k#x"), ValueError, ("uri",)),
    (
        lambda a: a.use_auth(httpx.Auth(), did="did:web:a.example#key", pds_url=PDS),
        ValueError,
        ("did",),
    ),
    # Found by the property-based test (test_public_api_fuzz.py).
    (lambda a: a.login("alice.test", "pw", pds_url="https://[::1"), ValueError, ("pds_url",)),
    (lambda a: a.login("alice.test", "pw", pds_url="https://h:99999"), ValueError, ("pds_url",)),
    (lambda a: a.close(-1), ValueError, ("timeout",)),
    (lambda a: a.timed_transport("x"), TypeError, ("inner", "BaseTransport")),  # type: ignore[arg-type]
    (
        lambda a: a.async_timed_transport(httpx.HTTPTransport()),  # type: ignore[arg-type]
        TypeError,
        ("inner", "AsyncBaseTransport"),
    ),
    (lambda a: a.httpx_event_hooks(asynchronous="yes"), TypeError, ("asynchronous", "bool")),  # type: ignore[arg-type]
]


def test_good_values_the_inline_tests_leave_to_the_checkers_are_recorded(tmp_path: Path) -> None:
    """An int time, non-ASCII text and a request over an hour pass the checkers
    (the calls' inline tests pass only floats, ASCII and times within an hour)."""
    agent = Agent("1.0", data_dir=tmp_path).start()
    rkey = agent.start_session()
    assert rkey is not None
    agent.page("/jardín")
    agent.feature("lupa-ñ")
    agent.action("levelUps", 2)
    agent.progress(10)
    agent.progress(25, level=None)
    agent.response(40, True)
    agent.report_request(7_200_000, "ok")  # kept as an hour
    agent.report_request(20, "server_error")
    agent.end_session("logout")
    agent.close()
    record = stored_record(tmp_path, rkey)
    summary, metadata = record["activitySummary"], record["metadata"]
    assert summary["pagesVisited"] == ["/jardín"] and metadata["features"] == ["lupa-ñ"]
    assert summary["gameActions"]["levelUps"] == 2 and summary["totalEvents"] == 6
    assert (summary["currentXP"], summary["xpGainedThisSession"]) == (25, 15)
    assert metadata["performanceMetrics"] == {
        "errorCount": 1,
        "averageResponseTime": round((40 + 3_600_000 + 20) / 3),
    }
    assert agent.status().dropped == {}


@pytest.mark.parametrize(("call", "error", "words"), BAD_CALLS)
def test_bad_input_is_refused_and_the_session_is_intact(
    tmp_path: Path, call: Callable[[Agent], Any], error: type[Exception], words: tuple[str, ...]
) -> None:
    agent = Agent("1.0", data_dir=tmp_path).start()
    rkey = agent.start_session(entry_point="direct")
    assert rkey is not None
    agent.page("/home")
    agent.action("itemsCollected", count=2)
    with pytest.raises(error) as raised:
        call(agent)
    for word in words:
        assert word in str(raised.value)
    assert len(str(raised.value)) <= 200  # a bad value is cut, never echoed whole
    assert agent.status().session == rkey  # still the same session, still live
    assert agent.status().dropped == {"refused_calls": 1}
    agent.end_session("logout")
    agent.close()
    record = stored_record(tmp_path, rkey)
    assert record["activitySummary"]["totalEvents"] == 2
    assert record["activitySummary"]["pagesVisited"] == ["/home"]
    assert record["activitySummary"]["gameActions"]["itemsCollected"] == 2
    assert record["sessionContext"] == {"entryPoint": "direct"}


def test_constructor_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="platform must be one of web, mobile, desktop, pwa"):
        Agent("1.0", platform="console")
    with pytest.raises(ValueError, match="client_version"):
        Agent("")
    with pytest.raises(ValueError, match="client_version must be text UTF-8 can encode"):
        Agent("1.\ud800")
    with pytest.raises(ValueError, match="checkpoint_interval"):
        Agent("1.0", checkpoint_interval=0)
    for clock in (5, 0, "system"):  # a falsy clock is refused too, never replaced
        with pytest.raises(TypeError, match="clock must have wall_ns"):
            Agent("1.0", clock=clock)  # type: ignore[arg-type]


def test_activity_without_a_session_is_dropped_and_counted(tmp_path: Path) -> None:
    agent = Agent("1.0", data_dir=tmp_path).start()
    agent.page("/nowhere")
    agent.touch()
    assert agent.end_session() is None  # ending with nothing running is harmless
    assert agent.status().dropped == {"calls_without_session": 2}
    assert agent.flush()
    assert agent.status().counters == {"calls_without_session": 2}
    agent.close()
    assert all_sessions(tmp_path) == []


def test_end_twice_returns_none_the_second_time(tmp_path: Path) -> None:
    agent = Agent("1.0", data_dir=tmp_path).start()
    rkey = agent.start_session()
    assert agent.end_session("logout") == rkey
    assert agent.end_session("logout") is None
    agent.close()
    assert stored_record(tmp_path, str(rkey))["endReason"] == "logout"


def test_invalidate_and_restart_ends_the_previous_session(tmp_path: Path) -> None:
    agent = Agent("1.0", data_dir=tmp_path).start()
    first = agent.start_session()
    second = agent.start_session()  # ends the first as user_initiated
    assert agent.invalidate() == second
    agent.close()
    assert stored_record(tmp_path, str(first))["endReason"] == "user_initiated"
    invalidated = stored_record(tmp_path, str(second))
    assert (invalidated["status"], invalidated["endReason"]) == ("invalidated", "forced_end")


def test_close_ends_the_session_as_app_close(tmp_path: Path) -> None:
    with Agent("1.0", data_dir=tmp_path) as agent:
        rkey = agent.start_session()
        agent.page("/home")
    record = stored_record(tmp_path, str(rkey))
    assert (record["status"], record["endReason"]) == ("ended", "app_close")
    assert stored(tmp_path, str(rkey)).outbox == "local"  # no account: kept here
    assert agent.close() is True  # closing twice is harmless


def test_list_caps_truncate_and_count(tmp_path: Path) -> None:
    agent = Agent("1.0", data_dir=tmp_path).start()
    rkey = agent.start_session()
    for i in range(MAX_PAGES + 3):
        agent.page(f"/p{i}")
    agent.close()
    assert len(stored_record(tmp_path, str(rkey))["activitySummary"]["pagesVisited"]) == MAX_PAGES
    assert agent.status().dropped == {"pages_over_cap": 3}


def test_checkpoint_writes_the_live_session(tmp_path: Path) -> None:
    with freeze_time("2026-11-24T10:00:00Z") as frozen:
        agent = Agent("1.0", data_dir=tmp_path).start()
        rkey = agent.start_session()
        assert agent.flush()
        assert stored(tmp_path, str(rkey)).outbox == "live"
        frozen.tick(3)
        agent.action("feedsLoaded")
        assert agent.flush()
        live = stored_record(tmp_path, str(rkey))
        assert live["status"] == "active"
        assert live["lastActivityAt"] == "2026-11-24T10:00:03.000Z"
        assert live["activitySummary"]["gameActions"]["feedsLoaded"] == 1
        agent.close()


@pytest.mark.parametrize("how", ["env", "switch"])
def test_opt_out_records_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "env":
        monkeypatch.setenv("DO_NOT_TRACK", "1")
    agent = Agent("1.0", data_dir=tmp_path, enabled=how != "switch").start()
    assert agent.start_session() is None
    agent.page("/home")
    agent.close()
    status = agent.status()
    assert (status.enabled, status.running, status.dropped) == (False, False, {})
    assert not (tmp_path / "agent.sqlite3").exists()


def test_purge_deletes_everything(tmp_path: Path) -> None:
    agent = Agent("1.0", data_dir=tmp_path).start()
    agent.start_session()
    agent.end_session()
    assert agent.flush()
    assert len(all_sessions(tmp_path)) == 1
    agent.purge()
    assert agent.flush()
    assert all_sessions(tmp_path) == []
    agent.close()


def test_corrupt_store_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "agent.sqlite3").write_bytes(b"this is not a database" * 100)
    agent = Agent("1.0", data_dir=tmp_path).start()
    rkey = agent.start_session()
    agent.close()
    assert stored(tmp_path, str(rkey)).outbox == "local"
    assert len(list(tmp_path.glob("agent.sqlite3.corrupt-*"))) == 1
    assert "corrupt" in caplog.text


def test_unwritable_store_degrades_to_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    agent = Agent("1.0", data_dir=blocker / "sub").start()
    rkey = agent.start_session()
    agent.page("/home")
    assert agent.flush()
    status = agent.status()
    assert status.store_mode == "memory"
    assert status.counters["store_failures"] == 1
    assert status.outbox["live"] == 1 and status.session == rkey
    agent.close()


# What the game's thread must never do inside an agent call.
_AUDIT_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading
    game_thread = threading.get_ident()
    seen = []
    watching = False
    FORBIDDEN = {"open", "socket.connect", "socket.__new__", "sqlite3.connect", "import",
                 "os.listdir", "os.scandir", "subprocess.Popen"}

    def hook(event, args):
        if watching and threading.get_ident() == game_thread and event in FORBIDDEN:
            seen.append([event, str(args[0])[:80]])

    sys.addaudithook(hook)
    import anisota_agent
    agent = anisota_agent.Agent("1.0", data_dir=sys.argv[1]).start()
    agent.flush()  # let the worker import what it needs, off this thread
    watching = True
    agent.start_session(entry_point="direct", authentication_method="oauth")
    for i in range(50):
        agent.page(f"/p{i % 7}")
        agent.feature("lens")
        agent.action("postsViewed", count=2)
        agent.progress(100 + i, level=2)
        agent.response(12.5, ok=i % 9 != 0)
        agent.link_log("at://did:plc:abc/net.anisota.beta.game.log/3lbyzq2a3v22c")
        agent.link_progress("at://did:plc:abc/net.anisota.beta.game.progress/3lbyzq2a3v22c")
        agent.touch()
        agent.set_foreground(i % 2 == 0)
        agent.status()
    agent.end_session("logout")
    watching = False
    agent.close()
    print(json.dumps(seen))
    """
)


def test_activity_calls_do_no_io_on_the_calling_thread(tmp_path: Path) -> None:
    assert json.loads(run_python(_AUDIT_SCRIPT, str(tmp_path))) == []


def test_the_audit_sees_io_on_the_calling_thread(tmp_path: Path) -> None:
    """The check above can fail: the same hook catches a file opened on that thread."""
    leaky = _AUDIT_SCRIPT.replace(
        'agent.end_session("logout")', 'open(sys.argv[1] + "/leak", "w").close()'
    )
    assert leaky != _AUDIT_SCRIPT
    assert [event for event, _ in json.loads(run_python(leaky, str(tmp_path)))] == ["open"]


_IMPORT_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    game_thread = threading.get_ident()
    imported = []

    def hook(event, args):
        if event == "import" and threading.get_ident() == game_thread:
            imported.append(args[0])

    sys.addaudithook(hook)
    import anisota_agent
    agent = anisota_agent.Agent("1.0").start()  # the default data dir, resolved by the worker
    agent.start_session()
    agent.close()
    heavy = {"sqlite_utils", "httpx", "psutil", "platformdirs", "sqlite3"}
    print(sorted(m for m in imported if m.split(".")[0] in heavy))
    """
)


def test_heavy_imports_stay_off_the_game_thread(tmp_path: Path) -> None:
    output = run_python(_IMPORT_SCRIPT, env={"ANISOTA_AGENT_DATA_DIR": str(tmp_path)})
    assert output.strip() == "[]"
    assert (tmp_path / "agent.sqlite3").exists()  # it did record, off the game's thread


def test_status_shows_host_calls_at_once_and_the_store_after_a_round(tmp_path: Path) -> None:
    """The README's promise: ``session`` now, ``outbox`` as of the recorder's last round."""
    agent = Agent("1.0", data_dir=tmp_path).start()
    rkey = agent.start_session()
    # A full round: the uplink finds no saved account (until then the session
    # awaits the resume and would end ``pending``, not ``local``).
    assert agent.flush(5)
    assert agent.status().outbox["live"] == 1
    agent.end_session()
    assert agent.status().session is None  # at once
    assert agent.flush(5, sync=False)
    outbox = agent.status().outbox
    assert (outbox["live"], outbox["local"], outbox["pending"]) == (0, 1, 0)
    agent.close()
    assert stored(tmp_path, str(rkey)).outbox == "local"  # no account: never uploaded


def test_levels_rising_in_progress_count_no_level_up(tmp_path: Path) -> None:
    """``levelUps`` counts ``action("levelUps")`` only, as the README says."""
    agent = Agent("1.0", data_dir=tmp_path).start()
    rkey = str(agent.start_session())
    agent.progress(100, level=1)
    agent.progress(900, level=3)
    agent.action("levelUps")
    agent.close()
    assert stored_record(tmp_path, rkey)["activitySummary"]["gameActions"]["levelUps"] == 1
