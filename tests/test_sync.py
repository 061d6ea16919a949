"""The sync engine against the real reference PDS: exactly once, within budget, no loops.

Happy and recovery paths run against the real PDS (``pds``, ``pds_ratelimited``);
faults are injected only by a :class:`FaultProxy` in front of it. Requests are
counted by the proxy (what reached the wire) and by :class:`Recorder`, the real
network transport noting every answer's status and rate-limit headers. The
engine is driven directly (``SyncEngine.sync`` is synchronous), except for the
end-to-end test through a real :class:`Agent`, and the crash test, which
SIGKILLs a real process in the middle of a flush.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from agent_helpers import OWNER, Bearer, seed, session_record, stored_record
from faultproxy import FaultProxy
from pds_harness import SESSION_COLLECTION, Account, PdsServer

from anisota_agent import Agent
from anisota_agent.auth import AppPasswordSession
from anisota_agent.clock import TidGenerator
from anisota_agent.lexicon import validate_record
from anisota_agent.store import DB_FILENAME, Store, StoredSession
from anisota_agent.sync import ACCOUNT_RECHECK_SECONDS, FIRST_BATCH, MAX_BATCH, SyncEngine
from anisota_agent.tokens import MemoryTokenStore
from anisota_agent.uplink import Uplink
from anisota_agent.xrpc import create_write

TIDS = TidGenerator()
APPLY = "com.atproto.repo.applyWrites"
PUT = "com.atproto.repo.putRecord"
GET = "com.atproto.repo.getRecord"
LIST = "com.atproto.repo.listRecords"
REFRESH = "com.atproto.server.refreshSession"
GET_SESSION = "com.atproto.server.getSession"
FILLER = "net.anisota.test.filler"  # another collection, to spend a write budget with


def xrpc(nsid: str) -> str:
    """The URL path of an XRPC method (what the proxy counts by prefix)."""
    return f"/xrpc/{nsid}"


def rows(store: Store) -> dict[str, StoredSession]:
    return {row.rkey: row for row in store.iter_sessions()}


def assert_exactly_once(pds: PdsServer, account: Account, store: Store, rkeys: list[str]) -> None:
    """Every session is one record on the PDS, equal to the local one, and synced locally."""
    remote = pds.list_records(account)
    remote_rkeys = [item["uri"].rsplit("/", 1)[-1] for item in remote]
    assert len(remote_rkeys) == len(set(remote_rkeys)), "a record is doubled"
    assert sorted(remote_rkeys) == sorted(rkeys), "records lost or extra"
    local = rows(store)
    for item in remote:
        row = local[item["uri"].rsplit("/", 1)[-1]]
        assert row.outbox == "synced" and not row.in_flight
        assert item["value"] == row.record
        assert (row.uri, row.cid) == (item["uri"], item["cid"])


# -- watching the wire ------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One request the engine sent and what came back (status None: no answer)."""

    nsid: str
    status: int | None
    remaining: int | None
    window: int | None
    reset: float | None
    retry_after: float | None


class Recorder(httpx.HTTPTransport):
    """The real network transport, noting every exchange in order."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[Exchange] = []
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        nsid = request.url.path.removeprefix("/xrpc/")
        try:
            response = super().handle_request(request)
        except httpx.TransportError:
            self._note(Exchange(nsid, None, None, None, None, None))
            raise
        headers = response.headers
        policy = headers.get("ratelimit-policy", "")
        window = policy.split(";w=")[1].split(",")[0] if ";w=" in policy else None
        self._note(
            Exchange(
                nsid,
                response.status_code,
                _int(headers.get("ratelimit-remaining")),
                _int(window),
                _float(headers.get("ratelimit-reset")),
                _float(headers.get("retry-after")),
            )
        )
        return response

    def _note(self, exchange: Exchange) -> None:
        with self._lock:
            self.log.append(exchange)

    def count(self, nsid: str | None = None) -> int:
        with self._lock:
            return sum(1 for e in self.log if nsid is None or e.nsid == nsid)

    def nsids(self) -> list[str]:
        with self._lock:
            return [e.nsid for e in self.log]


def _int(value: str | None) -> int | None:
    return None if value is None else int(value)


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


class Clock:
    """The real wall clock, which a test may move forward (past a backoff)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def move_to(self, when: float) -> None:
        self.offset = max(self.offset, when - time.time())


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / DB_FILENAME)
    yield opened
    opened.close()


