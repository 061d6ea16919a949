"""The local SQLite store: one row per session, its owner, its record, its outbox state.

Only the agent's worker thread (or the CLI) touches a :class:`Store`. The file is
in WAL mode so several game processes can share it; every write that could race
with another process is one conditional ``UPDATE``, so two processes cannot both
take the same session.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

logger = logging.getLogger("anisota_agent")

DB_FILENAME = "agent.sqlite3"

#: Outbox states. ``live``: being recorded by its owner, not queued yet.
OUTBOX_STATES = ("live", "pending", "synced", "quarantined")
#: What goes first when the store is over its size, and the loss it counts as.
PRUNE_ORDER = (
    ("synced", None),
    ("quarantined", "pruned_quarantined"),
    ("pending", "pruned_unsynced"),
)

migrations = Migrations("anisota_agent")


@migrations()
def m001_sessions(db: Database) -> None:
    """Sessions with their owner, record and outbox fields; counters of losses."""
    db.table("sessions").create(
        {
            "rkey": str,
            "did": str,
            "status": str,
            "outbox": str,
            "owner_pid": int,
            "owner_started": float,
            "owner_token": str,
            "started_at": str,
            "last_activity_at": str,
            "local_day": str,
            "record": str,
            "attempts": int,
            "next_attempt_at": float,
            "last_error": str,
            "uri": str,
            "cid": str,
            "synced_at": float,
            "checkpointed_at": float,
        },
        pk="rkey",
        not_null={"status", "outbox", "record", "started_at"},
        defaults={"attempts": 0},
    )
    db.table("sessions").create_index(["outbox", "next_attempt_at"])
    db.table("sessions").create_index(["local_day"])
    db.table("counters").create({"name": str, "value": int}, pk="name")


@migrations()
def m002_sync(db: Database) -> None:
    """Sync bookkeeping: a write that may have reached the PDS, and the sync's own state."""
    sessions = db.table("sessions")
    # 1 while a write of this session is on the wire: after a crash or an
    # ambiguous answer the PDS may or may not hold it, so look before writing.
    sessions.add_column("in_flight", int, not_null_default=0)
    # 1 once an active version was mirrored: the final write must be a put.
    sessions.add_column("mirrored", int, not_null_default=0)
    db.table("meta").create({"key": str, "value": str}, pk="key")


@dataclass(frozen=True)
class Owner:
    """The process (and agent instance in it) that records a session."""

    pid: int
    started: float
    token: str


@dataclass(frozen=True)
class StoredSession:
    """A session row as the store holds it."""

    rkey: str
    did: str | None
    status: str
    outbox: str
    record: dict[str, Any]
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    uri: str | None
    cid: str | None
    synced_at: float | None
    owner_pid: int | None
    owner_started: float | None
    owner_token: str | None
    in_flight: bool = False
    mirrored: bool = False

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> StoredSession:
        return cls(
            rkey=row["rkey"],
            did=row["did"],
            status=row["status"],
            outbox=row["outbox"],
            record=json.loads(row["record"]),
            attempts=row["attempts"] or 0,
            next_attempt_at=row["next_attempt_at"],
            last_error=row["last_error"],
            uri=row["uri"],
            cid=row["cid"],
            synced_at=row["synced_at"],
            owner_pid=row["owner_pid"],
            owner_started=row["owner_started"],
            owner_token=row["owner_token"],
            in_flight=bool(row.get("in_flight")),
            mirrored=bool(row.get("mirrored")),
        )


