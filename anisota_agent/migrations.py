"""The store's schema versions: sqlite-utils migrations, imported only to apply them.

:mod:`anisota_agent.store` does all its runtime work with plain :mod:`sqlite3` and
imports this module (and sqlite-utils with it, ~70 ms of imports: click, pluggy,
dateutil...) only when a file's ``_sqlite_migrations`` table says one of
:data:`~anisota_agent.store.MIGRATIONS` is not applied yet: a fresh file, or one
an older agent left. A store whose schema is current opens without it, so a
game's first session is committed within milliseconds of ``start()``.

A new migration is added here *and* its name appended to
:data:`~anisota_agent.store.MIGRATIONS` (a test checks the two agree).
"""

from __future__ import annotations

import sqlite3

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

__all__ = ["apply", "migrations"]

#: Named as :data:`anisota_agent.store.MIGRATION_SET` (a test keeps the two equal): the
#: store imports this module, never the other way round.
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


# The totals change with every row, in SQL, so every process sharing the file
# keeps them exact, and reading them never scans the sessions. (Not INSERT OR
# IGNORE: an outer statement's conflict policy, an upsert's too, overrides it.)
_TOTALS_TRIGGERS = """
CREATE TRIGGER sessions_totals_insert AFTER INSERT ON sessions BEGIN
    INSERT INTO outbox_totals(outbox, sessions, bytes) SELECT NEW.outbox, 0, 0
        WHERE NOT EXISTS (SELECT 1 FROM outbox_totals WHERE outbox = NEW.outbox);
    UPDATE outbox_totals SET sessions = sessions + 1, bytes = bytes + NEW.record_bytes
        WHERE outbox = NEW.outbox;
END;
CREATE TRIGGER sessions_totals_delete AFTER DELETE ON sessions BEGIN
    UPDATE outbox_totals SET sessions = sessions - 1, bytes = bytes - OLD.record_bytes
        WHERE outbox = OLD.outbox;
END;
CREATE TRIGGER sessions_totals_update AFTER UPDATE OF outbox, record_bytes ON sessions
WHEN OLD.outbox IS NOT NEW.outbox OR OLD.record_bytes IS NOT NEW.record_bytes BEGIN
    UPDATE outbox_totals SET sessions = sessions - 1, bytes = bytes - OLD.record_bytes
        WHERE outbox = OLD.outbox;
    INSERT INTO outbox_totals(outbox, sessions, bytes) SELECT NEW.outbox, 0, 0
        WHERE NOT EXISTS (SELECT 1 FROM outbox_totals WHERE outbox = NEW.outbox);
    UPDATE outbox_totals SET sessions = sessions + 1, bytes = bytes + NEW.record_bytes
        WHERE outbox = NEW.outbox;
END;
"""


@migrations()
def m003_bounds(db: Database) -> None:
    """Sizes and totals that bound the store at a constant cost; the login a session awaits."""
    sessions = db.table("sessions")
    # The record's length, kept by every write: the totals add it up.
    sessions.add_column("record_bytes", int, not_null_default=0)
    db.execute("UPDATE sessions SET record_bytes = length(record)")
    # Set while the session's account is the outcome of a login still under way.
    sessions.add_column("awaiting_login", str)
    db.execute(
        "CREATE TABLE outbox_totals (outbox TEXT PRIMARY KEY,"
        " sessions INTEGER NOT NULL, bytes INTEGER NOT NULL)"
    )
    db.execute(
        "INSERT INTO outbox_totals(outbox, sessions, bytes)"
        " SELECT outbox, count(*), coalesce(sum(record_bytes), 0) FROM sessions GROUP BY outbox"
    )
    db.executescript(_TOTALS_TRIGGERS)
    # Age-based prune, size-based prune (oldest first), the sync's queue and the
    # unattributed count: each an index range, never a scan of the table
    # (tests/test_store.py checks the plan of every statement of a round).
    sessions.create_index(["outbox", "synced_at"], if_not_exists=True)
    sessions.create_index(["outbox", "checkpointed_at"], if_not_exists=True)
    sessions.create_index(["outbox", "rkey"], if_not_exists=True)
    sessions.create_index(["outbox", "did", "rkey"], if_not_exists=True)
    # A day's other sessions of the account, in order, for relatedSessionUris.
    sessions.create_index(["local_day", "did", "rkey"], if_not_exists=True)
    db.execute("DROP INDEX IF EXISTS idx_sessions_local_day")  # a prefix of the one above
    # The sync's queue is (outbox, did) in rkey order now; an index no query uses
    # only costs every write and every pruned row.
    db.execute("DROP INDEX IF EXISTS idx_sessions_outbox_next_attempt_at")
    # Only sessions of a login under way are in it: tiny, and attribute() is a lookup.
    db.execute(
        "CREATE INDEX IF NOT EXISTS idx_sessions_awaiting_login ON sessions(awaiting_login)"
        " WHERE awaiting_login IS NOT NULL"
    )


@migrations()
def m004_local(db: Database) -> None:
    """The ``local`` outbox state: ended with no account and no login awaited, never uploaded."""
    db.execute(
        "UPDATE sessions SET outbox = 'local'"
        " WHERE outbox = 'pending' AND did IS NULL AND awaiting_login IS NULL"
    )


@migrations()
def m005_consent(db: Database) -> None:
    """The player's consent and the ``withheld`` outbox state: no row to change.

    The consent is a ``meta`` row (``consent``: the state and who chose it),
    written the first time an agent of this version starts; a file without it
    has the default. ``withheld`` (the host's guard kept a session off the PDS)
    is new: no older row has it. The set's version says the file may hold both.
    """


@migrations()
def m006_background(db: Database) -> None:
    """Each session's time in the background: local only, the lexicon has no field for it."""
    db.table("sessions").add_column("background_ms", int, not_null_default=0)


def apply(conn: sqlite3.Connection) -> None:
    """Apply the pending migrations on ``conn`` (inside the caller's transaction).

    Each migration runs in a savepoint of that transaction with the record of it
    having been applied, as sqlite-utils does; the caller holds the write lock
    (``BEGIN IMMEDIATE``) around the whole set, so that two processes opening an
    old file at once serialise, and the second finds nothing pending.
    """
    # No plugins: they could only add SQL functions, and loading them scans every
    # installed package's entry points.
    migrations.apply(Database(conn, execute_plugins=False))


def schema() -> str:
    """The schema the migrations leave a new database with, as one SQL script.

    ``anisota_agent/schema.sql`` holds it, so that a new store is made without
    importing sqlite-utils (``python -m anisota_agent.migrations`` prints it;
    a test keeps the two equal).
    """
    conn = sqlite3.connect(":memory:", isolation_level=None)
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        apply(conn)
        conn.execute("COMMIT")
        statements = [
            f"{sql};\n"
            for (sql,) in conn.execute(
                "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid"
            )
        ]
    conn.close()
    header = (
        "-- The store's schema as the migrations of anisota_agent/migrations.py leave a\n"
        "-- new database, made in one go without importing sqlite-utils.\n"
        "-- Regenerate: python -m anisota_agent.migrations > anisota_agent/schema.sql\n"
    )
    return header + "\n".join(["", *statements])


if __name__ == "__main__":
    print(schema(), end="")
