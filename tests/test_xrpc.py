"""The XRPC client: calls and error mapping against the real PDS; faults injected.

Happy paths and every error the reference PDS can produce run against the real
server (``pds`` fixture). ``httpx.MockTransport`` only stands in for what the
server cannot easily do on demand: timeouts, refused connections, 5xx from a
proxy, 429s.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from typing import Any

import httpx
import pytest
from agent_helpers import Bearer
from faultproxy import FaultProxy
from freezegun import freeze_time
from hypothesis import given
from hypothesis import strategies as st
from pds_harness import SESSION_COLLECTION, Account, PdsServer

from anisota_agent.checks import check_pds_url
from anisota_agent.clock import TidGenerator
from anisota_agent.records import to_json
from anisota_agent.xrpc import (
    DEFAULT_RETRY_AFTER,
    MAX_APPLY_WRITES,
    AccountUnavailable,
    ExpiredToken,
    Forbidden,
    InvalidRequest,
    InvalidSwap,
    InvalidToken,
    NetworkError,
    PayloadTooLarge,
    RateLimit,
    RateLimited,
    RecordNotFound,
    ServerError,
    XrpcClient,
    XrpcError,
    create_write,
    encode_json,
    parse_rate_limit,
)

TIDS = TidGenerator()
FROZEN = "2026-11-24T10:00:00Z"
FROZEN_EPOCH = 1795514400.0


class CountingTransport(httpx.HTTPTransport):
    """The real network transport, counting requests by XRPC method."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls[request.url.path.removeprefix("/xrpc/")] += 1
        return super().handle_request(request)


def record(**overrides: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "$type": SESSION_COLLECTION,
        "startedAt": "2026-11-24T10:00:00.000Z",
        "status": "active",
        "platform": "desktop",
        "clientVersion": "1.0",
        "activitySummary": {"totalEvents": 3, "pagesVisited": ["/garden", "/"]},
    }
    value.update(overrides)
    return value


@pytest.fixture
def client(pds: PdsServer, account: Account) -> Iterator[XrpcClient]:
    with XrpcClient(pds.url, auth=Bearer(account.access_jwt)) as xrpc:
        yield xrpc


def mock_client(
    handler: Callable[[httpx.Request], httpx.Response],
    on_response: Callable[[float, str], None] | None = None,
) -> XrpcClient:
    return XrpcClient(
        "https://pds.example.com",
        auth=Bearer("access-token"),
        transport=httpx.MockTransport(handler),
        on_response=on_response,
    )


