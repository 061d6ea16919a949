"""The local SQLite store: one row per session, its owner, its record, its outbox state.

Two threads share a :class:`Store`: the recorder writes sessions, the uplink syncs
them and marks the results. Every public method holds the store's re-entrant lock
for its SQLite work, so one connection serves both. :meth:`Store.adopt` swaps the
database under a store object (a fallback to memory, a re-created or salvaged
file) without the threads that hold it noticing.

The file is in WAL mode so several game processes can share it; every write that
could race with another process is one conditional ``UPDATE`` (or one ``BEGIN
IMMEDIATE`` transaction), so two processes cannot both take the same session.
The per-outbox totals that bound the store are kept by SQLite triggers, so they
stay exact whichever process writes, and nothing the recorder does per round
costs more as the store grows.

Runtime work is plain :mod:`sqlite3` (a connection in autocommit mode: a single
statement commits at once, several go in :func:`atomic` or ``BEGIN IMMEDIATE``).
The schema is kept by sqlite-utils migrations in :mod:`anisota_agent.migrations`,
imported only when a file's schema is behind :data:`MIGRATIONS`: opening a
current store costs no import of sqlite-utils, and checks only that the file is
a database (:meth:`Store.verify` runs the full check, after the first write).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

from ._files import create_private_file, make_private_dir, remove_stale_temp_files, tighten
from .records import MAX_RELATED_SESSIONS, to_json

__all__ = [
    "CONSENT_META_KEY",
    "DB_FILENAME",
    "DELETABLE_STATES",
    "LOST_UNKNOWN",
    "MIGRATIONS",
    "OUTBOX_STATES",
    "PRUNE_MAX_ROWS",
    "PRUNE_ORDER",
    "SALVAGE_STATES",
    "UNSYNCED_STATES",
    "WAL_BACKSTOP_PAGES",
    "Owner",
    "Salvage",
    "Store",
    "StoredSession",
    "WalCheckpointer",
    "atomic",
    "default_data_dir",
    "is_corrupt",
    "is_disk_fault",
    "pending_migrations",
]

logger = logging.getLogger("anisota_agent")

DB_FILENAME = "agent.sqlite3"

#: Outbox states. ``live``: being recorded by its owner, not queued yet;
#: ``pending``: ended, waiting for its sync (or for the login it was recorded
#: under); ``local``: ended with no account and no login awaited, never
#: uploaded; ``synced``: on the PDS; ``quarantined``: refused, kept with its error;
#: ``withheld``: the host's ``before_record`` guard kept it off the PDS (it
#: returned None, raised, or returned something that is not a valid record),
#: never uploaded. ``deleted``: the player deleted the account's records on the
#: PDS (``purge --remote``): kept locally, never uploaded again.
OUTBOX_STATES = ("live", "pending", "local", "synced", "quarantined", "withheld", "deleted")
#: What goes first when the store is over its size, and the loss it counts as.
PRUNE_ORDER = (
    # The player asked for these to be gone from the PDS: no loss to anyone.
    ("deleted", None),
    ("synced", None),
    ("quarantined", "pruned_quarantined"),
    # Before the pending ones: those may still reach the PDS, these never will.
    ("local", "pruned_unsynced"),
    ("withheld", "pruned_unsynced"),
    ("pending", "pruned_unsynced"),
)
#: Outbox states a corrupt file's sessions are salvaged from: all but ``synced``
#: (the PDS holds those already) and ``deleted`` (never to be uploaded).
SALVAGE_STATES = tuple(state for state in OUTBOX_STATES if state not in ("synced", "deleted"))
#: The outbox states :meth:`Store.mark_deleted` takes a session from: waiting
#: for its upload, or uploaded.
DELETABLE_STATES = ("pending", "synced")
#: The outbox states whose sessions go past ``retention_days``, by the column
#: that dates them, and the loss each counts as.
_RETENTION = (
    ("deleted", "checkpointed_at", None),
    ("synced", "synced_at", None),
    ("quarantined", "checkpointed_at", "pruned_quarantined"),
)
#: Every state but ``synced``: what a player's ``denied`` deletes.
UNSYNCED_STATES = tuple(state for state in OUTBOX_STATES if state != "synced")
#: The meta key of the consent: ``{"state": ..., "by": "player" | "host"}``.
CONSENT_META_KEY = "consent"
#: :attr:`Salvage.lost` when not even the number of sessions could be read.
LOST_UNKNOWN = -1
#: Rows :meth:`Store.prune` deletes at most per call, so one call stays short.
PRUNE_MAX_ROWS = 200

#: The sqlite-utils migration set of the store's schema (``_sqlite_migrations``).
MIGRATION_SET = "anisota_agent"
#: The names of its migrations, in order, as :mod:`anisota_agent.migrations`
#: defines them (a test keeps the two equal): a file that has applied all of
#: them opens without importing that module, nor sqlite-utils.
MIGRATIONS = (
    "m001_sessions",
    "m002_sync",
    "m003_bounds",
    "m004_local",
    "m005_consent",
    "m006_background",
)
#: The sessions of an account (``?``) due for sync at an instant (``?``).
_DUE = "outbox = 'pending' AND did = ? AND (next_attempt_at IS NULL OR next_attempt_at <= ?)"
#: Sets a meta key to a JSON text, whether it is there or not.
_UPSERT_META = (
    "INSERT INTO meta(key, value) VALUES(?, ?)"
    " ON CONFLICT(key) DO UPDATE SET value = excluded.value"
)
#: The outbox state of a session ending now (SQL over its row): ``local`` when it
#: has no account and awaits no login, else ``pending``.
_ENDED_OUTBOX = "CASE WHEN did IS NULL AND awaiting_login IS NULL THEN 'local' ELSE 'pending' END"
#: sqlite-utils' bookkeeping table: one row (migration_set, name, ...) per applied one.
_MIGRATIONS_TABLE = "_sqlite_migrations"


# The records of the store are NamedTuples, not dataclasses: importing dataclasses
# (inspect, ast, dis...) costs ~7 ms, on the way to the first write of a game.


class Owner(NamedTuple):
    """The process (and agent instance in it) that records a session."""

    pid: int
    started: float
    token: str


class StoredSession(NamedTuple):
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
    awaiting_login: str | None = None
    #: Milliseconds the game's window spent in the background during the
    #: session (local only: the record has no field for it, it is not uploaded).
    background_ms: int = 0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> StoredSession:
        """The session of a ``sessions`` row (as a column dict)."""
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
            awaiting_login=row.get("awaiting_login"),
            background_ms=row.get("background_ms") or 0,
        )


class Salvage(NamedTuple):
    """What was saved from a corrupt store file when it was replaced by a fresh one.

    ``salvaged``: sessions of the :data:`SALVAGE_STATES` (none synced) copied into
    the fresh store, owner fields kept so recovery can expire a dead owner's live
    ones. ``lost``: sessions of the old file that could not be read (their state
    unknown, so counted whatever it was); :data:`LOST_UNKNOWN` (-1) when not even
    their number could be read (the file is not a database any more). ``exact``:
    ``lost`` is an exact count (an index of the table was still readable and
    listed every session); otherwise it is an estimate that may overcount (rowids
    that failed to read, some of which may never have existed).
    """

    aside: Path
    salvaged: int
    lost: int
    exact: bool = True


def default_data_dir() -> Path:
    """The platform's user data dir for the agent (``ANISOTA_AGENT_DATA_DIR`` wins)."""
    override = os.environ.get("ANISOTA_AGENT_DATA_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_data_dir("anisota-agent", appauthor=False))


# -- failures ------------------------------------------------------------------------

#: sqlite3 errors that say something about the statement or the data, not the file.
_NOT_DISK_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
    sqlite3.DataError,
    sqlite3.NotSupportedError,
)
#: SQLite's primary result codes for a damaged file (SQLITE_CORRUPT, SQLITE_NOTADB).
_CORRUPT_CODES = (11, 26)


