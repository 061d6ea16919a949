"""Durable at once: a session is on disk whatever the network, the login or the disk does.

Against the real PDS (through a loopback fault proxy where the link must fail)
and real file systems: a small tmpfs that fills up or turns read-only, a file
deleted under the agent, a file corrupted between two runs.
"""

from __future__ import annotations

import gc
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_helpers import SteppedClock, all_sessions, stored
from faultproxy import FaultProxy
from pds_harness import Account, PdsServer

from anisota_agent import Agent
from anisota_agent.store import DB_FILENAME
from anisota_agent.uplink import AuthRequest

COLLECTION = "net.anisota.beta.game.session"
CREATE_SESSION = "/xrpc/com.atproto.server.createSession"


@pytest.fixture
def proxy(pds: PdsServer) -> Iterator[FaultProxy]:
    with FaultProxy(pds.url) as running:
        yield running


def on_pds(pds: PdsServer, account: Account) -> dict[str, Any]:
    """The account's session records on the PDS, by rkey (each rkey once: asserted)."""
    records = pds.list_records(account)
    rkeys = [str(item["uri"]).rsplit("/", 1)[-1] for item in records]
    assert len(rkeys) == len(set(rkeys)), "a session is on the PDS twice"
    return {rkey: item["value"] for rkey, item in zip(rkeys, records, strict=True)}


def play(agent: Agent, reason: str = "user_initiated") -> str:
    """One short session; its rkey."""
    rkey = str(agent.start_session(entry_point="direct"))
    agent.page("/garden")
    agent.action("itemsCollected")
    agent.end_session(reason)
    return rkey


# -- the recording path waits for nothing ----------------------------------------------


def test_sessions_reach_the_disk_while_the_login_hangs_and_belong_to_its_account(
    tmp_path: Path, pds: PdsServer, account: Account, proxy: FaultProxy
) -> None:
    clock = SteppedClock()
    proxy.hang()
    agent = Agent("1.0", data_dir=tmp_path, clock=clock).start()
    agent.login(account.handle, account.password, pds_url=proxy.url)
    assert proxy.wait_for_request(CREATE_SESSION)  # the login is in flight, unanswered
    rkey = str(agent.start_session())
    assert agent.flush(sync=False)
    assert stored(tmp_path, rkey).outbox == "live"
    agent.end_session("device_switch")
    assert agent.flush(sync=False)
    row = stored(tmp_path, rkey)
    assert (row.status, row.did) == ("ended", None)  # on disk before any account is known
    # The hung login fails (a network error): it is retried, and then succeeds.
    proxy.cut()
    proxy.passthrough()
    assert agent.flush()  # the failed attempt is behind us: a retry is scheduled
    assert agent.status().account is None
    clock.step(120)
    assert agent.flush()  # the retry logs in
    assert agent.flush()  # the recorder hands the session to that account; it syncs
    assert agent.status().account is not None
    agent.close()
    assert stored(tmp_path, rkey).did == account.did
    remote = on_pds(pds, account)
    assert list(remote) == [rkey]
    assert remote[rkey]["endReason"] == "device_switch"


def test_a_login_during_an_outage_is_retried_until_the_link_is_back(
    tmp_path: Path, pds: PdsServer, account: Account, proxy: FaultProxy
) -> None:
    clock = SteppedClock()
    proxy.cut()
    agent = Agent("1.0", data_dir=tmp_path, clock=clock).start()
    agent.login(account.handle, account.password, pds_url=proxy.url)
    first = play(agent)
    assert agent.flush()
    status = agent.status()
    assert status.account is None
    assert status.auth_problem is not None and "pending" in status.auth_problem
    clock.step(5)
    assert agent.flush()  # still cut: tried again, failed again
    attempts = proxy.requests_seen(CREATE_SESSION)
    proxy.passthrough()
    second = play(agent)  # still during the login
    clock.step(120)
    assert agent.flush()
    assert agent.flush()
    agent.close()
    assert agent.status().auth_problem is None
    assert proxy.requests_seen(CREATE_SESSION) == attempts + 1
    assert set(on_pds(pds, account)) == {first, second}


def test_a_refused_login_stops_and_forgets_the_password(
    tmp_path: Path, pds: PdsServer, account: Account, proxy: FaultProxy
) -> None:
    clock = SteppedClock()
    agent = Agent("1.0", data_dir=tmp_path, clock=clock).start()
    wrong = f"not-the-password-{os.urandom(4).hex()}"
    agent.login(account.handle, wrong, pds_url=proxy.url)
    rkey = play(agent)
    assert agent.flush()
    problem = agent.status().auth_problem
    assert problem is not None and "AuthenticationRequired" in problem
    clock.step(3600)
    assert agent.flush()
    assert proxy.requests_seen(CREATE_SESSION) == 1  # never asked again
    # The password is gone: no account change holding it is left anywhere in memory.
    gc.collect()  # what is left is referenced by something
    held = [item for item in gc.get_objects() if isinstance(item, AuthRequest)]
    assert [request for request in held if request.password == wrong] == []
    agent.close()
    assert stored(tmp_path, rkey).did is None  # no account: it stays local
    assert on_pds(pds, account) == {}