@pytest.fixture
def proxy(pds: PdsServer) -> Iterator[FaultProxy]:
    with FaultProxy(pds.url) as started:
        yield started


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with Recorder() as transport:
        yield transport


Connect = Callable[..., tuple[SyncEngine, AppPasswordSession]]


@pytest.fixture
def connect(store: Store, recorder: Recorder) -> Iterator[Connect]:
    """``connect(url, account, access_jwt=..., reserve=..., now=...)``: an engine for the
    account's own tokens (no createSession), through ``recorder``."""
    opened: list[tuple[SyncEngine, AppPasswordSession]] = []

    def make(
        url: str,
        account: Account,
        *,
        access_jwt: str | None = None,
        reserve: int = 0,
        now: Callable[[], float] = time.time,
    ) -> tuple[SyncEngine, AppPasswordSession]:
        credentials = AppPasswordSession(
            url,
            account.did,
            account.handle,
            account.refresh_jwt,
            token_store=MemoryTokenStore(),
            access_jwt=access_jwt or account.access_jwt,
            transport=recorder,
        )
        engine = SyncEngine(
            store, credentials.client(), credentials, now=now, reserve_points=reserve
        )
        opened.append((engine, credentials))
        return engine, credentials

    yield make
    for engine, credentials in opened:
        engine.client.close()
        credentials.close()


# -- 1. the happy path, through a real agent ----------------------------------------------


