"""The lifecycle under stress: a close that cannot hang, threads, fork, reconnect."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agent_helpers import all_sessions, logged, stored, stored_record
from faultproxy import FaultProxy
from pds_harness import Account, PdsServer

from anisota_agent import Agent
from anisota_agent.store import Store

DID = "did:plc:lifecycletest000000000000"


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback server that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


def test_close_returns_within_its_timeout_when_the_pds_never_answers(
    tmp_path: Path, silent_server: str
) -> None:
    agent = Agent("1.0", data_dir=tmp_path).start()
    agent.use_auth(httpx.Auth(), did=DID, pds_url=silent_server)
    rkey = str(agent.start_session())
    agent.page("/home")
    began = time.monotonic()
    agent.close(timeout=1)
    elapsed = time.monotonic() - began
    assert elapsed < 1.5, elapsed  # about the timeout, never the PDS's silence
    record = stored_record(tmp_path, rkey)
    assert (record["status"], record["endReason"]) == ("ended", "app_close")
    assert stored(tmp_path, rkey).outbox == "pending"


def test_async_context_manager(tmp_path: Path) -> None:
    async def play() -> str:
        async with Agent("1.0", data_dir=tmp_path) as agent:
            rkey = str(agent.start_session())
            agent.page("/async")
        return rkey

    rkey = asyncio.run(play())
    assert stored_record(tmp_path, rkey)["endReason"] == "app_close"


def test_many_threads_keep_exact_counts(tmp_path: Path) -> None:
    threads, calls = 8, 2_000
    agent = Agent("1.0", data_dir=tmp_path).start()
    rkey = str(agent.start_session())
    go = threading.Barrier(threads)

    def play(number: int) -> None:
        go.wait()
        for i in range(calls):
            agent.action("postsViewed")
            agent.response(10 + number, ok=i % 100 != 0)
            agent.page(f"/t{number}")
            if i % 250 == 0:
                agent.flush(timeout=5)  # checkpoints race with the calls

    workers = [threading.Thread(target=play, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    agent.close()
    record = stored_record(tmp_path, rkey)
    summary = record["activitySummary"]
    assert summary["gameActions"]["postsViewed"] == threads * calls
    assert summary["totalEvents"] == threads * calls * 3
    assert sorted(summary["pagesVisited"]) == sorted(f"/t{n}" for n in range(threads))
    performance = record["metadata"]["performanceMetrics"]
    assert performance["errorCount"] == threads * calls // 100
    assert performance["averageResponseTime"] == 14  # mean of 10..17 = 13.5, half up


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_records_its_own_session(tmp_path: Path) -> None:
    agent = Agent("1.0", data_dir=tmp_path).start()
    parent_rkey = str(agent.start_session())
    agent.page("/parent-before-fork")
    assert agent.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: record a session of its own, report its rkey
        code = 1
        try:
            os.close(read_end)
            assert agent.status().session is None  # the parent's session is not ours
            child_rkey = str(agent.start_session())
            agent.page("/child")
            agent.end_session("user_initiated")
            agent.close(timeout=5)
            os.write(write_end, child_rkey.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    child_rkey = os.read(read_end, 64).decode()
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    agent.page("/parent-after-fork")
    agent.close()
    assert child_rkey and child_rkey != parent_rkey
    child = stored_record(tmp_path, child_rkey)
    assert child["activitySummary"]["pagesVisited"] == ["/child"]
    parent = stored_record(tmp_path, parent_rkey)
    assert parent["activitySummary"]["pagesVisited"] == [
        "/parent-before-fork",
        "/parent-after-fork",
    ]
    assert parent["endReason"] == "app_close"
    assert len(all_sessions(tmp_path)) == 2


def test_a_queued_session_syncs_within_5_s_of_the_network_coming_back(
    tmp_path: Path, pds: PdsServer, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = threading.Event()
    mark_synced = Store.mark_synced_many

    def spy(store: Store, marks: list[tuple[str, str, str]], at: float) -> None:
        mark_synced(store, marks, at)
        synced.set()

    monkeypatch.setattr(Store, "mark_synced_many", spy)
    with FaultProxy(pds.url) as proxy:
        agent = Agent("1.0", data_dir=tmp_path).start()
        agent.login(account.handle, account.password, pds_url=proxy.url)
        assert agent.flush()
        assert agent.status().account is not None
        with logged("network: offline") as offline:
            proxy.cut()
            rkey = str(agent.start_session())
            agent.end_session("logout")
            assert agent.flush()  # the sync fails: queued
            assert offline.wait(15), agent.status()
        assert stored(tmp_path, rkey).outbox == "pending" and not synced.is_set()
        proxy.passthrough()
        restored = time.monotonic()
        assert synced.wait(5.0), agent.status()
        assert time.monotonic() - restored <= 5.0
        agent.close()
    assert [item["uri"] for item in pds.list_records(account)] == [
        f"at://{account.did}/net.anisota.beta.game.session/{rkey}"
    ]
