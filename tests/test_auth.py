"""Credentials and token stores: app-password sessions against the real PDS.

Logins, refreshes, revocation, deactivation and logout all run against the
reference PDS; requests are counted with a real transport that tallies XRPC
methods, to prove "exactly one refresh" and "no retry loop". A scripted PDS on
``httpx.MockTransport`` proves that every request of the credentials goes
through the transport they were given.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_helpers import Bearer, fake_keyring
from pds_harness import SESSION_COLLECTION, Account, PdsServer

from anisota_agent.auth import AppPasswordSession, HostAuth
from anisota_agent.clock import TidGenerator
from anisota_agent.tokens import FileTokenStore, KeyringTokenStore, MemoryTokenStore
from anisota_agent.xrpc import (
    AccountUnavailable,
    ExpiredToken,
    InvalidToken,
    NetworkError,
)

TIDS = TidGenerator()
CREATE = "com.atproto.server.createSession"
REFRESH = "com.atproto.server.refreshSession"
DELETE = "com.atproto.server.deleteSession"
PUT = "com.atproto.repo.putRecord"
SCRIPTED_PDS = "https://pds.example.com"
SCRIPTED_DID = "did:plc:scripted"


class CountingTransport(httpx.HTTPTransport):
    """The real network transport, counting requests by XRPC method."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.calls[request.url.path.removeprefix("/xrpc/")] += 1
        return super().handle_request(request)


class ScriptedPds:
    """The few PDS methods a session uses, played by an ``httpx.MockTransport``.

    Tokens are numbered: the PDS accepts only the latest access and refresh
    JWT, and :meth:`expire_access` makes the current access token expired, as
    the reference PDS says it: 400 ``ExpiredToken``. ``seen`` lists the XRPC
    methods called, in order; a method in ``cut`` fails to connect.
    """

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.generation = 0
        self.expired = False
        self.revoked: list[str] = []
        self.cut: set[str] = set()
        self.transport = httpx.MockTransport(self.handle)

    def expire_access(self) -> None:
        self.expired = True

    def handle(self, request: httpx.Request) -> httpx.Response:
        nsid = request.url.path.removeprefix("/xrpc/")
        self.seen.append(nsid)
        if nsid in self.cut:
            raise httpx.ConnectError("the test cut this method", request=request)
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if nsid == CREATE:
            assert json.loads(request.content) == {"identifier": "me.test", "password": "pw"}
            return self._new_tokens()
        if nsid == REFRESH:
            if token != f"refresh-{self.generation}":
                return httpx.Response(400, json={"error": "ExpiredToken", "message": "revoked"})
            return self._new_tokens()
        if nsid == DELETE:
            self.revoked.append(token)
            return httpx.Response(200)
        if nsid == PUT:
            if self.expired or token != f"access-{self.generation}":
                return httpx.Response(400, json={"error": "ExpiredToken", "message": "expired"})
            rkey = json.loads(request.content)["rkey"]
            uri = f"at://{SCRIPTED_DID}/{SESSION_COLLECTION}/{rkey}"
            return httpx.Response(200, json={"uri": uri, "cid": "bafy"})
        return httpx.Response(400, json={"error": "MethodNotImplemented"})

    def _new_tokens(self) -> httpx.Response:
        self.generation += 1
        self.expired = False
        return httpx.Response(
            200,
            json={
                "did": SCRIPTED_DID,
                "handle": "me.test",
                "accessJwt": f"access-{self.generation}",
                "refreshJwt": f"refresh-{self.generation}",
            },
        )


def record() -> dict[str, Any]:
    return {
        "$type": SESSION_COLLECTION,
        "startedAt": "2026-11-24T10:00:00.000Z",
        "status": "active",
        "platform": "desktop",
        "clientVersion": "1.0",
    }


def put(session: AppPasswordSession | HostAuth, transport: httpx.BaseTransport) -> str:
    """Write one record through ``session``; returns its rkey."""
    rkey = TIDS.next()
    with session.client(transport=transport) as xrpc:
        xrpc.put_record(session.did, SESSION_COLLECTION, rkey, record())
    return rkey


@pytest.fixture
def counting() -> Iterator[CountingTransport]:
    with CountingTransport() as transport:
        yield transport


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return tmp_path / "auth" / "session.json"


def expired_session(
    pds: PdsServer, account: Account, transport: httpx.BaseTransport, **kwargs: Any
) -> AppPasswordSession:
    """A session whose access token expired a minute ago (its refresh token is live)."""
    return AppPasswordSession(
        pds.url,
        account.did,
        account.handle,
        account.refresh_jwt,
        access_jwt=pds.mint_expired_access_token(account),
        transport=transport,
        **kwargs,
    )


