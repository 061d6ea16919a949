"""The recorder: the thread that owns the SQLite store and never touches the network.

Each round it asks the agent for its :class:`Work` (a copy of the live session
when it changed, sessions that ended, accounts found for sessions recorded
during a login, counts of dropped calls) and writes it to the store at once:
a start or an end of a session is committed within milliseconds of the game's
call, whatever the login, the sync or the validator are doing on the uplink's
thread. Then it hands the uplink what became due.

The file is never a dead end. A file that fails (full, read-only, deleted,
corrupt) is replaced by an in-memory store holding everything still unsynced,
so recording and syncing go on; the file is retried (backoff up to a minute)
and everything is written back once it works. A deleted file is re-created
from the open connection; a corrupt one is moved aside and its readable
unsynced sessions salvaged. What is lost after all is counted by reason.

The recorder also keeps the player's consent (in the store, read at start and
each round, so a change made by the CLI or another game window is followed)
and runs the host's ``before_record`` guard on every finished record before
storing it final, outside the write transaction.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .records import SessionState, build_record

if TYPE_CHECKING:
    from .clock import Clock
    from .guard import Guarded
    from .sessions import Collected
    from .settings import Settings
    from .status import StatusBoard
    from .store import Owner, Store
    from .uplink import UplinkWorker

__all__ = ["Recorder", "Work", "local_day", "scrubbed"]

logger = logging.getLogger("anisota_agent")

#: How often the store is pruned to its bounds (and once at start).
PRUNE_SECONDS = 3600.0
#: When a prune round left more to do: the next one comes this soon.
PRUNE_AGAIN_SECONDS = 1.0
#: Retries of a failed file: first after this many seconds, doubling to the cap.
FILE_RETRY_FIRST = 1.0
FILE_RETRY_MAX = 60.0


class Work(NamedTuple):
    """What the agent hands the recorder in one round."""

    #: What the session book collected.
    sessions: Collected
    #: flush() callers to answer after the uplink's next round, and after this one.
    waiters: list[threading.Event]
    recorded: list[threading.Event]
    stopping: bool
    purge: bool
    #: Wall-clock seconds by which a closing agent's last sync must end.
    deadline: float | None
    #: The consent the player chose since the last round (None: no change).
    consent: str | None = None


class AgentSide(Protocol):
    """What the recorder asks of the agent (all cheap, under the agent's lock)."""

    def _collect(self) -> Work: ...

    def _end_idle(self) -> float: ...

    def _consent_loaded(self, state: str) -> None: ...


def local_day(wall_ms: int) -> str:
    """The local calendar day (``YYYY-MM-DD``) of an epoch-millisecond instant."""
    return time.strftime("%Y-%m-%d", time.localtime(wall_ms / 1000))


def scrubbed(value: Any) -> Any:
    """``value`` with every string made encodable as UTF-8 (a lone surrogate becomes ``?``)."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {scrubbed(key): scrubbed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [scrubbed(item) for item in value]
    return value


class _DiskFault(Exception):
    """A write failed because of the file, not the record."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Recorder:
    """Owns the store; writes the agent's sessions the moment it is woken."""

    def __init__(
        self,
        agent: AgentSide,
        settings: Settings,
        status: StatusBoard,
        clock: Clock,
        owner_token: str,
        uplink: UplinkWorker,
    ) -> None:
        self._agent = agent
        self._settings = settings
        self._status = status
        self._clock = clock
        self._owner_token = owner_token
        self._uplink = uplink
        self.wake = threading.Event()
        #: Set once :attr:`store` exists (the uplink waits for it).
        self.ready = threading.Event()
        self.store: Store | None = None
        self._owner: Owner | None = None
        self._path: Any = None  # the file's Path, None when in memory by choice
        # Finished sessions not written anywhere yet: never dropped by a failure.
        self._held: list[SessionState] = []
        self._degraded = False
        self._retry_at = 0.0
        self._retry_delay = FILE_RETRY_FIRST
        self._prune_at = 0.0
        self._until_idle = 0.0
        # Set by verify_file() on the uplink's thread, acted on in the next round.
        self._file_failure: str | None = None
        self._recover_again = False
        # The consent in force, and who chose it ("player", or "host": its default).
        self._consent = settings.consent
        self._consent_by = "host"
        # The guard's verdicts on held sessions, by rkey: each record is guarded once.
        self._guarded: dict[str, Guarded] = {}
        self._thread = threading.Thread(target=self._run, name="anisota-recorder", daemon=True)

    def _wall_s(self) -> float:
        return self._clock.wall_ns() / 1e9

    def _mono_s(self) -> float:
        return self._clock.monotonic_ns() / 1e9

    def start(self) -> None:
        """Start the recorder thread."""
        self._thread.start()

    def join(self, timeout: float | None) -> bool:
        """Wait for the recorder to stop; True if it did within ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            self._open()
            work = self._round(first=True)
        finally:
            # The uplink starts its imports (httpx, the validator) only now, so
            # they do not compete for the GIL with the first write.
            self.ready.set()
        while not work.stopping:
            self.wake.wait(self._sleep_seconds())
            work = self._round(first=False)
        self._shut_down(work.deadline)

    def _round(self, first: bool) -> Work:
        """Write what the agent collected, then tend the file; answer the waiters."""
        self.wake.clear()
        # Activity only moves the idle deadline later, and a new session wakes
        # us: the figure from this round is safe to sleep on. A window going
        # behind brings a deadline in without waking us (the game's call must
        # not): rounds come at least every background timeout (see
        # _sleep_seconds), so the round after it sees that deadline in time.
        self._until_idle = self._agent._end_idle()
        work = self._agent._collect()
        wrote_final = False
        try:
            wrote_final = self._record(work)
            if first:
                self._recover()
            self._maintain(work.stopping)
        except Exception:  # a bug here must not kill recording for good
            logger.exception("recorder round failed")
            self._count({"worker_errors": 1})
        for waiter in work.recorded:
            waiter.set()
        self._uplink.after_round(
            work.waiters, wrote_final or work.purge, work.stopping, work.deadline
        )
        return work

    def _sleep_seconds(self) -> float:
        """Until the next checkpoint, idle or background deadline, file retry or prune."""
        now = self._mono_s()
        settings = self._settings
        due = [
            settings.checkpoint_interval,
            settings.background_timeout,
            self._until_idle,
            self._prune_at - now,
        ]
        if self._degraded:
            due.append(self._retry_at - now)
        return max(0.0, min(due))

    def _record(self, work: Work) -> bool:
        """Write the round's sessions; True if a finished one reached the store
        (or uploads were just granted: the uplink has work either way)."""
        # Held before anything that could fail: a finished session is never lost
        # to a bug or an error later in the round.
        if work.purge:
            self._held.clear()
            self._guarded.clear()
        granted = self._follow_consent(work.consent)
        recording = self._consent != "denied"
        if recording:
            self._held.extend(work.sessions.finished)
        store = self.store
        assert store is not None
        if work.purge:
            logger.info("purged %d session(s) and all counters", store.purge())
        if work.sessions.dropped:
            self._count(work.sessions.dropped)
        for tag, did in work.sessions.attributions:
            for state in self._held:
                state.attribute(tag, did)
            self._attribute(tag, did)
        live = work.sessions.live if recording else None
        wrote_final = self._write_round(live, work.sessions.now_mono_ns)
        self._refresh_outbox()
        return wrote_final or granted

    # -- consent -------------------------------------------------------------------

    def _load_consent(self) -> None:
        """At open: the player's stored choice wins; else the host's default, kept."""
        from .settings import CONSENT_STATES

        assert self.store is not None
        try:
            stored = self.store.consent()
            if stored and stored.get("by") == "player" and stored.get("state") in CONSENT_STATES:
                self._consent, self._consent_by = stored["state"], "player"
            else:
                self._consent, self._consent_by = self._settings.consent, "host"
                # Kept so that the CLI (flush, status) knows what holds.
                if stored != {"state": self._consent, "by": "host"}:
                    self.store.set_consent(self._consent, "host")
        except Exception as failure:  # the host's default holds for this run
            logger.error("cannot read or keep the consent: %s", failure)
        self._agent._consent_loaded(self._consent)
        if self._consent == "denied":
            self._delete_unsynced()

    def _follow_consent(self, asked: str | None) -> bool:
        """The player's change of this round, or one another process stored; True
        if uploads were just granted."""
        from .settings import CONSENT_STATES

        assert self.store is not None
        before = self._consent
        if asked is not None:
            self._consent, self._consent_by = asked, "player"
            try:
                self.store.set_consent(asked, "player")
            except Exception as failure:  # holds for this run; kept again on write-back
                logger.error("cannot keep the consent %s: %s", asked, failure)
        else:
            try:
                stored = self.store.consent()
            except Exception as failure:
                logger.debug("cannot read the stored consent: %s", failure)
                stored = None
            state = stored.get("state") if stored and stored.get("by") == "player" else None
            if state in CONSENT_STATES and state != self._consent:
                assert isinstance(state, str)
                logger.info("consent changed to %s by another process", state)
                self._consent, self._consent_by = state, "player"
                self._agent._consent_loaded(state)
        if self._consent == before:
            return False
        logger.info("consent: %s", self._consent)
        if self._consent == "denied":
            self._held.clear()
            self._guarded.clear()
            self._delete_unsynced()
        return self._consent == "granted"

    def _delete_unsynced(self) -> None:
        """Consent denied: every session not uploaded goes (those on the PDS stay)."""
        assert self.store is not None
        try:
            deleted = self.store.delete_unsynced()
        except Exception as failure:
            logger.error("consent denied, but the sessions not uploaded cannot go: %s", failure)
            return
        if deleted:
            logger.info("consent denied: deleted %d session(s) not uploaded", deleted)

    def _keep_consent_again(self) -> None:
        """After moving to a fresh file: the consent (and a denial's deletion) holds there too."""
        assert self.store is not None
        try:
            self.store.set_consent(self._consent, self._consent_by)
        except Exception as failure:
            logger.error("cannot keep the consent: %s", failure)
        if self._consent == "denied":
            self._delete_unsynced()

    # -- the guard -----------------------------------------------------------------

    def _guard_held(self, now_mono_ns: int) -> None:
        """Run the host's guard on every held session not guarded yet.

        Outside the write transaction: a slow guard holds no lock of the store
        (nor SQLite's write lock, which other processes wait for).
        """
        from .store import is_disk_fault

        if self._settings.before_record is None:
            return
        for state in self._held:
            if state.rkey in self._guarded:
                continue
            try:
                record = self._build(state, now_mono_ns)
            except Exception as failure:
                if is_disk_fault(failure):
                    raise _DiskFault(failure) from failure
                continue  # the write itself finds it unwritable
            self._guarded[state.rkey] = self._guard(state.rkey, record)

    def _guard(self, rkey: str, record: dict[str, Any]) -> Guarded:
        from .guard import apply_guard

        guard = self._settings.before_record
        assert guard is not None
        guarded = apply_guard(guard, record, rkey)
        if guarded.counter is not None:
            self._count({guarded.counter: 1})
        return guarded

    def _guard_expired(
        self, rkey: str, record: dict[str, Any]
    ) -> tuple[dict[str, Any], str | None]:
        """Recovery's hook: an expired session's record is finished too."""
        guarded = self._guard(rkey, record)
        return guarded.record, guarded.withheld

    def _build(self, state: SessionState, now_mono_ns: int) -> dict[str, Any]:
        assert self.store is not None
        day = local_day(state.started_wall_ms)
        related = self.store.related_rkeys(day, state.did, state.rkey) if state.did else []
        return build_record(state, now_mono_ns, related)

    def _write_round(self, live: SessionState | None, now_mono_ns: int) -> bool:
        """The live session and every held one in one commit; True if any was final.

        One commit a round, not one a session: a game ending sessions faster
        than a commit takes never leaves the recorder behind. A disk fault rolls
        the whole round back; it is written again, once, to the store the fault
        moved us to.
        """
        from .store import is_disk_fault

        store = self.store
        assert store is not None
        for _ in range(2):
            try:
                self._guard_held(now_mono_ns)
                with store.transaction():
                    if live is not None:
                        self._save(live, now_mono_ns, final=False)
                    for state in self._held:
                        self._save(state, now_mono_ns, final=True)
            except _DiskFault as fault:
                self._disk_failed(fault.error)
            except Exception as failure:  # the commit itself failed
                if not is_disk_fault(failure):
                    raise
                self._disk_failed(failure)
            else:
                wrote_final = bool(self._held)
                self._held.clear()
                self._guarded.clear()
                return wrote_final
        return False

    def _attribute(self, tag: str, did: str | None) -> None:
        assert self.store is not None
        try:
            moved = self.store.attribute(tag, did)
        except Exception as failure:
            logger.error("cannot attribute sessions to %s: %s", did or "no account", failure)
            return
        if moved and did is not None:
            logger.info("%d session(s) recorded during a login now belong to %s", moved, did)
        elif moved:
            logger.info("%d session(s) recorded during a failed login stay local", moved)

    def _save(self, state: SessionState, now_mono_ns: int, final: bool) -> None:
        """Write one session; raises :class:`_DiskFault` when the file failed."""
        from .store import is_disk_fault

        store, owner = self.store, self._owner
        assert store is not None and owner is not None
        day = local_day(state.started_wall_ms)
        record: dict[str, Any] | None = None
        try:
            background_ms = state.background_ms(now_mono_ns)
            guarded = self._guarded.get(state.rkey) if final else None
            if guarded is None:
                record = self._build(state, now_mono_ns)
                if final and self._settings.before_record is not None:
                    guarded = self._guarded[state.rkey] = self._guard(state.rkey, record)
            if guarded is not None:
                record = guarded.record
            assert record is not None
            if final:
                kept = store.finalize(
                    state.rkey,
                    state.did,
                    record,
                    owner,
                    day,
                    None if guarded is None else guarded.withheld,
                    awaiting_login=state.awaiting_login,
                    withheld=guarded is not None and guarded.withheld is not None,
                    background_ms=background_ms,
                )
            else:
                kept = store.checkpoint(
                    state.rkey,
                    state.did,
                    record,
                    owner,
                    day,
                    awaiting_login=state.awaiting_login,
                    background_ms=background_ms,
                )
        except Exception as failure:
            if is_disk_fault(failure):
                raise _DiskFault(failure) from failure
            kept = self._save_unwritable(state, record, failure, final)
        if not kept:
            logger.warning("session %s was taken over by another process", state.rkey)
            self._count({"sessions_taken_over": 1})
        elif not final and state.did is not None and record is not None:
            self._uplink.offer_live(state.rkey, state.did, record)

    def _save_unwritable(
        self,
        state: SessionState,
        record: dict[str, Any] | None,
        failure: Exception,
        final: bool,
    ) -> bool:
        """A record the store cannot take: keep a scrubbed copy, quarantined locally.

        One bad session must never degrade the store for the others.
        """
        from .store import is_disk_fault

        store, owner = self.store, self._owner
        assert store is not None and owner is not None
        logger.error("session %s cannot be stored as recorded: %s", state.rkey, failure)
        if not final:
            return True  # the final write tries again
        if record is None:  # not even a record to keep
            logger.error("session %s is lost: %s", state.rkey, failure)
            self._count({"lost_unwritable": 1})
            return True
        self._count({"unwritable_records": 1})
        error = f"the record could not be stored: {type(failure).__name__}: {failure}"
        try:
            return store.finalize(
                state.rkey,
                state.did,
                scrubbed(record),
                owner,
                local_day(state.started_wall_ms),
                scrubbed(error),
                awaiting_login=state.awaiting_login,
                # Final: ended, so counted up to its end whatever instant is given.
                background_ms=state.background_ms(state.started_mono_ns),
            )
        except Exception as again:
            if is_disk_fault(again):
                raise _DiskFault(again) from again
            logger.error("session %s is lost: %s", state.rkey, again)
            self._count({"lost_unwritable": 1})
            return True

    # -- the file ----------------------------------------------------------------

    def _open(self) -> None:
        from .recovery import process_started
        from .store import DB_FILENAME, Owner, Store

        settings = self._settings
        pid = os.getpid()
        self._owner = Owner(pid, process_started(pid), self._owner_token)
        if settings.in_memory:
            self.store = Store(None)
            self._status.update(store_path=None, store_mode="memory")
            self._load_consent()
            return
        try:
            directory = settings.store_dir()
            assert directory is not None
            self._path = directory / DB_FILENAME
            self._status.update(store_path=str(self._path))
            self.store = Store.open(self._path)
        except Exception as failure:  # no data dir, or a file that cannot be opened
            self.store = Store(None)
            self._fall_back(f"cannot open the store at {self._path or 'the data dir'}: {failure}")
            self._load_consent()
            return
        self._status.update(store_mode="sqlite")
        self._report_salvage()
        self._load_consent()

    def verify_file(self) -> None:
        """The full integrity check of the file; called by the uplink, once, at start.

        It reads the whole file (tens of ms), so it runs on the uplink's thread,
        on a connection of its own, while the recorder goes on writing. Damage
        found replaces the file in place (the store object stays the same); a
        replacement that fails is handed to the recorder's next round.
        """
        store = self.store
        if store is None or store.path is None:
            return
        try:
            if store.verify() is not None:
                self._report_salvage()
                self._prune_at = 0.0  # and expire the salvaged crashed sessions
                self._recover_again = True
        except Exception as failure:  # as when replace_corrupt() fails a write
            self._file_failure = f"the store failed its integrity check: {failure}"
        self.wake.set()

    def _report_salvage(self) -> None:
        assert self.store is not None
        salvage = self.store.salvage
        if salvage is None:
            return
        self._count({"store_corrupt": 1})
        if salvage.lost:
            self._count({"lost_corrupt_rows": max(1, salvage.lost)})
        logger.error(
            "store was corrupt: moved to %s; %d unsynced session(s) salvaged, %s unreadable",
            salvage.aside,
            salvage.salvaged,
            salvage.lost if salvage.lost >= 0 else "an unknown number",
        )

    def _disk_failed(self, failure: BaseException) -> None:
        """The file failed a write: move to a store that works, with nothing left behind."""
        from .store import is_corrupt

        assert self.store is not None
        self._count({"checkpoint_failures": 1})
        self._status.update(last_error=f"checkpoint failed: {failure}")
        logger.error("writing to the store failed: %s", failure)
        if self._degraded:
            return  # the memory store does not fail; nothing better to move to
        if is_corrupt(failure):
            try:
                self.store.replace_corrupt()
            except Exception as again:
                self._fall_back(f"the store is corrupt and cannot be replaced: {again}")
            else:
                self._report_salvage()
            return
        self._fall_back(str(failure))

    def _fall_back(self, reason: str) -> None:
        """Keep recording in memory, with every unsynced session the file held."""
        from .store import Store

        assert self.store is not None
        carried: list[dict[str, Any]] = []
        try:
            carried = self.store.rows(("live", "pending", "quarantined"))
        except Exception as failure:  # they stay in the file, synced once it is back
            logger.error("cannot read the unsynced sessions of the failed store: %s", failure)
        memory = Store(None)
        memory.absorb(carried)
        self.store.adopt(memory)
        self._degraded = self._path is not None
        self._retry_delay = FILE_RETRY_FIRST
        self._retry_at = self._mono_s() + self._retry_delay
        logger.error("store unavailable, recording in memory: %s", reason)
        self._status.update(store_mode="memory", last_error=reason)
        self._count({"store_failures": 1})

    def _maintain(self, stopping: bool) -> None:
        """Notice a deleted file, retry a failed one, prune to the bounds."""
        failure, self._file_failure = self._file_failure, None
        if failure is not None and not self._degraded:
            self._fall_back(failure)
        if self._recover_again:
            self._recover_again = False
            self._recover()
        if self._degraded:
            if stopping or self._mono_s() >= self._retry_at:
                self._write_back()
        elif self._path is not None:
            self._recreate_if_deleted()
        if not stopping and self._mono_s() >= self._prune_at:
            self._prune()

    def _recreate_if_deleted(self) -> None:
        from .store import Store

        store = self.store
        assert store is not None
        if not store.file_replaced():
            return
        try:
            # The old connection still reads the deleted file: take all of it along.
            rows = store.rows(("live", "pending", "quarantined"))
            counters, meta = store.counters(), store.meta()
            fresh = Store.open(self._path)
            fresh.absorb(rows)
            fresh.add_counts(counters)
            fresh.set_meta(meta)
        except Exception as failure:
            self._fall_back(f"the store file was deleted and cannot be re-created: {failure}")
            return
        store.adopt(fresh)
        logger.error(
            "the store file was deleted: re-created with %d unsynced session(s)", len(rows)
        )
        self._count({"store_recreated": 1})

    def _write_back(self) -> None:
        """Try the file again; on success it gets everything the memory store holds."""
        from .store import Store

        store = self.store
        assert store is not None
        fresh: Store | None = None
        try:
            fresh = Store.open(self._path)
            fresh.absorb(store.rows())
            fresh.add_counts(store.counters())
        except Exception as failure:
            if fresh is not None:
                fresh.close()
            self._retry_delay = min(FILE_RETRY_MAX, self._retry_delay * 2)
            self._retry_at = self._mono_s() + self._retry_delay
            logger.info(
                "the store file still fails (%s); next try in %.0f s", failure, self._retry_delay
            )
            return
        store.adopt(fresh)
        self._degraded = False
        self._keep_consent_again()
        logger.warning("the store file works again: every session written back to it")
        self._status.update(store_mode="sqlite")
        self._count({"store_restored": 1})
        self._report_salvage()

    # -- bounds and recovery -------------------------------------------------------

    def _recover(self) -> None:
        from .recovery import expire_dead_sessions

        assert self.store is not None
        now_ms = int(self._wall_s() * 1000)
        guard = None if self._settings.before_record is None else self._guard_expired
        recovered = expire_dead_sessions(
            self.store, now_ms, int(self._settings.max_session_age * 1000), guard
        )
        self._status.update(recovered=recovered)
        if recovered:
            self._uplink.after_round([], True, False)

    def _prune(self) -> None:
        assert self.store is not None
        settings = self._settings
        dropped, more = self.store.prune(
            settings.max_store_bytes, settings.retention_days * 86400, self._wall_s()
        )
        self._prune_at = self._mono_s() + (PRUNE_AGAIN_SECONDS if more else PRUNE_SECONDS)
        if dropped:
            logger.warning("store over its bounds: dropped %s", dropped)
            self._count(dropped)

    def _shut_down(self, deadline: float | None) -> None:
        """Let the uplink finish its last sync, write back if need be, close the store."""
        remaining = None if deadline is None else max(0.0, deadline - self._wall_s())
        self._uplink.join(remaining)
        if self._degraded:
            self._write_back()
        store = self.store
        if store is None:
            return
        if self._degraded:
            self._count_lost_at_exit()
        store.close()

    def _count_lost_at_exit(self) -> None:
        assert self.store is not None
        counts = self.store.outbox_counts()
        lost = counts.get("live", 0) + counts.get("pending", 0)
        if lost:
            logger.error("%d unsynced session(s) held only in memory are lost at exit", lost)
            self._count({"lost_memory_only": lost})

    def _count(self, counts: dict[str, int]) -> None:
        try:
            if self.store is not None:
                self.store.add_counts(counts)
        except Exception as failure:  # counting must never cost a session
            logger.error("cannot persist counters: %s", failure)
        self._status.add_counts(counts)

    def _refresh_outbox(self) -> None:
        assert self.store is not None
        try:
            outbox = self.store.outbox_counts()
        except Exception as failure:
            logger.error("cannot read the outbox: %s", failure)
            return
        self._status.update(outbox=outbox)
