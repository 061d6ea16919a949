"""The agent with a real account: attribution, mirroring, timing the game's own requests."""

from __future__ import annotations

import sys
import textwrap
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from agent_helpers import (
    OWNER,
    SteppedClock,
    fake_keyring,
    run_python,
    session_record,
    store_at,
    stored,
    stored_record,
)
from pds_harness import Account, PdsServer

from anisota_agent import Agent
from anisota_agent.sync import ACCOUNT_RECHECK_SECONDS
from anisota_agent.uplink import RESUME_TAG

COLLECTION = "net.anisota.beta.game.session"


def logged_in_agent(data_dir: Path, pds: PdsServer, account: Account, **settings: float) -> Agent:
    agent = Agent("1.0", data_dir=data_dir, **settings).start()  # type: ignore[arg-type]
    agent.login(account.handle, account.password, pds_url=pds.url)
    assert agent.flush()
    assert agent.status().account is not None, agent.status().auth_problem
    return agent


def test_sessions_recorded_logged_out_stay_local(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    agent = Agent("1.0", data_dir=tmp_path).start()
    anonymous = str(agent.start_session(authentication_method="anonymous"))
    agent.end_session("user_initiated")
    agent.login(account.handle, account.password, pds_url=pds.url)
    mine = str(agent.start_session(authentication_method="existing_session"))
    agent.end_session("logout")
    assert agent.flush()
    agent.close()
    assert stored(tmp_path, anonymous).did is None
    assert stored(tmp_path, anonymous).outbox == "local"  # never uploaded to anyone
    assert stored(tmp_path, mine).outbox == "synced"
    remote = [item["uri"] for item in pds.list_records(account)]
    assert remote == [f"at://{account.did}/{COLLECTION}/{mine}"]


def test_a_session_started_during_login_belongs_to_that_account(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    agent = Agent("1.0", data_dir=tmp_path).start()
    agent.login(account.handle, account.password, pds_url=pds.url)
    rkey = str(agent.start_session())  # before the worker has logged in
    agent.page("/home")
    agent.close()
    assert stored(tmp_path, rkey).did == account.did


def test_switching_accounts_invalidates_the_live_session(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    agent = logged_in_agent(tmp_path, pds, account)
    rkey = str(agent.start_session())
    agent.use_auth(httpx.Auth(), did="did:plc:someoneelse0000000000000", pds_url=pds.url)
    assert agent.status().session is None
    agent.close()
    record = stored_record(tmp_path, rkey)
    assert (record["status"], record["endReason"]) == ("invalidated", "forced_end")


def test_mirroring_puts_the_live_session_then_the_final_one(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    agent = logged_in_agent(tmp_path, pds, account, mirror_interval=60)
    rkey = str(agent.start_session())
    agent.page("/garden")
    assert agent.flush()
    live = pds.get_record(account, COLLECTION, rkey)
    assert live is not None and live["value"]["status"] == "active"
    assert stored(tmp_path, rkey).mirrored
    agent.page("/shop")
    agent.end_session("logout")
    assert agent.flush()
    agent.close()
    final = stored_record(tmp_path, rkey)
    remote = pds.get_record(account, COLLECTION, rkey)
    assert remote is not None and remote["value"] == final
    assert len(pds.list_records(account)) == 1


class _GameApi(BaseHTTPRequestHandler):
    """The game's own backend: /ok answers, /fail is a 503."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/ok" else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def game_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GameApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()
    server.server_close()


def test_the_games_httpx_requests_are_timed(tmp_path: Path, game_api: str) -> None:
    agent = Agent("1.0", data_dir=tmp_path).start()
    rkey = str(agent.start_session())
    with httpx.Client(base_url=game_api, transport=agent.timed_transport()) as client:
        for path in ("/ok", "/ok", "/fail"):
            client.get(path)
    with httpx.Client(base_url=game_api, event_hooks=agent.httpx_event_hooks()) as client:
        client.get("/ok")
    with pytest.raises(httpx.ConnectError), agent.timed():
        httpx.get("http://127.0.0.1:9/")  # nothing listens: a network error
    agent.close()
    performance = stored_record(tmp_path, rkey)["metadata"]["performanceMetrics"]
    assert performance["errorCount"] == 2  # the 503 and the refused connection
    # Timed requests are measurements, not player activity.
    assert stored_record(tmp_path, rkey)["activitySummary"]["totalEvents"] == 0


def test_the_atexit_hook_closes_the_agent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from anisota_agent import Agent
        agent = Agent("1.0", data_dir=sys.argv[1]).start()
        print(agent.start_session(), flush=True)
        agent.page("/last")
        # the game exits without calling close()
        """
    )
    rkey = run_python(script, str(tmp_path)).strip()
    record = stored_record(tmp_path, rkey)
    assert (record["status"], record["endReason"]) == ("ended", "app_close")
    assert record["activitySummary"]["pagesVisited"] == ["/last"]


def test_the_session_can_live_in_the_os_keyring(
    tmp_path: Path, pds: PdsServer, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = fake_keyring(monkeypatch)
    agent = Agent("1.0", data_dir=tmp_path, keyring=True).start()
    agent.login(account.handle, account.password, pds_url=pds.url)
    assert agent.flush()
    agent.close()
    assert not (tmp_path / "session.json").exists()
    (saved,) = secrets.values()
    assert account.did in saved and account.password not in saved
    # The CLI (and the next run) find it with ANISOTA_AGENT_KEYRING=1.
    monkeypatch.setenv("ANISOTA_AGENT_KEYRING", "1")
    again = Agent("1.0", data_dir=tmp_path).start()
    assert again.flush()
    assert again.status().account is not None and account.did in str(again.status().account)
    again.close()


def test_without_a_usable_keyring_the_session_goes_to_a_0600_file(
    tmp_path: Path, pds: PdsServer, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "keyring", None)  # not installed
    agent = Agent("1.0", data_dir=tmp_path, keyring=True).start()
    agent.login(account.handle, account.password, pds_url=pds.url)
    assert agent.flush()
    agent.close()
    assert (tmp_path / "session.json").stat().st_mode & 0o777 == 0o600


def test_sessions_awaiting_a_resume_that_never_came_go_to_the_saved_account(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    """A run was killed before it resumed the saved login; the next logs in before a round."""
    logged_in_agent(tmp_path, pds, account).close()  # the saved login
    rkey, record = session_record(account.did, 0)
    with store_at(tmp_path) as store:
        store.finalize(rkey, None, record, OWNER, "2026-11-24", awaiting_login=RESUME_TAG)
    agent = Agent("1.0", data_dir=tmp_path)
    agent.login(account.handle, account.password, pds_url=pds.url)  # before any round
    agent.start()
    assert agent.flush()
    agent.close()
    assert stored(tmp_path, rkey).did == account.did
    assert stored(tmp_path, rkey).outbox == "synced"


def test_sessions_awaiting_a_resume_stay_the_saved_accounts_when_the_saved_login_is_gone(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    """A run was killed before it resumed; then the saved login went, and another logs in."""
    logged_in_agent(tmp_path, pds, account).close()  # the saved login, noted in the store
    rkey, record = session_record(account.did, 0)
    with store_at(tmp_path) as store:
        store.finalize(rkey, None, record, OWNER, "2026-11-24", awaiting_login=RESUME_TAG)
    (tmp_path / "session.json").unlink()
    other = pds.create_account("other")
    agent = logged_in_agent(tmp_path, pds, other)
    own = str(agent.start_session())
    agent.end_session()
    assert agent.flush()
    agent.close()
    # Recorded while the first account's login was saved: its own, not the new one's.
    assert stored(tmp_path, rkey).did == account.did
    assert stored(tmp_path, rkey).outbox == "pending"
    assert stored(tmp_path, own).did == other.did
    assert stored(tmp_path, own).outbox == "synced"


class Counting(httpx.HTTPTransport):
    """httpx's real transport, counting the agent's requests by XRPC method."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.calls[request.url.path.removeprefix("/xrpc/")] += 1
        return super().handle_request(request)

    def snapshot(self) -> Counter[str]:
        """The calls so far, but the network monitor's probes (it asks after a long silence)."""
        with self._lock:
            return Counter({nsid: n for nsid, n in self.calls.items() if nsid != "_health"})


def test_a_reactivated_account_is_found_within_the_hour_and_syncs_without_a_new_login(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    transport, clock = Counting(), SteppedClock()
    agent = Agent("1.0", data_dir=tmp_path, transport=transport, clock=clock).start()
    try:
        agent.login(account.handle, account.password, pds_url=pds.url)
        assert agent.flush()
        pds.deactivate(account)
        rkey = str(agent.start_session())
        agent.end_session("logout")
        assert agent.flush()
        stopped = agent.status()
        assert stopped.auth_problem is not None and "AccountDeactivated" in stopped.auth_problem
        assert stored(tmp_path, rkey).outbox == "pending"
        pds.activate(account)

        before = transport.snapshot()
        clock.step(ACCOUNT_RECHECK_SECONDS - 60)  # not an hour yet: nothing is asked
        assert agent.flush() and agent.flush()
        assert transport.snapshot() == before
        assert agent.status().auth_problem == stopped.auth_problem
        assert stored(tmp_path, rkey).outbox == "pending"

        clock.step(120)  # past the hour: one getSession, then the sync goes on
        assert agent.flush()
        status = agent.status()
    finally:
        agent.close()
    assert status.auth_problem is None and status.account is not None
    assert transport.snapshot() - before == Counter(
        {"com.atproto.server.getSession": 1, "com.atproto.repo.applyWrites": 1}
    )
    assert stored(tmp_path, rkey).outbox == "synced"
    assert [item["uri"] for item in pds.list_records(account)] == [
        f"at://{account.did}/{COLLECTION}/{rkey}"
    ]
    assert transport.calls["com.atproto.server.createSession"] == 1  # no new login