def is_disk_fault(error: BaseException) -> bool:
    """Whether ``error`` says the store's file (or disk) failed, not the data written.

    A disk fault (full, read-only, an I/O error, a file that cannot be opened, a
    corrupt or vanished database, a lock held too long by another process) means
    another store may do better: the caller moves to memory or a fresh file. Any
    other error (a record that cannot be encoded, a constraint, a bug) would fail
    the same way anywhere and must not degrade the store for the other sessions.
    """
    if isinstance(error, sqlite3.Error):
        return isinstance(error, sqlite3.DatabaseError) and not isinstance(error, _NOT_DISK_ERRORS)
    # A file system error; a socket's errors are OSErrors too but never come from here.
    return isinstance(error, OSError) and not isinstance(error, ConnectionError | TimeoutError)


def is_corrupt(error: BaseException) -> bool:
    """Whether ``error`` says the database file is damaged (malformed, not a database)."""
    if not isinstance(error, sqlite3.DatabaseError):
        return False
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None and (code & 0xFF) in _CORRUPT_CODES:
        return True
    message = str(error).lower()
    return "malformed" in message or "not a database" in message or "corrupt" in message


#: Pages of write-ahead log after which a commit checkpoints it itself.
WAL_BACKSTOP_PAGES = 10_000


class WalCheckpointer:
    """Copies a store's write-ahead log into its file, on a connection of its own.

    Passive checkpoints: they wait for no writer and no writer waits for them,
    and they take nothing the recorder holds (the uplink runs them between its
    rounds). One connection for the checkpointer's life, re-opened only when the
    store's file changes: closing connections to a file also open elsewhere in
    the process is what SQLite handles worst (after a fork above all).
    """

    def __init__(self) -> None:
        self._conn: sqlite3.Connection | None = None
        self._path: Path | None = None

    def checkpoint(self, path: Path) -> None:
        """One passive checkpoint of the WAL of the store at ``path``."""
        with _GATE.inside():
            if self._conn is None or self._path != path:
                self.close()
                self._conn = sqlite3.connect(str(path), timeout=1.0, isolation_level=None)
                self._path = path
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def close(self) -> None:
        """Close the connection, if one is open."""
        with _GATE.inside():
            if self._conn is not None:
                self._conn.close()
            self._conn, self._path = None, None


def _check_integrity(conn: sqlite3.Connection) -> None:
    """``PRAGMA quick_check``; damage it reports is raised as "malformed" (corrupt)."""
    (verdict,) = conn.execute("PRAGMA quick_check(1)").fetchone()
    if verdict != "ok":
        raise sqlite3.DatabaseError(f"database disk image is malformed: {verdict}")


def pending_migrations(conn: sqlite3.Connection) -> list[str]:
    """The names of :data:`MIGRATIONS` the database on ``conn`` has not applied.

    What sqlite-utils' ``Migrations.pending()`` says, read with plain SQL from its
    ``_sqlite_migrations`` table, so that a current file opens without importing
    sqlite-utils. Reading the schema is also the cheap check that the file is
    sound enough to open: a damaged schema raises "malformed" here.
    """
    if not conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [_MIGRATIONS_TABLE]
    ).fetchone():
        return list(MIGRATIONS)
    try:
        applied = {
            name
            for (name,) in conn.execute(
                f"SELECT name FROM {_MIGRATIONS_TABLE} WHERE migration_set = ?", [MIGRATION_SET]
            )
        }
    except sqlite3.OperationalError as error:
        if is_corrupt(error):
            raise
        return list(MIGRATIONS)  # a table of another shape: sqlite-utils will sort it out
    return [name for name in MIGRATIONS if name not in applied]


# -- the lock ----------------------------------------------------------------------------

_P = ParamSpec("_P")
_R = TypeVar("_R")


class _ForkGate:
    """SQLite work under way in this process, counted, so that a fork waits for it.

    A fork copies SQLite's own mutexes as they are: forked while a thread was
    inside SQLite (opening a file, checkpointing), the child finds them held
    forever and hangs at its first connection. So every entry into SQLite passes
    this gate, and ``os.fork`` waits (a second at most) until none is under way.
    """

    WAIT_SECONDS = 1.0

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = 0
        self._forking = False

    @contextmanager
    def inside(self) -> Iterator[None]:
        """Around one piece of SQLite work."""
        with self._cond:
            while self._forking:
                self._cond.wait()
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                if not self._busy:
                    self._cond.notify_all()

    def before_fork(self) -> None:
        with self._cond:
            self._forking = True
            self._cond.wait_for(lambda: not self._busy, timeout=self.WAIT_SECONDS)

    def after_fork_in_parent(self) -> None:
        with self._cond:
            self._forking = False
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        self.__init__()  # type: ignore[misc]  # the threads that held it are gone


_GATE = _ForkGate()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_GATE.before_fork,
        after_in_parent=_GATE.after_fork_in_parent,
        after_in_child=_GATE.after_fork_in_child,
    )