def test_agent_syncs_a_session_whose_pds_record_equals_the_local_one(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    began = time.time()
    agent = Agent("1.4.2", data_dir=tmp_path).start()
    try:
        agent.login(account.handle, account.password, pds_url=pds.url)
        assert agent.flush(timeout=20)
        assert agent.status().auth_problem is None
        rkey = agent.start_session(entry_point="direct", authentication_method="existing_session")
        assert rkey is not None
        agent.page("/garden")
        agent.page("/inventory")
        agent.action("specimensCollected", count=3)
        agent.progress(1200, level=4)
        agent.progress(1350)
        agent.response(42.0)
        agent.feature("lens")
        agent.end_session("logout")
        assert agent.flush(timeout=20)
        status = agent.status()
    finally:
        agent.close()

    local = stored_record(tmp_path, rkey)  # validated against the lexicon
    assert local["status"] == "ended" and local["endReason"] == "logout"
    remote = pds.get_record(account, SESSION_COLLECTION, rkey)
    assert remote is not None
    assert remote["value"] == local
    assert remote["uri"] == f"at://{account.did}/net.anisota.beta.game.session/{rkey}"
    opened = Store(tmp_path / DB_FILENAME)
    try:
        row = opened.get(rkey)
    finally:
        opened.close()
    assert row is not None and row.outbox == "synced" and not row.in_flight
    assert (row.uri, row.cid) == (remote["uri"], remote["cid"])
    assert status.auth_problem is None and status.sync_error is None
    assert status.outbox["synced"] == 1 and status.outbox["pending"] == 0
    assert status.last_sync_at is not None and began <= status.last_sync_at <= time.time()
    assert len(pds.list_records(account)) == 1


# -- 2. SIGKILL in the middle of a flush --------------------------------------------------

# Syncs the store at argv[1] as the account it reads from stdin, printing a line
# per progress call. With "freeze", once a batch has settled, it stops after the
# PDS answered the next applyWrites and before the store records it (until killed).
_FLUSHER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import httpx
    from anisota_agent.auth import AppPasswordSession
    from anisota_agent.store import Store
    from anisota_agent.sync import SyncEngine

    config = json.loads(sys.stdin.readline())
    progressed = False

    class Transport(httpx.HTTPTransport):
        def handle_request(self, request):
            response = super().handle_request(request)
            if config["freeze"] and progressed and request.url.path.endswith("applyWrites"):
                response.read()
                print("answered", response.status_code, flush=True)
                sys.stdin.readline()  # never comes: the test kills us here
            return response

    def progress(done, total):
        global progressed
        progressed = True
        print("progress", done, total, flush=True)

    credentials = AppPasswordSession(
        config["pds_url"], config["did"], config["handle"], config["refresh_jwt"],
        access_jwt=config["access_jwt"], transport=Transport(),
    )
    store = Store(Path(sys.argv[1]))
    engine = SyncEngine(store, credentials.client(), credentials, now=time.time, reserve_points=0)
    engine.sync(progress=progress)
    print("done", engine.status.synced, flush=True)
    """
)


@pytest.mark.parametrize("freeze", [False, True], ids=["after-first-progress", "answer-unrecorded"])
def test_sigkill_mid_flush_then_a_fresh_engine_leaves_each_session_once(
    tmp_path: Path,
    pds: PdsServer,
    account: Account,
    store: Store,
    connect: Connect,
    recorder: Recorder,
    freeze: bool,
) -> None:
    rkeys = seed(store, account.did, 600)
    flusher = subprocess.Popen(
        [sys.executable, "-c", _FLUSHER, str(tmp_path / DB_FILENAME)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert flusher.stdin is not None and flusher.stdout is not None
        config = {
            "pds_url": pds.url,
            "did": account.did,
            "handle": account.handle,
            "refresh_jwt": account.refresh_jwt,
            "access_jwt": account.access_jwt,
            "freeze": freeze,
        }
        flusher.stdin.write(json.dumps(config) + "\n")
        flusher.stdin.flush()
        trigger = "answered" if freeze else "progress"
        lines = []
        for line in flusher.stdout:
            lines.append(line.strip())
            if line.startswith(trigger):
                break
        os.kill(flusher.pid, signal.SIGKILL)
        assert flusher.wait(timeout=30) == -signal.SIGKILL
    finally:
        if flusher.poll() is None:
            flusher.kill()
            flusher.wait(timeout=30)
        stderr = flusher.stderr.read() if flusher.stderr is not None else ""
        for pipe in (flusher.stdin, flusher.stdout, flusher.stderr):
            if pipe is not None:
                pipe.close()
    assert lines and lines[0] == f"progress {FIRST_BATCH} 600", (lines, stderr)
    assert lines[-1].startswith(trigger) and not any(line.startswith("done") for line in lines)

    # Killed mid-flush: the first batch is recorded, the rest is not all done.
    after_kill = rows(store)
    synced = [row for row in after_kill.values() if row.outbox == "synced"]
    in_flight = [row.rkey for row in after_kill.values() if row.in_flight]
    assert FIRST_BATCH <= len(synced) < 600
    remote_after_kill = {item["uri"].rsplit("/", 1)[-1] for item in pds.list_records(account)}
    if freeze:
        # The PDS committed the second batch; the store never heard of it.
        assert len(synced) == FIRST_BATCH and len(in_flight) == MAX_BATCH
        assert set(in_flight) <= remote_after_kill
        assert len(remote_after_kill) == FIRST_BATCH + MAX_BATCH

    engine, _ = connect(pds.url, account)
    status = engine.sync()
    assert status.synced == 600 - len(synced) and status.sync_error is None
    assert_exactly_once(pds, account, store, rkeys)
    assert all(exchange.status == 200 for exchange in recorder.log)  # no 500 on a re-create
    if in_flight:  # it looked before writing again
        assert recorder.nsids()[0] in (LIST, GET)
        if freeze:
            first_write = recorder.nsids().index(APPLY)
            assert set(recorder.nsids()[:first_write]) == {LIST}


# -- 3. an applyWrites committed whose answer was lost --------------------------------------


@pytest.mark.parametrize("count", [3, 250])
def test_lost_answer_to_a_committed_batch_is_looked_up_not_written_again(
    pds: PdsServer,
    account: Account,
    store: Store,
    proxy: FaultProxy,
    connect: Connect,
    recorder: Recorder,
    count: int,
) -> None:
    rkeys = seed(store, account.did, count)
    clock = Clock()
    engine, _ = connect(proxy.url, account, now=clock)
    proxy.drop_response_once(xrpc(APPLY))

    status = engine.sync()
    first = min(count, FIRST_BATCH)
    assert proxy.responses_dropped(xrpc(APPLY)) == 1
    assert status.synced == 0 and status.sync_error and status.auth_problem is None
    assert status.next_sync_at is not None and status.next_sync_at > clock()
    assert len(pds.list_records(account)) == first  # committed, though unanswered
    assert sum(row.in_flight for row in rows(store).values()) == first

    # Backing off: nothing leaves before next_attempt_at.
    seen = proxy.requests_seen()
    engine.sync()
    assert proxy.requests_seen() == seen

    clock.move_to(status.next_sync_at + 0.001)
    status = engine.sync()
    assert status.synced == count and status.sync_error is None and status.next_sync_at is None
    assert_exactly_once(pds, account, store, rkeys)
    assert all(e.status == 200 for e in recorder.log if e.status is not None)  # no 500 wedge
    second_round = recorder.nsids()[1:]  # after the dropped applyWrites
    if count <= 5:  # a few uncertain sessions: one getRecord each, and nothing to write
        assert proxy.requests_seen(xrpc(GET)) == count
        assert second_round == [GET] * count
        assert proxy.requests_seen(xrpc(APPLY)) == 1
    else:  # many: page listRecords first, then create only what is missing
        assert proxy.requests_seen(xrpc(LIST)) >= 1
        assert set(second_round[: second_round.index(APPLY)]) == {LIST}
        # The 10 found are not written again; the other 240 go as 10 (budget still
        # unknown: the only write so far went unanswered), 200 and 30.
        assert proxy.requests_seen(xrpc(APPLY)) == 1 + 3


def test_ambiguous_failure_without_a_commit_is_looked_up_then_created(
    pds: PdsServer, account: Account, store: Store, proxy: FaultProxy, connect: Connect
) -> None:
    rkeys = seed(store, account.did, 3)
    clock = Clock()
    engine, _ = connect(proxy.url, account, now=clock)
    proxy.inject_response(
        xrpc(APPLY), 502, json_body={"error": "BadGateway", "message": "upstream hiccup"}
    )
    status = engine.sync()
    assert status.synced == 0 and status.next_sync_at is not None
    assert pds.list_records(account) == []
    assert all(row.in_flight for row in rows(store).values())

    clock.move_to(status.next_sync_at + 0.001)
    assert engine.sync().synced == 3
    assert_exactly_once(pds, account, store, rkeys)
    assert proxy.requests_seen(xrpc(GET)) == 3  # looked: RecordNotFound for each
    assert proxy.requests_forwarded(xrpc(APPLY)) == 1  # then created them once


# -- 4. an access token that expires mid-flush ------------------------------------------------


def test_access_token_expiring_mid_flush_is_refreshed_once_and_the_flush_completes(
    pds: PdsServer,
    account: Account,
    store: Store,
    proxy: FaultProxy,
    connect: Connect,
    recorder: Recorder,
) -> None:
    rkeys = seed(store, account.did, 250)
    engine, credentials = connect(proxy.url, account)
    calls: list[int] = []

    def expire_after_first_batch(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 1:
            # The session keeps its access JWT in memory (auth.py): swap in an expired one.
            credentials._access_jwt = pds.mint_expired_access_token(account)

    status = engine.sync(progress=expire_after_first_batch)
    assert calls == [FIRST_BATCH, FIRST_BATCH + MAX_BATCH, 250]
    assert status.auth_problem is None and status.sync_error is None and status.synced == 250
    assert proxy.requests_seen(xrpc(REFRESH)) == 1
    assert proxy.requests_seen(xrpc(APPLY)) == 3 + 1  # the refused one, sent again
    assert [e.status for e in recorder.log if e.nsid == APPLY] == [200, 400, 200, 200]
    assert_exactly_once(pds, account, store, rkeys)


# -- 5. revoked or deactivated: stop with a clear status, no retry storm --------------------------


def test_revoked_refresh_token_stops_syncing_with_an_auth_problem_and_no_retries(
    pds: PdsServer, account: Account, store: Store, proxy: FaultProxy, connect: Connect
) -> None:
    seed(store, account.did, 20)
    pds.revoke_refresh(account)
    engine, credentials = connect(
        proxy.url, account, access_jwt=pds.mint_expired_access_token(account)
    )
    status = engine.sync()
    assert status.auth_problem is not None
    assert "ExpiredToken" in status.auth_problem and "revoked" in status.auth_problem
    assert status.synced == 0 and credentials.revoked
    assert store.meta()["status.auth_problem"] == status.auth_problem
    assert proxy.requests_seen(xrpc(APPLY)) == 1 and proxy.requests_seen(xrpc(REFRESH)) == 1
    seen = proxy.requests_seen()
    assert seen == 2

    for _ in range(5):
        assert engine.sync().auth_problem == status.auth_problem
    assert not engine.due()
    assert proxy.requests_seen() == seen  # no retry storm
    assert pds.list_records(account) == []
    assert all(row.outbox == "pending" and not row.in_flight for row in rows(store).values())


def test_deactivated_account_stops_syncing_with_a_clear_status(
    pds: PdsServer, account: Account, store: Store, proxy: FaultProxy, connect: Connect
) -> None:
    seed(store, account.did, 20)
    engine, _ = connect(proxy.url, account)
    pds.deactivate(account)
    status = engine.sync()
    assert status.auth_problem is not None and "AccountDeactivated" in status.auth_problem
    assert status.synced == 0
    seen = proxy.requests_seen()
    assert seen == proxy.requests_seen(xrpc(APPLY)) == 1
    for _ in range(5):
        engine.sync()
    assert not engine.due() and proxy.requests_seen() == seen
    assert all(row.outbox == "pending" and not row.in_flight for row in rows(store).values())
    pds.activate(account)
    assert pds.list_records(account) == []


def test_deactivated_account_found_while_looking_stops_too(
    pds: PdsServer, account: Account, store: Store, proxy: FaultProxy, connect: Connect
) -> None:
    """Sessions in flight make the engine look first; a deactivated repo refuses the
    lookup itself (400 "Could not locate record"): still a clear stop, no backoff loop."""
    rkeys = seed(store, account.did, 3)
    store.mark_in_flight(rkeys)
    engine, _ = connect(proxy.url, account)
    pds.deactivate(account)
    try:
        status = engine.sync()
        assert status.auth_problem is not None and "deactivated" in status.auth_problem
        seen = proxy.requests_seen()
        for _ in range(3):
            engine.sync()
        assert not engine.due() and proxy.requests_seen() == seen
    finally:
        pds.activate(account)


def test_a_taken_down_account_is_asked_once_an_hour_and_syncs_once_reinstated(
    pds: PdsServer, account: Account, store: Store, proxy: FaultProxy, connect: Connect
) -> None:
    rkeys = seed(store, account.did, 3)
    clock = Clock()
    engine, _ = connect(proxy.url, account, now=clock)
    pds.takedown(account)
    try:
        status = engine.sync()
        assert status.auth_problem is not None and "AccountTakedown" in status.auth_problem
        assert engine.recheck_at is not None
        assert status.next_sync_at == engine.recheck_at
        assert engine.recheck_at == pytest.approx(time.time() + ACCOUNT_RECHECK_SECONDS, abs=5)
        seen = proxy.requests_seen()
        assert not engine.recheck_account() and proxy.requests_seen() == seen  # not yet

        clock.move_to(engine.recheck_at + 1)  # still taken down: getSession is refused
        first_check = engine.recheck_at
        assert not engine.recheck_account()
        assert proxy.requests_seen() == seen + 1 and proxy.requests_seen(xrpc(GET_SESSION)) == 1
        assert engine.status.auth_problem == status.auth_problem and not engine.due()
        assert engine.recheck_at >= first_check + ACCOUNT_RECHECK_SECONDS
        assert not engine.recheck_account()  # the next hour has not come
    finally:
        pds.takedown(account, applied=False)
    clock.move_to(engine.recheck_at + 1)
    assert engine.recheck_account()
    assert engine.status.auth_problem is None and engine.recheck_at is None
    assert store.meta()["status.auth_problem"] is None
    assert engine.sync().synced == 3
    assert_exactly_once(pds, account, store, rkeys)


def test_revoked_credentials_are_never_asked_again(
    pds: PdsServer, account: Account, store: Store, proxy: FaultProxy, connect: Connect
) -> None:
    seed(store, account.did, 1)
    pds.revoke_refresh(account)
    engine, _ = connect(proxy.url, account, access_jwt=pds.mint_expired_access_token(account))
    assert engine.sync().auth_problem is not None
    assert engine.recheck_at is None
    seen = proxy.requests_seen()
    assert not engine.recheck_account() and proxy.requests_seen() == seen


# -- 6. the write budget: a reserve for the game, and 429 -----------------------------------------


def spend(pds: PdsServer, account: Account, creates: int = MAX_BATCH) -> Exchange:
    """One applyWrites of ``creates`` tiny records in another collection (3 points each)."""
    writes = [create_write(FILLER, TIDS.next(), {"$type": FILLER, "n": 1}) for _ in range(creates)]
    response = pds.xrpc(
        "POST",
        "com.atproto.repo.applyWrites",
        token=account.access_jwt,
        json_body={"repo": account.did, "writes": writes},
    )
    headers = response.headers
    policy = headers.get("ratelimit-policy", "")
    return Exchange(
        APPLY,
        response.status_code,
        _int(headers.get("ratelimit-remaining")),
        int(policy.split(";w=")[1]) if ";w=" in policy else None,
        _float(headers.get("ratelimit-reset")),
        _float(headers.get("retry-after")),
    )


def test_sync_never_spends_the_reserve_and_waits_for_the_window_reset(
    pds_ratelimited: PdsServer, store: Store, connect: Connect, recorder: Recorder
) -> None:
    pds = pds_ratelimited
    account = pds.create_account("reserve")
    for _ in range(6):  # 3,600 of the 5,000 points of the hour
        spent = spend(pds, account)
        assert spent.status == 200
    assert (spent.remaining, spent.window) == (1400, 3600)  # the write bucket, now tightest
    assert spent.reset is not None
    reserve = 1000
    rkeys = seed(store, account.did, 300)
    clock = Clock()
    engine, _ = connect(pds.url, account, reserve=reserve, now=clock)

    status = engine.sync()
    writes = [e for e in recorder.log if e.nsid == APPLY]
    assert writes and all(e.status == 200 and e.window == 3600 for e in writes)
    assert all(e.remaining is not None and e.remaining >= reserve for e in writes)
    # The blind first batch, then all the budget above the reserve allows, then stop.
    expected = FIRST_BATCH + (1400 - 3 * FIRST_BATCH - reserve) // 3
    assert status.synced == expected and len(writes) == 2
    assert writes[-1].remaining == 1400 - 3 * expected
    assert status.next_sync_at == writes[-1].reset == spent.reset
    assert status.sync_error is not None and "reserve" in status.sync_error
    assert status.points_spent == 3 * expected
    assert len(pds.list_records(account)) == expected
    assert sum(row.outbox == "pending" and not row.in_flight for row in rows(store).values()) == (
        300 - expected
    )

    # Nothing more until the window resets, however often it is asked.
    seen = recorder.count()
    clock.move_to(status.next_sync_at - 1)
    for _ in range(3):
        engine.sync()
    assert recorder.count() == seen and not engine.due()
    clock.move_to(status.next_sync_at)
    assert engine.due()  # the reset time is when it may go on
    assert rkeys


def test_a_429_between_batches_is_honoured_until_its_reset(
    pds_ratelimited: PdsServer, store: Store, connect: Connect, recorder: Recorder
) -> None:
    pds = pds_ratelimited
    account = pds.create_account("limited")
    seed(store, account.did, 400)
    clock = Clock()
    engine, _ = connect(pds.url, account, reserve=0, now=clock)
    drained: list[Exchange] = []

    def spend_the_rest(done: int, total: int) -> None:
        # The game spends the rest of the budget while the engine is between batches.
        while not drained or drained[-1].status == 200:
            drained.append(spend(pds, account))
            assert len(drained) <= 12

    status = engine.sync(progress=spend_the_rest)
    assert drained[-1].status == 429
    writes = [e for e in recorder.log if e.nsid == APPLY]
    assert [e.status for e in writes] == [200, 429]
    refused = writes[-1]
    assert refused.retry_after is not None and refused.reset is not None
    assert refused.remaining == 0 and refused.window == 3600
    assert status.synced == FIRST_BATCH and status.next_sync_at is not None
    # retry-after is a delta, ratelimit-reset an absolute time: the later one wins.
    assert abs(status.next_sync_at - max(refused.reset, time.time() + refused.retry_after)) < 2
    assert status.next_sync_at > time.time() + 3000
    assert len(pds.list_records(account)) == FIRST_BATCH
    # The refused batch was not written: plain creates again later, nothing to look up.
    assert not any(row.in_flight for row in rows(store).values())

    seen = recorder.count()
    for _ in range(3):
        engine.sync()
    clock.move_to(status.next_sync_at - 1)
    engine.sync()
    assert recorder.count() == seen and not engine.due()


# -- 7. a record the PDS refuses ----------------------------------------------------------------


@pytest.mark.invalid_records  # planted on purpose
def test_an_invalid_record_is_quarantined_before_it_is_ever_sent(
    pds: PdsServer, account: Account, store: Store, connect: Connect, recorder: Recorder
) -> None:
    sessions = [session_record(account.did, index) for index in range(25)]
    sessions[3][1]["activitySummary"]["totalEvents"] = 1.5  # no floats in the data model
    for rkey, record in sessions:
        assert store.finalize(rkey, account.did, record, OWNER, "2026-11-24")
    bad_rkey = sessions[3][0]
    engine, _ = connect(pds.url, account)
    status = engine.sync()
    assert status.synced == 24 and status.quarantined == 1
    row = store.get(bad_rkey)
    assert row is not None and row.outbox == "quarantined" and not row.in_flight
    assert row.last_error is not None and "floats are not allowed" in row.last_error
    assert [(e.nsid, e.status) for e in recorder.log] == [(APPLY, 200), (APPLY, 200)]
    assert_exactly_once(pds, account, store, [rkey for rkey, _ in sessions if rkey != bad_rkey])


@pytest.mark.invalid_records  # planted on purpose, bypassing the agent's validation
def test_refused_record_is_quarantined_and_the_rest_of_its_batch_syncs(
    pds: PdsServer,
    account: Account,
    store: Store,
    connect: Connect,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A record the lexicon passes and the PDS refuses all the same, as a newer
    # PDS might: here, by switching the agent's own check off.
    monkeypatch.setattr("anisota_agent.lexicon.validate_record", lambda record: None)
    sessions = [session_record(account.did, index) for index in range(25)]
    sessions[3][1]["activitySummary"]["totalEvents"] = 1.5  # no floats in the data model
    for rkey, record in sessions:
        assert store.finalize(rkey, account.did, record, OWNER, "2026-11-24")
    rkeys = [rkey for rkey, _ in sessions]
    bad_rkey = rkeys[3]  # 4th of the first batch
    good = [rkey for rkey in rkeys if rkey != bad_rkey]
    engine, _ = connect(pds.url, account)

    status = engine.sync()
    assert status.synced == 24 and status.quarantined == 1 and status.sync_error is None
    row = store.get(bad_rkey)
    assert row is not None and row.outbox == "quarantined" and not row.in_flight
    assert row.last_error is not None
    assert "InvalidRequest" in row.last_error and "1.5" in row.last_error
    assert pds.get_record(account, SESSION_COLLECTION, bad_rkey) is None
    assert_exactly_once(pds, account, store, good)
    # The refused batch, the bad record alone, the other 9 again, then the next batch.
    assert [(e.nsid, e.status) for e in recorder.log] == [
        (APPLY, 400),
        (PUT, 400),
        (APPLY, 200),
        (APPLY, 200),
    ]
    engine.sync()
    assert recorder.count() == 4  # a quarantined record is never sent again


def test_large_records_are_batched_under_the_body_limit(
    pds: PdsServer, account: Account, store: Store, connect: Connect, recorder: Recorder
) -> None:
    rkeys = seed(store, account.did, 210, large=True)
    first = store.get(rkeys[0])
    assert first is not None
    assert len(json.dumps(first.record)) > 12_000  # 200 of them: a 2.6 MB body, a 413
    engine, _ = connect(pds.url, account)
    status = engine.sync()
    assert status.synced == 210 and status.quarantined == 0
    assert recorder.count(PUT) == 0 and all(e.status == 200 for e in recorder.log)
    assert recorder.count(APPLY) <= 5
    assert_exactly_once(pds, account, store, rkeys)


def test_a_pass_loads_one_batch_a_round_yet_sends_full_batches_and_reports_the_whole_queue(
    pds: PdsServer,
    account: Account,
    store: Store,
    connect: Connect,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rkeys = seed(store, account.did, 450)
    loaded: list[int] = []
    load = store.due_for_sync

    def counted(did: str, now: float, limit: int) -> list[StoredSession]:
        due = load(did, now, limit)
        loaded.append(len(due))
        return due

    monkeypatch.setattr(store, "due_for_sync", counted)
    reports: list[tuple[int, int]] = []
    engine, _ = connect(pds.url, account)
    status = engine.sync(progress=lambda done, total: reports.append((done, total)))
    assert status.synced == 450 and status.sync_error is None
    assert loaded and max(loaded) <= MAX_BATCH  # never the whole queue's records at once
    # The batches of one load of all 450: 10 (budget unknown), 200, 200, 40; the
    # total is the whole queue from the first report on.
    assert reports == [(10, 450), (210, 450), (410, 450), (450, 450)]
    assert recorder.count(APPLY) == 4
    assert_exactly_once(pds, account, store, rkeys)


# -- mirrored sessions ------------------------------------------------------------------------


def test_mirror_whose_answer_was_lost_is_replaced_by_the_final_record_without_a_500(
    pds: PdsServer, account: Account, store: Store, proxy: FaultProxy
) -> None:
    rkey, record = session_record(account.did, 7)
    live = {**record, "status": "active"}
    for key in ("endedAt", "endReason", "duration"):
        live.pop(key)
    validate_record(live)
    assert store.checkpoint(rkey, account.did, live, OWNER, "2026-11-24")
    clock = Clock()
    uplink = Uplink(store, MemoryTokenStore(), now=clock)
    uplink.use_host_auth(Bearer(account.access_jwt), account.did, proxy.url)
    try:
        proxy.drop_response_once(xrpc(PUT))
        assert not uplink.mirror(rkey, live)  # it landed, but the answer was lost
        remote = pds.get_record(account, SESSION_COLLECTION, rkey)
        assert remote is not None and remote["value"] == live
        # A lost answer is a network failure like any other: the sync backs off.
        assert uplink.engine is not None and not uplink.engine.due()
        assert uplink.sync() is not None and proxy.requests_seen() == 1
        next_at = uplink.engine.status.next_sync_at
        assert next_at is not None
        clock.move_to(next_at)

        assert store.finalize(rkey, account.did, record, OWNER, "2026-11-24")
        status = uplink.sync()
        assert status is not None and status.synced == 1 and status.sync_error is None
    finally:
        uplink.close()
    assert_exactly_once(pds, account, store, [rkey])
    assert proxy.requests_seen(xrpc(APPLY)) == 0  # no #create over the mirrored record
    assert proxy.requests_seen(xrpc(GET)) == 1 and proxy.requests_seen(xrpc(PUT)) == 2


def test_a_backoff_that_has_passed_leaves_the_worker_nothing_to_wait_for(
    pds: PdsServer, account: Account, store: Store, proxy: FaultProxy
) -> None:
    """The worker sleeps at most ``seconds_until_retry()``: a 0 there for good would
    make it spin. Once the wait is over it must say None, synced or not."""
    rkeys = seed(store, account.did, 3)
    clock = Clock()
    uplink = Uplink(store, MemoryTokenStore(), now=clock)
    uplink.use_host_auth(Bearer(account.access_jwt), account.did, proxy.url)
    try:
        proxy.inject_response(xrpc(APPLY), 503, json_body={"error": "Unavailable"})
        status = uplink.sync()
        assert status is not None and status.next_sync_at is not None
        wait = uplink.seconds_until_retry()
        assert wait is not None and 0 < wait <= status.next_sync_at - time.time() + 1
        assert not uplink.due()

        clock.move_to(status.next_sync_at + 0.001)
        assert uplink.seconds_until_retry() is None and uplink.due()
        status = uplink.sync()
        assert status is not None and status.synced == 3
        assert status.next_sync_at is None and status.sync_error is None
        assert uplink.seconds_until_retry() is None and not uplink.due()
    finally:
        uplink.close()
    assert_exactly_once(pds, account, store, rkeys)


def test_a_new_engine_recalls_the_budget_an_earlier_one_saw(
    pds: PdsServer, account: Account, store: Store, proxy: FaultProxy
) -> None:
    """A CLI flush or a restarted game must not send a blind first batch into the reserve."""
    seed(store, account.did, 5)
    reset_at = time.time() + 600
    budget = {"limit": 5000, "remaining": 1004, "reset_at": reset_at, "window": 3600}
    store.set_meta({f"sync.budget.{account.did}": budget})
    uplink = Uplink(store, MemoryTokenStore(), reserve_points=1000)
    uplink.use_host_auth(Bearer(account.access_jwt), account.did, proxy.url)
    try:
        status = uplink.sync()
    finally:
        uplink.close()
    # 4 points above the reserve: the first batch is one create (3 points), not
    # the blind FIRST_BATCH that would have taken all 5. This PDS enforces no
    # limits, so its answer carries no budget and the other 4 follow at once.
    assert status is not None and status.synced == 5 and status.budget is None
    assert proxy.requests_seen("/xrpc/com.atproto.repo.applyWrites") == 2
