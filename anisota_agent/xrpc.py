"""A small synchronous XRPC client for the few atproto calls the agent makes.

It runs on the agent's uplink thread only. Every failure becomes an
:class:`XrpcError` subclass that tells the sync loop what to do next:

- ``ambiguous`` errors (:class:`NetworkError`, :class:`ServerError`): a write may
  or may not have been committed; look (``getRecord``/``listRecords``) before
  writing again, and retry with backoff.
- :class:`ExpiredToken`: refresh the session, then retry (the app-password auth
  in :mod:`anisota_agent.auth` does that once by itself).
- :class:`InvalidToken`, :class:`AccountUnavailable`, :class:`Forbidden`: stop
  and report; retrying cannot help until the player acts.
- :class:`RateLimited`: wait until :attr:`RateLimited.retry_at`.
- :class:`InvalidRequest`, :class:`PayloadTooLarge`: the server refused this
  payload; quarantine the record, never retry it as is.
- :class:`RecordNotFound`, :class:`InvalidSwap`: answers about the repo's state.

Tokens never appear in URLs, log lines or exception messages.
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import logging
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal, NoReturn

import httpx

from ._version import __version__
from .checks import check_pds_url
from .records import to_json
from .timing import ExchangeTimer

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "MAX_APPLY_WRITES",
    "UNSET",
    "AccountUnavailable",
    "ExpiredToken",
    "Forbidden",
    "InvalidRequest",
    "InvalidSwap",
    "InvalidToken",
    "JsonDict",
    "NetworkError",
    "OnResponse",
    "PayloadTooLarge",
    "RateLimit",
    "RateLimited",
    "RecordNotFound",
    "ServerError",
    "XrpcClient",
    "XrpcError",
    "create_write",
    "delete_write",
    "encode_json",
    "error_from_response",
    "parse_rate_limit",
    "retry_time",
]

logger = logging.getLogger("anisota_agent")

#: ``com.atproto.repo.applyWrites`` refuses more writes than this in one batch.
MAX_APPLY_WRITES = 200

#: Waiting time assumed for a 429 that names no reset time.
DEFAULT_RETRY_AFTER = 60.0

#: A ``ratelimit-reset`` below this is a delta in seconds, not a Unix time (the
#: IETF draft says delta; the atproto PDS sends an absolute time).
_EPOCH_THRESHOLD = 1_000_000_000

_ACCOUNT_ERRORS = frozenset({"AccountTakedown", "AccountDeactivated", "AccountSuspended"})

JsonDict = dict[str, Any]
#: ``on_response(elapsed_ms, outcome)``: ``ok``, ``server_error`` or ``network_error``.
OnResponse = Callable[[float, str], None]


# -- errors ---------------------------------------------------------------------


class XrpcError(Exception):
    """An XRPC call failed.

    Attributes:
        status: the HTTP status, or None when no response arrived.
        error: the XRPC error name (``"ExpiredToken"``), if the server gave one.
        message: the server's message, or a description of the failure.
        headers: the response headers (empty when no response arrived).
        nsid: the method that was called.
    """

    #: True when a write may or may not have been committed.
    ambiguous: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        headers: Mapping[str, str] | None = None,
        nsid: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = httpx.Headers(headers or {})
        self.nsid = nsid

    def __str__(self) -> str:
        where = f"{self.nsid}: " if self.nsid else ""
        status = f"{self.status} " if self.status is not None else ""
        name = f"{self.error}: " if self.error else ""
        return f"{where}{status}{name}{self.message}"


class NetworkError(XrpcError):
    """No usable response: timeout, refused or dropped connection, TLS failure."""

    ambiguous = True


class ServerError(XrpcError):
    """A 5xx answer (or an unreadable 2xx body): the server may have committed."""

    ambiguous = True


class ExpiredToken(XrpcError):
    """The access (or refresh) token expired or was revoked (400 ``ExpiredToken``)."""


class InvalidToken(XrpcError):
    """The credentials are missing, malformed or wrong (``InvalidToken``, ``AuthMissing``,
    ``AuthenticationRequired`` for a wrong password)."""


class AccountUnavailable(XrpcError):
    """The account is taken down, suspended or deactivated."""


class Forbidden(XrpcError):
    """403: these credentials may not do this (for instance, another account's repo)."""


class RateLimited(XrpcError):
    """429: the write budget is spent; :attr:`retry_at` is when to try again."""

    def __init__(self, message: str, *, retry_at: float, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        #: Unix time (seconds) after which a retry may succeed.
        self.retry_at = retry_at


class RecordNotFound(XrpcError):
    """``getRecord`` of an rkey that holds no record."""


class InvalidSwap(XrpcError):
    """A ``swapRecord``/``swapCommit`` precondition did not hold."""


class InvalidRequest(XrpcError):
    """The server refused the payload (a float, a wrong ``$type``, too many writes...)."""


class PayloadTooLarge(XrpcError):
    """413: the request body is over the server's limit."""


# -- rate limits ----------------------------------------------------------------


@dataclass(frozen=True)
class RateLimit:
    """The tightest rate-limit bucket a response reported.

    ``reset_at`` is a Unix time in seconds; ``window`` the bucket's length in
    seconds, when the server named it in ``ratelimit-policy``.
    """

    limit: int
    remaining: int
    reset_at: float
    window: int | None


def parse_rate_limit(headers: Mapping[str, str]) -> RateLimit | None:
    """Read the ``ratelimit-*`` headers; None when absent or malformed."""
    try:
        limit = int(headers["ratelimit-limit"])
        remaining = int(headers["ratelimit-remaining"])
        reset_at = _reset_time(headers["ratelimit-reset"])
    except (KeyError, ValueError):
        return None
    return RateLimit(limit, remaining, reset_at, _policy_window(headers.get("ratelimit-policy")))


def _reset_time(value: str) -> float:
    reset = float(value)
    return reset if reset >= _EPOCH_THRESHOLD else time.time() + reset


def _policy_window(policy: str | None) -> int | None:
    """The ``w=`` of the first policy item (``"5000;w=3600"`` -> 3600)."""
    if not policy:
        return None
    first = policy.split(",")[0]
    for param in first.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name == "w":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def retry_time(headers: Mapping[str, str]) -> float:
    """When a 429 says to retry: the later of ``retry-after`` and ``ratelimit-reset``."""
    candidates: list[float] = []
    retry_after = headers.get("retry-after")
    if retry_after:
        parsed = _parse_retry_after(retry_after.strip())
        if parsed is not None:
            candidates.append(parsed)
    reset = headers.get("ratelimit-reset")
    if reset:
        with contextlib.suppress(ValueError):
            candidates.append(_reset_time(reset))
    return max(candidates) if candidates else time.time() + DEFAULT_RETRY_AFTER


def _parse_retry_after(value: str) -> float | None:
    """``Retry-After`` is delta seconds, or an HTTP date (RFC 9110)."""
    try:
        return time.time() + max(0.0, float(value))
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


# -- mapping responses to errors ------------------------------------------------


def error_from_response(response: httpx.Response, nsid: str | None = None) -> XrpcError:
    """The :class:`XrpcError` subclass for a non-2xx response."""
    status = response.status_code
    name, message = _error_body(response)
    kwargs: dict[str, Any] = {
        "status": status,
        "error": name,
        "headers": response.headers,
        "nsid": nsid,
    }
    if status == 429:
        return RateLimited(message, retry_at=retry_time(response.headers), **kwargs)
    return _error_class(status, name)(message, **kwargs)


def _error_class(status: int, name: str | None) -> type[XrpcError]:
    if status >= 500:
        return ServerError
    if name in _ACCOUNT_ERRORS and status in (400, 401):
        return AccountUnavailable
    if name == "ExpiredToken" and status in (400, 401):
        return ExpiredToken
    if status == 401 or (status == 400 and name == "InvalidToken"):
        return InvalidToken
    if status == 400:
        return {"RecordNotFound": RecordNotFound, "InvalidSwap": InvalidSwap}.get(
            name or "", InvalidRequest
        )
    return {403: Forbidden, 413: PayloadTooLarge}.get(status, XrpcError)


def _error_body(response: httpx.Response) -> tuple[str | None, str]:
    """``(error, message)`` from an XRPC error body; proxies may send HTML instead."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        name = body.get("error")
        message = body.get("message")
        return (
            name if isinstance(name, str) else None,
            message if isinstance(message, str) else (response.reason_phrase or "error"),
        )
    return None, f"{response.reason_phrase or 'HTTP error'} (non-XRPC body)"


# -- URLs -------------------------------------------------------------------------


def _user_agent() -> str:
    return f"anisota-agent/{__version__}"


def _server_time(headers: Mapping[str, str]) -> float | None:
    value = headers.get("date")
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


# -- the client -------------------------------------------------------------------


class _Unset(enum.Enum):
    UNSET = enum.auto()


#: Default of ``put_record(swap_record=...)``: no precondition at all.
UNSET: Literal[_Unset.UNSET] = _Unset.UNSET


def create_write(collection: str, rkey: str, value: JsonDict) -> JsonDict:
    """An ``applyWrites`` ``#create`` item."""
    return {
        "$type": "com.atproto.repo.applyWrites#create",
        "collection": collection,
        "rkey": rkey,
        "value": value,
    }


def delete_write(collection: str, rkey: str) -> JsonDict:
    """An ``applyWrites`` ``#delete`` item."""
    return {"$type": "com.atproto.repo.applyWrites#delete", "collection": collection, "rkey": rkey}


class XrpcClient:
    """Calls one PDS over a single keep-alive :class:`httpx.Client`.

    Args:
        base_url: the PDS, ``https://...`` (``http://`` only to a loopback host).
        auth: supplies the access token to the methods that need one (see
            :meth:`anisota_agent.auth.Credentials.httpx_auth`).
        transport: an httpx transport (tests inject faults with it).
        timeout: seconds allowed for each phase (connect, write, read, pool) of a
            request; a per-call ``timeout`` overrides it.
        on_response: called as ``on_response(elapsed_ms, outcome)`` after every HTTP
            exchange (timed by :class:`~anisota_agent.timing.ExchangeTimer`), and
            with ``network_error`` for every call that got no usable answer; it
            must be quick. If it raises, the call goes on (the error is logged).

    Not for the game's thread: every method blocks on the network.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 10.0,
        on_response: OnResponse | None = None,
    ) -> None:
        self.base_url = check_pds_url(base_url)
        self._auth = auth
        #: Times every exchange for ``on_response``; None when nobody listens.
        self._timing = ExchangeTimer(on_response) if on_response is not None else None
        #: The latest rate-limit headers seen, from any response.
        self.last_rate_limit: RateLimit | None = None
        #: The server's clock (Unix seconds) from the latest ``Date`` header.
        self.server_date: float | None = None
        #: ``server_date`` minus the local clock when it arrived (seconds, ±1).
        self.clock_skew: float | None = None
        hooks = (
            self._timing.hooks() if self._timing is not None else {"request": [], "response": []}
        )
        hooks["response"].append(self._observe)
        self._client = httpx.Client(
            base_url=self.base_url,
            transport=transport,
            timeout=timeout,
            headers={"User-Agent": _user_agent()},
            follow_redirects=False,
            event_hooks=hooks,
        )

    # -- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> XrpcClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"XrpcClient({self.base_url!r})"

    # -- com.atproto.server -----------------------------------------------------

    def create_session(
        self, identifier: str, password: str, *, timeout: float | None = None
    ) -> JsonDict:
        """``createSession``: ``{did, handle, accessJwt, refreshJwt, ...}``."""
        body = {"identifier": identifier, "password": password}
        return self._call("POST", "com.atproto.server.createSession", body=body, timeout=timeout)

    def refresh_session(self, refresh_jwt: str, *, timeout: float | None = None) -> JsonDict:
        """``refreshSession`` with the refresh JWT: a new token pair."""
        return self._call(
            "POST",
            "com.atproto.server.refreshSession",
            auth=_Bearer(refresh_jwt),
            timeout=timeout,
        )

    def delete_session(self, refresh_jwt: str, *, timeout: float | None = None) -> None:
        """``deleteSession``: revoke the refresh JWT (logout)."""
        self._call(
            "POST",
            "com.atproto.server.deleteSession",
            auth=_Bearer(refresh_jwt),
            timeout=timeout,
        )

    def get_session(self, *, timeout: float | None = None) -> JsonDict:
        """``getSession`` with the client's auth: ``{did, handle, active, ...}``."""
        return self._call(
            "GET", "com.atproto.server.getSession", auth=self._need_auth(), timeout=timeout
        )

    # -- com.atproto.repo -------------------------------------------------------

    def put_record(
        self,
        repo: str,
        collection: str,
        rkey: str,
        record: JsonDict,
        *,
        swap_record: str | Literal[_Unset.UNSET] | None = UNSET,
        timeout: float | None = None,
    ) -> JsonDict:
        """``putRecord``: create or replace the record at ``rkey``.

        Returns ``{uri, cid}``, plus ``commit`` only when something was written
        (an identical record is a no-op). ``swap_record=None`` writes only if
        the rkey is free; a CID writes only over that exact version (else
        :class:`InvalidSwap`). ``validate`` is left unset: the PDS does not know
        this lexicon and stores it as ``validationStatus: "unknown"``.
        """
        body: JsonDict = {"repo": repo, "collection": collection, "rkey": rkey, "record": record}
        if swap_record is not UNSET:
            body["swapRecord"] = swap_record
        return self._call(
            "POST",
            "com.atproto.repo.putRecord",
            body=body,
            auth=self._need_auth(),
            timeout=timeout,
        )

    def apply_writes(
        self, repo: str, writes: list[JsonDict], *, timeout: float | None = None
    ) -> JsonDict:
        """``applyWrites``: up to :data:`MAX_APPLY_WRITES` writes in one atomic commit.

        Build ``#create`` items with :func:`create_write`, ``#delete`` ones with
        :func:`delete_write`. One bad item (a create of an existing rkey, an
        update or delete of a missing one) fails the whole batch with a 500
        (:class:`ServerError`): look at the repo before retrying.
        """
        if not 1 <= len(writes) <= MAX_APPLY_WRITES:
            raise ValueError(f"applyWrites takes 1 to {MAX_APPLY_WRITES} writes; got {len(writes)}")
        return self._call(
            "POST",
            "com.atproto.repo.applyWrites",
            body={"repo": repo, "writes": writes},
            auth=self._need_auth(),
            timeout=timeout,
        )

    def delete_record(
        self, repo: str, collection: str, rkey: str, *, timeout: float | None = None
    ) -> JsonDict:
        """``deleteRecord``: ``{commit?}``; a no-op (no ``commit``) when the rkey is free."""
        body = {"repo": repo, "collection": collection, "rkey": rkey}
        return self._call(
            "POST",
            "com.atproto.repo.deleteRecord",
            body=body,
            auth=self._need_auth(),
            timeout=timeout,
        )

    def get_record(
        self, repo: str, collection: str, rkey: str, *, timeout: float | None = None
    ) -> JsonDict:
        """``getRecord`` (public): ``{uri, cid, value}``; :class:`RecordNotFound` if absent."""
        params = {"repo": repo, "collection": collection, "rkey": rkey}
        return self._call("GET", "com.atproto.repo.getRecord", params=params, timeout=timeout)

    def list_records(
        self,
        repo: str,
        collection: str,
        limit: int = 100,
        cursor: str | None = None,
        reverse: bool = False,
        *,
        timeout: float | None = None,
    ) -> JsonDict:
        """``listRecords`` (public): ``{records: [{uri, cid, value}], cursor?}``.

        Newest rkey first unless ``reverse``; pass the answer's ``cursor`` back
        for the next page. Stop at a page without records or without a cursor:
        the reference PDS returns a cursor even with the last page.
        """
        params: dict[str, str | int] = {"repo": repo, "collection": collection, "limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        if reverse:
            params["reverse"] = "true"
        return self._call("GET", "com.atproto.repo.listRecords", params=params, timeout=timeout)

    def health(self, *, timeout: float | None = None) -> JsonDict:
        """``GET /xrpc/_health``: ``{version}`` when the PDS is up."""
        return self._call("GET", "_health", timeout=timeout)

    # -- plumbing -----------------------------------------------------------------

    def _need_auth(self) -> httpx.Auth:
        if self._auth is None:
            raise InvalidToken("this client has no credentials", error="AuthMissing")
        return self._auth

    def _call(
        self,
        method: str,
        nsid: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: JsonDict | None = None,
        auth: httpx.Auth | None = None,
        timeout: float | None = None,
    ) -> JsonDict:
        content = None if body is None else encode_json(body, nsid)
        headers = {} if content is None else {"Content-Type": "application/json"}
        began = self._timing.start() if self._timing is not None else 0.0
        try:
            response = self._client.request(
                method,
                f"/xrpc/{nsid}",
                params=params,
                content=content,
                headers=headers,
                auth=auth,
                timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
            )
        except httpx.TransportError as failure:
            return self._transport_failed(nsid, failure, began)
        if not response.is_success:
            error = error_from_response(response, nsid)
            logger.debug("%s %s -> %s", method, nsid, error)
            raise error
        logger.debug("%s %s -> %d", method, nsid, response.status_code)
        return _json_object(response, nsid)

    def _transport_failed(self, nsid: str, failure: httpx.TransportError, began: float) -> NoReturn:
        # Also after an answer whose body then failed to arrive: the call as a
        # whole got no usable answer, and the hooks never report that.
        if self._timing is not None:
            self._timing.no_answer(began)
        kind = type(failure).__name__
        logger.debug("%s failed: %s: %s", nsid, kind, failure)
        raise NetworkError(f"{kind}: {failure}" if str(failure) else kind, nsid=nsid) from failure

    def _observe(self, response: httpx.Response) -> None:
        """Response hook: every answer, an auth flow's resend too, updates the
        rate limit and the server's clock."""
        rate_limit = parse_rate_limit(response.headers)
        if rate_limit is not None:
            self.last_rate_limit = rate_limit
        server_date = _server_time(response.headers)
        if server_date is not None:
            self.server_date = server_date
            self.clock_skew = server_date - time.time()


def _json_object(response: httpx.Response, nsid: str) -> JsonDict:
    """The JSON object of a 2xx answer; ``{}`` for an empty body."""
    if not response.content:
        return {}
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        # A 2xx we cannot read (a captive portal, a broken proxy): we cannot tell
        # whether the write happened, so it is as ambiguous as a 5xx.
        raise ServerError(
            "2xx answer without a JSON object",
            status=response.status_code,
            headers=response.headers,
            nsid=nsid,
        )
    return body


class _Bearer(httpx.Auth):
    """A fixed bearer token (the refresh JWT for refreshSession/deleteSession)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request

    def __repr__(self) -> str:
        return "_Bearer(<redacted>)"


def encode_json(body: JsonDict, nsid: str | None = None) -> bytes:
    """``body`` as the client sends it: :func:`~anisota_agent.records.to_json`,
    the record encoding (compact, ASCII with other characters escaped).

    ``len(encode_json(batch))`` is what counts against the PDS's request size
    limit (1,000,000 bytes on the reference PDS). A list in the body (a batch's
    writes) is encoded an item at a time, to the same text: one ``json.dumps``
    of 200 records (~150 KB) holds the GIL for ~2.6 ms in C, where no thread
    switch can happen, and a game thread asking for the GIL waited that on top
    of the switch interval.

    Raises:
        InvalidRequest: for NaN/infinity or a value JSON cannot carry.
    """
    try:
        members = [f"{to_json(key)}:{_encoded(value)}" for key, value in body.items()]
    except (TypeError, ValueError) as failure:
        raise InvalidRequest(f"cannot encode the request as JSON: {failure}", nsid=nsid) from None
    return ("{" + ",".join(members) + "}").encode()


def _encoded(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join([to_json(item) for item in value]) + "]"
    return to_json(value)
