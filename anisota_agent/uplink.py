"""The uplink: the thread that owns the network, and its link to the player's PDS.

It logs in (retrying a login the network kept from the PDS), resumes a saved
login, tends the network monitor (interfaces, probes), mirrors the live session
and syncs what the recorder finalized. It reads due sessions from the shared
store and marks the results there; it never writes a session's record, so
nothing it waits for can delay the recorder.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .checks import is_loopback_host
from .guard import raised_in
from .network import NetworkMonitor, interfaces_up
from .status import BACKGROUND_FACTS, STATUS_META_PREFIX, SYNC_FACTS

if TYPE_CHECKING:
    import httpx

    from .auth import Credentials
    from .clock import Clock
    from .settings import Settings
    from .status import StatusBoard
    from .store import Store, WalCheckpointer
    from .sync import SyncEngine, SyncStatus
    from .tokens import TokenStore
    from .xrpc import OnResponse

# The modules behind the link (httpx among them) are imported on the uplink's
# thread when it first needs them, never on the game's.

__all__ = ["RESUME_TAG", "AuthRequest", "LoginDeferred", "Uplink", "UplinkWorker"]

logger = logging.getLogger("anisota_agent")

#: How often the uplink looks at the network interfaces (psutil), at most.
INTERFACE_POLL_SECONDS = 5.0
#: The uplink checkpoints the store's write-ahead log at least this often.
WAL_CHECKPOINT_SECONDS = 30.0
#: Retries of a login the network kept from the PDS: doubling, with jitter, to the cap.
LOGIN_RETRY_FIRST = 1.0
LOGIN_RETRY_MAX = 60.0
#: The login tag of sessions started before the saved login (if any) is resumed.
RESUME_TAG = "resume"
#: The store's note of the account whose login was saved last (see _adopt_orphans).
SAVED_ACCOUNT_META = "login.saved_did"


class AuthRequest(NamedTuple):
    """An account change the host asked for, carried out on the uplink's thread."""

    kind: str  # "host" (its own httpx.Auth), "password" (app password), "logout"
    did: str | None = None
    pds_url: str | None = None
    auth: Any = None  # the host's httpx.Auth
    identifier: str | None = None
    password: str | None = None
    #: Sessions recorded while this login is under way carry this tag.
    tag: str | None = None

    def __repr__(self) -> str:  # never show the password, even in a traceback
        return f"AuthRequest(kind={self.kind!r}, did={self.did!r}, pds_url={self.pds_url!r})"


class LoginDeferred(Exception):
    """A login that could not reach the PDS, to be tried again (at ``retry_at`` if known)."""

    def __init__(self, message: str, retry_at: float | None) -> None:
        super().__init__(message)
        self.retry_at = retry_at


class AccountSide(Protocol):
    """What the uplink asks of the agent (all cheap, under the agent's lock)."""

    def _take_auth_requests(self) -> list[AuthRequest]: ...

    def _has_auth_requests(self) -> bool: ...

    def _account_found(self, tag: str, did: str | None) -> None: ...

    _owner_token: str

    def _wake(self) -> None: ...

    def _uploads_allowed(self) -> bool: ...