def default_data_dir() -> Path:
    """The platform's user data dir for the agent (``ANISOTA_AGENT_DATA_DIR`` wins)."""
    override = os.environ.get("ANISOTA_AGENT_DATA_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_data_dir("anisota-agent", appauthor=False))


class Store:
    """The session store. ``path=None`` keeps everything in memory."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.db = Database(self._connect(path))
        migrations.apply(self.db)

    @staticmethod
    def _connect(path: Path | None) -> sqlite3.Connection:
        if path is None:
            return sqlite3.connect(":memory:")
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=5.0)
        try:
            # WAL lets a second game window read and write beside us; NORMAL sync
            # survives a crashed process (only power loss can lose the last commit).
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            # Damage found before any migration or write makes it worse.
            (verdict,) = conn.execute("PRAGMA quick_check").fetchone()
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {verdict}")
        except BaseException:
            conn.close()  # never move a file aside under an open connection
            raise
        return conn

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open the store at ``path``; a corrupt file is moved aside for a fresh one."""
        try:
            return cls(path)
        except sqlite3.DatabaseError as error:
            if not _looks_corrupt(error):
                raise
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            logger.error("store %s is corrupt (%s); moved to %s", path, error, aside)
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{path}{suffix}")
                if source.exists():
                    source.rename(Path(f"{aside}{suffix}"))
            return cls(path)

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    # -- writes of the owner -------------------------------------------------

    def checkpoint(
        self, rkey: str, did: str | None, record: dict[str, Any], owner: Owner, local_day: str
    ) -> bool:
        """Write the live session's record; False if another process took it over."""
        return self._write(rkey, did, record, owner, local_day, "live", None)

    def finalize(
        self,
        rkey: str,
        did: str | None,
        record: dict[str, Any],
        owner: Owner,
        local_day: str,
        error: str | None = None,
    ) -> bool:
        """Queue an ended session for sync, or quarantine it with ``error``.

        False if another process already took the session over (recovery).
        """
        outbox = "quarantined" if error else "pending"
        return self._write(rkey, did, record, owner, local_day, outbox, error)

    def _write(
        self,
        rkey: str,
        did: str | None,
        record: dict[str, Any],
        owner: Owner,
        local_day: str,
        outbox: str,
        error: str | None,
    ) -> bool:
        row = {
            "rkey": rkey,
            "did": did,
            "status": record["status"],
            "outbox": outbox,
            "owner_pid": owner.pid,
            "owner_started": owner.started,
            "owner_token": owner.token,
            "started_at": record["startedAt"],
            "last_activity_at": record["lastActivityAt"],
            "local_day": local_day,
            "record": json.dumps(record, separators=(",", ":")),
            "last_error": error,
            "checkpointed_at": time.time(),
        }
        # One conditional UPDATE: only the owner may write, and only while live.
        with self.db.atomic():
            cursor = self.db.execute(
                "UPDATE sessions SET did=:did, status=:status, outbox=:outbox,"
                " last_activity_at=:last_activity_at, record=:record, last_error=:last_error,"
                " checkpointed_at=:checkpointed_at"
                " WHERE rkey=:rkey AND outbox='live' AND owner_token=:owner_token",
                row,
            )
            if cursor.rowcount:
                return True
            if self.db.execute("SELECT 1 FROM sessions WHERE rkey=?", [rkey]).fetchone():
                return False
            self.db.table("sessions").insert(row)
        return True

    # -- recovery -------------------------------------------------------------

    def live_sessions(self) -> list[StoredSession]:
        """Sessions still marked ``live`` (recorded by some process right now, or crashed)."""
        return self._select("outbox = 'live'")

    def expire(self, stale: StoredSession, record: dict[str, Any], error: str | None) -> bool:
        """Queue a dead owner's session as expired; False if someone else already did."""
        cursor = self.db.execute(
            "UPDATE sessions SET status=?, outbox=?, record=?, last_error=?"
            " WHERE rkey=? AND outbox='live' AND owner_token IS ?",
            [
                record["status"],
                "quarantined" if error else "pending",
                json.dumps(record, separators=(",", ":")),
                error,
                stale.rkey,
                stale.owner_token,
            ],
        )
        self.db.conn.commit()
        return cursor.rowcount == 1

    # -- reads ----------------------------------------------------------------

    def get(self, rkey: str) -> StoredSession | None:
        """One session by record key."""
        rows = self._select("rkey = ?", [rkey])
        return rows[0] if rows else None

    def sessions(self, outbox: str | None = None, limit: int | None = None) -> list[StoredSession]:
        """Sessions, newest first, optionally only those in one outbox state."""
        where, params = ("outbox = ?", [outbox]) if outbox else ("1=1", [])
        return self._select(where, params, limit=limit)

    def iter_sessions(self) -> Iterator[StoredSession]:
        """Every session, oldest first, without loading them all at once."""
        for row in self.db["sessions"].rows_where(order_by="rkey"):
            yield StoredSession.from_row(row)

    def outbox_counts(self) -> dict[str, int]:
        """How many sessions are in each outbox state."""
        counts = dict.fromkeys(OUTBOX_STATES, 0)
        for outbox, count in self.db.execute(
            "SELECT outbox, count(*) FROM sessions GROUP BY outbox"
        ).fetchall():
            counts[outbox] = count
        return counts

    def related_rkeys(self, local_day: str, did: str, exclude: str) -> list[str]:
        """Record keys of the account's other sessions of the same local day, oldest first."""
        rows = self.db.execute(
            "SELECT rkey FROM sessions WHERE local_day = ? AND did = ? AND rkey != ? ORDER BY rkey",
            [local_day, did, exclude],
        ).fetchall()
        return [rkey for (rkey,) in rows]

    def _select(
        self, where: str, params: list[Any] | None = None, limit: int | None = None
    ) -> list[StoredSession]:
        rows = self.db.table("sessions").rows_where(
            where, params or [], order_by="rkey desc", limit=limit
        )
        return [StoredSession.from_row(row) for row in rows]

    # -- the sync's side ------------------------------------------------------

    def due_for_sync(self, did: str, now: float, limit: int) -> list[StoredSession]:
        """Pending sessions of ``did`` whose next attempt is due, oldest first."""
        rows = self.db.table("sessions").rows_where(
            "outbox = 'pending' AND did = ? AND (next_attempt_at IS NULL OR next_attempt_at <= ?)",
            [did, now],
            order_by="rkey",
            limit=limit,
        )
        return [StoredSession.from_row(row) for row in rows]

    def unattributed_count(self) -> int:
        """Ended sessions recorded while no account was known (never uploaded)."""
        row = self.db.execute(
            "SELECT count(*) FROM sessions WHERE outbox = 'pending' AND did IS NULL"
        ).fetchone()
        return int(row[0])

    def mark_in_flight(self, rkeys: list[str]) -> None:
        """Record, before sending, that these sessions' writes are about to leave."""
        self._update_many(rkeys, "in_flight = 1, attempts = attempts + 1")

    def mark_synced(self, rkey: str, uri: str, cid: str, at: float) -> None:
        """The PDS holds this session's final record."""
        self.db.execute(
            "UPDATE sessions SET outbox = 'synced', in_flight = 0, uri = ?, cid = ?,"
            " synced_at = ?, last_error = NULL, next_attempt_at = NULL WHERE rkey = ?",
            [uri, cid, at, rkey],
        )
        self.db.conn.commit()

    def mark_mirrored(self, rkey: str) -> None:
        """An active version of this session is on the PDS."""
        self._update_many([rkey], "mirrored = 1")

    def retry_later(self, rkeys: list[str], error: str, at: float, in_flight: bool) -> None:
        """A write failed; try again at ``at``. ``in_flight``: it may have landed."""
        self._update_many(
            rkeys,
            "last_error = ?, next_attempt_at = ?, in_flight = ?",
            [error, at, int(in_flight)],
        )

    def clear_backoff(self, did: str) -> None:
        """Make the account's pending sessions due at once."""
        self.db.execute(
            "UPDATE sessions SET next_attempt_at = NULL WHERE outbox = 'pending' AND did = ?",
            [did],
        )
        self.db.conn.commit()

    def settle(self, rkeys: list[str]) -> None:
        """These sessions are known not to be on the PDS: plain creates again."""
        self._update_many(rkeys, "in_flight = 0")

    def quarantine(self, rkey: str, error: str) -> None:
        """The PDS refused this record: keep it with the error, stop sending it."""
        self._update_many([rkey], "outbox = 'quarantined', in_flight = 0, last_error = ?", [error])

    def _update_many(
        self, rkeys: list[str], assignments: str, params: list[Any] | None = None
    ) -> None:
        with self.db.atomic():
            for rkey in rkeys:
                self.db.execute(
                    f"UPDATE sessions SET {assignments} WHERE rkey = ?", [*(params or []), rkey]
                )

    def set_meta(self, values: dict[str, Any]) -> None:
        """Save sync state shown by ``anisota-agent status`` (JSON values)."""
        with self.db.atomic():
            for key, value in values.items():
                self.db.execute(
                    "INSERT INTO meta(key, value) VALUES(?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    [key, json.dumps(value)],
                )

    def meta(self) -> dict[str, Any]:
        """The saved sync state."""
        return {row["key"]: json.loads(row["value"]) for row in self.db.table("meta").rows}

    # -- bounds --------------------------------------------------------------------

    def prune(self, max_bytes: int, max_age_s: float, now: float) -> dict[str, int]:
        """Keep the store within ``max_bytes`` of records and ``max_age_s`` of age.

        Synced sessions go first (they are safe on the PDS), then quarantined ones
        (the PDS refused them), and only then finished sessions not yet synced,
        oldest first; live sessions never. Returns what was dropped, by kind, for
        the loss counters (synced ones are not losses).
        """
        cutoff = now - max_age_s
        dropped: dict[str, int] = {}
        with self.db.atomic():
            self.db.execute(
                "DELETE FROM sessions WHERE outbox = 'synced' AND synced_at < ?", [cutoff]
            )
            old = self.db.execute(
                "DELETE FROM sessions WHERE outbox = 'quarantined' AND checkpointed_at < ?",
                [cutoff],
            ).rowcount
            if old:
                dropped["pruned_quarantined"] = old
            for outbox, loss in PRUNE_ORDER:
                while self._record_bytes() > max_bytes:
                    if not self._delete_oldest(outbox):
                        break
                    if loss:
                        dropped[loss] = dropped.get(loss, 0) + 1
        return dropped

    def _record_bytes(self) -> int:
        row = self.db.execute("SELECT coalesce(sum(length(record)), 0) FROM sessions").fetchone()
        return int(row[0])

    def _delete_oldest(self, outbox: str) -> bool:
        cursor = self.db.execute(
            "DELETE FROM sessions WHERE rkey = "
            "(SELECT rkey FROM sessions WHERE outbox = ? ORDER BY rkey LIMIT 1)",
            [outbox],
        )
        return cursor.rowcount > 0

    # -- counters of what the agent dropped -----------------------------------

    def add_counts(self, counts: dict[str, int]) -> None:
        """Add to the persistent loss counters."""
        with self.db.atomic():
            for name, value in counts.items():
                self.db.execute(
                    "INSERT INTO counters(name, value) VALUES(?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    [name, value],
                )

    def counters(self) -> dict[str, int]:
        """The persistent loss counters."""
        return {row["name"]: row["value"] for row in self.db["counters"].rows}

    def purge(self) -> int:
        """Delete every session and counter; returns how many sessions went."""
        with self.db.atomic():
            removed: int = self.db.execute("DELETE FROM sessions").rowcount
            self.db.execute("DELETE FROM counters")
        return removed


def _looks_corrupt(error: sqlite3.DatabaseError) -> bool:
    message = str(error).lower()
    return "malformed" in message or "not a database" in message or "corrupt" in message