def _locked(method: Callable[Concatenate[Store, _P], _R]) -> Callable[Concatenate[Store, _P], _R]:
    """Run ``method`` holding the store's lock: the recorder and the uplink share it."""

    @functools.wraps(method)
    def locked(self: Store, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock, _GATE.inside():
            return method(self, *args, **kwargs)

    return locked


# -- transactions ------------------------------------------------------------------------

#: Savepoint names: unique in the process, so nested blocks never release another's.
_SAVEPOINTS = itertools.count()


@contextmanager
def atomic(conn: sqlite3.Connection, *, immediate: bool = False) -> Iterator[None]:
    """One transaction around the block, or a savepoint in the one already open.

    Nestable, as sqlite-utils' ``Database.atomic()`` is: the outermost block
    begins and commits (``BEGIN IMMEDIATE`` with ``immediate``, taking the write
    lock at once), an inner one is a savepoint its error rolls back alone. An
    error rolls the block back and is raised as it was, also when it already
    ended the whole transaction (a ``RAISE(ROLLBACK)``, a full disk); so does a
    failed ``COMMIT``. ``conn`` must be in autocommit mode (``isolation_level``
    None), as the store's connections are.
    """
    if conn.in_transaction:
        savepoint = f"anisota_{next(_SAVEPOINTS)}"
        conn.execute(f"SAVEPOINT {savepoint}")
        try:
            yield
        except BaseException:
            # The error may have ended the transaction, savepoints and all:
            # cleaning up then would hide it under "no such savepoint".
            if conn.in_transaction:
                conn.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
                conn.execute(f"RELEASE SAVEPOINT {savepoint}")
            raise
        conn.execute(f"RELEASE SAVEPOINT {savepoint}")
        return
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        _rollback(conn)
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if the error that ended the block left one."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


class Store:
    """The session store. ``path=None`` keeps everything in memory.

    Thread-safe: every public method holds the store's re-entrant lock for its
    SQLite work, and nothing else (no network, no waiting) is ever done under it.
    (The readers that return sessions decode their records after letting go of
    it, and :meth:`file_replaced` looks at the file system outside it.) ``db`` (a
    :class:`sqlite3.Connection` in autocommit mode) is the current connection; it
    changes on :meth:`adopt` and :meth:`replace_corrupt`, so never keep a
    reference to it.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.RLock()
        #: What was salvaged when this store replaced a corrupt file, else None.
        self.salvage: Salvage | None = None
        with _GATE.inside():
            conn = self._connect(path)
            try:
                self.db: sqlite3.Connection = conn
                self._migrate()
                self._identity = _identity(path)
            except BaseException:
                conn.close()  # never move a file aside under an open connection
                raise

    @staticmethod
    def _connect(path: Path | None) -> sqlite3.Connection:
        # Two threads use the connection, one at a time under the store's lock.
        # Autocommit (isolation_level None): a statement outside atomic() or
        # _immediate() commits by itself, never opening a transaction nobody ends.
        if path is None:
            conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA recursive_triggers=on")
            return conn
        # The player's data, others' to read by no umask: the dir 0700, the file
        # 0600 before SQLite opens it (its -wal and -shm take the file's mode).
        make_private_dir(path.parent)
        create_private_file(path)
        conn = sqlite3.connect(
            str(path), timeout=5.0, check_same_thread=False, isolation_level=None
        )
        try:
            # WAL lets a second game window read and write beside us; NORMAL sync
            # survives a crashed process (only power loss can lose the last commit).
            # A file that is not a database fails here already ("file is not a
            # database"), and goes the corrupt route of open().
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            # Copying the log into the file (40-90 ms with its fsync) is left to
            # checkpoint_wal(), off the recorder's path: done in a commit, it held
            # the store's lock in whichever thread's commit crossed 1,000 pages.
            # This high mark is only a backstop should nobody call it.
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
            # As sqlite-utils set it: a REPLACE's deletions fire the delete triggers.
            conn.execute("PRAGMA recursive_triggers=on")
            # Only a cheap check here (the header; pending_migrations() reads the
            # schema): the full one (verify()) takes ~1 ms on a small file and
            # 110-150 ms on a large one, and must not delay the first write.
            conn.execute("PRAGMA schema_version").fetchone()
        except BaseException:
            conn.close()
            raise
        # A -wal or -shm left by an older version (killed, so never removed) keeps
        # the mode it was made with: SQLite goes on using it as it is.
        for side in _SIDE_FILES[1:]:
            tighten(Path(f"{path}{side}"))
        return conn

    def _migrate(self) -> None:
        # Only when something is pending: a read-only file that is up to date
        # still opens (the CLI can show it), and a current one costs no import
        # of sqlite-utils (~70 ms: the first write of a game waits for it).
        if not pending_migrations(self.db):
            return
        if self._create_if_empty():
            return
        if self.path is not None:
            # Damage found before a migration rewrites the file makes it no worse
            # (instant on a fresh file; an old one migrates once, this time only).
            self._check_integrity()
        from . import migrations

        # One IMMEDIATE transaction around the whole set: two processes opening an
        # old file at once serialise here, and the second finds nothing pending
        # (sqlite-utils looks again inside it) instead of adding the same column twice.
        with atomic(self.db, immediate=True):
            migrations.apply(self.db)

    def _create_if_empty(self) -> bool:
        """Make a new database's schema from ``schema.sql``; False if it is not empty.

        What the migrations would leave, without importing sqlite-utils: a game's
        first run (and a fallback to memory, at a disk fault) writes its first
        session tens of ms sooner. Under the write lock, so two processes making
        the same new file cannot both do it.
        """
        script = Path(__file__).with_name("schema.sql").read_text()
        with atomic(self.db, immediate=True):
            if self.db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
                return False
            statement = ""
            for line in script.splitlines(keepends=True):
                statement += line
                if sqlite3.complete_statement(statement):
                    self.db.execute(statement)
                    statement = ""
            self.db.executemany(
                f"INSERT INTO {_MIGRATIONS_TABLE}(migration_set, name, applied_at)"
                " VALUES (?, ?, datetime('now'))",
                [(MIGRATION_SET, name) for name in MIGRATIONS],
            )
        return True

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open the store at ``path``; a corrupt file is moved aside for a fresh one.

        The readable unsynced sessions of a corrupt file (and its counters and
        meta) are salvaged into the fresh store, which says so in :attr:`salvage`.
        The moved-aside file is only read, never changed.

        Only a cheap check is done here: a file that is not a database, or whose
        schema cannot be read, is corrupt at once; damage elsewhere in the file
        is found by :meth:`verify` (the uplink runs it at start, off the recorder's way) or
        by the first statement that reads it (then see :meth:`replace_corrupt`).
        """
        store = cls._open_or_salvage(path)
        # Every start opens the store here first (the recorder, on its thread,
        # before its first write; the CLI too), whether the login is kept in the
        # file or the keyring: the place to clear what a killed token write left
        # (FileTokenStore.save's temp file, holding a refresh token). A listing
        # of a few entries; psutil is imported only if one is there to judge.
        remove_stale_temp_files(path.parent)
        return store

    @classmethod
    def _open_or_salvage(cls, path: Path) -> Store:
        try:
            return cls(path)
        except sqlite3.DatabaseError as error:
            if not is_corrupt(error):
                raise
            aside = _move_aside(path)
            logger.error("store %s is corrupt (%s); moved to %s", path, error, aside)
        recovered = _read_aside(aside)
        store = cls(path)
        store.salvage = store._take(recovered, aside)
        return store

    def verify(self) -> Salvage | None:
        """Check the whole file (``PRAGMA quick_check``); replace it if it is damaged.

        None when the file is sound (and for an in-memory store, which has no
        file). When the check reports damage, or fails with an error
        :func:`is_corrupt` recognises, does what :meth:`replace_corrupt` does
        (the file moved aside, its readable unsynced sessions salvaged into a
        fresh one, this object going on with it) and returns the
        :class:`Salvage`; raises as it does when that fails. Any other error of
        the check (an I/O error) is raised.

        Reads the whole file (70 ms at 13,000 sessions, 110-150 ms at 100,000),
        on a connection of its own and without the store's lock: the recorder
        goes on writing meanwhile (the uplink runs it, once, at start).
        """
        path = self.path
        if path is None:
            return None
        try:
            with _GATE.inside():
                conn = sqlite3.connect(str(path), timeout=5.0, isolation_level=None)
                try:
                    _check_integrity(conn)
                finally:
                    conn.close()
        except sqlite3.DatabaseError as error:
            if not is_corrupt(error):
                raise
            logger.error("store %s failed its integrity check: %s", self.path, error)
            return self.replace_corrupt()
        return None

    def _check_integrity(self) -> None:
        _check_integrity(self.db)

    @_locked
    def replace_corrupt(self) -> Salvage:
        """Replace this store's file, found corrupt while running, by a fresh one.

        For a write (or read) that raised an error :func:`is_corrupt` recognises:
        closes the connection, moves the file aside as :meth:`open` does, salvages
        its readable unsynced sessions, counters and meta, and continues on a
        fresh file at the same path (this object; threads holding it notice
        nothing). Returns the :class:`Salvage`, also kept in :attr:`salvage`.

        If the file cannot be moved aside, or the fresh one cannot be created (the
        disk failed as well), this store continues in memory (``path`` None) with
        what could be salvaged, and the error is raised: it never keeps a closed
        connection. Raises :class:`ValueError` for an in-memory store.
        """
        path = self.path
        if path is None:
            raise ValueError("an in-memory store has no file to replace")
        # Under the lock throughout, file moves and salvage included: the
        # connection is closed meanwhile, and the other thread must wait for the
        # fresh one rather than fail on it (a rare, bounded wait).
        _close_quietly(self.db)
        try:
            aside = _move_aside(path)
        except BaseException:
            self.adopt(Store(None))
            raise
        logger.error("store %s is corrupt; moved to %s", path, aside)
        recovered = _read_aside(aside)
        try:
            fresh = Store(path)
        except BaseException:
            memory = Store(None)
            salvage = memory._take(recovered, aside)
            self.adopt(memory)
            self.salvage = salvage
            raise
        salvage = fresh._take(recovered, aside)
        self.adopt(fresh)
        self.salvage = salvage
        return salvage

    def _take(self, recovered: _Recovered, aside: Path) -> Salvage:
        """Fill this (fresh) store with what was read from a corrupt file."""
        with self._lock:
            salvaged = self.absorb(recovered.rows)
            try:
                self.add_counts(recovered.counters)
                with self._immediate():
                    self.db.executemany(_UPSERT_META, list(recovered.meta.items()))
            except sqlite3.Error as error:  # counters are worth less than sessions
                logger.error("cannot copy the counters of the corrupt store: %s", error)
        salvage = Salvage(aside, salvaged, recovered.lost, recovered.exact)
        logger.info("salvaged from %s: %s", aside, salvage)
        return salvage

    @_locked
    def adopt(self, other: Store, carry: tuple[str, ...] | None = None) -> None:
        """Continue on ``other``'s database: its connection, path and salvage.

        This object's own connection is closed (an error in closing a failed
        file is ignored). Threads holding this object go on with the new database
        from their next call. ``other`` is spent: its methods then fail as on a
        closed store, and closing it leaves the adopted connection open.

        ``carry``: outbox states whose sessions are first copied into ``other``
        (by :meth:`absorb`), under both stores' locks, so that no write another
        thread makes between the copy and the switch stays behind in the old
        database. If reading them fails (the old file failed), nothing changes
        and the error is raised: copy what can be copied, then adopt without.
        """
        if other is self:
            return
        with other._lock:
            if carry is not None:
                other.absorb(self.rows(carry))
            old = self.db
            self.db, self.path, self._identity = other.db, other.path, other._identity
            self.salvage = other.salvage
            other.db = _closed_database()
        _close_quietly(old)

    @_locked
    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    def file_replaced(self) -> bool:
        """Whether the file at :attr:`path` is no longer the one this store opened.

        True if it was deleted or replaced by another file (the connection still
        works on the old, unlinked inode, which nobody will ever see again). False
        for an in-memory store, and when the path cannot be looked at for another
        reason (a permission problem is not a replaced file).
        """
        # The lock covers reading which file this is, not the stat: that is file
        # system work, and a slow file system must not stall the other thread.
        with self._lock:
            path, identity = self.path, self._identity
        if path is None or identity is None:
            return False
        try:
            stat = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) != identity

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the store and one write transaction around the block.

        Every write inside commits at once at its end (or none does, on an
        error): the recorder writes a whole round's sessions with one commit.
        """
        with self._lock, _GATE.inside(), atomic(self.db, immediate=True):
            yield

    def _immediate(self) -> AbstractContextManager[None]:
        """One write transaction taken at once (``BEGIN IMMEDIATE``), or a savepoint in one.

        Taking the write lock first means another process cannot change what a
        transaction read before it writes (a deferred one would fail with BUSY).
        """
        return atomic(self.db, immediate=True)

    # -- writes of the owner -------------------------------------------------

    @_locked
    def checkpoint(
        self,
        rkey: str,
        did: str | None,
        record: dict[str, Any],
        owner: Owner,
        local_day: str,
        *,
        awaiting_login: str | None = None,
        background_ms: int = 0,
    ) -> bool:
        """Write the live session's record; False if another process took it over.

        ``awaiting_login``: the tag of the login under way while ``did`` is unknown
        (see :meth:`attribute`). ``background_ms``: the session's time in the
        background so far, kept beside the record (never in it).
        """
        return self._write(
            rkey, did, record, owner, local_day, "live", None, awaiting_login, background_ms
        )

    @_locked
    def finalize(
        self,
        rkey: str,
        did: str | None,
        record: dict[str, Any],
        owner: Owner,
        local_day: str,
        error: str | None = None,
        *,
        awaiting_login: str | None = None,
        withheld: bool = False,
        background_ms: int = 0,
    ) -> bool:
        """Queue an ended session for sync, or quarantine it with ``error``.

        ``withheld``: the host's guard kept it off the PDS (``error`` says why):
        stored ``withheld``, never uploaded. False if another process already
        took the session over (recovery).
        """
        if withheld:
            outbox = "withheld"
        elif error:
            outbox = "quarantined"
        elif did is None and awaiting_login is None:
            outbox = "local"  # unless the stored row has an account by now: see _write
        else:
            outbox = "pending"
        return self._write(
            rkey, did, record, owner, local_day, outbox, error, awaiting_login, background_ms
        )

    def _write(
        self,
        rkey: str,
        did: str | None,
        record: dict[str, Any],
        owner: Owner,
        local_day: str,
        outbox: str,
        error: str | None,
        awaiting_login: str | None,
        background_ms: int,
    ) -> bool:
        text = to_json(record)
        row = {
            "rkey": rkey,
            "did": did,
            "status": record["status"],
            "outbox": outbox,
            "owner_pid": owner.pid,
            "owner_started": owner.started,
            "owner_token": owner.token,
            "started_at": record["startedAt"],
            # Optional in the lexicon: a guard may leave it out.
            "last_activity_at": record.get("lastActivityAt"),
            "local_day": local_day,
            "record": text,
            "record_bytes": len(text),
            "last_error": error,
            "checkpointed_at": time.time(),
            # A session whose account is known awaits no login.
            "awaiting_login": None if did is not None else awaiting_login,
            "background_ms": background_ms,
        }
        # One statement, so nothing can come between a look and a write: a new
        # session is inserted; an existing one is written only by its owner and
        # only while live (else nothing changes: taken over). A did the row
        # already has (attributed after a login) is never undone.
        columns, values = ", ".join(row), ", ".join(f":{column}" for column in row)
        cursor = self.db.execute(
            f"INSERT INTO sessions ({columns}) VALUES ({values}) ON CONFLICT(rkey) DO UPDATE SET"
            " did = coalesce(excluded.did, sessions.did),"
            " awaiting_login = CASE WHEN coalesce(excluded.did, sessions.did) IS NULL"
            " THEN excluded.awaiting_login END,"
            " status = excluded.status,"
            " outbox = CASE WHEN excluded.outbox = 'local' AND sessions.did IS NOT NULL"
            " THEN 'pending' ELSE excluded.outbox END,"
            " last_activity_at = excluded.last_activity_at, record = excluded.record,"
            " record_bytes = excluded.record_bytes, last_error = excluded.last_error,"
            " checkpointed_at = excluded.checkpointed_at, background_ms = excluded.background_ms"
            " WHERE sessions.outbox = 'live' AND sessions.owner_token = excluded.owner_token",
            row,
        )
        return bool(cursor.rowcount)

    @_locked
    def attribute(self, tag: str, did: str | None, *, not_owner: str | None = None) -> int:
        """Give ``did`` to the sessions recorded while login ``tag`` was under way.

        Only sessions with no account yet and not synced; returns how many. None:
        the login failed, its ended sessions are ``local``. ``not_owner``: only
        sessions some other process recorded (not the owner with this token).
        """
        cursor = self.db.execute(
            "UPDATE sessions SET did = ?, awaiting_login = NULL,"
            " outbox = CASE WHEN outbox = 'pending' AND ? IS NULL THEN 'local' ELSE outbox END"
            " WHERE did IS NULL AND awaiting_login = ? AND outbox != 'synced'"
            " AND owner_token IS NOT ?",
            [did, did, tag, not_owner],
        )
        return int(cursor.rowcount)

    # -- recovery -------------------------------------------------------------

    def live_sessions(self) -> list[StoredSession]:
        """Sessions still marked ``live`` (recorded by some process right now, or crashed)."""
        return self._select("outbox = 'live'")

    @_locked
    def expire(
        self,
        stale: StoredSession,
        record: dict[str, Any],
        error: str | None,
        *,
        withheld: bool = False,
    ) -> bool:
        """Queue a dead owner's session as expired; False if someone else already did.

        ``withheld``: the host's guard kept it off the PDS (see :meth:`finalize`).
        """
        text = to_json(record)
        # checkpointed_at: the latest write of the row, which absorb() compares.
        outbox = "'withheld'" if withheld else "'quarantined'" if error else _ENDED_OUTBOX
        cursor = self.db.execute(
            f"UPDATE sessions SET status=?, outbox={outbox}, record=?, record_bytes=?,"
            " last_error=?, checkpointed_at=? WHERE rkey=? AND outbox='live' AND owner_token IS ?",
            [
                record["status"],
                text,
                len(text),
                error,
                time.time(),
                stale.rkey,
                stale.owner_token,
            ],
        )
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

    def iter_sessions(self, page: int = 256) -> Iterator[StoredSession]:
        """Every session, oldest first, without loading them all at once.

        Read ``page`` sessions at a time, each page under the lock: the caller's
        work between sessions never holds the store.
        """
        after = ""
        while True:
            rows = self._fetch("rkey > ?", [after], "rkey", page)
            for row in rows:
                yield StoredSession.from_row(row)
            if len(rows) < page:
                return
            after = rows[-1]["rkey"]

    def rows(self, outboxes: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """The raw rows (column dicts) in these outbox states (None: all), oldest first.

        What :meth:`absorb` takes: for moving sessions between stores.
        """
        where, params = "1=1", list(outboxes or ())
        if outboxes is not None:
            where = f"outbox IN ({', '.join('?' for _ in outboxes)})"
        return self._fetch(where, params, "rkey")

    @_locked
    def outbox_counts(self) -> dict[str, int]:
        """How many sessions are in each outbox state (every state present)."""
        counts = dict.fromkeys(OUTBOX_STATES, 0)
        for outbox, count in self.db.execute("SELECT outbox, sessions FROM outbox_totals"):
            if count or outbox in counts:
                counts[outbox] = count
        return counts

    @_locked
    def record_bytes_total(self) -> int:
        """The size of every stored record together (what ``max_store_bytes`` bounds)."""
        (total,) = self.db.execute("SELECT coalesce(sum(bytes), 0) FROM outbox_totals").fetchone()
        return int(total)

    @_locked
    def related_rkeys(
        self, local_day: str, did: str, exclude: str, limit: int = MAX_RELATED_SESSIONS
    ) -> list[str]:
        """Record keys of the account's newest ``limit`` other sessions of the same
        local day, oldest first.

        Bounded on purpose: a record lists no more, and a day of thousands of
        sessions must not make every write read them all.
        """
        rows = self.db.execute(
            "SELECT rkey FROM sessions WHERE local_day = ? AND did = ? AND rkey != ?"
            " ORDER BY rkey DESC LIMIT ?",
            [local_day, did, exclude, limit],
        ).fetchall()
        return [rkey for (rkey,) in reversed(rows)]

    def _select(
        self, where: str, params: list[Any] | None = None, limit: int | None = None
    ) -> list[StoredSession]:
        rows = self._fetch(where, params or [], "rkey DESC", limit)
        return [StoredSession.from_row(row) for row in rows]

    def _fetch(
        self, where: str, params: list[Any], order: str, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Session rows as column dicts, read under the lock.

        Only the reading holds the lock: decoding the records (JSON, two thirds of
        the cost of a batch of 1,000) is done by the caller after it, so the
        uplink's reads never hold up the recorder's writes for longer than SQLite
        needs.
        """
        sql = f"SELECT * FROM sessions WHERE {where} ORDER BY {order}"
        if limit is not None:
            sql, params = f"{sql} LIMIT ?", [*params, limit]
        with self._lock:
            cursor = self.db.execute(sql, params)
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, values, strict=True)) for values in cursor]

    # -- moving sessions between stores --------------------------------------------------

    @_locked
    def absorb(self, rows: Iterable[dict[str, Any]]) -> int:
        """Upsert ``rows`` (from :meth:`rows`, of this or another store) in one transaction.

        A row whose rkey is already here replaces the one here, except when:

        * the one here is ``synced``: the PDS holds it, nothing may undo that;
        * the one here is ``deleted``: the player deleted it on the PDS, and a
          copy taken before must not queue it again;
        * the one here was written later (``checkpointed_at``) and the incoming
          one is not ``synced``: another process sharing the file went on with
          that session after the copy was taken, so the copy is stale.

        Columns this schema lacks are ignored, those the row lacks take their
        defaults, and ``record_bytes`` is recomputed. Returns how many rows were
        inserted or replaced.
        """
        columns = [row[1] for row in self.db.execute("PRAGMA table_info(sessions)")]
        prepared = [_prepared(row, columns) for row in rows]
        if not prepared:
            return 0
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "rkey")
        sql = (
            f"INSERT INTO sessions ({', '.join(columns)})"
            f" VALUES ({', '.join(':' + c for c in columns)})"
            f" ON CONFLICT(rkey) DO UPDATE SET {updates}"
            " WHERE sessions.outbox NOT IN ('synced', 'deleted') AND (excluded.outbox = 'synced'"
            " OR sessions.checkpointed_at IS NULL OR excluded.checkpointed_at IS NULL"
            " OR excluded.checkpointed_at >= sessions.checkpointed_at)"
        )
        with self._immediate():
            changed = 0
            # One row at a time: executemany's rowcount is not reliable for upserts
            # on every Python version.
            for row in prepared:
                changed += self.db.execute(sql, row).rowcount
        return changed

    # -- the sync's side ------------------------------------------------------

    def due_for_sync(self, did: str, now: float, limit: int) -> list[StoredSession]:
        """Pending sessions of ``did`` whose next attempt is due, oldest first."""
        rows = self._fetch(_DUE, [did, now], "rkey", limit)
        return [StoredSession.from_row(row) for row in rows]

    @_locked
    def count_due(self, did: str, now: float) -> int:
        """How many sessions :meth:`due_for_sync` would return without a limit.

        A count on the ``(outbox, did, rkey)`` index: no record is read or decoded.
        """
        sql = f"SELECT count(*) FROM sessions WHERE {_DUE}"
        (count,) = self.db.execute(sql, [did, now]).fetchone()
        return int(count)

    @_locked
    def mark_in_flight(self, rkeys: list[str]) -> None:
        """Record, before sending, that these sessions' writes are about to leave."""
        self._update_many(rkeys, "in_flight = 1, attempts = attempts + 1")

    @_locked
    def mark_synced(self, rkey: str, uri: str, cid: str, at: float) -> None:
        """The PDS holds this session's final record."""
        self.mark_synced_many([(rkey, uri, cid)], at)

    @_locked
    def mark_synced_many(self, marks: list[tuple[str, str, str]], at: float) -> None:
        """The PDS holds these sessions' final records: ``(rkey, uri, cid)`` each.

        One commit for a whole batch's answers, not one a session.
        """
        with atomic(self.db):
            self.db.executemany(
                "UPDATE sessions SET outbox = 'synced', in_flight = 0, uri = ?, cid = ?,"
                " synced_at = ?, last_error = NULL, next_attempt_at = NULL WHERE rkey = ?",
                [(uri, cid, at, rkey) for rkey, uri, cid in marks],
            )

    @_locked
    def mark_mirrored(self, rkey: str) -> None:
        """An active version of this session is on the PDS."""
        self._update_many([rkey], "mirrored = 1")

    @_locked
    def retry_later(self, rkeys: list[str], error: str, at: float, in_flight: bool) -> None:
        """A write failed; try again at ``at``. ``in_flight``: it may have landed."""
        self._update_many(
            rkeys,
            "last_error = ?, next_attempt_at = ?, in_flight = ?",
            [error, at, int(in_flight)],
        )

    @_locked
    def clear_backoff(self, did: str) -> None:
        """Make the account's pending sessions due at once."""
        self.db.execute(
            "UPDATE sessions SET next_attempt_at = NULL WHERE outbox = 'pending' AND did = ?",
            [did],
        )

    @_locked
    def settle(self, rkeys: list[str]) -> None:
        """These sessions are known not to be on the PDS: plain creates again."""
        self._update_many(rkeys, "in_flight = 0")

    @_locked
    def quarantine(self, rkey: str, error: str) -> None:
        """The PDS refused this record: keep it with the error, stop sending it."""
        self._update_many([rkey], "outbox = 'quarantined', in_flight = 0, last_error = ?", [error])

    @_locked
    def mark_deleted(self, did: str) -> int:
        """Never upload the sessions of ``did`` again: its records were deleted on the PDS.

        Its pending and synced sessions become ``deleted`` (kept locally, pruned
        first); returns how many. Live ones are their recorder's (it writes
        only while they are live) and quarantined ones are never uploaded anyway.
        One statement, so a sync round cannot come between a look and the mark.
        """
        states = ", ".join(f"'{state}'" for state in DELETABLE_STATES)
        cursor = self.db.execute(
            "UPDATE sessions SET outbox = 'deleted', in_flight = 0, next_attempt_at = NULL"
            f" WHERE did = ? AND outbox IN ({states})",
            [did],
        )
        return int(cursor.rowcount)

    def _update_many(
        self, rkeys: list[str], assignments: str, params: list[Any] | None = None
    ) -> None:
        with self._immediate():
            self.db.executemany(
                f"UPDATE sessions SET {assignments} WHERE rkey = ?",
                [[*(params or []), rkey] for rkey in rkeys],
            )

    @_locked
    def set_meta(self, values: dict[str, Any]) -> None:
        """Save sync state shown by ``anisota-agent status`` (JSON values)."""
        with self._immediate():
            self.db.executemany(
                _UPSERT_META, [[key, to_json(value)] for key, value in values.items()]
            )

    @_locked
    def consent(self) -> dict[str, Any] | None:
        """The stored consent, ``{"state": ..., "by": "player" | "host"}``; None if none."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [CONSENT_META_KEY]).fetchone()
        if row is None:
            return None
        try:
            value = json.loads(row[0])
        except (TypeError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    @_locked
    def set_consent(self, state: str, by: str) -> None:
        """Keep the consent ``state``, chosen ``by`` the player or the host's default."""
        self.set_meta({CONSENT_META_KEY: {"state": state, "by": by}})

    @_locked
    def delete_unsynced(self) -> int:
        """Delete every session not on the PDS (all but ``synced``); returns how many."""
        with self._immediate():
            cursor = self.db.execute(
                f"DELETE FROM sessions WHERE outbox IN ({', '.join('?' for _ in UNSYNCED_STATES)})",
                list(UNSYNCED_STATES),
            )
        return int(cursor.rowcount)

    @_locked
    def meta(self) -> dict[str, Any]:
        """The saved sync state."""
        return {
            key: json.loads(value) for key, value in self.db.execute("SELECT key, value FROM meta")
        }

    # -- bounds --------------------------------------------------------------------

    @_locked
    def prune(
        self, max_bytes: int, max_age_s: float, now: float, max_rows: int = PRUNE_MAX_ROWS
    ) -> tuple[dict[str, int], bool]:
        """Keep the store within ``max_bytes`` of records and ``max_age_s`` of age.

        Deleted and synced sessions past retention go first, then quarantined
        ones past retention; then, while over ``max_bytes``: deleted sessions
        (the player deleted them on the PDS), synced ones (they are safe on the
        PDS), then quarantined ones (the PDS refused them), and only then finished
        sessions not yet synced, oldest first; live sessions never.

        At most ``max_rows`` rows go per call, so a call stays short whatever the
        store's size. Returns what was dropped, by kind, for the loss counters
        (synced ones are not losses), and whether more is left to prune (call
        again soon).
        """
        cutoff = now - max_age_s
        dropped: dict[str, int] = {}
        budget = max_rows
        with self._immediate():
            for outbox, column, loss in _RETENTION:
                if budget <= 0:
                    break
                old = self.db.execute(
                    "DELETE FROM sessions WHERE rkey IN (SELECT rkey FROM sessions"
                    f" WHERE outbox = ? AND {column} < ? LIMIT ?)",
                    [outbox, cutoff, budget],
                ).rowcount
                budget -= old
                if loss and old:
                    dropped[loss] = dropped.get(loss, 0) + old
            excess = self._total_bytes() - max_bytes
            for outbox, loss in PRUNE_ORDER:
                if excess <= 0 or budget <= 0:
                    break
                freed, count = self._delete_oldest(outbox, excess, budget)
                excess -= freed
                budget -= count
                if loss and count:
                    dropped[loss] = dropped.get(loss, 0) + count
            more = budget <= 0 and self._prunable(excess > 0, cutoff)
        return dropped, more

    def _total_bytes(self) -> int:
        (total,) = self.db.execute("SELECT coalesce(sum(bytes), 0) FROM outbox_totals").fetchone()
        return int(total)

    def _delete_oldest(self, outbox: str, excess: int, budget: int) -> tuple[int, int]:
        """Delete the oldest sessions of ``outbox`` until ``excess`` bytes are freed.

        At most ``budget`` of them; returns the bytes freed and the rows deleted.
        Walks (rkey, size) pairs along an index, then deletes them all in one
        statement: no re-sum of the table per deletion.
        """
        freed, count, last = 0, 0, None
        cursor = self.db.execute(
            "SELECT rkey, record_bytes FROM sessions WHERE outbox = ? ORDER BY rkey LIMIT ?",
            [outbox, budget],
        )
        for rkey, size in cursor:
            freed, count, last = freed + size, count + 1, rkey
            if freed >= excess:
                break
        cursor.close()
        if last is None:
            return 0, 0
        # Under the IMMEDIATE transaction nobody else wrote since the walk: these
        # are exactly the rows walked.
        deleted = self.db.execute(
            "DELETE FROM sessions WHERE outbox = ? AND rkey <= ?", [outbox, last]
        ).rowcount
        return freed, int(deleted)

    def _prunable(self, over_bytes: bool, cutoff: float) -> bool:
        """Whether a next prune call would find something (the budget ran out)."""
        if (
            over_bytes
            and self.db.execute(
                "SELECT 1 FROM outbox_totals WHERE sessions > 0"
                f" AND outbox IN ({', '.join('?' for _ in PRUNE_ORDER)})",
                [outbox for outbox, _ in PRUNE_ORDER],
            ).fetchone()
        ):
            return True
        return any(
            self.db.execute(
                f"SELECT 1 FROM sessions WHERE outbox = ? AND {column} < ? LIMIT 1",
                [outbox, cutoff],
            ).fetchone()
            for outbox, column, _ in _RETENTION
        )

    # -- counters of what the agent dropped -----------------------------------

    @_locked
    def add_counts(self, counts: dict[str, int]) -> None:
        """Add to the persistent loss counters."""
        with self._immediate():
            self.db.executemany(
                "INSERT INTO counters(name, value) VALUES(?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                list(counts.items()),
            )

    @_locked
    def counters(self) -> dict[str, int]:
        """The persistent loss counters."""
        return dict(self.db.execute("SELECT name, value FROM counters").fetchall())

    @_locked
    def purge(self) -> int:
        """Delete every session and counter; returns how many sessions went."""
        with self._immediate():
            # The triggers keep outbox_totals right row by row (a DELETE with no
            # WHERE on a table with triggers is not truncated wholesale).
            removed: int = self.db.execute("DELETE FROM sessions").rowcount
            self.db.execute("DELETE FROM counters")
        return removed


