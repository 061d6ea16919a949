"""Credentials for writing to the player's PDS, and where the session is kept.

Two kinds of :class:`Credentials`:

- :class:`AppPasswordSession`: the agent logs in with an app password
  (``createSession``), keeps the short-lived access JWT in memory only, and
  persists the refresh JWT (never the password) in a :class:`TokenStore`. Its
  :meth:`~AppPasswordSession.httpx_auth` refreshes once on ``ExpiredToken``.
- :class:`HostAuth`: the host game already holds a session (typically atproto
  OAuth with DPoP) and hands the agent an :class:`httpx.Auth` that signs
  requests; the host owns refreshing it.

Everything here runs on the agent's uplink thread (or in the CLI): it blocks on
the network and the disk. No password or token is ever logged or put in an
exception message or ``repr``.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Generator
from typing import Any, ClassVar

import httpx

from .checks import check_pds_url
from .tokens import TokenStore
from .xrpc import (
    ExpiredToken,
    InvalidToken,
    OnResponse,
    ServerError,
    XrpcClient,
    XrpcError,
)

__all__ = [
    "DEFAULT_AUTH_TIMEOUT",
    "STORE_FORMAT",
    "AppPasswordSession",
    "Credentials",
    "HostAuth",
]

logger = logging.getLogger("anisota_agent")

#: Version of the stored session format.
STORE_FORMAT = 1

#: Seconds allowed per phase of a login, refresh or logout request.
DEFAULT_AUTH_TIMEOUT = 10.0


# -- credentials ------------------------------------------------------------------


class Credentials(abc.ABC):
    """What the sync needs to write to one account's repo.

    Attributes:
        did: the account's DID (the ``repo`` of every write).
        pds_url: the PDS to write to.
        kind: ``"app_password"`` or ``"host"``.

    Every request made for these credentials goes through the ``transport``
    they were created with (None: httpx's own), unless :meth:`client` is given
    another.
    """

    kind: ClassVar[str]
    did: str
    pds_url: str
    _transport: httpx.BaseTransport | None = None

    @abc.abstractmethod
    def httpx_auth(self) -> httpx.Auth:
        """The :class:`httpx.Auth` that adds the access token to each request."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A one-line summary without secrets: kind, handle, DID, PDS."""

    def client(
        self,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 10.0,
        on_response: OnResponse | None = None,
    ) -> XrpcClient:
        """An :class:`XrpcClient` for :attr:`pds_url` authenticated by these credentials.

        ``transport`` None: the one the credentials were created with.
        """
        return XrpcClient(
            self.pds_url,
            auth=self.httpx_auth(),
            transport=transport if transport is not None else self._transport,
            timeout=timeout,
            on_response=on_response,
        )

    def close(self) -> None:  # noqa: B027 - optional hook, most credentials hold nothing
        """Release any connection the credentials hold."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class AppPasswordSession(Credentials):
    """An app-password (``createSession``) session.

    Use :meth:`login` the first time and :meth:`from_store` afterwards. The
    access JWT lives in memory only; the refresh JWT, DID, handle and PDS URL are
    saved in the token store after login and after every refresh (refresh
    tokens rotate). A session whose refresh token the server revoked stays
    dead: every later call fails at once with the same error, without touching
    the network, until the player logs in again.

    Args:
        pds_url: the PDS (https, or http to a loopback host).
        did, handle: the account.
        refresh_jwt: the refresh token.
        token_store: where to persist rotated refresh tokens (None: nowhere).
        access_jwt: a current access token, if known (else the first request
            refreshes).
        transport: every request of the session goes through it: login,
            refresh, logout, and (by default) the clients of :meth:`client`.
        timeout, on_response: for the session's own login, refresh and logout
            requests, as in :class:`XrpcClient`.
    """

    kind = "app_password"

    def __init__(
        self,
        pds_url: str,
        did: str,
        handle: str,
        refresh_jwt: str,
        *,
        token_store: TokenStore | None = None,
        access_jwt: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = DEFAULT_AUTH_TIMEOUT,
        on_response: OnResponse | None = None,
    ) -> None:
        self.pds_url = check_pds_url(pds_url)
        self.did = did
        self.handle = handle
        self._refresh_jwt = refresh_jwt
        self._access_jwt = access_jwt
        self._store = token_store
        self._transport = transport
        self._timeout = timeout
        self._on_response = on_response
        self._lock = threading.Lock()
        self._dead: XrpcError | None = None
        self._http: XrpcClient | None = None
        self._auth = _SessionAuth(self)

    # -- construction -------------------------------------------------------------

    @classmethod
    def login(
        cls,
        pds_url: str,
        identifier: str,
        password: str,
        token_store: TokenStore | None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = DEFAULT_AUTH_TIMEOUT,
        on_response: OnResponse | None = None,
    ) -> AppPasswordSession:
        """Log in with a handle (or email) and an app password; save the session.

        The password is sent once and never kept or stored.

        Raises:
            ValueError: ``pds_url`` is not https (nor http to loopback).
            InvalidToken: wrong identifier or password (401 ``AuthenticationRequired``).
            AccountUnavailable: the account is taken down.
            RateLimited, NetworkError, ServerError: try again later.
            OSError: the token store cannot be written.
        """
        url = check_pds_url(pds_url)
        with XrpcClient(url, transport=transport, timeout=timeout, on_response=on_response) as http:
            answer = http.create_session(identifier, password)
        did, handle, access_jwt, refresh_jwt = _session_fields(answer)
        session = cls(
            url,
            did,
            handle,
            refresh_jwt,
            token_store=token_store,
            access_jwt=access_jwt,
            transport=transport,
            timeout=timeout,
            on_response=on_response,
        )
        if token_store is not None:
            try:
                token_store.save(session._stored_form())
            except OSError:
                # Nobody could resume or log out this session: revoke it now.
                session._revoke(session._forget())
                session.close()
                raise
        logger.info("logged in as %s (%s) at %s", handle, did, url)
        return session

    @classmethod
    def from_store(
        cls,
        token_store: TokenStore,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = DEFAULT_AUTH_TIMEOUT,
        on_response: OnResponse | None = None,
    ) -> AppPasswordSession | None:
        """The saved session, or None if there is none (or it is unusable, logged).

        No request is made here: the first authenticated request refreshes.
        """
        data = token_store.load()
        if data is None:
            return None
        fields = _stored_fields(data)
        if fields is None:
            logger.warning(
                "ignoring the saved session in %s: unknown format", token_store.describe()
            )
            return None
        pds_url, did, handle, refresh_jwt = fields
        try:
            return cls(
                pds_url,
                did,
                handle,
                refresh_jwt,
                token_store=token_store,
                transport=transport,
                timeout=timeout,
                on_response=on_response,
            )
        except ValueError as error:
            logger.warning("ignoring the saved session: %s", error)
            return None

    # -- Credentials ---------------------------------------------------------------

    def httpx_auth(self) -> httpx.Auth:
        """Adds ``Authorization: Bearer <access JWT>``; on 400 ``ExpiredToken`` it
        refreshes once (single flight) and resends the request once."""
        return self._auth

    def describe(self) -> str:
        """``app_password <handle> (<did>) at <pds_url>``, plus ``[revoked]`` if dead."""
        state = " [revoked: log in again]" if self._dead is not None else ""
        return f"app_password {self.handle} ({self.did}) at {self.pds_url}{state}"

    @property
    def revoked(self) -> bool:
        """True once the server refused the refresh token (or after :meth:`logout`)."""
        return self._dead is not None

    def logout(self) -> None:
        """Revoke the session on the server (best effort) and forget it locally.

        The stored token is deleted even when the server cannot be reached.
        """
        try:
            self._revoke(self._forget())
        finally:
            if self._store is not None:
                self._store.clear()
            self.close()
        logger.info("logged out %s (%s)", self.handle, self.did)

    def _forget(self) -> str:
        """Drop the tokens from memory; returns the refresh JWT for revocation."""
        with self._lock:
            refresh_jwt, self._refresh_jwt = self._refresh_jwt, ""
            self._access_jwt = None
            self._dead = InvalidToken("logged out")
        return refresh_jwt

    def _revoke(self, refresh_jwt: str) -> None:
        """``deleteSession``, best effort: the session is forgotten locally anyway."""
        if not refresh_jwt:
            return
        try:
            self._client().delete_session(refresh_jwt)
        except XrpcError as error:
            logger.warning("logout: the PDS did not confirm (%s); forgetting the session", error)

    def close(self) -> None:
        """Close the connection used for refreshes."""
        http, self._http = self._http, None
        if http is not None:
            http.close()

    # -- tokens -------------------------------------------------------------------------

    def _fresh_access(self, failed: str | None) -> str:
        """The access token to send: the current one unless it is ``failed`` (or
        there is none); else refresh, once for all the threads waiting here."""
        with self._lock:
            if self._dead is None and self._access_jwt is not None and self._access_jwt != failed:
                return self._access_jwt
            self._refresh_locked()
            assert self._access_jwt is not None
            return self._access_jwt

    def _refresh_locked(self) -> None:
        if self._dead is not None:
            raise _replay(self._dead)
        try:
            answer = self._client().refresh_session(self._refresh_jwt)
        except (ExpiredToken, InvalidToken) as error:
            # Revoked or expired: retrying cannot help, so fail fast from now on.
            self._access_jwt = None
            self._dead = error
            logger.warning("the PDS ended the session of %s (%s): log in again", self.did, error)
            raise
        did, handle, access_jwt, refresh_jwt = _session_fields(answer)
        if did != self.did:
            raise InvalidToken(f"refreshSession answered for another account ({did})")
        self.handle, self._access_jwt, self._refresh_jwt = handle, access_jwt, refresh_jwt
        logger.debug("refreshed the session of %s", did)
        self._persist()

    def _persist(self) -> None:
        if self._store is None:
            return
        try:
            self._store.save(self._stored_form())
        except OSError as error:
            # The session still works in memory; the next process may need a login.
            logger.error(
                "cannot save the refreshed session to %s: %s", self._store.describe(), error
            )

    def _stored_form(self) -> dict[str, Any]:
        return {
            "version": STORE_FORMAT,
            "kind": self.kind,
            "pds_url": self.pds_url,
            "did": self.did,
            "handle": self.handle,
            "refresh_jwt": self._refresh_jwt,
        }

    def _client(self) -> XrpcClient:
        if self._http is None:
            self._http = XrpcClient(
                self.pds_url,
                transport=self._transport,
                timeout=self._timeout,
                on_response=self._on_response,
            )
        return self._http


class _SessionAuth(httpx.Auth):
    """Bearer auth for an :class:`AppPasswordSession`, with one refresh on expiry.

    For synchronous clients: a refresh blocks the calling thread.
    """

    requires_response_body = True  # the error name is in the body

    def __init__(self, session: AppPasswordSession) -> None:
        self._session = session

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._session._fresh_access(failed=None)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if not _is_expired_token(response):
            return
        # Exactly one refresh and one resend: a second ExpiredToken goes back to
        # the caller as an error, so a skewed clock cannot cause a loop.
        token = self._session._fresh_access(failed=token)
        request.headers["Authorization"] = f"Bearer {token}"
        yield request


def _is_expired_token(response: httpx.Response) -> bool:
    if response.status_code not in (400, 401):
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("error") == "ExpiredToken"


def _replay(error: XrpcError) -> XrpcError:
    """A fresh copy of a stored error (re-raising one instance grows its traceback)."""
    return type(error)(
        error.message,
        status=error.status,
        error=error.error,
        headers=error.headers,
        nsid=error.nsid,
    )


def _session_fields(answer: dict[str, Any]) -> tuple[str, str, str, str]:
    """``(did, handle, accessJwt, refreshJwt)`` of a createSession/refreshSession answer."""
    fields = tuple(answer.get(key) for key in ("did", "handle", "accessJwt", "refreshJwt"))
    if not all(isinstance(value, str) and value for value in fields):
        raise ServerError("the PDS answered a session without did, handle or tokens")
    did, handle, access_jwt, refresh_jwt = (str(value) for value in fields)
    return did, handle, access_jwt, refresh_jwt


def _stored_fields(data: dict[str, Any]) -> tuple[str, str, str, str] | None:
    """``(pds_url, did, handle, refresh_jwt)`` of a saved session, or None."""
    if data.get("version") != STORE_FORMAT or data.get("kind") != AppPasswordSession.kind:
        return None
    fields = tuple(data.get(key) for key in ("pds_url", "did", "handle", "refresh_jwt"))
    if not all(isinstance(value, str) and value for value in fields):
        return None
    pds_url, did, handle, refresh_jwt = (str(value) for value in fields)
    return pds_url, did, handle, refresh_jwt


class HostAuth(Credentials):
    """Credentials the host game owns, such as its atproto OAuth + DPoP session.

    The agent sends its requests through ``auth`` and never sees a token. The
    host's auth flow is responsible for attaching the token, answering DPoP
    nonce challenges and refreshing as it needs.

    The agent cannot renew credentials it does not own: when the PDS refuses
    them, the sync stops and reports (``status().auth_problem``) instead of
    retrying, until the host hands the agent new ones (``use_auth``).

    Args:
        auth: signs each request (it may send extra requests, e.g. for a nonce).
        did: the account whose repo the agent writes.
        pds_url: that account's PDS.
        handle: for display only.
        transport: what :meth:`client` sends through (None: httpx's own).
    """

    kind = "host"

    def __init__(
        self,
        auth: httpx.Auth,
        did: str,
        pds_url: str,
        *,
        handle: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not isinstance(auth, httpx.Auth):
            raise TypeError(f"auth must be an httpx.Auth, not {type(auth).__name__}")
        if not isinstance(did, str) or not did.startswith("did:"):
            raise ValueError(f"did must be a DID (did:plc:..., did:web:...); got {did!r}")
        self._auth = auth
        self.did = did
        self.pds_url = check_pds_url(pds_url)
        self.handle = handle
        self._transport = transport

    def httpx_auth(self) -> httpx.Auth:
        """The host's auth, unchanged."""
        return self._auth

    def describe(self) -> str:
        """``host <handle> (<did>) at <pds_url>``."""
        name = f"{self.handle} " if self.handle else ""
        return f"host {name}({self.did}) at {self.pds_url}"
