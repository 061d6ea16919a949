"""Deleting and exporting the player's session records on the PDS (``anisota_agent.remote``).

Against the real reference PDS, through a :class:`FaultProxy` that counts what
reaches the wire (and, for the kill, holds one answer back). Records are seeded
straight onto the PDS with ``applyWrites`` ``#create`` batches of 200, each with
its local synced copy, as an agent would have left them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_helpers import OWNER, Bearer, all_sessions, seed, session_record, store_at
from faultproxy import FaultProxy
from pds_harness import SESSION_COLLECTION, Account, PdsServer

from anisota_agent import Agent, RemoteError, delete_remote_sessions, local_sessions
from anisota_agent.cli import main
from anisota_agent.remote import remote_sessions
from anisota_agent.store import Store
from anisota_agent.sync import budget_key
from anisota_agent.xrpc import create_write

APPLY = "/xrpc/com.atproto.repo.applyWrites"
DELETE = "/xrpc/com.atproto.repo.deleteRecord"
LIST = "/xrpc/com.atproto.repo.listRecords"
FILLER = "net.anisota.test.filler"  # another collection: never deleted
RESERVE = 1000  # the agent's default write reserve
DAY = "2026-11-24"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def login(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    data_dir: Path,
    pds_url: str,
    account: Account,
) -> None:
    """``anisota-agent login`` (the saved login every command here uses) to ``pds_url``."""
    monkeypatch.setenv("ANISOTA_AGENT_PASSWORD", account.password)
    code, _, err = run(
        capsys,
        *("--data-dir", str(data_dir), "login", "--pds-url", pds_url),
        *("--identifier", account.handle),
    )
    assert code == 0, err


def seed_remote(pds: PdsServer, account: Account, store: Store, count: int) -> list[str]:
    """``count`` session records on the PDS (3 points each), synced copies in ``store``."""
    rkeys: list[str] = []
    for start in range(0, count, 200):
        batch = [session_record(account.did, i) for i in range(start, min(count, start + 200))]
        writes = [create_write(SESSION_COLLECTION, rkey, record) for rkey, record in batch]
        answer = pds.xrpc(
            "POST",
            "com.atproto.repo.applyWrites",
            token=account.access_jwt,
            json_body={"repo": account.did, "writes": writes},
        )
        assert answer.status_code == 200, answer.text
        for rkey, record in batch:
            assert store.finalize(rkey, account.did, record, OWNER, DAY)
        results = answer.json()["results"]
        marks = [(rkey, r["uri"], r["cid"]) for (rkey, _), r in zip(batch, results, strict=True)]
        store.mark_synced_many(marks, time.time())
        rkeys.extend(rkey for rkey, _ in batch)
    return rkeys


def budget_left(pds: PdsServer, account: Account) -> int:
    """The write budget's ``ratelimit-remaining`` before a 1-point probe of another collection.

    ``deleteRecord`` of a free rkey writes nothing, costs 1 point, and answers
    with the tightest bucket, here the account's hourly write budget.
    """
    answer = pds.xrpc(
        "POST",
        "com.atproto.repo.deleteRecord",
        token=account.access_jwt,
        json_body={"repo": account.did, "collection": FILLER, "rkey": "3lbyzq2a3v22c"},
    )
    assert answer.status_code == 200 and answer.headers["ratelimit-policy"] == "5000;w=3600"
    return int(answer.headers["ratelimit-remaining"]) + 1


@pytest.fixture
def ratelimited_account(pds_ratelimited: PdsServer) -> Account:
    return pds_ratelimited.create_account("remote")


@pytest.fixture
def proxy_rl(pds_ratelimited: PdsServer) -> Iterator[FaultProxy]:
    with FaultProxy(pds_ratelimited.url) as proxy:
        yield proxy


@pytest.fixture
def proxy(pds: PdsServer) -> Iterator[FaultProxy]:
    with FaultProxy(pds.url) as p:
        yield p


# -- purge --remote -----------------------------------------------------------------


def test_purge_remote_deletes_1000_records_in_5_batches_and_keeps_the_reserve(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    pds_ratelimited: PdsServer,
    ratelimited_account: Account,
    proxy_rl: FaultProxy,
) -> None:
    pds, account = pds_ratelimited, ratelimited_account
    login(capsys, monkeypatch, tmp_path, proxy_rl.url, account)
    with store_at(tmp_path) as store:
        rkeys = seed_remote(pds, account, store, 1000)
        unsent = seed(store, account.did, 3)  # pending: they would upload later
        others = seed(store, "did:plc:someoneelse0000000000000", 2)
    proxy_rl.reset()  # 2,000 points of the hour left: 5,000 less 3 a create

    began = time.monotonic()
    code, out, err = run(capsys, "--data-dir", str(tmp_path), "purge", "--remote", "--yes")
    seconds = time.monotonic() - began
    assert code == 0, err
    assert out.startswith(
        f"deleted 1000 session record(s) from {proxy_rl.url} for {account.handle}"
        f" ({account.did}); 1003 local session(s) marked never to upload"
    )
    assert "1000/1000" in err  # the progress bar
    assert pds.list_records(account) == []
    # One deleteRecord learns the budget (1 point), then 200 a batch: 200, 200, 200, 200, 199.
    assert proxy_rl.requests_seen(APPLY) == 5 and proxy_rl.requests_seen(DELETE) == 1
    # 10 pages and the empty one after; then the listing that finds nothing left.
    assert proxy_rl.requests_seen(LIST) == 12
    # 1,000 points spent of the 2,000 left: the reserve is whole.
    assert budget_left(pds, account) == RESERVE
    print(f"purge --remote of 1,000 records: {seconds:.2f} s, {proxy_rl.requests_seen()} requests")

    outbox = {row.rkey: row.outbox for row in all_sessions(tmp_path)}
    assert {outbox[rkey] for rkey in rkeys + unsent} == {"deleted"}
    assert {outbox[rkey] for rkey in others} == {"pending"}  # another account's
    with store_at(tmp_path) as store:
        assert store.due_for_sync(account.did, float("inf"), limit=10) == []
        saved = store.meta()[budget_key(account.did)]
    assert saved["remaining"] >= RESERVE  # what the next run (or the agent's sync) starts from


def test_purge_remote_killed_halfway_finishes_when_run_again(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    pds_ratelimited: PdsServer,
    ratelimited_account: Account,
    proxy_rl: FaultProxy,
) -> None:
    pds, account = pds_ratelimited, ratelimited_account
    login(capsys, monkeypatch, tmp_path, proxy_rl.url, account)
    with store_at(tmp_path) as store:
        seed_remote(pds, account, store, 1000)
    proxy_rl.reset()
    # The first batch's answer is held: the PDS has deleted it, the CLI waits.
    proxy_rl.delay(600, APPLY)
    command = [sys.executable, "-m", "anisota_agent.cli", "--data-dir", str(tmp_path)]
    child = subprocess.Popen(
        [*command, "purge", "--remote", "--yes"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proxy_rl.wait_for_held(APPLY, timeout=60)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert len(pds.list_records(account)) == 1000 - 1 - 200  # the probe, then one batch
    proxy_rl.passthrough()

    again = subprocess.run(
        [*command, "purge", "--remote", "--yes"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("deleted 799 session record(s)")
    assert pds.list_records(account) == []
    # The killed run's batch, then 4 for the 799 left: the rerun knew the budget
    # (saved as spent before the killed batch left), so no probe and no small batch.
    assert proxy_rl.requests_seen(APPLY) == 5 and proxy_rl.requests_seen(DELETE) == 1
    assert budget_left(pds, account) >= RESERVE
    assert {row.outbox for row in all_sessions(tmp_path)} == {"deleted"}


def test_a_network_fault_says_run_again_and_nothing_else_is_deleted(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    pds: PdsServer,
    account: Account,
    proxy: FaultProxy,
) -> None:
    login(capsys, monkeypatch, tmp_path, proxy.url, account)
    other = pds.xrpc(
        "POST",
        "com.atproto.repo.createRecord",
        token=account.access_jwt,
        json_body={"repo": account.did, "collection": FILLER, "record": {"$type": FILLER}},
    )
    assert other.status_code == 200
    with store_at(tmp_path) as store:
        seed_remote(pds, account, store, 450)
    proxy.drop_response_once(APPLY)  # processed by the PDS, the answer lost
    code, _, err = run(capsys, "--data-dir", str(tmp_path), "purge", "--remote", "--yes")
    assert code == 1
    message = err.splitlines()[-1].split("\r")[-1]
    assert message.startswith("anisota-agent: no answer from the PDS (")
    assert message.endswith(": 1 of 450 session records deleted; run again to finish")
    assert not re.search(r"[A-Z][a-zA-Z]+Error", message), message
    assert len(pds.list_records(account)) == 450 - 1 - 200

    code, out, err = run(capsys, "--data-dir", str(tmp_path), "purge", "--remote", "--yes")
    assert code == 0, err
    assert out.startswith("deleted 249 session record(s)")
    assert pds.list_records(account) == []
    assert [item["uri"] for item in pds.list_records(account, FILLER)] == [other.json()["uri"]]


def test_purge_remote_asks_first_and_refuses_without_a_terminal(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    pds: PdsServer,
    account: Account,
) -> None:
    login(capsys, monkeypatch, tmp_path, pds.url, account)
    with store_at(tmp_path) as store:
        seed_remote(pds, account, store, 3)
    code, _, err = run(capsys, "--data-dir", str(tmp_path), "purge", "--remote")
    assert code == 1 and "--yes" in err  # stdin is no terminal here
    prompts: list[str] = []
    answers = iter(["n", None, "y"])

    def answer(prompt: str) -> str:
        prompts.append(prompt)
        given = next(answers)
        if given is None:
            raise EOFError  # Ctrl-D: no
        return given

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", answer)
    assert run(capsys, "--data-dir", str(tmp_path), "purge", "--remote")[:2] == (
        0,
        "nothing deleted\n",
    )
    assert run(capsys, "--data-dir", str(tmp_path), "purge", "--remote")[:2] == (
        0,
        "\nnothing deleted\n",
    )
    assert len(pds.list_records(account)) == 3
    assert {row.outbox for row in all_sessions(tmp_path)} == {"synced"}  # nor marked
    question = (
        f"Delete 3 session record(s) from {pds.url} for {account.handle} ({account.did}),"
        " and never upload its local sessions? [y/N] "
    )
    assert prompts == [question, question]
    code, out, _ = run(capsys, "--data-dir", str(tmp_path), "purge", "--remote")
    assert code == 0 and out.startswith("deleted 3 session record(s)")
    assert pds.list_records(account) == []


def test_purge_and_export_remote_need_a_login(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for command in (("purge", "--remote", "--yes"), ("export", "--remote")):
        code, _, err = run(capsys, "--data-dir", str(tmp_path), *command)
        assert (code, err) == (1, "anisota-agent: not logged in: run `anisota-agent login` first\n")
    with pytest.raises(RemoteError, match="not logged in"):
        delete_remote_sessions(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing created


def test_a_dead_login_or_a_cut_link_is_a_message_without_secrets(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    pds: PdsServer,
    account: Account,
    proxy: FaultProxy,
) -> None:
    login(capsys, monkeypatch, tmp_path, proxy.url, account)
    proxy.cut()
    for command in (("purge", "--remote", "--yes"), ("export", "--remote")):
        code, out, err = run(capsys, "--data-dir", str(tmp_path), *command)
        assert code == 1 and out == ""
        assert err.startswith("anisota-agent: ") and "no answer from the PDS (" in err, err
        assert "Traceback" not in err
    proxy.passthrough()
    with store_at(tmp_path) as store:
        seed_remote(pds, account, store, 1)  # listRecords is public: the delete needs the login
    session_file = tmp_path / "session.json"
    saved = json.loads(session_file.read_text())
    saved["refresh_jwt"] = "not-a-token"  # as after a revocation: the PDS refuses it
    session_file.write_text(json.dumps(saved))
    code, _, err = run(capsys, "--data-dir", str(tmp_path), "purge", "--remote", "--yes")
    assert code == 1
    message = err.splitlines()[-1]
    assert message.startswith("anisota-agent: the PDS refused the login ("), err
    assert message.endswith(": 0 of 1 session records deleted; log in again, then run again")
    assert "not-a-token" not in err and account.password not in err


# -- the library ----------------------------------------------------------------------


def test_a_record_uploaded_during_the_deletion_is_deleted_too(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    with store_at(tmp_path) as store:
        seed_remote(pds, account, store, 5)
    late: list[str] = []

    def upload_meanwhile(done: int, total: int) -> None:
        if done == 1 and not late:  # a game's sync lands after the listing
            rkey, record = session_record(account.did, 99)
            with store_at(tmp_path) as store:
                late.extend(seed_remote_one(pds, account, store, rkey, record))

    report = delete_remote_sessions(
        tmp_path,
        auth=Bearer(account.access_jwt),
        did=account.did,
        pds_url=pds.url,
        progress=upload_meanwhile,
    )
    assert (report.found, report.deleted, report.local_marked) == (6, 6, 6)
    assert pds.list_records(account) == []
    assert {row.outbox for row in all_sessions(tmp_path)} == {"deleted"}


def seed_remote_one(
    pds: PdsServer, account: Account, store: Store, rkey: str, record: dict[str, Any]
) -> list[str]:
    """One session record created on the PDS and marked synced in ``store``, as a sync does."""
    answer = pds.xrpc(
        "POST",
        "com.atproto.repo.createRecord",
        token=account.access_jwt,
        json_body={
            "repo": account.did,
            "collection": SESSION_COLLECTION,
            "rkey": rkey,
            "record": record,
        },
    )
    assert answer.status_code == 200, answer.text
    assert store.finalize(rkey, account.did, record, OWNER, DAY)
    store.mark_synced_many([(rkey, answer.json()["uri"], answer.json()["cid"])], time.time())
    return [rkey]


def test_the_reserve_stops_a_deletion_with_the_host_auth_and_says_when(
    tmp_path: Path, pds_ratelimited: PdsServer, ratelimited_account: Account
) -> None:
    pds, account = pds_ratelimited, ratelimited_account
    with store_at(tmp_path) as store:
        seed_remote(pds, account, store, 1000)  # 2,000 points of the hour left
    seen: list[tuple[int, int]] = []
    with pytest.raises(RemoteError) as stopped:
        delete_remote_sessions(
            tmp_path,
            auth=Bearer(account.access_jwt),  # as Agent.use_auth: the game's own auth
            did=account.did,
            pds_url=pds.url,
            write_reserve=1500,
            progress=lambda done, total: seen.append((done, total)),
        )
    error = stopped.value
    report = error.report
    assert report is not None
    # 1 (the probe) + 200 + 200 + 99: every point above the reserve, not one more.
    assert (report.found, report.deleted, report.batches, report.points_spent) == (
        1000,
        500,
        3,
        500,
    )
    assert seen == [(0, 1000), (1, 1000), (201, 1000), (401, 1000), (500, 1000)]
    assert report.budget is not None and report.budget.remaining == 1500
    assert error.retry_at == report.budget.reset_at and error.retry_at > time.time() + 3000
    assert "reserve is reached (1500 of 5000 points left, 1500 kept for the game)" in str(error)
    assert "500 of 1000 session records deleted; run again after " in str(error)
    assert len(pds.list_records(account)) == 500
    assert budget_left(pds, account) == 1500


def test_a_listed_record_of_another_collection_stops_everything(tmp_path: Path) -> None:
    did = "did:plc:abcdefghijklmnopqrstuvwx"
    writes: list[str] = []

    def pds(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("listRecords"):
            records = [
                {"uri": f"at://{did}/{SESSION_COLLECTION}/3lbyzq2a3v22c", "cid": "c", "value": {}},
                {"uri": f"at://{did}/app.bsky.feed.post/3lbyzq2a3v22d", "cid": "c", "value": {}},
            ]
            return httpx.Response(200, json={"records": records, "cursor": "x"})
        writes.append(request.url.path)
        return httpx.Response(200, json={})

    transport = httpx.MockTransport(pds)
    with pytest.raises(RemoteError, match="not did:plc:abcdefghijklmnopqrstuvwx's session"):
        delete_remote_sessions(
            tmp_path,
            auth=Bearer("token"),
            did=did,
            pds_url="http://127.0.0.1:9",
            transport=transport,
        )
    assert writes == []
    listed = remote_sessions(did=did, pds_url="http://127.0.0.1:9", transport=transport)
    with pytest.raises(RemoteError, match="not did:plc"):
        next(listed)  # the whole page is checked before any of it is yielded


# -- export --remote -----------------------------------------------------------------


def test_export_remote_of_300_records_equals_the_local_copies(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    agent = Agent("1.0", data_dir=tmp_path).start()
    agent.login(account.handle, account.password, pds_url=pds.url)
    assert agent.flush(30)
    for index in range(300):
        agent.start_session(entry_point="direct")
        agent.page(f"/garden/{index}")
        agent.action("specimensCollected", count=index + 1)
        agent.end_session("logout")
    assert agent.flush(60)
    agent.close()
    assert [row.outbox for row in all_sessions(tmp_path)] == ["synced"] * 300

    target = tmp_path / "remote.jsonl"
    began = time.monotonic()
    code, out, err = run(
        capsys, "--data-dir", str(tmp_path), "export", "--remote", "--output", str(target)
    )
    seconds = time.monotonic() - began
    assert (code, out) == (0, ""), err
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert all(set(line) == {"uri", "cid", "value"} for line in lines)
    uris = [line["uri"] for line in lines]
    assert len(uris) == 300 == len(set(uris)) and uris == sorted(uris)  # oldest first
    local: dict[str, dict[str, Any]] = {
        row["uri"]: row for row in local_sessions(tmp_path) if row["outbox"] == "synced"
    }
    assert set(local) == set(uris)
    for line in lines:
        assert line["value"] == local[line["uri"]]["record"]
        assert line["cid"] == local[line["uri"]]["cid"]
    # The library, for the account named directly (listRecords is public).
    direct = list(remote_sessions(did=account.did, pds_url=pds.url))
    assert direct == lines
    print(f"export --remote of 300 records: {seconds:.2f} s")