# -- helpers of the store ---------------------------------------------------------------


def _identity(path: Path | None) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the store's file: how a replaced file is recognised."""
    if path is None:
        return None
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _close_quietly(db: sqlite3.Connection) -> None:
    """Close a connection whose file may have failed; its errors no longer matter."""
    try:
        db.close()
    except Exception as error:
        logger.debug("closing the old store connection failed: %s", error)


def _closed_database() -> sqlite3.Connection:
    """A connection that fails every use, for a store whose connection another adopted."""
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.close()
    return db


def _prepared(row: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    """``row`` with exactly this schema's columns, defaults filled, size recomputed."""
    values = {column: row.get(column) for column in columns}
    for column in ("attempts", "in_flight", "mirrored", "background_ms"):
        if column in values and values[column] is None:
            values[column] = 0
    if "record_bytes" in values:
        values["record_bytes"] = len(row["record"])
    return values


_SIDE_FILES = ("", "-wal", "-shm")


def _move_aside(path: Path) -> Path:
    """Move a corrupt store (and its WAL side files) to a new ``.corrupt-<time>`` name."""
    stamp = int(time.time())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    suffix = 1
    while any(Path(f"{aside}{side}").exists() for side in _SIDE_FILES):
        aside = path.with_name(f"{path.name}.corrupt-{stamp}.{suffix}")
        suffix += 1
    for side in _SIDE_FILES:
        source = Path(f"{path}{side}")
        if source.exists():
            target = Path(f"{aside}{side}")
            source.rename(target)
            # Kept for the player to inspect, private as the store was (an older
            # version's file may be 0644). The salvage opens it read-only after
            # this: a -shm SQLite makes for it takes the file's mode.
            tighten(target)
    return aside


# -- salvage of a corrupt file ----------------------------------------------------------


class _Recovered(NamedTuple):
    """What could be read from a corrupt file."""

    rows: list[dict[str, Any]]
    counters: dict[str, int]
    meta: dict[str, str]
    lost: int
    exact: bool


#: Positions read one by one past an unreadable spot, when no index says which
#: rowids exist nor where the table ends, before giving up on the rest.
_BLIND_PROBES = 65536


def _open_read_only(aside: Path) -> sqlite3.Connection:
    """A read-only connection that leaves the moved-aside file exactly as it is.

    Without a WAL beside it the file is opened ``immutable`` (no locks, no
    ``-wal``/``-shm`` created); with one, read-only, so its last commits count.
    """
    uri = aside.resolve().as_uri()
    has_wal = Path(f"{aside}-wal").exists()
    query = "?mode=ro" if has_wal else "?mode=ro&immutable=1"
    return sqlite3.connect(uri + query, uri=True)


def _read_aside(aside: Path) -> _Recovered:
    """Read every row still readable from the corrupt file at ``aside``."""
    try:
        conn = _open_read_only(aside)
    except sqlite3.Error as error:
        logger.error("cannot open the corrupt store %s at all: %s", aside, error)
        return _Recovered([], {}, {}, LOST_UNKNOWN, False)
    try:
        return _read_sessions(conn, aside)
    finally:
        conn.close()


def _read_sessions(conn: sqlite3.Connection, aside: Path) -> _Recovered:
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(sessions)")]
    except sqlite3.Error as error:
        columns = []
        logger.error("the corrupt store %s has no readable schema: %s", aside, error)
    counters = _read_pairs(conn, "SELECT name, value FROM counters")
    meta = _read_pairs(conn, "SELECT key, value FROM meta")
    if not columns:
        return _Recovered([], counters, meta, LOST_UNKNOWN, False)
    expected = _listed_rowids(conn)
    readable, failed = _scan_rows(conn, expected)
    good = {rowid: row for rowid, row in readable.items() if _usable(row)}
    if expected is not None:
        lost, exact = len(expected - good.keys()), True
    else:
        lost, exact = failed + len(readable) - len(good), False
    rows = [row for row in good.values() if row["outbox"] in SALVAGE_STATES]
    return _Recovered(rows, counters, meta, lost, exact)


def _read_pairs(conn: sqlite3.Connection, sql: str) -> dict[str, Any]:
    try:
        return {key: value for key, value in conn.execute(sql) if isinstance(key, str)}
    except sqlite3.Error:
        return {}


def _listed_rowids(conn: sqlite3.Connection) -> set[int] | None:
    """The rowids of every session, from the first full index still readable.

    An index lives on other pages than the table's rows: it usually still lists
    the sessions a damaged table page held, which makes the loss an exact count.
    """
    try:
        indexes = [row[1] for row in conn.execute("PRAGMA index_list(sessions)") if not row[4]]
    except sqlite3.Error:
        return None
    for name in indexes:
        quoted = name.replace('"', '""')
        try:
            rowids = {
                rowid
                for (rowid,) in conn.execute(f'SELECT rowid FROM sessions INDEXED BY "{quoted}"')
            }
        except sqlite3.Error:
            continue
        return rowids
    return None


def _scan_rows(
    conn: sqlite3.Connection, expected: set[int] | None
) -> tuple[dict[int, dict[str, Any]], int]:
    """Every readable row by rowid, and how many rowids failed to read.

    Reads in rowid order; past a spot that fails, tries the next rowids one by one
    (those the index lists, else every position) and resumes the ordered read from
    the first that works. One unreadable page costs only its own rows.
    """
    listed = sorted(expected) if expected is not None else None
    end = _last_rowid(conn, listed)
    rows: dict[int, dict[str, Any]] = {}
    # since_found: positions tried since the last row read, for the blind case.
    failed, position, since_found = 0, 0, 0
    while True:
        try:
            cursor = conn.execute(
                "SELECT rowid, * FROM sessions WHERE rowid > ? ORDER BY rowid", [position]
            )
            names = [column[0] for column in cursor.description][1:]
            for values in cursor:
                position, since_found = values[0], 0
                rows[position] = dict(zip(names, values[1:], strict=True))
            return rows, failed
        except sqlite3.Error:
            pass
        # The row after ``position`` cannot be read: step over it, one rowid at a time.
        while True:
            if listed is not None:
                index = bisect.bisect_right(listed, position)
                if index == len(listed):
                    return rows, failed
                candidate = listed[index]
            else:
                candidate = position + 1
                if (end is not None and candidate > end) or since_found >= _BLIND_PROBES:
                    return rows, failed
            position, since_found = candidate, since_found + 1
            try:
                cursor = conn.execute("SELECT rowid, * FROM sessions WHERE rowid = ?", [candidate])
                names = [column[0] for column in cursor.description][1:]
                found = cursor.fetchone()
            except sqlite3.Error:
                failed += 1
                continue
            if found is not None:
                rows[candidate], since_found = dict(zip(names, found[1:], strict=True)), 0
            break  # readable here: back to the ordered read after it


def _last_rowid(conn: sqlite3.Connection, listed: list[int] | None) -> int | None:
    try:
        (last,) = conn.execute("SELECT max(rowid) FROM sessions").fetchone()
    except sqlite3.Error:
        last = None
    if listed:
        return max(last or 0, listed[-1])
    return int(last) if last is not None else None


def _usable(row: dict[str, Any]) -> bool:
    """Whether a row read from a damaged file is a session and not garbage."""
    text = row.get("record")
    if not isinstance(text, str):  # a blob where the text was: garbage
        return False
    try:
        record = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(record, dict)
        and isinstance(row.get("rkey"), str)
        and row.get("outbox") in OUTBOX_STATES
        and isinstance(row.get("status"), str)
        and isinstance(row.get("started_at"), str)
    )