def test_a_session_ended_before_the_saved_login_is_resumed_is_that_accounts(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    first = Agent("1.0", data_dir=tmp_path).start()
    first.login(account.handle, account.password, pds_url=pds.url)
    assert first.flush()
    first.close()
    again = Agent("1.0", data_dir=tmp_path)
    again.start()
    rkey = play(again)  # most likely before the uplink has read the saved login
    assert again.flush()
    assert again.flush()
    again.close()
    assert stored(tmp_path, rkey).outbox == "synced"
    assert list(on_pds(pds, account)) == [rkey]


def test_the_recorder_keeps_its_interval_while_a_sync_hangs(
    tmp_path: Path, pds: PdsServer, account: Account, proxy: FaultProxy
) -> None:
    agent = Agent("1.0", data_dir=tmp_path).start()
    agent.login(account.handle, account.password, pds_url=proxy.url)
    assert agent.flush()
    proxy.hang()
    done = play(agent)  # its sync hangs on the wire
    assert proxy.wait_for_request("/xrpc/com.atproto.repo.")
    live = str(agent.start_session())
    agent.page("/shop")
    assert agent.flush(timeout=2.0, sync=False)  # the recorder answers all the same
    assert stored(tmp_path, live).record["activitySummary"]["pagesVisited"] == ["/shop"]
    assert stored(tmp_path, done).status == "ended"
    proxy.cut()
    proxy.passthrough()
    agent.close()


# -- disk faults -----------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of our own, to fill up or turn read-only (needs root)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Take every free byte of the file system ``directory`` is on."""
    filler = directory / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


def play_until_memory(agent: Agent, limit: int = 400) -> list[str]:
    """Sessions played until the store falls back to memory; their rkeys."""
    rkeys = []
    for _ in range(limit):
        rkey = str(agent.start_session())
        for page in range(20):
            agent.page(f"/room/{page:02d}/{'x' * 100}")
        agent.end_session("user_initiated")
        rkeys.append(rkey)
        assert agent.flush(sync=False)
        if agent.status().store_mode == "memory":
            return rkeys
    raise AssertionError("the full disk never failed a write")


def test_a_full_disk_records_in_memory_syncs_and_writes_back_when_space_frees(
    tmpfs: Path, pds: PdsServer, account: Account
) -> None:
    clock = SteppedClock()
    data = tmpfs / "data"
    agent = Agent("1.0", data_dir=data, clock=clock).start()
    agent.login(account.handle, account.password, pds_url=pds.url)
    assert agent.flush()
    filler = fill(tmpfs)
    rkeys = play_until_memory(agent)
    status = agent.status()
    assert status.counters.get("store_failures") == 1
    offline_rkey = rkeys[-1]
    assert agent.flush()  # the sessions held in memory still sync
    assert set(rkeys) <= set(on_pds(pds, account))
    later = play(agent)
    clock.step(30)
    assert agent.flush(sync=False)
    assert agent.status().store_mode == "memory"  # still full: retried, still failing
    filler.unlink()
    clock.step(120)
    assert agent.flush()
    assert agent.status().store_mode == "sqlite"
    agent.close()
    rows = {row.rkey: row for row in all_sessions(data)}
    assert {*rkeys, later} <= set(rows)
    assert rows[offline_rkey].outbox == "synced"
    assert rows[later].outbox == "synced"
    assert set(on_pds(pds, account)) == {*rkeys, later}


def test_a_read_only_disk_records_in_memory_and_writes_back_when_writable(
    tmpfs: Path, pds: PdsServer, account: Account
) -> None:
    data = tmpfs / "data"
    earlier = Agent("1.0", data_dir=data).start()
    before = play(earlier)
    assert earlier.close()
    # Read-only from the start of the next run (a file system cannot turn
    # read-only under a file open for writing).
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    clock = SteppedClock()
    try:
        agent = Agent("1.0", data_dir=data, clock=clock).start()
        agent.login(account.handle, account.password, pds_url=pds.url)
        during = play(agent)
        assert agent.flush(sync=False)
        assert agent.status().store_mode == "memory"
        assert agent.flush()
        assert agent.flush()
        assert list(on_pds(pds, account)) == [during]  # synced from memory
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    clock.step(120)
    assert agent.flush()
    assert agent.status().store_mode == "sqlite"
    agent.close()
    rows = {row.rkey: row for row in all_sessions(data)}
    assert rows[during].outbox == "synced"  # recorded and synced in memory, written back
    assert rows[before].did is None  # before any login: stays local, as documented
    assert set(on_pds(pds, account)) == {during}


def test_a_deleted_file_is_recreated_with_everything_unsynced(
    tmp_path: Path, pds: PdsServer, account: Account, proxy: FaultProxy
) -> None:
    clock = SteppedClock()
    agent = Agent("1.0", data_dir=tmp_path, clock=clock).start()
    agent.login(account.handle, account.password, pds_url=proxy.url)
    assert agent.flush()
    proxy.cut()
    unsynced = play(agent)
    live = str(agent.start_session())
    assert agent.flush(sync=False)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / DB_FILENAME}{suffix}").unlink(missing_ok=True)
    agent.page("/after")
    assert agent.flush(sync=False)  # one round notices and re-creates the file
    assert (tmp_path / DB_FILENAME).exists()
    assert stored(tmp_path, unsynced).outbox == "pending"
    assert stored(tmp_path, live).outbox == "live"
    assert agent.status().counters.get("store_recreated") == 1
    proxy.passthrough()
    agent.end_session("app_close")
    clock.step(30)  # past the backoff of the sync the cut link failed
    assert agent.flush()
    agent.close()
    assert set(on_pds(pds, account)) == {unsynced, live}


