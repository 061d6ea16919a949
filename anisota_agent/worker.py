"""The background worker: the only thread that touches the disk.

Each round it asks the agent for its :class:`Work` (a copy of the live session
when it changed, sessions that ended, counts of dropped calls), writes it to the
store, and answers anyone waiting for that round. It sleeps until the next
periodic checkpoint unless the agent wakes it (session start and end, close, an
explicit :meth:`~anisota_agent.Agent.checkpoint`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from .lexicon import RecordValidationError, validate_record
from .records import SessionState, build_record, expire_record

if TYPE_CHECKING:
    from .store import Owner, Store, StoredSession

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


class WorkerStatus:
    """What the worker last saw; read by ``Agent.status()`` without any I/O."""

    def __init__(self) -> None:
        self.store_path: str | None = None
        self.store_mode = "starting"
        self.outbox: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        self.last_error: str | None = None
        self.last_checkpoint_wall: float | None = None
        self.recovered = 0

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


class Worker:
    """Owns the store and writes the agent's sessions to it on its own thread."""

    def __init__(
        self,
        collect: Callable[[], Work],
        data_dir: str | None,
        in_memory: bool,
        owner_token: str,
        wall_ms: Callable[[], int],
        checkpoint_interval: float,
        end_idle: Callable[[], float],
        max_session_age_ms: int,
    ) -> None:
        self._collect = collect
        self._data_dir = data_dir
        self._in_memory = in_memory
        self._owner_token = owner_token
        self._wall_ms = wall_ms
        self._checkpoint_interval = checkpoint_interval
        self._end_idle = end_idle
        self._max_session_age_ms = max_session_age_ms
        self.wake = threading.Event()
        self.status = WorkerStatus()
        self._status_lock = threading.Lock()
        self._store: Store | None = None
        self._owner: Owner | None = None
        self._unsaved: list[SessionState] = []
        self._write_failures = 0
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
        while True:
            # Sleep until the next checkpoint, or until the live session would go idle.
            self.wake.wait(min(self._checkpoint_interval, self._end_idle()))
            self.wake.clear()
            self._end_idle()
            work = self._collect()
            try:
                self._process(work)
            except Exception:  # a bug here must not kill recording for good
                logger.exception("worker round failed")
                self._count({"worker_errors": 1})
            for waiter in work.waiters:
                waiter.set()
            if work.stopping:
                break
        if self._store is not None:
            self._store.close()

    def _process(self, work: Work) -> None:
        if work.purge:
            self._purge()
        if work.dropped:
            self._count(work.dropped)
        self._unsaved.extend(work.finished)
        if work.live is not None:
            self._save(work.live, work.now_mono_ns, final=False)
        while self._unsaved:
            if not self._save(self._unsaved[0], work.now_mono_ns, final=True):
                break
            self._unsaved.pop(0)
        self._refresh_status()

    # -- store -----------------------------------------------------------------

    def _open_store(self) -> None:
        from pathlib import Path

        import psutil

        from .store import DB_FILENAME, Owner, Store, default_data_dir

        pid = os.getpid()
        self._owner = Owner(pid, psutil.Process(pid).create_time(), self._owner_token)
        path = None
        if not self._in_memory:
            path = (Path(self._data_dir) if self._data_dir else default_data_dir()) / DB_FILENAME
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
        except Exception as failure:
            return self._write_failed(state.rkey, failure)
        self._write_failures = 0
        if not kept:
            logger.warning("session %s was taken over by another process", state.rkey)
            self._count({"sessions_taken_over": 1})
        self._set_status(last_checkpoint_wall=time.time())
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

    def _recover(self) -> None:
        """Expire sessions whose owner died, or that outlived the maximum age."""
        assert self._store is not None
        now_ms = self._wall_ms()
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

        if now_ms - parse_datetime(stale.record["startedAt"]) > self._max_session_age_ms:
            return True
        return not owner_alive(stale.owner_pid, stale.owner_started, stale.owner_token)

    def _purge(self) -> None:
        assert self._store is not None
        removed = self._store.purge()
        self._unsaved.clear()
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
