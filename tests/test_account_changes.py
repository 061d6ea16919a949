"""Account changes that fail in a way nobody foresaw: reported once, never a loop.

A login, use_auth, resume or logout whose request (or token store) raises something
other than the XRPC errors the uplink expects must still end as a plain
``status().auth_problem``, be counted, release the sessions awaiting it, and
log one ERROR line without the exception's message (it may quote a secret) or
a traceback. A scripted PDS on ``httpx.MockTransport`` plays the server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from agent_helpers import Bearer, stored

from anisota_agent import Agent
from anisota_agent.auth import HostAuth
from anisota_agent.tokens import FileTokenStore

PDS_URL = "https://pds.example.com"
DID = "did:plc:scripted"
PASSWORD = "correct-horse-battery-staple-7f3a"
REFRESH_JWT = "refresh-jwt-5b2e"
ACCESS_JWT = "access-jwt-9c41"
CREATE = "/xrpc/com.atproto.server.createSession"
DELETE = "/xrpc/com.atproto.server.deleteSession"


def raises(request: httpx.Request) -> httpx.Response:
    """A transport hook that fails with something no XRPC error covers, quoting a secret."""
    raise RuntimeError(f"the transport broke while sending {PASSWORD}")


def garbage(request: httpx.Request) -> httpx.Response:
    """A 200 whose JSON nests too deep to read (``json`` raises RecursionError)."""
    body = b"[" * 100_000 + b"]" * 100_000
    return httpx.Response(200, content=body, headers={"content-type": "application/json"})


class ScriptedPds:
    """createSession answers tokens; the rest is ``then`` (e.g. a hook that raises)."""

    def __init__(self, then: Callable[[httpx.Request], httpx.Response]) -> None:
        self.seen: list[str] = []
        self._then = then
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request.url.path)
        if request.url.path == CREATE:
            tokens = {"accessJwt": ACCESS_JWT, "refreshJwt": REFRESH_JWT}
            return httpx.Response(200, json={"did": DID, "handle": "me.test", **tokens})
        return self._then(request)


def assert_reported_once(caplog: pytest.LogCaptureFixture, problem: str) -> None:
    """One ERROR line for the failure, no traceback, no secret anywhere in the log."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage().split(" (raised in ")[0] for r in errors] == [problem]
    assert all(r.exc_info is None and r.exc_text is None for r in caplog.records)
    for secret in (PASSWORD, REFRESH_JWT, ACCESS_JWT):
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("answer", "kind"), [(raises, "RuntimeError"), (garbage, "RecursionError")]
)
def test_a_login_that_fails_unexpectedly_sets_auth_problem_and_keeps_its_session_local(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    answer: Callable[[httpx.Request], httpx.Response],
    kind: str,
) -> None:
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return answer(request)

    transport = httpx.MockTransport(handle)
    with caplog.at_level(logging.DEBUG):
        agent = Agent("1.0", data_dir=tmp_path, transport=transport).start()
        agent.login("me.test", PASSWORD, pds_url=PDS_URL)
        during = str(agent.start_session())  # carries the login's tag
        agent.end_session("logout")
        for _ in range(3):  # later rounds try nothing again
            assert agent.flush()
        status = agent.status()
        after = str(agent.start_session())
        agent.close()
    assert status.auth_problem == f"login failed: unexpected {kind}"
    assert status.account is None
    assert status.counters.get("account_errors") == 1 and "worker_errors" not in status.counters
    assert seen == [CREATE]  # one attempt, no retry loop
    assert stored(tmp_path, during).did is None  # recorded, and local
    assert stored(tmp_path, during).outbox == "local"
    assert stored(tmp_path, after).awaiting_login is None  # the login no longer holds sessions
    assert_reported_once(caplog, status.auth_problem)


def test_a_logout_whose_revocation_fails_unexpectedly_still_forgets_the_login(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pds = ScriptedPds(then=raises)
    with caplog.at_level(logging.DEBUG):
        agent = Agent("1.0", data_dir=tmp_path, transport=pds.transport).start()
        agent.login("me.test", PASSWORD, pds_url=PDS_URL)
        assert agent.flush()
        assert agent.status().account is not None
        agent.logout()
        assert agent.flush()
        status = agent.status()
        agent.close()
    assert status.auth_problem == "logout failed: unexpected RuntimeError"
    assert status.account is None
    assert status.counters.get("account_errors") == 1
    assert pds.seen == [CREATE, DELETE]
    assert not (tmp_path / "session.json").exists()  # the next run resumes nothing
    assert_reported_once(caplog, status.auth_problem)


def test_a_resume_that_fails_unexpectedly_releases_the_sessions_awaiting_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def load(self: FileTokenStore) -> None:
        raise LookupError(f"a token store of its own, holding {REFRESH_JWT}")

    monkeypatch.setattr(FileTokenStore, "load", load)
    with caplog.at_level(logging.DEBUG):
        agent = Agent("1.0", data_dir=tmp_path).start()
        during = str(agent.start_session())  # awaits the resume
        agent.end_session("user_initiated")
        assert agent.flush()
        status = agent.status()
        after = str(agent.start_session())
        agent.close()
    assert status.auth_problem == "resuming the saved login failed: unexpected LookupError"
    assert status.account is None
    assert status.counters.get("account_errors") == 1
    assert stored(tmp_path, during).did is None
    assert stored(tmp_path, after).awaiting_login is None
    assert_reported_once(caplog, status.auth_problem)


def test_after_an_unexpected_failure_the_next_login_works(tmp_path: Path) -> None:
    calls = 0

    def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("once")
        tokens = {"accessJwt": ACCESS_JWT, "refreshJwt": REFRESH_JWT}
        return httpx.Response(200, json={"did": DID, "handle": "me.test", **tokens})

    agent = Agent("1.0", data_dir=tmp_path, transport=httpx.MockTransport(flaky)).start()
    agent.login("me.test", PASSWORD, pds_url=PDS_URL)
    assert agent.flush()
    assert agent.status().auth_problem is not None
    agent.login("me.test", PASSWORD, pds_url=PDS_URL)
    assert agent.flush()
    status = agent.status()
    agent.close()
    assert status.auth_problem is None
    assert status.account is not None and DID in status.account


def test_a_use_auth_that_fails_unexpectedly_sets_auth_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def client(self: HostAuth, **http: object) -> None:
        raise RuntimeError(f"the host's auth broke, token {ACCESS_JWT}")

    monkeypatch.setattr(HostAuth, "client", client)
    with caplog.at_level(logging.DEBUG):
        agent = Agent("1.0", data_dir=tmp_path, transport=httpx.MockTransport(raises)).start()
        agent.use_auth(Bearer(ACCESS_JWT), did=DID, pds_url=PDS_URL)
        assert agent.flush()
        status = agent.status()
        agent.close()
    assert status.auth_problem == "use_auth failed: unexpected RuntimeError"
    assert status.account is None
    assert status.counters.get("account_errors") == 1
    assert_reported_once(caplog, status.auth_problem)