# -- app-password sessions against the real PDS ------------------------------------------


def test_login_keeps_only_the_refresh_token_on_disk(
    pds: PdsServer, account: Account, token_file: Path, counting: CountingTransport
) -> None:
    session = AppPasswordSession.login(
        pds.url, account.handle, account.password, FileTokenStore(token_file), transport=counting
    )
    assert (session.did, session.handle, session.pds_url) == (account.did, account.handle, pds.url)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    raw = token_file.read_text()
    saved = json.loads(raw)
    assert set(saved) == {"version", "kind", "pds_url", "did", "handle", "refresh_jwt"}
    assert saved["did"] == account.did and saved["pds_url"] == pds.url
    assert account.password not in raw
    assert session._access_jwt is not None and session._access_jwt not in raw
    assert [p.name for p in token_file.parent.iterdir()] == ["session.json"]  # no temp file

    rkey = put(session, counting)
    assert pds.get_record(account, SESSION_COLLECTION, rkey) is not None
    assert counting.calls == {"com.atproto.server.createSession": 1, PUT: 1}
    for text in (session.describe(), repr(session)):
        assert account.handle in text and account.did in text
        assert saved["refresh_jwt"] not in text and session._access_jwt not in text


def test_wrong_password_stores_nothing(pds: PdsServer, account: Account, token_file: Path) -> None:
    with pytest.raises(InvalidToken) as caught:
        AppPasswordSession.login(pds.url, account.handle, "wrong", FileTokenStore(token_file))
    assert (caught.value.status, caught.value.error) == (401, "AuthenticationRequired")
    assert not token_file.exists()


def test_from_store_refreshes_on_first_use(
    pds: PdsServer, account: Account, token_file: Path, counting: CountingTransport
) -> None:
    store = FileTokenStore(token_file)
    AppPasswordSession.login(pds.url, account.handle, account.password, store).close()
    first_refresh = json.loads(token_file.read_text())["refresh_jwt"]

    resumed = AppPasswordSession.from_store(store, transport=counting)
    assert resumed is not None and resumed.did == account.did
    assert counting.calls == {}  # nothing until the first request
    put(resumed, counting)
    put(resumed, counting)
    assert counting.calls == {REFRESH: 1, PUT: 2}
    rotated = json.loads(token_file.read_text())["refresh_jwt"]
    assert rotated != first_refresh  # refresh tokens rotate; the new one is saved
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_expired_access_token_refreshes_exactly_once(
    pds: PdsServer, account: Account, counting: CountingTransport
) -> None:
    seen: list[str] = []
    store = MemoryTokenStore()
    session = expired_session(
        pds,
        account,
        counting,
        token_store=store,
        on_response=lambda _ms, out: seen.append(out),
    )
    rkey = put(session, counting)
    assert counting.calls == {PUT: 2, REFRESH: 1}  # expired, refresh, resend
    assert pds.get_record(account, SESSION_COLLECTION, rkey) is not None
    saved = store.load()
    assert saved is not None and saved["refresh_jwt"] != account.refresh_jwt
    assert seen == ["ok"]  # the session's own refresh request
    put(session, counting)
    assert counting.calls == {PUT: 3, REFRESH: 1}