def corrupt_pages(path: Path, first: int, count: int) -> None:
    """Overwrite ``count`` pages from page ``first`` (1-based) with garbage."""
    import sqlite3

    with sqlite3.connect(path) as conn:
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    with open(path, "r+b") as raw:
        raw.seek((first - 1) * page_size)
        raw.write(os.urandom(page_size * count))


def test_a_corrupt_file_is_moved_aside_and_its_unsynced_sessions_salvaged(
    tmp_path: Path, pds: PdsServer, account: Account, proxy: FaultProxy
) -> None:
    proxy.cut()
    agent = Agent("1.0", data_dir=tmp_path).start()
    agent.login(account.handle, account.password, pds_url=proxy.url)
    rkeys = [play(agent) for _ in range(120)]
    assert agent.close()
    proxy.passthrough()
    db = tmp_path / DB_FILENAME
    pages = db.stat().st_size // 4096
    corrupt_pages(db, pages // 2, 2)
    again = Agent("1.0", data_dir=tmp_path).start()
    again.login(account.handle, account.password, pds_url=proxy.url)
    assert again.flush()
    assert again.flush()
    status = again.status()
    again.close()
    assert status.counters.get("store_corrupt") == 1
    lost = status.counters.get("lost_corrupt_rows", 0)
    assert list(tmp_path.glob(f"{DB_FILENAME}.corrupt-*"))
    remote = on_pds(pds, account)
    # Sessions recorded during a login that never succeeded are that login's: a
    # later login under the same identifier takes them.
    assert set(remote) <= set(rkeys)
    assert len(remote) + lost == len(rkeys)
    assert len(remote) >= len(rkeys) // 2


class Cuttable(httpx.BaseTransport):
    """httpx's own transport, with a switch that cuts the link."""

    def __init__(self) -> None:
        self.cut = False
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.cut:
            raise httpx.ConnectError("link cut", request=request)
        return self._inner.handle_request(request)


@pytest.mark.invalid_records  # a record the lexicon refuses stays local, by design
def test_one_record_that_cannot_be_sent_never_costs_the_others(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    link = Cuttable()
    agent = Agent("1.0", data_dir=tmp_path, transport=link).start()
    agent.login(account.handle, account.password, pds_url=pds.url)
    assert agent.flush()
    link.cut = True
    before, bad, after = play(agent), play(agent), play(agent)
    agent.close()
    # The host cannot record what the lexicon refuses any more (its text is
    # checked at the call), so the file is changed behind the agent's back, as a
    # hand edit or an older version's bug would: a platform the lexicon lacks.
    with sqlite3.connect(tmp_path / DB_FILENAME) as conn:
        conn.execute(
            "UPDATE sessions SET record = json_set(record, '$.platform', 'console') WHERE rkey = ?",
            [bad],
        )
        # And all of them due now, as once the cut link's backoff has passed.
        conn.execute("UPDATE sessions SET next_attempt_at = NULL")
    conn.close()
    agent = Agent("1.0", data_dir=tmp_path).start()
    assert agent.flush()
    status = agent.status()
    agent.close()
    assert status.store_mode == "sqlite"
    assert stored(tmp_path, bad).outbox == "quarantined"
    assert set(on_pds(pds, account)) == {before, after}


def test_a_record_the_store_refuses_is_quarantined_and_the_store_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails for the record's sake (not the disk's) costs only that session."""
    import sqlite3

    from anisota_agent.store import Store

    finalize = Store.finalize
    refused: list[str] = []

    def refusing(self: Store, rkey: str, *args: object, **kwargs: object) -> bool:
        error = args[4] if len(args) > 4 else None
        if not refused and error is None:
            refused.append(rkey)
            raise sqlite3.IntegrityError("NOT NULL constraint failed: sessions.status")
        return finalize(self, rkey, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "finalize", refusing)
    agent = Agent("1.0", data_dir=tmp_path).start()
    bad = play(agent)
    good = play(agent)
    assert agent.flush(sync=False)
    status = agent.status()
    agent.close()
    assert refused == [bad]
    assert status.store_mode == "sqlite"
    assert status.counters.get("unwritable_records") == 1
    row = stored(tmp_path, bad)
    assert row.outbox == "quarantined" and row.last_error is not None
    assert "IntegrityError" in row.last_error
    assert stored(tmp_path, good).outbox == "local"  # no account: kept here