def answer(status: int, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    if body is None:
        return httpx.Response(status, headers=headers)
    return httpx.Response(status, json=body, headers=headers)


# -- against the real PDS ---------------------------------------------------------------


def test_health_date_and_on_response(pds: PdsServer) -> None:
    seen: list[tuple[float, str]] = []
    with XrpcClient(pds.url, on_response=lambda ms, outcome: seen.append((ms, outcome))) as xrpc:
        assert xrpc.health() == {"version": "0.5.35"}
    assert len(seen) == 1 and seen[0][1] == "ok" and 0 <= seen[0][0] < 5000
    assert xrpc.server_date is not None and abs(xrpc.server_date - time.time()) < 5
    assert xrpc.clock_skew is not None and abs(xrpc.clock_skew) < 5
    assert xrpc.last_rate_limit is None  # rate limits are off on this PDS


def test_create_session_and_get_session(pds: PdsServer, account: Account) -> None:
    with XrpcClient(pds.url) as xrpc:
        session = xrpc.create_session(account.handle, account.password)
        assert session["did"] == account.did and session["handle"] == account.handle
        assert session["accessJwt"] and session["refreshJwt"]
    with XrpcClient(pds.url, auth=Bearer(session["accessJwt"])) as xrpc:
        assert xrpc.get_session()["did"] == account.did


def test_wrong_password_is_invalid_token(pds: PdsServer, account: Account) -> None:
    with XrpcClient(pds.url) as xrpc, pytest.raises(InvalidToken) as caught:
        xrpc.create_session(account.handle, "not-the-password")
    error = caught.value
    assert (error.status, error.error) == (401, "AuthenticationRequired")
    assert not error.ambiguous
    assert "not-the-password" not in str(error)


def test_put_get_round_trip_and_idempotent_put(client: XrpcClient, account: Account) -> None:
    rkey = TIDS.next()
    sent = record()
    first = client.put_record(account.did, SESSION_COLLECTION, rkey, sent)
    assert first["uri"] == f"at://{account.did}/{SESSION_COLLECTION}/{rkey}"
    assert "commit" in first and first["validationStatus"] == "unknown"

    got = client.get_record(account.did, SESSION_COLLECTION, rkey)
    assert got["value"] == sent
    assert (got["uri"], got["cid"]) == (first["uri"], first["cid"])

    again = client.put_record(account.did, SESSION_COLLECTION, rkey, sent)
    assert (again["uri"], again["cid"]) == (first["uri"], first["cid"])
    assert "commit" not in again  # nothing written

    changed = client.put_record(account.did, SESSION_COLLECTION, rkey, record(status="ended"))
    assert changed["cid"] != first["cid"] and "commit" in changed


def test_swap_record(client: XrpcClient, account: Account) -> None:
    rkey = TIDS.next()
    created = client.put_record(account.did, SESSION_COLLECTION, rkey, record(), swap_record=None)
    with pytest.raises(InvalidSwap) as caught:  # "only if absent", but it exists
        client.put_record(
            account.did, SESSION_COLLECTION, rkey, record(status="ended"), swap_record=None
        )
    assert (caught.value.status, caught.value.error) == (400, "InvalidSwap")
    # An identical record is a no-op that answers 200 before the swap is checked.
    same = client.put_record(account.did, SESSION_COLLECTION, rkey, record(), swap_record=None)
    assert same["cid"] == created["cid"] and "commit" not in same
    updated = client.put_record(
        account.did, SESSION_COLLECTION, rkey, record(status="ended"), swap_record=created["cid"]
    )
    with pytest.raises(InvalidSwap):  # stale CID
        client.put_record(
            account.did, SESSION_COLLECTION, rkey, record(status="x"), swap_record=created["cid"]
        )
    assert client.get_record(account.did, SESSION_COLLECTION, rkey)["cid"] == updated["cid"]


def test_apply_writes_creates_and_failed_recreate(pds: PdsServer, account: Account) -> None:
    seen: list[str] = []
    with XrpcClient(
        pds.url,
        auth=Bearer(account.access_jwt),
        on_response=lambda _ms, out: seen.append(out),
    ) as xrpc:
        rkeys = [TIDS.next() for _ in range(3)]
        result = xrpc.apply_writes(
            account.did, [create_write(SESSION_COLLECTION, k, record()) for k in rkeys]
        )
        assert [r["$type"] for r in result["results"]] == [
            "com.atproto.repo.applyWrites#createResult"
        ] * 3
        assert [r["uri"].rsplit("/", 1)[1] for r in result["results"]] == rkeys

        fresh = TIDS.next()
        with pytest.raises(ServerError) as caught:  # one re-create fails the whole batch
            xrpc.apply_writes(
                account.did,
                [
                    create_write(SESSION_COLLECTION, fresh, record()),
                    create_write(SESSION_COLLECTION, rkeys[0], record()),
                ],
            )
        assert (caught.value.status, caught.value.error) == (500, "InternalServerError")
        assert caught.value.ambiguous
        with pytest.raises(RecordNotFound):
            xrpc.get_record(account.did, SESSION_COLLECTION, fresh)
    assert seen == ["ok", "server_error", "ok"]
    assert len(pds.list_records(account)) == 3


def test_get_missing_record(client: XrpcClient, account: Account) -> None:
    with pytest.raises(RecordNotFound) as caught:
        client.get_record(account.did, SESSION_COLLECTION, TIDS.next())
    assert (caught.value.status, caught.value.error) == (400, "RecordNotFound")
    assert not caught.value.ambiguous


def test_list_records_pages_with_cursor(client: XrpcClient, account: Account) -> None:
    rkeys = [TIDS.next() for _ in range(5)]
    client.apply_writes(account.did, [create_write(SESSION_COLLECTION, k, record()) for k in rkeys])
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page = client.list_records(account.did, SESSION_COLLECTION, limit=2, cursor=cursor)
        if not page["records"]:
            break  # the reference PDS sends a cursor even with the last page
        pages.append([r["uri"].rsplit("/", 1)[1] for r in page["records"]])
        cursor = page["cursor"]
    assert pages == [rkeys[4:2:-1], rkeys[2:0:-1], rkeys[:1]]  # newest first
    oldest_first = client.list_records(account.did, SESSION_COLLECTION, limit=10, reverse=True)
    assert [r["uri"].rsplit("/", 1)[1] for r in oldest_first["records"]] == rkeys


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(record(duration=1.5), id="float"),
        pytest.param(record(**{"$type": "net.anisota.beta.game.log"}), id="wrong-type"),
    ],
)
def test_refused_record_is_invalid_request(
    client: XrpcClient, account: Account, bad: dict[str, Any]
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        client.put_record(account.did, SESSION_COLLECTION, TIDS.next(), bad)
    assert (caught.value.status, caught.value.error) == (400, "InvalidRequest")
    assert not caught.value.ambiguous


def test_oversized_body_is_payload_too_large(client: XrpcClient, account: Account) -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        client.put_record(
            account.did, SESSION_COLLECTION, TIDS.next(), record(clientVersion="x" * 1_100_000)
        )
    assert caught.value.status == 413


def test_token_errors(pds: PdsServer, account: Account) -> None:
    write = (account.did, SESSION_COLLECTION, TIDS.next(), record())
    expired = pds.mint_expired_access_token(account)
    cases: list[tuple[httpx.Auth, type[XrpcError], int, str]] = [
        (httpx.Auth(), InvalidToken, 401, "AuthMissing"),  # sends no token
        (Bearer("not.a.jwt"), InvalidToken, 400, "InvalidToken"),
        (Bearer(account.refresh_jwt), InvalidToken, 400, "InvalidToken"),  # wrong kind
        (Bearer(expired), ExpiredToken, 400, "ExpiredToken"),
    ]
    for auth, kind, status, name in cases:
        with XrpcClient(pds.url, auth=auth) as xrpc, pytest.raises(kind) as caught:
            xrpc.put_record(*write)
        assert (caught.value.status, caught.value.error) == (status, name)


def test_another_accounts_repo(pds: PdsServer, account: Account) -> None:
    other = pds.create_account("other")
    with (
        XrpcClient(pds.url, auth=Bearer(other.access_jwt)) as xrpc,
        pytest.raises(InvalidToken) as caught,
    ):
        xrpc.put_record(account.did, SESSION_COLLECTION, TIDS.next(), record())
    # The reference PDS answers 401 here, not the 403 the docs suggest.
    assert (caught.value.status, caught.value.error) == (401, "AuthenticationRequired")


def test_deactivated_and_taken_down_accounts(pds: PdsServer, account: Account) -> None:
    pds.deactivate(account)
    with XrpcClient(pds.url, auth=Bearer(account.access_jwt)) as xrpc:
        with pytest.raises(AccountUnavailable) as caught:
            xrpc.put_record(account.did, SESSION_COLLECTION, TIDS.next(), record())
        assert (caught.value.status, caught.value.error) == (401, "AccountDeactivated")
        assert xrpc.get_session()["active"] is False  # reads of the own session still work
    taken = pds.create_account("taken")
    pds.takedown(taken)
    with XrpcClient(pds.url, auth=Bearer(taken.access_jwt)) as xrpc:
        with pytest.raises(AccountUnavailable) as caught:
            xrpc.put_record(taken.did, SESSION_COLLECTION, TIDS.next(), record())
        assert (caught.value.status, caught.value.error) == (401, "AccountTakedown")
        # getSession of a taken-down account is a plain 400 on this PDS, not 401.
        with pytest.raises(InvalidRequest, match="Could not find user info"):
            xrpc.get_session()


def test_lost_answer_is_ambiguous_but_committed(pds: PdsServer, account: Account) -> None:
    rkey = TIDS.next()
    seen: list[str] = []
    with (
        FaultProxy(pds.url) as proxy,
        XrpcClient(
            proxy.url,
            auth=Bearer(account.access_jwt),
            on_response=lambda _ms, out: seen.append(out),
        ) as xrpc,
    ):
        proxy.drop_response_once("/xrpc/com.atproto.repo.putRecord")
        with pytest.raises(NetworkError) as caught:
            xrpc.put_record(account.did, SESSION_COLLECTION, rkey, record())
        assert caught.value.ambiguous and caught.value.status is None
        # It did land: the caller must look before writing again.
        assert xrpc.get_record(account.did, SESSION_COLLECTION, rkey)["value"] == record()
    assert seen == ["network_error", "ok"]


def test_rate_limit_headers_from_the_real_pds(pds_ratelimited: PdsServer) -> None:
    account = pds_ratelimited.create_account("limits")
    with XrpcClient(pds_ratelimited.url, auth=Bearer(account.access_jwt)) as xrpc:
        xrpc.put_record(account.did, SESSION_COLLECTION, TIDS.next(), record())
        limit = xrpc.last_rate_limit
    assert limit is not None
    assert 0 <= limit.remaining < limit.limit
    assert time.time() - 1 <= limit.reset_at <= time.time() + 24 * 3600
    assert limit.window is not None and limit.window > 0


# -- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://pds.example.com",
        "https://pds.example.com/",
        "http://127.0.0.1:2583",
        "http://127.9.9.9",
        "http://localhost:2583/",
        "http://[::1]:2583",
    ],
)
def test_accepted_urls(url: str) -> None:
    assert check_pds_url(url) == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "http://pds.example.com",
        "http://192.168.1.10:2583",
        "http://localhost.example.com",
        "http://127.0.0.1.nip.io",
        "ftp://pds.example.com",
        "pds.example.com",
        "https://user:secret@pds.example.com",
        "https://pds.example.com/?x=1",
    ],
)
def test_refused_urls(url: str) -> None:
    with pytest.raises(ValueError):
        check_pds_url(url)
    with pytest.raises(ValueError):
        XrpcClient(url)


