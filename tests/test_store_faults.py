"""The store when its file fails: disk faults told from bad records, a file deleted or
replaced under it, a corrupt file moved aside and its readable sessions salvaged.

Real SQLite files in ``tmp_path``, damaged with real bytes; no mocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import OWNER, seed, session_record, store_at

from anisota_agent.recovery import expire_dead_sessions
from anisota_agent.store import (
    DB_FILENAME,
    LOST_UNKNOWN,
    OUTBOX_STATES,
    Owner,
    Store,
    is_corrupt,
    is_disk_fault,
)

DID = "did:plc:storefaults000000000000000"
DAY = "2026-11-24"
#: An owner that is not running: this pid, but not this process's start time.
DEAD = Owner(os.getpid(), 1.0, "dead-owner")


def page_size(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    return int(size)


def records_by_rkey(store: Store) -> dict[str, str]:
    return dict(store.db.execute("SELECT rkey, record FROM sessions").fetchall())


def overwrite_pages(path: Path, pages: set[int]) -> None:
    """Overwrite these pages (0-based) of the file with garbage."""
    size = page_size(path)
    with open(path, "r+b") as raw:
        for page in pages:
            raw.seek(page * size)
            raw.write(os.urandom(size))


def pages_holding(path: Path, records: dict[str, str], rkeys: list[str]) -> set[int]:
    """The pages (0-based) holding these sessions' records (a record sits in one leaf)."""
    data, size = path.read_bytes(), page_size(path)
    pages = set()
    for rkey in rkeys:
        offset = data.find(records[rkey].encode())
        assert offset > 0
        pages.add(offset // size)
    return pages


def on_pages(path: Path, records: dict[str, str], pages: set[int]) -> set[str]:
    """The sessions whose records sit on these pages."""
    data, size = path.read_bytes(), page_size(path)
    return {rkey for rkey, text in records.items() if data.find(text.encode()) // size in pages}


def quick_check(path: Path) -> str:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        return str(conn.execute("PRAGMA quick_check").fetchone()[0])
    except sqlite3.DatabaseError as error:
        return str(error)
    finally:
        conn.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def the_aside(directory: Path) -> Path:
    (aside,) = directory.glob(f"{DB_FILENAME}.corrupt-*")  # one file: no -wal/-shm beside it
    return aside


# -- disk faults and bad records --------------------------------------------------------


@pytest.mark.invalid_records  # records no encoder or constraint takes, on purpose
def test_a_full_disk_is_a_disk_fault_and_a_bad_record_is_not(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        seed(store, DID, 2)
        (pages,) = store.db.execute("PRAGMA page_count").fetchone()
        store.db.execute(f"PRAGMA max_page_count = {pages}")  # the file cannot grow: "full"
        faults: list[BaseException] = []
        for index in range(50):
            rkey, record = session_record(DID, 10 + index)
            try:
                store.finalize(rkey, DID, record, OWNER, DAY)
            except sqlite3.Error as error:
                faults.append(error)
                break
        assert faults, "the capped file never filled up"
        assert "full" in str(faults[0])
        assert is_disk_fault(faults[0]) and not is_corrupt(faults[0])

        rkey, record = session_record(DID, 99)
        bad: list[BaseException] = []
        attempts: list[tuple[dict[str, Any], str | None]] = [
            (record, "text no encoder takes \ud800"),
            ({**record, "odd": {1, 2}}, None),
            ({**record, "status": None}, None),
        ]
        for written, message in attempts:
            with pytest.raises(Exception) as caught:
                store.finalize(rkey, DID, written, OWNER, DAY, message)
            bad.append(caught.value)
    assert [type(error) for error in bad] == [
        UnicodeEncodeError,
        TypeError,
        sqlite3.IntegrityError,
    ]
    assert not any(is_disk_fault(error) for error in bad)


def test_errors_of_the_file_system_and_of_sqlite_are_classified(tmp_path: Path) -> None:
    faults: list[BaseException] = []
    readonly = tmp_path / "ro.sqlite3"
    Store.open(readonly).close()
    conn = sqlite3.connect(f"{readonly.as_uri()}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as caught:
        conn.execute("INSERT INTO counters(name, value) VALUES ('x', 1)")
    conn.close()
    faults.append(caught.value)  # attempt to write a readonly database
    with pytest.raises(sqlite3.OperationalError) as caught:
        sqlite3.connect(tmp_path).execute("SELECT 1")  # a directory: unable to open
    faults.append(caught.value)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError) as raised:
        Store.open(tmp_path / "a-file" / DB_FILENAME)  # its directory cannot be made
    faults.append(raised.value)
    if Path("/dev/full").exists():
        with pytest.raises(OSError) as raised, open("/dev/full", "wb", buffering=0) as full:
            full.write(b"x")
        faults.append(raised.value)  # ENOSPC
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(os.urandom(8192))
    with pytest.raises(sqlite3.DatabaseError) as corrupt:
        sqlite3.connect(garbage).execute("SELECT * FROM sqlite_master")
    faults.append(corrupt.value)
    assert all(is_disk_fault(fault) for fault in faults), faults
    assert [is_corrupt(fault) for fault in faults][-1]
    assert not any(is_corrupt(fault) for fault in faults[:-1])

    closed = Store(None)
    closed.close()
    with pytest.raises(sqlite3.ProgrammingError) as misuse:
        closed.outbox_counts()
    for error in (misuse.value, ValueError("x"), ConnectionError("x"), KeyError("status")):
        assert not is_disk_fault(error)
        assert not is_corrupt(error)


# -- a file deleted or replaced under the store ----------------------------------------------


def test_file_replaced_notices_a_deleted_or_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    assert Store(None).file_replaced() is False
    with store_at(tmp_path) as store:
        assert store.file_replaced() is False
        seed(store, DID, 3)
        for side in ("", "-wal", "-shm"):
            Path(f"{path}{side}").unlink(missing_ok=True)
        assert store.file_replaced() is True
        # The old connection still reads the deleted file: everything can be carried over.
        carried = store.rows(("live", "pending", "quarantined"))
        assert len(carried) == 3
        fresh = Store.open(path)
        fresh.absorb(carried)
        store.adopt(fresh)
        assert store.file_replaced() is False
        assert store.outbox_counts()["pending"] == 3

        other = tmp_path / "other.sqlite3"
        Store.open(other).close()
        os.replace(other, path)  # another file at the same path
        assert store.file_replaced() is True


# -- a corrupt file found at open --------------------------------------------------------


def test_a_corrupt_file_is_salvaged_row_by_row_and_the_aside_left_untouched(
    tmp_path: Path,
) -> None:
    path = tmp_path / DB_FILENAME
    with store_at(tmp_path) as store:
        rkeys = seed(store, DID, 300)
        records = records_by_rkey(store)
    pages = pages_holding(path, records, [rkeys[100], rkeys[150], rkeys[200]])
    unreadable = on_pages(path, records, pages)
    overwrite_pages(path, pages)
    assert quick_check(path) != "ok"
    damaged = sha256(path)

    store = Store.open(path)
    try:
        # The open checks only the header and the schema: the damage is found by
        # verify(), which the uplink runs at start.
        assert store.salvage is None and not list(tmp_path.glob(f"{DB_FILENAME}.corrupt-*"))
        assert store.verify() == store.salvage
        salvage = store.salvage
        assert salvage is not None
        aside = the_aside(tmp_path)
        assert salvage.aside == aside and sha256(aside) == damaged
        assert (salvage.salvaged, salvage.lost, salvage.exact) == (
            300 - len(unreadable),
            len(unreadable),
            True,
        )
        assert 3 <= salvage.lost < 30  # a few pages cost only their own rows
        kept = records_by_rkey(store)
        assert set(kept) == set(rkeys) - unreadable
        assert all(kept[rkey] == records[rkey] for rkey in kept)  # byte for byte
        assert store.outbox_counts()["pending"] == salvage.salvaged
        assert store.file_replaced() is False
        assert quick_check(path) == "ok"
        rkey, record = session_record(DID, 400)
        assert store.finalize(rkey, DID, record, OWNER, DAY)  # the fresh store works
    finally:
        store.close()


def test_salvage_keeps_unsynced_sessions_owners_counters_and_meta(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    with store_at(tmp_path) as store:
        rkeys = seed(store, DID, 60)
        for rkey in rkeys[:20]:
            store.mark_synced(rkey, f"at://{DID}/x/{rkey}", "cid", at=1.0)
        for rkey in rkeys[20:25]:
            store.quarantine(rkey, "refused")
        live = []
        for index in range(5):
            rkey, record = session_record(DID, 100 + index)
            assert store.checkpoint(rkey, DID, record, DEAD, DAY)
            live.append(rkey)
        store.add_counts({"pruned_unsynced": 4})
        store.set_meta({"sync.last": {"at": 5}})
        records = records_by_rkey(store)
    # Damage a page of synced sessions only: nothing unsynced is lost.
    pages = pages_holding(path, records, [rkeys[5]])
    lost = on_pages(path, records, pages)
    assert lost <= set(rkeys[:20])
    overwrite_pages(path, pages)

    with store_at(tmp_path) as store:
        store.verify()
        assert store.salvage is not None
        assert (store.salvage.salvaged, store.salvage.lost) == (45, len(lost))
        counts = dict.fromkeys(OUTBOX_STATES, 0) | {"live": 5, "pending": 35, "quarantined": 5}
        assert store.outbox_counts() == counts
        assert store.counters() == {"pruned_unsynced": 4}
        assert store.meta() == {"sync.last": {"at": 5}}
        assert store.get(rkeys[20]).last_error == "refused"  # type: ignore[union-attr]
        # The owner fields came along: recovery expires the dead owner's live sessions.
        assert expire_dead_sessions(store, now_ms=1_900_000_000_000, max_age_ms=10**12) == 5
        assert {row.rkey for row in store.sessions("pending")} >= set(live)


def test_a_file_whose_header_is_overwritten_salvages_nothing_and_counts_unknown_losses(
    tmp_path: Path,
) -> None:
    path = tmp_path / DB_FILENAME
    with store_at(tmp_path) as store:
        seed(store, DID, 30)
    with open(path, "r+b") as raw:
        raw.write(os.urandom(100))  # "SQLite format 3" and the header are gone
    with store_at(tmp_path) as store:
        assert store.salvage is not None
        assert (store.salvage.salvaged, store.salvage.lost) == (0, LOST_UNKNOWN)
        assert store.outbox_counts()["pending"] == 0
        seed(store, DID, 2)  # the fresh store works
        assert store.outbox_counts()["pending"] == 2
    with store_at(tmp_path) as store:
        assert store.salvage is None  # a sound file opens as it is


def test_with_every_index_unreadable_the_loss_is_estimated_from_the_table(
    tmp_path: Path,
) -> None:
    path = tmp_path / DB_FILENAME
    with store_at(tmp_path) as store:
        rkeys = seed(store, DID, 300)
        records = records_by_rkey(store)
        try:
            index_pages = {
                pageno - 1
                for (pageno,) in store.db.execute(
                    "SELECT pageno FROM dbstat WHERE name IN (SELECT name FROM sqlite_master"
                    " WHERE type = 'index' AND tbl_name = 'sessions')"
                )
            }
        except sqlite3.OperationalError:
            pytest.skip("this SQLite has no dbstat table to find the index pages with")
    table_pages = pages_holding(path, records, [rkeys[120], rkeys[180]])
    unreadable = on_pages(path, records, table_pages)
    overwrite_pages(path, index_pages | table_pages)
    with store_at(tmp_path) as store:
        salvage = store.verify()
        assert salvage == store.salvage
        assert salvage is not None and salvage.exact is False
        assert set(records_by_rkey(store)) == set(rkeys) - unreadable
        # The rowids that failed to read: here, with no gaps, exactly the lost ones.
        assert salvage.salvaged + salvage.lost == 300
        assert salvage.lost == len(unreadable)


def test_a_damaged_schema_is_found_at_open(tmp_path: Path) -> None:
    """The open's cheap check reads the schema: damage there goes the corrupt route at once."""
    path = tmp_path / DB_FILENAME
    with store_at(tmp_path) as store:
        seed(store, DID, 30)
    with open(path, "r+b") as raw:
        raw.seek(100)  # past the header: the first page's cells, sqlite_master's rows
        raw.write(os.urandom(page_size(path) - 100))
    with store_at(tmp_path) as store:
        assert store.salvage is not None and store.salvage.salvaged == 0
        assert the_aside(tmp_path) == store.salvage.aside
        seed(store, DID, 2)  # the fresh store works
        assert store.outbox_counts()["pending"] == 2


def test_verify_leaves_a_sound_store_alone(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    with store_at(tmp_path) as store:
        seed(store, DID, 20)
        inode = path.stat().st_ino
        assert store.verify() is None
        assert store.salvage is None and path.stat().st_ino == inode
        assert store.outbox_counts()["pending"] == 20
    assert list(tmp_path.glob(f"{DB_FILENAME}.corrupt-*")) == []
    assert Store(None).verify() is None  # nothing on disk to check


def test_the_first_checkpoint_lands_before_the_damage_is_found_and_is_salvaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file damaged mid-way: the open does not wait for the full check, the recorder's
    verify() (run by the uplink once the first write has landed) finds the damage,
    and the session is salvaged."""
    from anisota_agent import Agent

    path = tmp_path / DB_FILENAME
    with store_at(tmp_path) as store:
        rkeys = seed(store, DID, 300)
        records = records_by_rkey(store)
    pages = pages_holding(path, records, [rkeys[100], rkeys[200]])
    unreadable = on_pages(path, records, pages)
    overwrite_pages(path, pages)

    agent = Agent("1.0", data_dir=tmp_path)
    rkey = agent.start_session()  # before start(): the first round writes it
    assert rkey is not None
    at_verify: list[tuple[str | None, bool]] = []
    verify = Store.verify

    def watched(self: Store) -> Any:
        # What the file holds as the check begins: the session, committed already.
        other = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = other.execute("SELECT outbox FROM sessions WHERE rkey = ?", [rkey]).fetchone()
        finally:
            other.close()
        at_verify.append((row[0] if row else None, self.salvage is None))
        return verify(self)

    monkeypatch.setattr(Store, "verify", watched)
    agent.start()
    try:
        assert agent.flush()  # the uplink checks the file before its first round
        status = agent.status()
    finally:
        agent.close()
    assert at_verify == [("live", True)]  # once, after the first write, before any salvage
    assert status.counters["store_corrupt"] == 1
    assert status.counters["lost_corrupt_rows"] == len(unreadable)
    assert status.store_mode == "sqlite"
    asides = tmp_path.glob(f"{DB_FILENAME}.corrupt-*")
    assert len([aside for aside in asides if not aside.name.endswith(("-wal", "-shm"))]) == 1
    with store_at(tmp_path) as store:
        assert store.salvage is None
        kept = {row.rkey: row.outbox for row in store.iter_sessions()}
    assert set(kept) == (set(rkeys) - unreadable) | {rkey}
    assert kept[rkey] == "local"  # recorded on in the fresh file, ended at close, no account


def test_two_corrupt_files_in_the_same_second_get_their_own_names(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    for _ in range(2):
        Store.open(path).close()
        path.write_bytes(os.urandom(4096))
        Store.open(path).close()
    assert len(list(tmp_path.glob(f"{DB_FILENAME}.corrupt-*"))) == 2


# -- corruption found while running ---------------------------------------------------


def test_corruption_found_by_a_write_is_replaced_in_place(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    store = Store.open(path)
    holder = store  # what the other thread holds: it must go on working
    try:
        rkeys = seed(store, DID, 300)
        records = records_by_rkey(store)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every row in the main file
        old_inode = path.stat().st_ino
        pages = pages_holding(path, records, [rkeys[150]])
        unreadable = on_pages(path, records, pages)
        overwrite_pages(path, pages)
        store.db.execute("PRAGMA shrink_memory")  # no cached copy hides the damage
        with pytest.raises(sqlite3.DatabaseError) as caught:
            store.prune(max_bytes=0, max_age_s=1e9, now=0.0, max_rows=300)
        assert is_corrupt(caught.value) and is_disk_fault(caught.value)

        salvage = store.replace_corrupt()
        assert store.salvage == salvage
        assert (salvage.salvaged, salvage.lost) == (300 - len(unreadable), len(unreadable))
        assert the_aside(tmp_path) == salvage.aside
        assert path.stat().st_ino != old_inode and not store.file_replaced()
        rkey, record = session_record(DID, 500)
        assert holder.finalize(rkey, DID, record, OWNER, DAY)
        assert holder.outbox_counts()["pending"] == salvage.salvaged + 1
    finally:
        store.close()
    with store_at(tmp_path) as again:
        assert again.salvage is None and again.get(rkey) is not None


def test_replace_corrupt_is_for_file_stores_only() -> None:
    with pytest.raises(ValueError):
        Store(None).replace_corrupt()


def test_salvaged_rows_of_an_older_schema_take_the_new_columns(tmp_path: Path) -> None:
    """A corrupt file of an m002-era agent: its rows lack record_bytes and awaiting_login."""
    from sqlite_utils import Database

    from anisota_agent.migrations import migrations

    path = tmp_path / DB_FILENAME
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    database = Database(conn)
    migrations.apply(database, stop_before="m003_bounds")
    rows = []
    for index in range(80):
        rkey, record = session_record(DID, index)
        rows.append(
            {
                "rkey": rkey,
                "did": DID,
                "status": "ended",
                "outbox": "pending",
                "started_at": record["startedAt"],
                "local_day": DAY,
                "record": json.dumps(record, separators=(",", ":")),
            }
        )
    database.table("sessions").insert_all(rows)
    conn.close()
    records = {row["rkey"]: row["record"] for row in rows}
    pages = pages_holding(path, records, [rows[40]["rkey"]])
    unreadable = on_pages(path, records, pages)
    overwrite_pages(path, pages)
    with store_at(tmp_path) as store:
        assert store.salvage is not None
        assert store.salvage.salvaged == 80 - len(unreadable)
        assert store.record_bytes_total() == sum(
            len(records[rkey]) for rkey in set(records) - unreadable
        )
