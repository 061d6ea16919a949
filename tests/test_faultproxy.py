"""FaultProxy against the real PDS: pass, cut, hang, delay, drop_response_once, inject."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from faultproxy import FaultProxy
from pds_harness import SESSION_COLLECTION, Account, PdsServer

from anisota_agent.xrpc import create_write

RECORD: dict[str, Any] = {
    "$type": SESSION_COLLECTION,
    "startedAt": "2026-11-24T10:00:00.000Z",
    "status": "active",
    "platform": "desktop",
    "clientVersion": "1.0",
}
PUT = "/xrpc/com.atproto.repo.putRecord"


@pytest.fixture
def proxy(pds: PdsServer) -> Iterator[FaultProxy]:
    with FaultProxy(pds.url) as p:
        yield p


@pytest.fixture
def client(proxy: FaultProxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=5.0) as c:
        yield c


def put(client: httpx.Client, account: Account, rkey: str, **record: Any) -> httpx.Response:
    return client.post(
        PUT,
        headers={"Authorization": f"Bearer {account.access_jwt}"},
        json={
            "repo": account.did,
            "collection": SESSION_COLLECTION,
            "rkey": rkey,
            "record": {**RECORD, **record},
        },
    )


def test_pass_keepalive_chunked_and_counts(
    pds: PdsServer, account: Account, proxy: FaultProxy, client: httpx.Client
) -> None:
    assert proxy.url.startswith("http://127.0.0.1:")
    for _ in range(3):
        resp = client.get("/xrpc/_health")
        assert resp.status_code == 200
        assert resp.json() == {"version": "0.5.35"}
    # Several writes on one pooled keep-alive connection.
    for i in range(3):
        resp = put(client, account, f"3lbyzq2a3v2{i + 2}c")
        assert resp.status_code == 200, resp.text
    assert proxy.connections_accepted() == 1
    # A chunked request body is forwarded with a Content-Length.
    body = json.dumps({"identifier": account.handle, "password": account.password}).encode()
    resp = client.post(
        "/xrpc/com.atproto.server.createSession",
        content=iter([body[:10], body[10:]]),
        headers={"Content-Type": "application/json"},
    )
    assert resp.status_code == 200, resp.text
    # A big listRecords is gzip'd and chunked by the PDS; it must arrive intact.
    writes = [create_write(SESSION_COLLECTION, f"r{i:04d}", RECORD) for i in range(60)]
    resp = client.post(
        "/xrpc/com.atproto.repo.applyWrites",
        headers={"Authorization": f"Bearer {account.access_jwt}"},
        json={"repo": account.did, "writes": writes},
    )
    assert resp.status_code == 200, resp.text
    params: dict[str, str | int] = {
        "repo": account.did,
        "collection": SESSION_COLLECTION,
        "limit": 100,
    }
    via_proxy = client.get("/xrpc/com.atproto.repo.listRecords", params=params)
    direct = httpx.get(f"{pds.url}/xrpc/com.atproto.repo.listRecords", params=params)
    assert direct.headers.get("content-encoding") == "gzip"
    assert "content-length" not in direct.headers  # chunked upstream
    assert via_proxy.json() == direct.json()
    assert len(via_proxy.json()["records"]) == 63
    # Errors pass through untouched.
    missing = client.get(
        "/xrpc/com.atproto.repo.getRecord",
        params={"repo": account.did, "collection": SESSION_COLLECTION, "rkey": "nope"},
    )
    assert missing.status_code == 400
    assert missing.json()["error"] == "RecordNotFound"

    assert proxy.requests_seen("/xrpc/_health") == 3
    assert proxy.requests_seen(PUT) == 3
    assert proxy.requests_seen("/xrpc/com.atproto.repo.") == 3 + 1 + 1 + 1
    assert proxy.requests_seen() == 3 + 3 + 1 + 1 + 1 + 1


def test_cut(account: Account, proxy: FaultProxy, client: httpx.Client) -> None:
    assert put(client, account, "3lbyzq2a3v22c").status_code == 200  # pooled connection
    proxy.set_mode("cut")
    with pytest.raises(httpx.TransportError):
        put(client, account, "3lbyzq2a3v22d")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{proxy.url}/xrpc/_health", timeout=2)
    proxy.set_mode("pass")
    assert put(client, account, "3lbyzq2a3v22d").status_code == 200
    assert proxy.requests_forwarded(PUT) == 2


def test_cut_resets_a_request_in_flight(proxy: FaultProxy, client: httpx.Client) -> None:
    proxy.set_mode("hang")
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.get("/xrpc/_health")
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    assert proxy.wait_for_request("/xrpc/_health", timeout=5)
    proxy.set_mode("cut")
    worker.join(timeout=5)
    assert len(errors) == 1
    assert isinstance(errors[0], httpx.ReadError)


def test_hang(pds: PdsServer, account: Account, proxy: FaultProxy) -> None:
    proxy.set_mode("hang")
    with httpx.Client(base_url=proxy.url, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        put(c, account, "3lbyzq2a3v22c")
    assert proxy.requests_seen(PUT) == 1
    assert proxy.requests_forwarded(PUT) == 0
    assert pds.get_record(account, SESSION_COLLECTION, "3lbyzq2a3v22c") is None
    proxy.set_mode("pass")
    with httpx.Client(base_url=proxy.url, timeout=5) as c:
        assert put(c, account, "3lbyzq2a3v22c").status_code == 200


def test_drop_response_once(
    pds: PdsServer, account: Account, proxy: FaultProxy, client: httpx.Client
) -> None:
    assert client.get("/xrpc/_health").status_code == 200
    proxy.drop_response_once(PUT)
    with pytest.raises(httpx.RemoteProtocolError):
        put(client, account, "3lbyzq2a3v22c", status="ended")
    # The PDS committed it although the client never got the answer.
    got = pds.get_record(account, SESSION_COLLECTION, "3lbyzq2a3v22c")
    assert got is not None and got["value"]["status"] == "ended"
    assert proxy.requests_seen(PUT) == 1
    assert proxy.responses_dropped(PUT) == 1
    # Only once: the retry goes through (a no-op put: same cid, no commit).
    again = put(client, account, "3lbyzq2a3v22c", status="ended")
    assert again.status_code == 200
    assert again.json()["cid"] == got["cid"]
    assert "commit" not in again.json()
    assert proxy.requests_seen(PUT) == 2


def test_inject_response(account: Account, proxy: FaultProxy, client: httpx.Client) -> None:
    proxy.inject_response(
        PUT,
        429,
        json_body={"error": "RateLimitExceeded", "message": "Rate Limit Exceeded"},
        headers={"retry-after": "7"},
    )
    resp = put(client, account, "3lbyzq2a3v22c")
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "7"
    assert resp.json()["error"] == "RateLimitExceeded"
    assert proxy.requests_forwarded(PUT) == 0
    assert put(client, account, "3lbyzq2a3v22c").status_code == 200
    assert proxy.requests_forwarded(PUT) == 1


def test_delay_forwards_at_once_and_holds_every_answer_back(
    pds: PdsServer, account: Account, proxy: FaultProxy, client: httpx.Client
) -> None:
    proxy.delay(0.6)
    assert proxy.delay_seconds == 0.6
    outcome: list[httpx.Response | BaseException] = []
    began = time.monotonic()

    def call() -> None:
        try:
            outcome.append(put(client, account, "3lbyzq2a3v22c", status="ended"))
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    # The PDS has answered and committed; the client is still waiting for the answer.
    assert proxy.wait_for_held(PUT, timeout=5)
    got = pds.get_record(account, SESSION_COLLECTION, "3lbyzq2a3v22c")
    assert got is not None and got["value"]["status"] == "ended"
    assert not outcome
    caller.join(timeout=10)
    elapsed = time.monotonic() - began
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.Response)
    assert outcome[0].status_code == 200
    assert outcome[0].json()["cid"] == got["cid"]
    assert elapsed >= 0.6
    # Injected answers wait too, on the same keep-alive connection.
    proxy.inject_response(PUT, 502)
    began = time.monotonic()
    assert put(client, account, "3lbyzq2a3v22d").status_code == 502
    assert time.monotonic() - began >= 0.6
    assert proxy.answers_held(PUT) == 2
    assert proxy.requests_forwarded(PUT) == 1
    # passthrough() clears it: a request made now is answered without the wait.
    proxy.passthrough()
    assert proxy.delay_seconds == 0.0
    began = time.monotonic()
    assert put(client, account, "3lbyzq2a3v22d").status_code == 200
    assert time.monotonic() - began < 0.6
    assert proxy.answers_held() == 2


def test_delay_of_one_path_holds_only_its_answers(
    pds: PdsServer, account: Account, proxy: FaultProxy, client: httpx.Client
) -> None:
    proxy.delay(30, PUT)
    assert client.get("/xrpc/_health").status_code == 200  # at once: another path
    assert proxy.answers_held() == 0
    errors: list[BaseException] = []

    def call() -> None:
        try:
            put(client, account, "3lbyzq2a3v22c")
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert proxy.wait_for_held(PUT, timeout=5)
    assert proxy.answers_held() == 1
    proxy.cut()
    caller.join(timeout=5)
    assert len(errors) == 1 and isinstance(errors[0], httpx.TransportError)
    proxy.reset()
    assert put(client, account, "3lbyzq2a3v22d").status_code == 200  # cleared


def test_delay_reopens_a_cut_link_and_reset_clears_it(account: Account, proxy: FaultProxy) -> None:
    proxy.cut()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{proxy.url}/xrpc/_health", timeout=2)
    proxy.delay(0.3)  # back, and slow from its first answer on
    assert proxy.mode == "pass"
    began = time.monotonic()
    assert httpx.get(f"{proxy.url}/xrpc/_health", timeout=5).status_code == 200
    assert time.monotonic() - began >= 0.3
    with pytest.raises(ValueError, match="delay"):
        proxy.delay(-1)
    proxy.reset()
    assert (proxy.delay_seconds, proxy.answers_held()) == (0.0, 0)
    with httpx.Client(base_url=proxy.url, timeout=0.25) as quick:
        assert quick.get("/xrpc/_health").status_code == 200  # would time out if held


def test_cut_resets_a_request_whose_answer_is_held(
    pds: PdsServer, account: Account, proxy: FaultProxy, client: httpx.Client
) -> None:
    proxy.delay(30)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            put(client, account, "3lbyzq2a3v22c")
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert proxy.wait_for_held(PUT, timeout=5)
    proxy.cut()
    caller.join(timeout=5)
    assert not caller.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], httpx.TransportError)
    # Committed upstream although the answer never arrived.
    assert pds.get_record(account, SESSION_COLLECTION, "3lbyzq2a3v22c") is not None