# -- injected faults ------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("connection refused"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.ReadTimeout("read timed out"),
        httpx.RemoteProtocolError("server disconnected without sending a response"),
        httpx.ReadError("connection reset by peer"),
    ],
    ids=lambda failure: type(failure).__name__,
)
def test_transport_failures_are_ambiguous_network_errors(failure: httpx.TransportError) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise failure

    seen: list[str] = []
    with (
        mock_client(handler, on_response=lambda _ms, out: seen.append(out)) as xrpc,
        pytest.raises(NetworkError) as caught,
    ):
        xrpc.put_record("did:plc:x", SESSION_COLLECTION, "3lbyzq2a3v22c", record())
    error = caught.value
    assert error.ambiguous and error.status is None
    assert error.nsid == "com.atproto.repo.putRecord"
    assert error.__cause__ is failure
    assert seen == ["network_error"]


@pytest.mark.parametrize(
    ("response", "error_name"),
    [
        (httpx.Response(502, text="<html>Bad Gateway</html>"), None),
        (answer(503, {"error": "ServiceUnavailable", "message": "down"}), "ServiceUnavailable"),
        (answer(500, {"error": "InternalServerError"}), "InternalServerError"),
    ],
)
def test_5xx_is_an_ambiguous_server_error(response: httpx.Response, error_name: str | None) -> None:
    seen: list[str] = []
    with (
        mock_client(lambda _r: response, on_response=lambda _ms, out: seen.append(out)) as xrpc,
        pytest.raises(ServerError) as caught,
    ):
        xrpc.apply_writes("did:plc:x", [create_write(SESSION_COLLECTION, "k", record())])
    assert caught.value.ambiguous
    assert (caught.value.status, caught.value.error) == (response.status_code, error_name)
    assert seen == ["server_error"]