def test_concurrent_expiry_is_refreshed_once(
    pds: PdsServer, account: Account, counting: CountingTransport
) -> None:
    session = expired_session(pds, account, counting)
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def write(xrpc: Any) -> None:
        start.wait()
        try:
            xrpc.put_record(account.did, SESSION_COLLECTION, TIDS.next(), record())
        except BaseException as error:
            errors.append(error)

    with session.client(transport=counting) as xrpc:
        threads = [threading.Thread(target=write, args=(xrpc,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert errors == []
    assert counting.calls[REFRESH] == 1
    assert len(pds.list_records(account)) == 4


def test_revoked_refresh_token_stops_without_a_loop(
    pds: PdsServer, account: Account, counting: CountingTransport
) -> None:
    pds.revoke_refresh(account)
    session = expired_session(pds, account, counting)
    with pytest.raises(ExpiredToken) as caught:
        put(session, counting)
    error = caught.value
    assert (error.status, error.error, error.message) == (
        400,
        "ExpiredToken",
        "Token has been revoked",
    )
    assert error.nsid == REFRESH and not error.ambiguous
    assert counting.calls == {PUT: 1, REFRESH: 1}
    assert session.revoked and "revoked" in session.describe()

    # Dead from now on: fails at once, without a single request.
    with pytest.raises(ExpiredToken):
        put(session, counting)
    assert counting.calls == {PUT: 1, REFRESH: 1}


def test_revoked_refresh_from_store_sends_no_write(
    pds: PdsServer, account: Account, counting: CountingTransport
) -> None:
    store = MemoryTokenStore()
    AppPasswordSession(
        pds.url, account.did, account.handle, account.refresh_jwt, token_store=store
    )._persist()
    pds.revoke_refresh(account)
    session = AppPasswordSession.from_store(store, transport=counting)
    assert session is not None
    with pytest.raises(ExpiredToken):
        put(session, counting)  # no access token yet: the write refreshes first
    with pytest.raises(ExpiredToken):
        put(session, counting)
    assert counting.calls == {REFRESH: 1}


def test_deactivated_account_cannot_write(
    pds: PdsServer, account: Account, counting: CountingTransport
) -> None:
    store = MemoryTokenStore()
    session = AppPasswordSession.login(
        pds.url, account.handle, account.password, store, transport=counting
    )
    pds.deactivate(account)
    with pytest.raises(AccountUnavailable) as caught:
        put(session, counting)
    assert (caught.value.status, caught.value.error) == (401, "AccountDeactivated")
    assert counting.calls[REFRESH] == 0 and not session.revoked
    # A deactivated account can still refresh (and reactivate): a resumed session
    # refreshes before its first write, and only the write is refused.
    resumed = AppPasswordSession.from_store(store, transport=counting)
    assert resumed is not None
    with pytest.raises(AccountUnavailable):
        put(resumed, counting)
    assert counting.calls[REFRESH] == 1 and not resumed.revoked


def test_taken_down_account_fails_refresh(
    pds: PdsServer, account: Account, counting: CountingTransport
) -> None:
    pds.takedown(account)
    session = expired_session(pds, account, counting)
    with pytest.raises(AccountUnavailable) as caught:
        put(session, counting)
    assert (caught.value.status, caught.value.error) == (401, "AccountTakedown")
    assert counting.calls == {PUT: 1, REFRESH: 1}


def test_logout_revokes_and_forgets(pds: PdsServer, account: Account, token_file: Path) -> None:
    store = FileTokenStore(token_file)
    session = AppPasswordSession.login(pds.url, account.handle, account.password, store)
    refresh_jwt = json.loads(token_file.read_text())["refresh_jwt"]
    session.logout()
    assert not token_file.exists()
    answer = pds.xrpc("POST", REFRESH, token=refresh_jwt)
    assert (answer.status_code, answer.json()["error"]) == (400, "ExpiredToken")
    assert session.revoked
    with pytest.raises(InvalidToken), session.client() as xrpc:
        xrpc.get_session()


def test_logout_offline_still_forgets(
    pds: PdsServer, account: Account, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileTokenStore(token_file)
    AppPasswordSession.login(pds.url, account.handle, account.password, store).close()

    def offline(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("network unreachable", request=request)

    session = AppPasswordSession.from_store(store, transport=httpx.MockTransport(offline))
    assert session is not None
    with caplog.at_level(logging.WARNING, logger="anisota_agent"):
        session.logout()
    assert not token_file.exists()
    assert "did not confirm" in caplog.text


def test_refresh_offline_is_a_network_error(pds: PdsServer, account: Account) -> None:
    def offline(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    session = AppPasswordSession(
        pds.url,
        account.did,
        account.handle,
        account.refresh_jwt,
        transport=httpx.MockTransport(offline),
    )
    with pytest.raises(NetworkError):
        put(session, httpx.HTTPTransport())  # the refresh before the write fails
    assert not session.revoked  # a later try may succeed


def test_no_secret_is_logged(
    pds: PdsServer, account: Account, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileTokenStore(token_file)
    with caplog.at_level(logging.DEBUG):
        first = AppPasswordSession.login(pds.url, account.handle, account.password, store)
        access = first._access_jwt
        first.close()
        session = AppPasswordSession.from_store(store)
        assert session is not None
        put(session, httpx.HTTPTransport())  # refreshes first: a new refresh token is saved
        refreshed = json.loads(token_file.read_text())["refresh_jwt"]
        session.logout()
    assert caplog.records  # something was logged
    for secret in (account.password, access, refreshed, account.refresh_jwt):
        assert secret and secret not in caplog.text


def test_plain_http_to_a_remote_pds_is_refused(tmp_path: Path) -> None:
    def never(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request may be sent")

    transport = httpx.MockTransport(never)
    with pytest.raises(ValueError, match="https"):
        AppPasswordSession.login(
            "http://pds.example.com", "me.test", "pw", None, transport=transport
        )
    store = MemoryTokenStore()
    store.save(
        {
            "version": 1,
            "kind": "app_password",
            "pds_url": "http://pds.example.com",
            "did": "did:plc:x",
            "handle": "me.test",
            "refresh_jwt": "r",
        }
    )
    assert AppPasswordSession.from_store(store, transport=transport) is None
    with pytest.raises(ValueError):
        HostAuth(Bearer("t"), "did:plc:x", "http://pds.example.com")


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"version": 2, "kind": "app_password", "pds_url": "https://p", "did": "d", "handle": "h"},
        {"version": 1, "kind": "oauth", "pds_url": "https://p", "did": "d", "handle": "h"},
        {"version": 1, "kind": "app_password", "pds_url": "https://p", "did": "d", "handle": "h"},
    ],
)
def test_from_store_ignores_unknown_data(data: dict[str, Any]) -> None:
    store = MemoryTokenStore()
    assert AppPasswordSession.from_store(store) is None
    store.save(data)
    assert AppPasswordSession.from_store(store) is None


# -- every request through the transport the credentials were given ------------------


def write_through_default_client(credentials: AppPasswordSession | HostAuth) -> None:
    """One ``putRecord`` through ``credentials.client()``, given no transport."""
    with credentials.client() as xrpc:
        xrpc.put_record(credentials.did, SESSION_COLLECTION, TIDS.next(), record())


def test_every_request_of_a_login_goes_through_its_transport() -> None:
    pds, store = ScriptedPds(), MemoryTokenStore()
    outcomes: list[str] = []
    session = AppPasswordSession.login(
        SCRIPTED_PDS,
        "me.test",
        "pw",
        store,
        transport=pds.transport,
        on_response=lambda _ms, outcome: outcomes.append(outcome),
    )
    assert pds.seen == [CREATE] and session.did == SCRIPTED_DID

    write_through_default_client(session)
    assert pds.seen == [CREATE, PUT]

    pds.expire_access()  # the PDS refuses the access token; the session refreshes
    write_through_default_client(session)
    assert pds.seen == [CREATE, PUT, PUT, REFRESH, PUT]
    saved = store.load()
    assert saved is not None and saved["refresh_jwt"] == "refresh-2"

    session.logout()
    assert pds.seen == [CREATE, PUT, PUT, REFRESH, PUT, DELETE]
    assert pds.revoked == ["refresh-2"] and store.load() is None
    assert outcomes == ["ok", "ok", "ok"]  # the session's own createSession, refresh, logout


def test_every_request_of_a_resumed_session_goes_through_its_transport() -> None:
    pds, store = ScriptedPds(), MemoryTokenStore()
    AppPasswordSession.login(SCRIPTED_PDS, "me.test", "pw", store, transport=pds.transport).close()

    resumed = AppPasswordSession.from_store(store, transport=pds.transport)
    assert resumed is not None
    write_through_default_client(resumed)  # no access token yet: refresh, then write
    assert pds.seen == [CREATE, REFRESH, PUT]
    resumed.logout()
    assert pds.seen == [CREATE, REFRESH, PUT, DELETE] and pds.revoked == ["refresh-2"]


def test_a_refresh_cut_in_the_transport_is_retried_on_the_next_write() -> None:
    pds = ScriptedPds()
    session = AppPasswordSession.login(SCRIPTED_PDS, "me.test", "pw", None, transport=pds.transport)
    pds.expire_access()
    pds.cut.add(REFRESH)
    with pytest.raises(NetworkError) as caught:
        write_through_default_client(session)
    assert caught.value.nsid == REFRESH and not session.revoked
    pds.cut.clear()
    write_through_default_client(session)
    assert pds.seen == [CREATE, PUT, REFRESH, PUT, REFRESH, PUT]


def test_host_auth_sends_through_its_transport() -> None:
    pds = ScriptedPds()
    pds.generation = 7
    host = HostAuth(Bearer("access-7"), SCRIPTED_DID, SCRIPTED_PDS, transport=pds.transport)
    write_through_default_client(host)
    assert pds.seen == [PUT]


def test_a_transport_given_to_client_wins() -> None:
    given, other = ScriptedPds(), ScriptedPds()
    given.generation = other.generation = 1
    host = HostAuth(Bearer("access-1"), SCRIPTED_DID, SCRIPTED_PDS, transport=given.transport)
    with host.client(transport=other.transport) as xrpc:
        xrpc.put_record(host.did, SESSION_COLLECTION, TIDS.next(), record())
    assert (given.seen, other.seen) == ([], [PUT])


# -- host-supplied auth ---------------------------------------------------------------------


def test_host_auth_writes_with_the_hosts_auth(
    pds: PdsServer, account: Account, counting: CountingTransport
) -> None:
    host = HostAuth(Bearer(account.access_jwt), account.did, pds.url, handle=account.handle)
    rkey = put(host, counting)
    assert pds.get_record(account, SESSION_COLLECTION, rkey) is not None
    assert host.describe() == f"host {account.handle} ({account.did}) at {pds.url}"
    assert account.access_jwt not in repr(host)


def test_host_auth_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        HostAuth(Bearer("t"), "alice.test", "https://pds.example.com")
    with pytest.raises(TypeError):
        HostAuth("token", "did:plc:x", "https://pds.example.com")  # type: ignore[arg-type]


# -- token stores ---------------------------------------------------------------------------

DATA = {"version": 1, "kind": "app_password", "refresh_jwt": "secret"}


def test_file_store_round_trip_atomic_and_private(token_file: Path) -> None:
    store = FileTokenStore(token_file)
    assert store.load() is None
    old_umask = os.umask(0)  # even a permissive umask must not widen the file
    try:
        store.save(DATA)
        store.save(DATA | {"handle": "h"})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert store.load() == DATA | {"handle": "h"}
    assert [p.name for p in token_file.parent.iterdir()] == ["session.json"]
    store.clear()
    store.clear()
    assert store.load() is None and not token_file.exists()
    assert store.describe() == str(token_file)


def test_file_store_repairs_a_readable_file(
    token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file.parent.mkdir()
    token_file.write_text(json.dumps(DATA))
    token_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="anisota_agent"):
        assert FileTokenStore(token_file).load() == DATA
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert "readable by others" in caplog.text and "secret" not in caplog.text


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"x" * 70_000])
def test_file_store_ignores_garbage(
    token_file: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    token_file.parent.mkdir()
    token_file.write_bytes(content)
    token_file.chmod(0o600)
    with caplog.at_level(logging.ERROR, logger="anisota_agent"):
        assert FileTokenStore(token_file).load() is None
    assert "ignoring the token file" in caplog.text


def test_file_store_refuses_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(DATA))
    target.chmod(0o600)
    link = tmp_path / "session.json"
    link.symlink_to(target)
    assert FileTokenStore(link).load() is None


def test_keyring_store_with_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = fake_keyring(monkeypatch)

    assert KeyringTokenStore.available()
    store = KeyringTokenStore("anisota-test")
    assert store.load() is None
    store.save(DATA)
    assert json.loads(secrets[("anisota-test", "session")]) == DATA
    assert store.load() == DATA
    store.clear()
    store.clear()
    assert store.load() is None


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "x" * 70_000])
def test_keyring_store_ignores_garbage(
    monkeypatch: pytest.MonkeyPatch, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    secrets = fake_keyring(monkeypatch)
    secrets[("anisota-test", "session")] = content
    with caplog.at_level(logging.ERROR, logger="anisota_agent"):
        assert KeyringTokenStore("anisota-test").load() is None
    assert "ignoring the keyring entry anisota-test" in caplog.text


def test_keyring_store_without_keyring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keyring", None)  # import keyring -> ImportError
    assert not KeyringTokenStore.available()
    with pytest.raises(RuntimeError, match="keyring"):
        KeyringTokenStore()


def test_login_that_cannot_be_saved_is_revoked(
    pds: PdsServer, account: Account, counting: CountingTransport
) -> None:
    attempted: list[dict[str, Any]] = []

    class ReadOnlyStore(MemoryTokenStore):
        def save(self, data: dict[str, Any]) -> None:
            attempted.append(data)
            raise PermissionError("read-only file system")

    with pytest.raises(PermissionError):
        AppPasswordSession.login(
            pds.url, account.handle, account.password, ReadOnlyStore(), transport=counting
        )
    assert counting.calls["com.atproto.server.deleteSession"] == 1
    answer = pds.xrpc("POST", REFRESH, token=attempted[0]["refresh_jwt"])
    assert (answer.status_code, answer.json()["message"]) == (400, "Token has been revoked")
