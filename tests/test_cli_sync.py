"""The CLI's account and sync commands against the real local PDS."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from agent_helpers import all_sessions, seed, store_at
from pds_harness import Account, PdsServer

from anisota_agent.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def logged_in(
    tmp_path: Path,
    pds: PdsServer,
    account: Account,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    monkeypatch.setenv("ANISOTA_AGENT_PASSWORD", account.password)
    code, out, _ = run(
        capsys,
        *("--data-dir", str(tmp_path), "login"),
        *("--pds-url", pds.url, "--identifier", account.handle),
    )
    assert code == 0 and account.did in out
    with store_at(tmp_path):
        pass  # a store as a game's first run leaves it
    return tmp_path


def test_login_keeps_only_the_refresh_token_in_a_0600_file(
    logged_in: Path, account: Account
) -> None:
    token_file = logged_in / "session.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    text = token_file.read_text()
    assert account.password not in text
    saved = json.loads(text)
    assert saved["did"] == account.did and "refresh_jwt" in saved
    assert "access_jwt" not in text and "accessJwt" not in text


def test_wrong_password_fails_without_traceback(
    tmp_path: Path,
    pds: PdsServer,
    account: Account,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ANISOTA_AGENT_PASSWORD", "not-the-password")
    code, _, err = run(
        capsys,
        *("--data-dir", str(tmp_path), "login"),
        *("--pds-url", pds.url, "--identifier", account.handle),
    )
    assert code == 1
    assert err.startswith("anisota-agent: login failed:") and "Traceback" not in err
    assert "not-the-password" not in err
    assert not (tmp_path / "session.json").exists()


def test_flush_syncs_everything_with_progress(
    logged_in: Path, pds: PdsServer, account: Account, capsys: pytest.CaptureFixture[str]
) -> None:
    with store_at(logged_in) as store:
        rkeys = seed(store, account.did, 25)
    code, out, err = run(capsys, "--data-dir", str(logged_in), "flush")
    assert code == 0, err
    assert out.startswith("synced 25, quarantined 0, left 0")
    assert "25/25" in err  # the progress bar
    remote = {item["uri"].rsplit("/", 1)[1] for item in pds.list_records(account)}
    assert remote == set(rkeys)
    assert {row.outbox for row in all_sessions(logged_in)} == {"synced"}
    code, out, _ = run(capsys, "--data-dir", str(logged_in), "status")
    assert account.handle in out and "synced 25" in out and "last never" not in out


def test_flush_without_login_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with store_at(tmp_path):
        pass
    code, _, err = run(capsys, "--data-dir", str(tmp_path), "flush")
    assert code == 1 and "not logged in" in err


def test_doctor_then_logout(
    logged_in: Path, pds: PdsServer, account: Account, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--data-dir", str(logged_in), "doctor")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("ok   PDS reachable: " + pds.url)
    assert lines[1] == f"ok   credentials: {account.handle} ({account.did})"
    assert lines[2].startswith("ok   clock skew: ")
    code, out, _ = run(capsys, "--data-dir", str(logged_in), "logout")
    assert (code, out) == (0, f"logged out {account.handle} ({account.did})\n")
    assert not (logged_in / "session.json").exists()
    code, _, err = run(capsys, "--data-dir", str(logged_in), "doctor")
    assert code == 1 and "not logged in" in err
