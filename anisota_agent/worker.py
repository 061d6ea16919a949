"""The background worker: the only thread that touches the disk or the network.

Each round it asks the agent for its :class:`Work` (a copy of the live session
when it changed, sessions that ended, an account change, counts of dropped
calls), writes it to the store, tends the network monitor, syncs what is due,
and answers anyone waiting for that round. It sleeps until the next periodic
checkpoint, idle deadline, sync retry or probe, unless the agent wakes it
(session start and end, an account change, back online, close, ``flush()``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .lexicon import RecordValidationError, validate_record
from .network import NetworkMonitor, interfaces_up
from .records import SessionState, build_record, expire_record, is_loopback_host

if TYPE_CHECKING:
    from .store import Owner, Store, StoredSession
    from .sync import SyncEngine, Uplink

logger = logging.getLogger("anisota_agent")

#: Consecutive failed writes after which the worker gives up on the file and
#: keeps recording in memory, so the game's sessions are not lost to a full disk.
MAX_WRITE_FAILURES = 3

#: Tokens of the agents alive in this process; recovery in this process uses it
#: to tell a crashed earlier agent's session from a running one's.
LIVE_OWNER_TOKENS: set[str] = set()


class AuthRequest(NamedTuple):
    """An account change the host asked for, carried out on the worker thread."""

    kind: str  # "host" (its own httpx.Auth), "password" (app password), "logout"
    did: str | None = None
    pds_url: str | None = None
    auth: Any = None  # the host's httpx.Auth
    identifier: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # never show the password, even in a traceback
        return f"AuthRequest(kind={self.kind!r}, did={self.did!r}, pds_url={self.pds_url!r})"


class Work(NamedTuple):
    """What the agent hands the worker in one round."""

    live: SessionState | None
    finished: list[SessionState]
    dropped: dict[str, int]
    waiters: list[threading.Event]
    now_mono_ns: int
    stopping: bool
    purge: bool
    auth_request: AuthRequest | None
    #: Wall-clock seconds by which a closing agent's last sync must end.
    deadline: float | None


class WorkerStatus:
    """What the worker last saw; read by ``Agent.status()`` without any I/O."""

    def __init__(self) -> None:
        self.store_path: str | None = None
        self.store_mode = "starting"
        self.outbox: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        self.last_error: str | None = None
        self.recovered = 0
        self.account: str | None = None
        self.auth_problem: str | None = None
        self.last_sync_at: float | None = None
        self.next_sync_at: float | None = None
        self.sync_error: str | None = None

    def copy(self) -> WorkerStatus:
        """A copy whose dicts the worker will not change."""
        clone = WorkerStatus()
        clone.__dict__.update(self.__dict__)
        clone.outbox = dict(self.outbox)
        clone.counters = dict(self.counters)
        return clone


def local_day(wall_ms: int) -> str:
    """The local calendar day (``YYYY-MM-DD``) of an epoch-millisecond instant."""
    return time.strftime("%Y-%m-%d", time.localtime(wall_ms / 1000))


class AgentSide(Protocol):
    """What the worker asks of the agent (all cheap, under the agent's lock)."""

    def _collect(self) -> Work: ...

    def _end_idle(self) -> float: ...

    def _set_account(self, did: str | None) -> None: ...


class WorkerSettings(NamedTuple):
    """The agent's settings the worker needs."""

    data_dir: str | None
    in_memory: bool
    owner_token: str
    checkpoint_interval: float
    max_session_age_ms: int
    reserve_points: int
    mirror_interval: float | None
    max_store_bytes: int
    retention_s: float
    keyring: bool | None


#: How often the worker looks at the network interfaces (psutil), at most.
INTERFACE_POLL_SECONDS = 5.0
#: How often the store is pruned to its bounds (and once at start).
PRUNE_SECONDS = 3600.0
#: How long one background sync pass may run before the worker checkpoints again.
SYNC_SLICE_SECONDS = 10.0


class Worker:
    """Owns the store and the PDS link; writes and syncs the agent's sessions."""

    def __init__(
        self,
        agent: AgentSide,
        settings: WorkerSettings,
        network: NetworkMonitor,
        wall_s: Callable[[], float],
        mono_s: Callable[[], float],
    ) -> None:
        self._agent = agent
        self._settings = settings
        self._network = network
        self._wall_s = wall_s
        self._network_now = mono_s
        self.wake = threading.Event()
        self.status = WorkerStatus()
        self._status_lock = threading.Lock()
        self._store: Store | None = None
        self._uplink: Uplink | None = None
        self._owner: Owner | None = None
        self._unsaved: list[SessionState] = []
        self._write_failures = 0
        self._resumed = False
        self._interfaces_polled_at = -INTERFACE_POLL_SECONDS
        self._mirrored_at: float | None = None
        # The live session's latest record and its account, for mirroring.
        self._live_record: tuple[str, str, dict[str, Any]] | None = None
        self._thread = threading.Thread(target=self._run, name="anisota-agent", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def join(self, timeout: float | None) -> bool:
        """Wait for the worker to stop; True if it did within ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        self._open_store()
        self._recover()
        self._open_uplink()
        pruned_at = -PRUNE_SECONDS
        until_idle = self._agent._end_idle()
        while True:
            # Activity only moves the idle deadline later, and a new session wakes
            # us: the figure from the last round is safe to sleep on.
            self.wake.wait(self._sleep_seconds(until_idle))
            self.wake.clear()
            until_idle = self._agent._end_idle()
            work = self._agent._collect()
            try:
                if self._wall_s() - pruned_at >= PRUNE_SECONDS:
                    pruned_at = self._wall_s()
                    self._prune()
                self._process(work)
                self._tend_network(probe=not work.stopping)
                self._sync(work.deadline)
            except Exception:  # a bug here must not kill recording for good
                logger.exception("worker round failed")
                self._count({"worker_errors": 1})
            for waiter in work.waiters:
                waiter.set()
            if work.stopping:
                break
        self._shut_down()

    def _sleep_seconds(self, until_idle: float) -> float:
        """Until the next checkpoint, idle deadline, sync retry or network probe."""
        due = [self._settings.checkpoint_interval, until_idle]
        if self._uplink is not None:
            retry = self._uplink.seconds_until_retry()
            if retry is not None:
                due.append(retry)
        probe_at = self._network.next_probe_at()
        if probe_at is not None and self._uplink is not None and self._uplink.engine:
            due.append(max(0.0, probe_at - self._network_now()))
        return max(0.0, min(due))

    def _process(self, work: Work) -> None:
        # Held before anything that could fail: a finished session is never lost
        # to a bug or an error later in the round.
        if work.purge:
            self._unsaved.clear()
        self._unsaved.extend(work.finished)
        if work.purge:
            self._purge()
        try:
            self._apply_auth(work.auth_request, work.finished)
        except Exception:
            logger.exception("the account change failed")
            self._count({"worker_errors": 1})
        if work.dropped:
            self._count(work.dropped)
        if work.live is not None:
            self._save(work.live, work.now_mono_ns, final=False)
        while self._unsaved:
            if not self._save(self._unsaved[0], work.now_mono_ns, final=True):
                break
            self._unsaved.pop(0)
        self._refresh_status()

    def _shut_down(self) -> None:
        if self._uplink is not None:
            self._uplink.close()
        if self._store is not None:
            self._store.close()

    # -- store -----------------------------------------------------------------

    def _open_store(self) -> None:
        from pathlib import Path

        import psutil

        from .store import DB_FILENAME, Owner, Store, default_data_dir

        settings = self._settings
        pid = os.getpid()
        self._owner = Owner(pid, psutil.Process(pid).create_time(), settings.owner_token)
        path = None
        if not settings.in_memory:
            data_dir = Path(settings.data_dir) if settings.data_dir else default_data_dir()
            path = data_dir / DB_FILENAME
        try:
            self._store = Store.open(path) if path is not None else Store(None)
            self._set_status(
                store_path=str(path) if path else None, store_mode="sqlite" if path else "memory"
            )
        except Exception as error:
            self._degrade(f"cannot open {path}: {error}")

    def _degrade(self, reason: str) -> None:
        """Keep recording in an in-memory store after the file failed us."""
        from .store import Store

        logger.error("store unavailable, recording in memory: %s", reason)
        self._store = Store(None)
        self._set_status(store_mode="memory", last_error=reason)
        self._count({"store_failures": 1})

    def _save(self, state: SessionState, now_mono_ns: int, final: bool) -> bool:
        assert self._store is not None and self._owner is not None
        day = local_day(state.started_wall_ms)
        try:
            related = self._store.related_rkeys(day, state.did, state.rkey) if state.did else []
            record = build_record(state, now_mono_ns, related)
            error = _validation_error(record)
            if error and not final:
                logger.error("session %s builds an invalid record: %s", state.rkey, error)
            if final:
                kept = self._store.finalize(state.rkey, state.did, record, self._owner, day, error)
            else:
                kept = self._store.checkpoint(state.rkey, state.did, record, self._owner, day)
                if kept and state.did:
                    self._live_record = (state.rkey, state.did, record)
        except Exception as failure:
            return self._write_failed(state.rkey, failure)
        self._write_failures = 0
        if not kept:
            logger.warning("session %s was taken over by another process", state.rkey)
            self._count({"sessions_taken_over": 1})
        return True

    def _write_failed(self, rkey: str, failure: Exception) -> bool:
        self._write_failures += 1
        logger.error("checkpoint of session %s failed: %s", rkey, failure)
        self._count({"checkpoint_failures": 1})
        self._set_status(last_error=f"checkpoint failed: {failure}")
        if self._write_failures >= MAX_WRITE_FAILURES:
            self._write_failures = 0
            self._degrade(f"{MAX_WRITE_FAILURES} writes failed, last: {failure}")
        return False

    # -- the PDS -----------------------------------------------------------------

    def _open_uplink(self) -> None:
        """The PDS link; the account comes with the first round (:meth:`_apply_auth`)."""
        from .auth import MemoryTokenStore, TokenStore, token_store_for
        from .sync import Uplink

        assert self._store is not None
        path = self._store.path
        tokens: TokenStore = (
            token_store_for(path.parent, self._settings.keyring) if path else MemoryTokenStore()
        )
        self._uplink = Uplink(
            self._store,
            tokens,
            on_response=self._network.observe_request,
            reserve_points=self._settings.reserve_points,
            now=self._wall_s,
        )

    def _apply_auth(self, request: AuthRequest | None, finished: list[SessionState]) -> None:
        """Carry out the host's account change; at the first round, resume a saved login.

        Sessions that ended while a login was under way are that account's too.
        """
        uplink = self._uplink
        assert uplink is not None
        did = None
        if request is None:
            if self._resumed:
                return
            did = uplink.resume()  # no request is made until the first sync
        elif request.kind == "host":
            assert request.did is not None and request.pds_url is not None
            uplink.use_host_auth(request.auth, request.did, request.pds_url)
        elif request.kind == "password":
            assert request.pds_url and request.identifier and request.password
            did = uplink.login(request.pds_url, request.identifier, request.password)
        else:
            uplink.logout()
        self._resumed = True  # a host's choice made at start wins over a saved login
        if request is None or request.kind == "password":
            # A saved login held from the agent's start; a requested one from the
            # moment it was asked for.
            for state in finished:
                if state.did is None and (request is None or state.awaiting_account):
                    state.did = did
        if did is not None or (request is not None and request.kind == "password"):
            self._agent._set_account(did)  # None: the login failed
        self._refresh_account()

    def _tend_network(self, probe: bool) -> None:
        """Poll the interfaces now and then, probe the PDS when in doubt.

        A closing agent does not probe: its time belongs to the last sync.
        """
        now = self._network_now()
        engine = self._uplink.engine if self._uplink is not None else None
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
        if transitions:
            assert self._store is not None
            self._store.set_meta({"network.condition": transitions[-1].new})
            if any(change.reconnected for change in transitions) and engine is not None:
                engine.retry_now()  # back online: do not wait out the old backoff

    def _sync(self, deadline: float | None) -> None:
        """Sync what is due (unless offline), and mirror the live session if asked."""
        uplink = self._uplink
        if uplink is None or self._network.condition == "offline":
            return
        self._mirror(uplink)
        if uplink.due():
            slice_end = self._wall_s() + SYNC_SLICE_SECONDS
            uplink.sync(slice_end if deadline is None else min(deadline, slice_end))
            self._refresh_status()
        self._refresh_account()

    def _mirror(self, uplink: Uplink) -> None:
        interval = self._settings.mirror_interval
        if interval is None or self._live_record is None:
            return
        now = self._wall_s()
        if self._mirrored_at is not None and now - self._mirrored_at < interval:
            return
        rkey, did, record = self._live_record
        if uplink.did == did and uplink.mirror(rkey, record):
            self._mirrored_at = now
            self._live_record = None

    def _refresh_account(self) -> None:
        uplink = self._uplink
        assert uplink is not None
        engine = uplink.engine
        status = engine.status if engine is not None else None
        self._set_status(
            account=uplink.credentials.describe() if uplink.credentials else None,
            auth_problem=(status.auth_problem if status else None) or uplink.problem,
            last_sync_at=status.last_sync_at if status else None,
            next_sync_at=status.next_attempt_at if status else None,
            sync_error=status.last_error if status else None,
        )

    # -- recovery -------------------------------------------------------------

    def _recover(self) -> None:
        """Expire sessions whose owner died, or that outlived the maximum age."""
        assert self._store is not None
        now_ms = int(self._wall_s() * 1000)
        recovered = 0
        for stale in self._store.live_sessions():
            if not self._should_expire(stale, now_ms):
                continue
            record = expire_record(stale.record, now_ms)
            if self._store.expire(stale, record, _validation_error(record)):
                recovered += 1
        if recovered:
            logger.info("recovered %d session(s) left active by a dead process", recovered)
        self._set_status(recovered=recovered)

    def _should_expire(self, stale: StoredSession, now_ms: int) -> bool:
        from .clock import parse_datetime

        if now_ms - parse_datetime(stale.record["startedAt"]) > self._settings.max_session_age_ms:
            return True
        return not owner_alive(stale.owner_pid, stale.owner_started, stale.owner_token)

    def _prune(self) -> None:
        assert self._store is not None
        settings = self._settings
        dropped = self._store.prune(settings.max_store_bytes, settings.retention_s, self._wall_s())
        if dropped:
            logger.warning("store over its bounds: dropped %s", dropped)
            self._count(dropped)

    def _purge(self) -> None:
        assert self._store is not None
        removed = self._store.purge()
        logger.info("purged %d session(s) and all counters", removed)

    def _count(self, counts: dict[str, int]) -> None:
        try:
            if self._store is not None:
                self._store.add_counts(counts)
        except Exception as failure:  # counting must never cost a session
            logger.error("cannot persist counters: %s", failure)
        with self._status_lock:
            for name, value in counts.items():
                self.status.counters[name] = self.status.counters.get(name, 0) + value

    def _refresh_status(self) -> None:
        assert self._store is not None
        try:
            outbox = self._store.outbox_counts()
        except Exception as failure:
            logger.error("cannot read the outbox: %s", failure)
            return
        self._set_status(outbox=outbox)

    def _set_status(self, **changes: Any) -> None:
        with self._status_lock:
            for name, value in changes.items():
                setattr(self.status, name, value)

    def snapshot_status(self) -> WorkerStatus:
        """A copy of the worker's status, safe to hand to the host."""
        with self._status_lock:
            return self.status.copy()


def _validation_error(record: dict[str, Any]) -> str | None:
    try:
        validate_record(record)
    except RecordValidationError as error:
        return str(error)
    return None


def owner_alive(pid: int | None, started: float | None, token: str | None) -> bool:
    """Whether the agent that owns a session still runs.

    A pid alone is not enough: pids are reused, so the process's create time must
    match too. In this very process, the owner's token must still be registered.
    """
    import psutil

    if pid is None or started is None:
        return False
    try:
        create_time = psutil.Process(pid).create_time()
    except psutil.Error:
        return False
    if abs(create_time - started) > 0.01:
        return False
    if pid == os.getpid():
        return token in LIVE_OWNER_TOKENS
    return True


def _is_local(engine: SyncEngine | None) -> bool:
    """Whether the PDS is on this machine: reachable whatever the interfaces say."""
    from urllib.parse import urlsplit

    return engine is not None and is_loopback_host(urlsplit(engine.client.base_url).hostname or "")
