"""The player's session records on their PDS: export them, or delete them all.

Records on a PDS are public. These functions let a game's settings screen (and
``anisota-agent export --remote`` / ``purge --remote``) show the player what
the PDS holds and delete it:

* :func:`remote_sessions` pages ``listRecords`` and yields every
  ``net.anisota.beta.game.session`` record of the account, oldest first.
* :func:`delete_remote_sessions` lists the collection's record keys, then
  deletes them with ``applyWrites`` ``#delete`` batches of up to 200 (1 point
  each), never spending the last ``write_reserve`` points of the write budget,
  and marks the local copies ``deleted`` so that they are never uploaded.

Only this collection's records are ever deleted, and only those the PDS listed
for this account. The deletion is idempotent: after a kill, a network fault or
the budget, running it again lists what is left and deletes it.

Both block on the network (and the local store): call them from a background
thread, never from a frame. httpx and the store are imported at the call.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from .checks import check_did, check_int, check_path, check_pds_url
from .lexicon import SESSION_NSID
from .settings import DEFAULT_WRITE_RESERVE

if TYPE_CHECKING:
    from pathlib import Path

    import httpx

    from .auth import Credentials
    from .store import Store
    from .xrpc import RateLimit, XrpcClient, XrpcError

__all__ = [
    "DELETE_POINTS",
    "DeleteReport",
    "RemoteAccount",
    "RemoteError",
    "delete_remote_sessions",
    "remote_sessions",
]

logger = logging.getLogger("anisota_agent")

#: What a ``#delete`` (or a ``deleteRecord``) costs of the write budget.
DELETE_POINTS = 1
#: Records asked for per ``listRecords`` page (the PDS's maximum).
LIST_PAGE = 100
#: Seconds allowed per phase of each request.
REQUEST_TIMEOUT = 15.0
#: Listings (each followed by the deletes of what it found) before a deletion
#: gives up on records that keep appearing: a game still uploading.
MAX_ROUNDS = 3

#: ``confirm(account, records)``: True to go on with deleting ``records`` records.
Confirm = Callable[["RemoteAccount", int], bool]
#: ``progress(deleted, total)``, after each delete request.
Progress = Callable[[int, int], None]


# NamedTuples, not dataclasses, and pathlib imported at the call: either import
# would add 5-8 ms to every ``import anisota_agent``, on the way to a game's frame.


class RemoteAccount(NamedTuple):
    """The account whose records these functions read or delete, and its PDS."""

    did: str
    pds_url: str
    handle: str | None = None

    def describe(self) -> str:
        """``handle (did)``, or the DID alone when the handle is unknown."""
        return f"{self.handle} ({self.did})" if self.handle else self.did


class DeleteReport(NamedTuple):
    """What :func:`delete_remote_sessions` did (so far, in :attr:`RemoteError.report`).

    ``found``: the session records the PDS listed (in every round: a listing
    after the deletes finds what was uploaded meanwhile); ``deleted``: those deleted
    since; ``requests``: XRPC requests made (lists included); ``batches``: of them
    ``applyWrites`` requests; ``points_spent``: of the write budget;
    ``local_marked``: local sessions marked ``deleted``; ``budget``: the write
    budget the last write's answer reported, or one saved earlier in its window
    (None: none known);
    ``confirmed``: False when ``confirm`` declined (nothing was deleted).
    """

    account: RemoteAccount
    found: int = 0
    deleted: int = 0
    requests: int = 0
    batches: int = 0
    points_spent: int = 0
    local_marked: int = 0
    budget: RateLimit | None = None
    confirmed: bool = True


class RemoteError(Exception):
    """Reading or deleting the records on the PDS could not finish.

    The message says why in words a player can read. ``retry_at`` (Unix
    seconds) is when running again can succeed, for a budget or a rate limit;
    None when it depends on something else (the network: at once; the login:
    log in again). ``report``: what a deletion did before it stopped.
    """

    def __init__(
        self, message: str, *, retry_at: float | None = None, report: DeleteReport | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_at = retry_at
        self.report = report


# -- export -------------------------------------------------------------------------


def remote_sessions(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    did: str | None = None,
    pds_url: str | None = None,
    keyring: bool | None = None,
    transport: httpx.BaseTransport | None = None,
) -> Iterator[dict[str, Any]]:
    """Every session record of the account on its PDS, oldest first.

    Each item is ``{"uri", "cid", "value"}`` as ``listRecords`` gives it (the
    lines ``anisota-agent export --remote`` writes). The account is ``did`` at
    ``pds_url`` (both, or neither), else the login saved in ``data_dir`` (the
    agent's; default: the platform's user data dir, or ``ANISOTA_AGENT_DATA_DIR``;
    ``keyring`` as in :class:`~anisota_agent.Agent`). ``listRecords`` is public:
    no credentials are sent.

    Blocks on the network for each page (100 records): iterate it on a worker
    thread, not the game's.

    Raises:
        RemoteError: no saved login, or the PDS could not be read (the items
            yielded before stay valid).
    """
    account = _account(data_dir, did, pds_url, keyring)
    from .xrpc import XrpcClient

    with XrpcClient(account.pds_url, transport=transport, timeout=REQUEST_TIMEOUT) as client:
        for page in _pages(client, account, reverse=True):
            yield from page


def _account(
    data_dir: str | os.PathLike[str] | None,
    did: str | None,
    pds_url: str | None,
    keyring: bool | None,
) -> RemoteAccount:
    """``did`` at ``pds_url``, or the account of the saved login."""
    if (did is None) != (pds_url is None):
        raise ValueError("did and pds_url go together (or neither: the saved login)")
    if did is not None and pds_url is not None:
        return RemoteAccount(check_did("did", did), check_pds_url(pds_url))
    credentials = _saved_login(_directory(data_dir), keyring, None)
    try:
        return RemoteAccount(credentials.did, credentials.pds_url, _handle(credentials))
    finally:
        credentials.close()


# -- delete -------------------------------------------------------------------------


def delete_remote_sessions(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    auth: httpx.Auth | None = None,
    did: str | None = None,
    pds_url: str | None = None,
    handle: str | None = None,
    write_reserve: int = DEFAULT_WRITE_RESERVE,
    confirm: Confirm | None = None,
    progress: Progress | None = None,
    keyring: bool | None = None,
    transport: httpx.BaseTransport | None = None,
) -> DeleteReport:
    """Delete every session record of the account on its PDS; never upload them again.

    The account is the login saved in ``data_dir`` (as for the agent and the
    CLI), or the host's own ``auth`` (any :class:`httpx.Auth`, as for
    ``Agent.use_auth``) for ``did`` at ``pds_url``. ``data_dir`` is the agent's
    (default: the platform's user data dir): there the account's pending and
    synced sessions are marked ``deleted`` before the first delete, so that no
    agent uploads them again (a session being recorded right now still is,
    when it ends: run it again then).

    ``confirm(account, records)``, if given, is asked once the records are
    counted; False deletes nothing (``report.confirmed`` False).
    ``progress(deleted, total)`` is called after each request. No write spends
    the last ``write_reserve`` points of the write budget the PDS reports (the
    agent's default reserve: 1,000 points); until this run or an earlier one
    saw the budget, the first record goes alone (``deleteRecord``) to learn it.
    A last listing checks that nothing is left: records an agent uploaded
    meanwhile are deleted too (at most :data:`MAX_ROUNDS` listings).

    Blocks until done (about 2.4 s for 1,000 records on a loopback PDS): call it
    from a worker thread or a settings screen's own task, never from a frame.

    Raises:
        RemoteError: not logged in, the budget's reserve or a rate limit reached
            (``retry_at``), a network fault or a refusal. Whatever was deleted
            stays deleted: run it again to finish.
        ValueError, TypeError: a bad argument.
    """
    reserve = check_int("write_reserve", write_reserve, 0, 1_000_000)
    directory = _directory(data_dir)
    if auth is not None:
        credentials = _host_auth(auth, did, pds_url, handle, transport)
    elif did is not None or pds_url is not None:
        raise ValueError("did and pds_url go with auth (without it: the saved login)")
    else:
        credentials = _saved_login(directory, keyring, transport)
    account = RemoteAccount(credentials.did, credentials.pds_url, handle or _handle(credentials))
    store = _open_store(directory)
    try:
        with credentials.client(timeout=REQUEST_TIMEOUT) as client:
            deletion = _Deletion(client, account, store, reserve, progress)
            return deletion.run(confirm)
    finally:
        if store is not None:
            store.close()
        credentials.close()


class _Deletion:
    """One run of :func:`delete_remote_sessions`: list, confirm, mark, delete in batches."""

    def __init__(
        self,
        client: XrpcClient,
        account: RemoteAccount,
        store: Store | None,
        reserve: int,
        progress: Progress | None,
    ) -> None:
        from .sync import recalled_budget

        self.client = client
        self.account = account
        self.store = store
        self.reserve = reserve
        self.progress = progress
        self.found = self.deleted = self.requests = self.batches = 0
        self.points_spent = self.local_marked = 0
        meta = store.meta() if store is not None else {}
        self.budget = recalled_budget(meta, account.did, time.time())
        #: Whether a write has told the budget (this run, or one saved in this window).
        self.known = self.budget is not None

    def report(self, confirmed: bool = True) -> DeleteReport:
        """What this run did so far."""
        return DeleteReport(
            self.account,
            self.found,
            self.deleted,
            self.requests,
            self.batches,
            self.points_spent,
            self.local_marked,
            self.budget,
            confirmed,
        )

    def run(self, confirm: Confirm | None) -> DeleteReport:
        """List, ask, then delete round after round until a listing comes back empty."""
        rkeys = self._list()
        self.found = len(rkeys)
        if confirm is not None and not confirm(self.account, len(rkeys)):
            return self.report(confirmed=False)
        for _ in range(MAX_ROUNDS):
            if self.store is not None:
                # First: from now on no agent sharing the store uploads them
                # (again: a sync that was on the wire may have marked some synced).
                self.local_marked += self.store.mark_deleted(self.account.did)
            self._report_progress()
            while rkeys:
                size = self._batch_size(len(rkeys))
                self._delete(rkeys[:size])
                rkeys = rkeys[size:]
                self._report_progress()
            # What an agent uploaded meanwhile; one empty page when nothing.
            rkeys = self._list()
            if not rkeys:
                return self.report()
            self.found += len(rkeys)
        raise RemoteError(
            f"session records keep appearing on the PDS (a game still uploading?):"
            f" {self._so_far()}; close the game and run again",
            report=self.report(),
        )

    def _list(self) -> list[str]:
        rkeys: list[str] = []
        try:
            for page in _pages(self.client, self.account, on_request=self._count_request):
                rkeys.extend(_rkey(item["uri"]) for item in page)
        except RemoteError as failure:
            failure.report = self.report()
            raise
        return rkeys

    def _count_request(self) -> None:
        self.requests += 1

    def _batch_size(self, left: int) -> int:
        """As many deletes as the budget above the reserve allows, up to 200."""
        from .sync import spare_points
        from .xrpc import MAX_APPLY_WRITES

        if not self.known:
            return 1  # one point to learn the budget, rather than a blind batch
        spare = spare_points(self.budget, self.reserve, time.time())
        if spare is None:
            return min(MAX_APPLY_WRITES, left)
        if spare < DELETE_POINTS:
            raise self._reserve_reached()
        return min(MAX_APPLY_WRITES, left, spare // DELETE_POINTS)

    def _delete(self, rkeys: list[str]) -> None:
        from .xrpc import XrpcError, delete_write

        points = DELETE_POINTS * len(rkeys)
        # Saved as if it had landed before it leaves: a run killed now leaves
        # the next one a budget that is low rather than high.
        self._save_budget(points)
        self.client.last_rate_limit = None  # only this write's answer tells the budget
        self.requests += 1
        did = self.account.did
        try:
            if len(rkeys) == 1:  # a no-op when the record is gone meanwhile
                self.client.delete_record(did, SESSION_NSID, rkeys[0], timeout=REQUEST_TIMEOUT)
            else:
                self.batches += 1
                writes = [delete_write(SESSION_NSID, rkey) for rkey in rkeys]
                self.client.apply_writes(did, writes, timeout=REQUEST_TIMEOUT)
        except XrpcError as failure:
            raise self._failed(failure) from failure
        self.known = True
        self.budget = self.client.last_rate_limit
        self.deleted += len(rkeys)
        self.points_spent += points
        self._save_budget(0)

    def _save_budget(self, in_flight: int) -> None:
        """Keep the budget (less ``in_flight`` points) for the next run and the agent's sync."""
        from dataclasses import asdict, replace

        from .sync import budget_key

        if self.store is None or self.budget is None:
            return
        saved = replace(self.budget, remaining=self.budget.remaining - in_flight)
        try:
            self.store.set_meta({budget_key(self.account.did): asdict(saved)})
        except Exception as failure:  # a lost note of the budget must not stop the deletion
            logger.error("cannot save the write budget: %s", failure)

    def _report_progress(self) -> None:
        if self.progress is not None:
            self.progress(self.deleted, self.found)

    def _so_far(self) -> str:
        return f"{self.deleted} of {self.found} session records deleted"

    def _reserve_reached(self) -> RemoteError:
        budget = self.budget
        assert budget is not None
        return RemoteError(
            f"the write budget's reserve is reached ({budget.remaining} of {budget.limit}"
            f" points left, {self.reserve} kept for the game): {self._so_far()};"
            f" run again after {_clock(budget.reset_at)}",
            retry_at=budget.reset_at,
            report=self.report(),
        )

    def _failed(self, failure: XrpcError) -> RemoteError:
        from .xrpc import ExpiredToken, InvalidToken, RateLimited

        retry_at = failure.retry_at if isinstance(failure, RateLimited) else None
        if retry_at is not None:
            then = f"run again after {_clock(retry_at)}"
        elif isinstance(failure, (ExpiredToken, InvalidToken)):
            then = "log in again, then run again"
        else:
            then = "run again to finish"
        return RemoteError(
            f"{_describe(failure)}: {self._so_far()}; {then}",
            retry_at=retry_at,
            report=self.report(),
        )


# -- listing ------------------------------------------------------------------------


def _pages(
    client: XrpcClient,
    account: RemoteAccount,
    *,
    reverse: bool = False,
    on_request: Callable[[], None] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """The collection's records, a ``listRecords`` page at a time, each checked.

    Stops at an empty page or one without a new cursor (the reference PDS gives
    a cursor with its last page too).
    """
    from .xrpc import RateLimited, XrpcError

    cursor: str | None = None
    while True:
        if on_request is not None:
            on_request()
        try:
            page = client.list_records(
                account.did, SESSION_NSID, LIST_PAGE, cursor, reverse, timeout=REQUEST_TIMEOUT
            )
        except XrpcError as failure:
            retry_at = failure.retry_at if isinstance(failure, RateLimited) else None
            raise RemoteError(
                f"cannot list the records: {_describe(failure)}", retry_at=retry_at
            ) from failure
        records = page.get("records") or []
        if not records:
            return
        yield [_checked(item, account.did) for item in records]
        next_cursor = page.get("cursor")
        if not isinstance(next_cursor, str) or not next_cursor or next_cursor == cursor:
            return
        cursor = next_cursor


def _checked(item: Any, did: str) -> dict[str, Any]:
    """``{uri, cid, value}`` of a listed record, which must be this account's session record.

    What is deleted comes from these uris: a record of another repo or
    collection (a broken or hostile PDS) stops everything instead.
    """
    uri = item.get("uri") if isinstance(item, dict) else None
    parts = uri.split("/") if isinstance(uri, str) else []
    # at://<did>/<collection>/<rkey> splits as ["at:", "", did, collection, rkey]
    if parts[:4] != ["at:", "", did, SESSION_NSID] or len(parts) != 5 or not parts[4]:
        raise RemoteError(f"the PDS listed a record that is not {did}'s session: {uri!r:.120}")
    return {"uri": uri, "cid": item.get("cid"), "value": item.get("value")}


def _rkey(uri: str) -> str:
    return uri.rsplit("/", 1)[1]


# -- credentials and the store ---------------------------------------------------


def _directory(data_dir: str | os.PathLike[str] | None) -> Path:
    from pathlib import Path

    from .store import default_data_dir

    return default_data_dir() if data_dir is None else Path(check_path("data_dir", data_dir))


def _saved_login(
    directory: Path, keyring: bool | None, transport: httpx.BaseTransport | None
) -> Credentials:
    from .auth import AppPasswordSession
    from .tokens import token_store_for

    tokens = token_store_for(directory, keyring)
    try:
        credentials = AppPasswordSession.from_store(tokens, transport=transport)
    except OSError as error:
        raise RemoteError(f"cannot read the saved login in {tokens.describe()}: {error}") from error
    if credentials is None:
        raise RemoteError(f"not logged in (no saved login in {tokens.describe()})")
    return credentials


def _host_auth(
    auth: httpx.Auth,
    did: str | None,
    pds_url: str | None,
    handle: str | None,
    transport: httpx.BaseTransport | None,
) -> Credentials:
    from .auth import HostAuth

    if did is None or pds_url is None:
        raise ValueError("auth needs the account's did and pds_url")
    return HostAuth(auth, did, pds_url, handle=handle, transport=transport)


def _handle(credentials: Credentials) -> str | None:
    handle = getattr(credentials, "handle", None)
    return handle if isinstance(handle, str) else None


def _open_store(directory: Path) -> Store | None:
    """The data dir's store, or None where nothing was recorded (none is created)."""
    import sqlite3

    from .store import DB_FILENAME, Store

    path = directory / DB_FILENAME
    if not path.exists():
        return None
    try:
        return Store.open(path)
    except (sqlite3.Error, OSError) as error:
        raise RemoteError(f"cannot open the store at {path}: {error}") from error


# -- words for the player ---------------------------------------------------------


def _describe(failure: XrpcError) -> str:
    """What a failed request means, without Python class names."""
    from .xrpc import (
        AccountUnavailable,
        ExpiredToken,
        Forbidden,
        InvalidToken,
        NetworkError,
        RateLimited,
    )

    if isinstance(failure, NetworkError):
        cause = failure.__cause__
        text = re.sub(r"^\[Errno -?\d+\] ", "", str(cause)) if cause else ""
        return f"no answer from the PDS ({text or 'network error'})"
    if isinstance(failure, RateLimited):
        return "the PDS's rate limit is reached"
    if isinstance(failure, (ExpiredToken, InvalidToken)):
        return f"the PDS refused the login ({failure})"
    if isinstance(failure, (AccountUnavailable, Forbidden)):
        return f"the PDS refused this account ({failure})"
    return f"the PDS failed ({failure})"


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