def test_unreadable_2xx_is_ambiguous() -> None:
    with (
        mock_client(lambda _r: httpx.Response(200, text="<html>portal</html>")) as xrpc,
        pytest.raises(ServerError) as caught,
    ):
        xrpc.put_record("did:plc:x", SESSION_COLLECTION, "k", record())
    assert caught.value.ambiguous and caught.value.status == 200


@pytest.mark.parametrize(
    ("status", "name", "kind"),
    [
        (400, "ExpiredToken", ExpiredToken),
        (401, "ExpiredToken", ExpiredToken),
        (400, "InvalidToken", InvalidToken),
        (401, "InvalidToken", InvalidToken),
        (401, "AuthMissing", InvalidToken),
        (401, None, InvalidToken),
        (401, "AccountTakedown", AccountUnavailable),
        (401, "AccountDeactivated", AccountUnavailable),
        (400, "AccountDeactivated", AccountUnavailable),
        (400, "RecordNotFound", RecordNotFound),
        (400, "InvalidSwap", InvalidSwap),
        (400, "InvalidRequest", InvalidRequest),
        (400, None, InvalidRequest),
        (403, "Forbidden", Forbidden),
        (413, "PayloadTooLargeError", PayloadTooLarge),
        (404, "MethodNotImplemented", XrpcError),
    ],
)
def test_error_mapping(status: int, name: str | None, kind: type[XrpcError]) -> None:
    body = {"message": "because"} | ({"error": name} if name else {})
    with mock_client(lambda _r: answer(status, body)) as xrpc, pytest.raises(XrpcError) as caught:
        xrpc.get_session()
    assert type(caught.value) is kind
    assert (caught.value.status, caught.value.error) == (status, name)
    assert caught.value.message == "because" and not caught.value.ambiguous