class Uplink:
    """The link to the player's PDS: the account, its client and sync engine.

    Owns at most one account at a time. Every method runs on the uplink's thread
    (or in the CLI) and never raises a server or auth failure: those become
    :attr:`problem`, logged on the ``anisota_agent`` logger. Only a login that
    could not reach the PDS raises (:class:`LoginDeferred`): it is to be retried.
    (Anything else an account change raises is a failure nobody foresaw: the
    worker reports it.)
    """

    def __init__(
        self,
        store: Store,
        token_store: TokenStore,
        *,
        on_response: OnResponse | None = None,
        reserve_points: int = 1000,
        now: Callable[[], float] = time.time,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.store = store
        self.token_store = token_store
        self.credentials: Credentials | None = None
        self.engine: SyncEngine | None = None
        #: Why there is no working account (a failed login, say), if so.
        self.problem: str | None = None
        self._reserve = reserve_points
        self._now = now
        # How every request to the PDS is made: timed for the monitor, through the transport.
        self._http: dict[str, Any] = {"on_response": on_response, "transport": transport}

    @property
    def did(self) -> str | None:
        """The account's DID, if one is connected."""
        return self.credentials.did if self.credentials is not None else None

    def resume(self) -> str | None:
        """Pick up the app-password session saved by an earlier run or ``login``."""
        try:
            if self.token_store.load() is None:
                return None  # nothing saved: no reason to import httpx at all
            from .auth import AppPasswordSession

            credentials = AppPasswordSession.from_store(self.token_store, **self._http)
        except OSError as failure:
            self.problem = f"cannot read the saved session: {failure}"
            logger.error("%s", self.problem)
            return None
        if credentials is not None:
            self._connect(credentials)
        return self.did

    def saved_did(self) -> str | None:
        """The account of the saved login, if any (reads the token store, no request)."""
        try:
            saved = self.token_store.load()
        except OSError:
            return None
        did = saved.get("did") if saved else None
        return did if isinstance(did, str) else None

    def login(self, pds_url: str, identifier: str, password: str) -> str | None:
        """App-password login; the password is used once and not kept.

        Returns the account's DID, or None when the PDS refused the login (a wrong
        password, a taken-down account: :attr:`problem` says which).

        A session that cannot be saved (a read-only or full disk) is kept in
        memory for this run rather than refused.

        Raises:
            LoginDeferred: the PDS could not be asked or could not answer (network,
                5xx, 429): try again later.
        """
        from .auth import AppPasswordSession
        from .tokens import MemoryTokenStore
        from .xrpc import NetworkError, RateLimited, ServerError, XrpcError

        try:
            try:
                credentials = AppPasswordSession.login(
                    pds_url, identifier, password, self.token_store, **self._http
                )
            except OSError as unsaved:  # the login was revoked: log in again, in memory
                logger.error("cannot save the login (%s): it lasts for this run only", unsaved)
                credentials = AppPasswordSession.login(
                    pds_url, identifier, password, MemoryTokenStore(), **self._http
                )
        except (NetworkError, ServerError, RateLimited) as failure:
            self.problem = f"login pending: {type(failure).__name__}: {failure}"
            logger.warning("%s", self.problem)
            retry_at = failure.retry_at if isinstance(failure, RateLimited) else None
            raise LoginDeferred(self.problem, retry_at) from failure
        except XrpcError as failure:
            self.problem = f"login failed: {type(failure).__name__}: {failure}"
            logger.error("%s", self.problem)
            return None
        self._connect(credentials)
        return self.did

    def use_host_auth(self, auth: httpx.Auth, did: str, pds_url: str) -> str:
        """Sync through the host's own ``httpx.Auth`` (its OAuth/DPoP session)."""
        from .auth import HostAuth

        self._connect(HostAuth(auth, did, pds_url))
        return did

    def logout(self) -> None:
        """Revoke and forget an app-password session; drop a host's auth."""
        from .auth import AppPasswordSession

        credentials = self.credentials
        self._disconnect()
        if isinstance(credentials, AppPasswordSession):
            credentials.logout()
        else:
            self.token_store.clear()
        self.problem = None

    def due(self) -> bool:
        """Whether a sync round could write something now."""
        if self.engine is None or not self.engine.due():
            return False
        return bool(self.store.due_for_sync(self.engine.did, self._now(), limit=1))

    def recheck_account(self) -> bool:
        """Ask whether an account that stopped the sync is back, when that is due
        (see :meth:`SyncEngine.recheck_account`); True if syncing resumes."""
        return self.engine is not None and self.engine.recheck_account()

    def seconds_until_retry(self) -> float | None:
        """Seconds until a backed-off or budget-limited sync may run again, or
        until a stopped account is asked again whether it is back."""
        engine = self.engine
        if engine is None:
            return None
        status = engine.status
        # Stopped: only an account's own stop is ever asked about again.
        next_at = engine.recheck_at if status.auth_problem is not None else status.next_sync_at
        now = self._now()
        # A time already past is nothing to wait for: nothing may be due at all
        # (the queue pruned, say), and waiting 0 s would spin.
        return None if next_at is None or next_at <= now else next_at - now

    def sync(
        self, deadline: float | None = None, interrupted: Callable[[], bool] | None = None
    ) -> SyncStatus | None:
        """One sync pass (see :meth:`SyncEngine.sync`); None without an account."""
        if self.engine is None:
            return None
        return self.engine.sync(deadline, interrupted=interrupted)

    def mirror(self, rkey: str, record: dict[str, Any]) -> bool:
        """Put the live session's current record on the PDS (see :meth:`SyncEngine.mirror`)."""
        return self.engine is not None and self.engine.mirror(rkey, record)

    def close(self) -> None:
        """Close the connections (the account stays saved)."""
        self._disconnect()

    def _connect(self, credentials: Credentials) -> None:
        from .sync import SyncEngine

        # Built before the old account goes: a failure here leaves that one as it was.
        client = None
        try:
            client = credentials.client(**self._http)
            engine = SyncEngine(
                self.store, client, credentials, now=self._now, reserve_points=self._reserve
            )
        except BaseException:
            if client is not None:
                client.close()
            credentials.close()
            raise
        self._disconnect()
        self.credentials, self.engine = credentials, engine
        self.problem = None
        logger.info("syncing as %s", credentials.describe())

    def _disconnect(self) -> None:
        if self.engine is not None:
            self.engine.client.close()
        if self.credentials is not None:
            self.credentials.close()
        self.engine = None
        self.credentials = None


class UplinkWorker:
    """The thread that owns the PDS link: logins, probes, mirrors and syncs."""

    def __init__(
        self,
        agent: AccountSide,
        settings: Settings,
        status: StatusBoard,
        clock: Clock,
        network: NetworkMonitor,
    ) -> None:
        self._agent = agent
        self._settings = settings
        self._status = status
        self._clock = clock
        self._network = network
        self.wake = threading.Event()
        self._lock = threading.Lock()
        # Handed over by the recorder, under self._lock.
        self._waiters: list[threading.Event] = []
        self._stopping = False
        self._deadline: float | None = None
        self._live_record: tuple[str, str, dict[str, Any]] | None = None
        self._store_ready: threading.Event | None = None
        self._store: Callable[[], Store | None] = lambda: None
        self._verify_store: Callable[[], None] = lambda: None
        self._link: Uplink | None = None
        # A login the network kept from the PDS, and when to try it again.
        self._login: AuthRequest | None = None
        self._login_at = 0.0
        self._login_delay = LOGIN_RETRY_FIRST
        self._interfaces_polled_at = -INTERFACE_POLL_SECONDS
        self._mirrored_at: float | None = None
        self._rng = random.Random()
        self._checkpointer: WalCheckpointer | None = None
        self._thread = threading.Thread(target=self._run, name="anisota-uplink", daemon=True)

    def _wall_s(self) -> float:
        return self._clock.wall_ns() / 1e9

    def _mono_s(self) -> float:
        return self._clock.monotonic_ns() / 1e9

    def start(
        self,
        store_ready: threading.Event,
        store: Callable[[], Store | None],
        verify_store: Callable[[], None],
    ) -> None:
        """Start the thread; it begins once ``store_ready`` is set.

        ``verify_store`` is the recorder's full check of the file, which the
        uplink runs first thing, off the recorder's way.
        """
        self._store_ready = store_ready
        self._store = store
        self._verify_store = verify_store
        self._thread.start()

    def join(self, timeout: float | None) -> bool:
        """Wait for the uplink to stop; True if it did within ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- what the recorder hands over -------------------------------------------

    def after_round(
        self,
        waiters: list[threading.Event],
        due: bool,
        stopping: bool = False,
        deadline: float | None = None,
    ) -> None:
        """The recorder wrote a round: sync what became ``due``, answer ``waiters``.

        ``stopping``: the agent closes; the last sync must end by ``deadline``
        (wall seconds).
        """
        with self._lock:
            self._waiters.extend(waiters)
            if stopping:
                self._stopping, self._deadline = True, deadline
        if waiters or due or stopping:
            self.wake.set()

    def offer_live(self, rkey: str, did: str, record: dict[str, Any]) -> None:
        """The live session's latest record, for mirroring."""
        self._live_record = (rkey, did, record)

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        assert self._store_ready is not None
        self._store_ready.wait()
        store = self._store()
        if store is None:  # the recorder failed outright; it logged why
            return
        self._verify_store()
        self._link = Uplink(
            store,
            self._token_store(),
            on_response=self._network.observe_request,
            reserve_points=self._settings.write_reserve,
            now=self._wall_s,
            transport=self._settings.transport,
        )
        first = True
        while True:
            if not first:
                self.wake.wait(self._sleep_seconds())
            self.wake.clear()
            with self._lock:
                waiters, self._waiters = self._waiters, []
                stopping, deadline = self._stopping, self._deadline
            try:
                self._apply_requests(first)
                self._retry_login()
                self._tend_network(probe=not stopping)
                self._sync(deadline if stopping else None)
            except Exception:  # a bug here must not kill syncing for good
                logger.exception("uplink round failed")
                self._status.add_counts({"worker_errors": 1})
            first = False
            for waiter in waiters:
                waiter.set()
            if stopping:
                break
            self._checkpoint_wal()
        self._link.close()
        if self._checkpointer is not None:
            self._checkpointer.close()

    def _checkpoint_wal(self) -> None:
        """Keep the store's write-ahead log short, here rather than in a recorder commit."""
        from .store import WalCheckpointer

        assert self._link is not None
        path = self._link.store.path
        if path is None:
            return
        if self._checkpointer is None:
            self._checkpointer = WalCheckpointer()
        try:
            self._checkpointer.checkpoint(path)
        except Exception as failure:  # the recorder finds out what the file does
            logger.debug("WAL checkpoint skipped: %s", failure)
            self._checkpointer.close()

    def _token_store(self) -> TokenStore:
        from .tokens import MemoryTokenStore, token_store_for

        directory = self._settings.store_dir()
        if directory is None:
            return MemoryTokenStore()
        return token_store_for(directory, self._settings.keyring)

    def _sleep_seconds(self) -> float:
        """Until the next sync retry, login retry or network probe."""
        link = self._link
        assert link is not None
        due = [WAL_CHECKPOINT_SECONDS]
        retry = link.seconds_until_retry()
        if retry is not None:
            due.append(retry)
        if self._login is not None:
            due.append(self._login_at - self._mono_s())
        probe_at = self._network.next_probe_at()
        if probe_at is not None and link.engine is not None:
            due.append(probe_at - self._mono_s())
        return max(0.0, min(due))

    # -- the account ---------------------------------------------------------------

    def _apply_requests(self, first: bool) -> None:
        """Carry out the host's account changes; at the first round, resume a saved login.

        A host's choice made before the first round wins over a saved login;
        what was recorded while the saved login was the player's (by a run
        killed before it resumed, say) stays that account's all the same.
        """
        link = self._link
        assert link is not None
        requests = self._agent._take_auth_requests()
        if first and not requests:
            # Reads a file; no request is made until the first sync.
            did = self._account_change("resuming the saved login", link.resume)
            if did is None:
                self._adopt_orphans()
            self._found(RESUME_TAG, did)
        elif first:
            saved = self._account_change("reading the saved login", link.saved_did)
            if saved is None:
                self._adopt_orphans()
            self._attribute_stored(RESUME_TAG, saved)
            self._agent._account_found(RESUME_TAG, None)
        for request in requests:
            self._drop_pending_login()
            if request.kind == "host":
                assert request.did is not None and request.pds_url is not None
                use = functools.partial(
                    link.use_host_auth, request.auth, request.did, request.pds_url
                )
                self._account_change("use_auth", use)
            elif request.kind == "password":
                self._login = request
                self._login_at = self._mono_s()
                self._login_delay = LOGIN_RETRY_FIRST
            else:
                self._account_change("logout", link.logout)
        self._refresh_account()

    def _account_change(self, what: str, change: Callable[[], str | None]) -> str | None:
        """Carry out one account change (login, use_auth, resume, logout); its DID, if any.

        The link turns the failures it expects into its problem. Anything else
        (a bug, a transport or token store that raises something of its own)
        ends the change here, once: logged at ERROR by its type and place only
        (its message may quote the password or a token), counted as
        ``account_errors``, and shown in ``auth_problem``. Nothing is left to
        try it again, so it cannot loop.
        """
        link = self._link
        assert link is not None
        try:
            return change()
        except LoginDeferred:
            raise  # the network's answer: retried with backoff
        except Exception as failure:
            link.problem = f"{what} failed: unexpected {type(failure).__name__}"
            logger.error("%s (raised in %s)", link.problem, raised_in(failure))
            self._status.add_counts({"account_errors": 1})
            return None

    def _drop_pending_login(self) -> None:
        """A newer account change replaces a login still being retried."""
        pending = self._login
        if pending is not None and pending.tag is not None:
            self._agent._account_found(pending.tag, None)
        self._login = None

    def _retry_login(self) -> None:
        """Try the pending login when it is due; on a refusal, stop and drop the password."""
        request, link = self._login, self._link
        if request is None or link is None or self._mono_s() < self._login_at:
            return
        assert request.pds_url and request.identifier and request.password and request.tag
        login = functools.partial(link.login, request.pds_url, request.identifier, request.password)
        try:
            did = self._account_change("login", login)
        except LoginDeferred as deferred:
            delay = self._login_delay * self._rng.uniform(0.5, 1.5)
            if deferred.retry_at is not None:
                delay = max(delay, deferred.retry_at - self._wall_s())
            self._login_at = self._mono_s() + delay
            self._login_delay = min(LOGIN_RETRY_MAX, self._login_delay * 2)
            self._refresh_account()
            return
        self._login = None  # the password leaves memory here, whatever the answer
        self._found(request.tag, did)
        self._refresh_account()

    def _found(self, tag: str, did: str | None) -> None:
        """The login tagged ``tag`` yielded ``did``: its sessions are that account's.

        Those already stored are moved at once, so this very round (a closing
        agent's last) syncs them; the agent moves those still in memory, and the
        recorder those it writes meanwhile.
        """
        if did is not None:
            self._remember_saved_account(did)
        self._attribute_stored(tag, did)
        self._agent._account_found(tag, did)

    def _remember_saved_account(self, did: str) -> None:
        assert self._link is not None
        try:
            self._link.store.set_meta({SAVED_ACCOUNT_META: did})
        except Exception as failure:  # only orphans of a killed run would miss it
            logger.error("cannot note the saved account: %s", failure)

    def _adopt_orphans(self) -> None:
        """With no saved login now, give a killed run's sessions that awaited one to its account.

        A run killed before its first round leaves its sessions awaiting the
        resume of the saved login. When that login is gone by the next run (the
        player logs in again, maybe as someone else), the store's note of the
        account saved last still names theirs. This run's own sessions follow
        this run's logins, as usual.
        """
        link = self._link
        assert link is not None
        try:
            did = link.store.meta().get(SAVED_ACCOUNT_META)
        except Exception as failure:  # the next run tries again
            logger.error("cannot read the saved account: %s", failure)
            return
        if isinstance(did, str):
            self._attribute_stored(RESUME_TAG, did, not_owner=self._agent._owner_token)

    def _attribute_stored(self, tag: str, did: str | None, not_owner: str | None = None) -> None:
        assert self._link is not None
        store = self._link.store
        try:
            if store.attribute(tag, did, not_owner=not_owner):
                # Sessions changed state (pending for did, or local): status shows it now.
                self._status.update(outbox=store.outbox_counts())
        except Exception as failure:  # the recorder's next round tries again
            logger.error("cannot attribute sessions to %s: %s", did or "no account", failure)

    def _refresh_account(self) -> None:
        link = self._link
        assert link is not None
        engine = link.engine
        facts = (
            engine.status.facts()
            if engine is not None
            else {name: BACKGROUND_FACTS[name] for name in SYNC_FACTS}
        )
        facts["auth_problem"] = facts["auth_problem"] or link.problem
        self._status.update(
            **facts, account=link.credentials.describe() if link.credentials else None
        )

    def _interrupted(self) -> bool:
        return (
            self._stopping or self._agent._has_auth_requests() or not self._agent._uploads_allowed()
        )

    # -- the network -----------------------------------------------------------------

    def _tend_network(self, probe: bool) -> None:
        """Poll the interfaces now and then, probe the PDS when in doubt.

        A closing agent does not probe: its time belongs to the last sync.
        """
        link = self._link
        assert link is not None
        now = self._mono_s()
        engine = link.engine
        # A PDS on this machine is reachable whatever the interfaces say.
        if not _is_local(engine) and now - self._interfaces_polled_at >= INTERFACE_POLL_SECONDS:
            self._interfaces_polled_at = now
            self._network.observe_interfaces(interfaces_up())
        if probe and engine is not None and self._network.probe_due():
            began = time.perf_counter()
            try:
                engine.client.health(timeout=5.0)
            except Exception:
                self._network.observe_probe(None, counted=True)  # the client reported it
            else:
                self._network.observe_probe((time.perf_counter() - began) * 1000, counted=True)
                engine.retry_now()  # the PDS answers: no reason to wait out a backoff
        transitions = self._network.pop_transitions()
        if not transitions:
            return
        condition = transitions[-1].new
        logger.info("network: %s", condition)
        link.store.set_meta({f"{STATUS_META_PREFIX}network": condition})
        if any(change.reconnected for change in transitions):
            if engine is not None:
                engine.retry_now()  # back online: do not wait out the old backoff
            self._login_at = now  # and a pending login is tried at once

    def _sync(self, deadline: float | None) -> None:
        """Sync what is due (unless offline), and mirror the live session if asked."""
        link = self._link
        assert link is not None
        if self._network.condition == "offline" or not self._agent._uploads_allowed():
            return  # offline, or the player has not granted consent: nothing leaves
        if deadline is None:  # a closing agent's time belongs to the last sync
            link.recheck_account()
        self._mirror(link)
        if link.due():
            # A pass ends early, between requests, for an account change or close.
            link.sync(deadline, interrupted=self._interrupted)
            self._status.update(outbox=link.store.outbox_counts())
            if link.due() and deadline is None:
                self.wake.set()  # more to do, once the interruption is dealt with
        self._refresh_account()

    def _mirror(self, link: Uplink) -> None:
        interval = self._settings.mirror_interval
        live = self._live_record
        if interval is None or live is None:
            return
        now = self._wall_s()
        if self._mirrored_at is not None and now - self._mirrored_at < interval:
            return
        rkey, did, record = live
        if link.did == did and link.mirror(rkey, record):
            self._mirrored_at = now
            if self._live_record is live:
                self._live_record = None


def _is_local(engine: SyncEngine | None) -> bool:
    """Whether the PDS is on this machine: reachable whatever the interfaces say."""
    from urllib.parse import urlsplit

    return engine is not None and is_loopback_host(urlsplit(engine.client.base_url).hostname or "")