@freeze_time(FROZEN)
@pytest.mark.parametrize(
    ("headers", "retry_at"),
    [
        ({"retry-after": "30"}, FROZEN_EPOCH + 30),
        ({"ratelimit-reset": str(int(FROZEN_EPOCH) + 290)}, FROZEN_EPOCH + 290),
        (  # both: the later one wins
            {"retry-after": "10", "ratelimit-reset": str(int(FROZEN_EPOCH) + 50)},
            FROZEN_EPOCH + 50,
        ),
        ({"retry-after": email.utils.formatdate(FROZEN_EPOCH + 120, usegmt=True)}, None),
        ({}, FROZEN_EPOCH + DEFAULT_RETRY_AFTER),
        ({"retry-after": "soon"}, FROZEN_EPOCH + DEFAULT_RETRY_AFTER),
    ],
)
def test_429_retry_at(headers: dict[str, str], retry_at: float | None) -> None:
    body = {"error": "RateLimitExceeded", "message": "Rate Limit Exceeded"}
    with (
        mock_client(lambda _r: answer(429, body, headers)) as xrpc,
        pytest.raises(RateLimited) as caught,
    ):
        xrpc.put_record("did:plc:x", SESSION_COLLECTION, "k", record())
    expected = FROZEN_EPOCH + 120 if retry_at is None else retry_at
    assert caught.value.retry_at == pytest.approx(expected)
    assert (caught.value.status, caught.value.error) == (429, "RateLimitExceeded")


@freeze_time(FROZEN)
def test_rate_limit_parsing() -> None:
    headers = {
        "ratelimit-limit": "5000",
        "ratelimit-remaining": "4990",
        "ratelimit-reset": "1795518000",
        "ratelimit-policy": "5000;w=3600",
    }
    assert parse_rate_limit(headers) == RateLimit(5000, 4990, 1795518000.0, 3600)
    assert parse_rate_limit(httpx.Headers(headers)) == RateLimit(5000, 4990, 1795518000.0, 3600)
    no_policy = {k: v for k, v in headers.items() if k != "ratelimit-policy"}
    assert parse_rate_limit(no_policy) == RateLimit(5000, 4990, 1795518000.0, None)
    # a delta (as in the IETF draft) rather than the PDS's absolute time
    assert parse_rate_limit(headers | {"ratelimit-reset": "60"}) == RateLimit(
        5000, 4990, FROZEN_EPOCH + 60, 3600
    )
    assert parse_rate_limit(headers | {"ratelimit-policy": "30;w=300, 5000;w=3600"}) == RateLimit(
        5000, 4990, 1795518000.0, 300
    )
    assert parse_rate_limit(headers | {"ratelimit-policy": "5000;w=soon"}) == RateLimit(
        5000, 4990, 1795518000.0, None
    )
    assert parse_rate_limit({}) is None
    assert parse_rate_limit(headers | {"ratelimit-remaining": "many"}) is None


def test_last_rate_limit_follows_every_response() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {
            "ratelimit-limit": "5000",
            "ratelimit-remaining": "4000" if "putRecord" in request.url.path else "3000",
            "ratelimit-reset": "1795518000",
        }
        if "putRecord" in request.url.path:
            return answer(200, {"uri": "at://x", "cid": "c"}, headers)
        return answer(429, {"error": "RateLimitExceeded"}, headers)

    with mock_client(handler) as xrpc:
        xrpc.put_record("did:plc:x", SESSION_COLLECTION, "k", record())
        assert xrpc.last_rate_limit is not None and xrpc.last_rate_limit.remaining == 4000
        with pytest.raises(RateLimited):
            xrpc.apply_writes("did:plc:x", [create_write(SESSION_COLLECTION, "k", record())])
        assert xrpc.last_rate_limit.remaining == 3000


def test_request_shape() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return answer(200, {"uri": "at://x", "cid": "c", "records": []})

    with mock_client(handler) as xrpc:
        xrpc.put_record("did:plc:x", SESSION_COLLECTION, "k", record(), timeout=1.5)
        xrpc.get_record("did:plc:x", SESSION_COLLECTION, "k")
        xrpc.list_records("did:plc:x", SESSION_COLLECTION, limit=7, cursor="c1", reverse=True)
    put, get, listing = requests
    assert put.headers["user-agent"].startswith("anisota-agent/")
    assert put.headers["authorization"] == "Bearer access-token"
    assert put.extensions["timeout"]["read"] == 1.5
    body = json.loads(put.content)
    assert body == {"repo": "did:plc:x", "collection": SESSION_COLLECTION, "rkey": "k"} | {
        "record": record()
    }  # no validate, no swapRecord
    assert "authorization" not in get.headers  # public reads carry no token
    assert dict(listing.url.params) == {
        "repo": "did:plc:x",
        "collection": SESSION_COLLECTION,
        "limit": "7",
        "cursor": "c1",
        "reverse": "true",
    }


def test_refused_before_sending() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return answer(200, {})

    with mock_client(handler) as xrpc:
        with pytest.raises(InvalidRequest):  # NaN has no JSON form
            xrpc.put_record("did:plc:x", SESSION_COLLECTION, "k", record(x=float("nan")))
        with pytest.raises(ValueError):
            xrpc.apply_writes("did:plc:x", [])
        too_many = [create_write(SESSION_COLLECTION, str(i), record()) for i in range(201)]
        assert len(too_many) == MAX_APPLY_WRITES + 1
        with pytest.raises(ValueError):
            xrpc.apply_writes("did:plc:x", too_many)
    with XrpcClient("https://pds.example.com") as anonymous, pytest.raises(InvalidToken):
        anonymous.put_record("did:plc:x", SESSION_COLLECTION, "k", record())
    assert sent == []


def test_a_failing_on_response_does_not_fail_the_call(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_ms: float, _outcome: str) -> None:
        raise RuntimeError("monitor bug")

    with (
        caplog.at_level(logging.DEBUG, logger="anisota_agent"),
        mock_client(lambda _r: answer(200, {"version": "x"}), on_response=broken) as xrpc,
    ):
        assert xrpc.health() == {"version": "x"}
        assert xrpc.health() == {"version": "x"}
    failures = [r.levelno for r in caplog.records if "sink failed" in r.getMessage()]
    assert failures == [logging.ERROR, logging.DEBUG]  # one traceback, then quieter


class _BreaksMidBody(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield b'{"vers'
        raise httpx.ReadError("connection reset mid-body")


def test_an_answer_whose_body_is_cut_is_a_network_error() -> None:
    seen: list[str] = []

    def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_BreaksMidBody())

    with (
        mock_client(handler, on_response=lambda _ms, out: seen.append(out)) as xrpc,
        pytest.raises(NetworkError) as caught,
    ):
        xrpc.health()
    assert caught.value.ambiguous and caught.value.status is None
    # The headers came (the hook saw them); the call as a whole got no usable answer.
    assert seen == ["ok", "network_error"]


class _ResendOnce(httpx.Auth):
    """Sends a request, then resends it once with a second token."""

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = "Bearer first"
        yield request
        request.headers["Authorization"] = "Bearer second"
        yield request


@pytest.mark.parametrize(
    ("second", "outcomes"),
    [
        (answer(200, {"did": "did:plc:x"}), ["server_error", "ok"]),
        (None, ["server_error", "network_error"]),
    ],
    ids=["answered", "cut"],
)
def test_each_exchange_of_an_auth_flow_is_reported(
    second: httpx.Response | None, outcomes: list[str]
) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers["authorization"] == "Bearer first":
            return answer(503, {"error": "ServiceUnavailable"})
        if second is None:
            raise httpx.ConnectError("refused", request=request)
        return second

    with XrpcClient(
        "https://pds.example.com",
        auth=_ResendOnce(),
        transport=httpx.MockTransport(handler),
        on_response=lambda _ms, out: seen.append(out),
    ) as xrpc:
        if second is None:
            with pytest.raises(NetworkError):
                xrpc.get_session()
        else:
            assert xrpc.get_session() == {"did": "did:plc:x"}
    assert seen == outcomes


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.text()
JSON_VALUES = st.recursive(
    JSON_SCALARS | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), JSON_VALUES | st.lists(JSON_VALUES, max_size=6), max_size=5))
def test_a_body_encoded_an_item_at_a_time_is_the_one_json_text(body: dict[str, Any]) -> None:
    assert encode_json(body) == to_json(body).encode()


def test_a_value_json_cannot_carry_deep_in_a_batch_is_refused_before_sending() -> None:
    writes = [create_write(SESSION_COLLECTION, "k", record()) for _ in range(3)]
    writes[2]["value"]["x"] = float("inf")
    with pytest.raises(InvalidRequest, match="cannot encode"):
        encode_json({"repo": "did:plc:x", "writes": writes}, "com.atproto.repo.applyWrites")
