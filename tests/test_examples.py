"""The scripts in ``examples/`` run, and record what they claim to.

``minimal_embed`` and the three game windows (pygame, Qt, pyglet, headless)
run as scripts in a fresh interpreter (as a developer would run them); the
others are imported and their ``main()`` called in process.
``offline_sync`` plays against the real test PDS and checks the account's
repo afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pds_harness import Account, PdsServer

from anisota_agent.lexicon import validate_record
from anisota_agent.store import DB_FILENAME, Store, StoredSession

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

Main = Callable[[list[str] | None], int]


def example_main(name: str) -> Main:
    """``main`` of ``examples/<name>.py``, imported by path (examples is no package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main: Main = module.main
    return main


def stored_records(data_dir: Path) -> dict[str, StoredSession]:
    """Every session stored in ``data_dir``, by rkey."""
    store = Store.open(data_dir / DB_FILENAME)
    try:
        return {row.rkey: row for row in store.iter_sessions()}
    finally:
        store.close()


def field(output: str, pattern: str) -> str:
    """The first group of ``pattern`` in ``output`` (one line, multiline mode)."""
    match = re.search(pattern, output, re.MULTILINE)
    assert match is not None, f"no {pattern!r} in the output:\n{output}"
    return match.group(1)


@pytest.fixture(autouse=True)
def tracking_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)


def test_minimal_embed_runs_as_a_script(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DO_NOT_TRACK"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "minimal_embed.py"), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    rkey = field(out, r"^session:\s+(\S+)$")
    assert field(out, r"^store:\s+(.*)$") == f"{tmp_path / DB_FILENAME} (sqlite)"
    # No account: the finished session stays local, never uploaded.
    outbox = field(out, r"^outbox:\s+(.*)$")
    assert outbox == "live 0, pending 0, local 1, synced 0, quarantined 0, withheld 0, deleted 0"
    assert field(out, r"^dropped:\s+(.*)$") == "nothing"
    assert field(out, r"^written:\s+(.*)$") == "yes"

    rows = stored_records(tmp_path)
    assert list(rows) == [rkey]
    record = rows[rkey].record
    validate_record(record)
    assert (record["status"], record["endReason"]) == ("ended", "user_initiated")
    summary = record["activitySummary"]
    assert summary["pagesVisited"] == ["/home", "/garden"]
    assert summary["gameActions"]["specimensCollected"] == 2
    assert (summary["currentXP"], summary["currentLevel"]) == (1250, 4)
    assert summary["totalEvents"] == 6
    assert record["metadata"]["features"] == ["specimen-lens"]
    assert record["metadata"]["performanceMetrics"] == {"errorCount": 0, "averageResponseTime": 84}


def test_asyncio_client_counts_every_500_and_times_every_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    turns = 8
    assert example_main("asyncio_client")(["--turns", str(turns), "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out

    served = re.search(r"^server:\s+(\d+) requests, (\d+) answered 500, (\d+) slow$", out, re.M)
    assert served is not None, out
    requests, errors, slow = (int(n) for n in served.groups())
    assert requests == 3 * turns  # three routes a turn
    assert errors > 0 and slow > 0, "the seed must give some failures and slow answers"
    assert int(field(out, r"^game:\s+(\d+) fetches failed$")) == errors
    assert int(field(out, r"^errorCount: (\d+)$")) == errors

    rkey = field(out, r"^session:\s+(\S+)$")
    record = stored_records(tmp_path)[rkey].record
    validate_record(record)
    metrics = record["metadata"]["performanceMetrics"]
    assert metrics["errorCount"] == errors
    assert metrics["averageResponseTime"] == int(field(out, r"^averageResponseTime: (\d+) ms$"))
    # Each slow answer took at least 300 ms; each of the others a few ms on loopback.
    assert metrics["averageResponseTime"] >= (slow * 300) // requests
    assert metrics["averageResponseTime"] < (slow * 300 + requests * 200) // requests
    # Timed requests are measured, not counted as player activity: a page a turn,
    # and an action per successful fetch.
    assert record["activitySummary"]["totalEvents"] == turns + requests - errors


@dataclass(frozen=True)
class OfflineRun:
    """One run of ``offline_sync`` against the test PDS, shared by the tests below."""

    code: int
    out: str
    account: Account
    data_dir: Path
    #: (rkey, outbox, networkCondition, uri) per session, in play order.
    sessions: list[tuple[str, str, str, str]]


@pytest.fixture(scope="module")
def offline_run(pds: PdsServer, tmp_path_factory: pytest.TempPathFactory) -> OfflineRun:
    # Module scope (one ~7 s run for both tests), so a module-scoped account too.
    account = pds.create_account("offline")
    data_dir = tmp_path_factory.mktemp("offline_sync")
    # Sessions at [0, 2), [2, 4), [4, 6) s; the cable is cut over [2.25, 4.75) s.
    args = ["--pds-url", pds.url, "--handle", account.handle, "--password", account.password]
    args += ["--sessions", "3", "--session-seconds", "2"]
    args += ["--offline-at", "2.25", "--offline-for", "2.5", "--sync-timeout", "15"]
    args += ["--data-dir", str(data_dir)]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("DO_NOT_TRACK", raising=False)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            code = example_main("offline_sync")(args)
    out = printed.getvalue()
    sessions = re.findall(r"^session (\S+)\s+(\w+)\s+networkCondition (\w+)\s+(\S+)$", out, re.M)
    return OfflineRun(code, out, account, data_dir, sessions)


def test_offline_sync_gets_every_session_onto_the_pds_exactly_once(
    pds: PdsServer, offline_run: OfflineRun
) -> None:
    out = offline_run.out
    assert offline_run.code == 0, out
    # The outage was seen: the agent went offline, and held a finished session back.
    assert "--- the network goes away ---" in out and "--- the network is back ---" in out
    assert re.search(r"cable CUT\s+agent sees offline\s+outbox: live \d+ pending [1-9]", out), out
    assert "every session is on the PDS" in out
    assert len(offline_run.sessions) == 3, out
    played = [rkey for rkey, *_ in offline_run.sessions]

    # Exactly once: the PDS holds these three records and nothing else.
    records = pds.list_records(offline_run.account)
    on_pds = {item["uri"].rsplit("/", 1)[-1]: item for item in records}
    assert len(records) == 3 and sorted(on_pds) == sorted(played)
    rows = stored_records(offline_run.data_dir)
    for rkey, outbox, _, uri in offline_run.sessions:
        assert outbox == rows[rkey].outbox == "synced"
        assert on_pds[rkey]["uri"] == uri == rows[rkey].uri
        assert on_pds[rkey]["value"] == rows[rkey].record  # the final version, as stored


def test_offline_sync_records_the_outage_in_the_session_it_hit(offline_run: OfflineRun) -> None:
    assert offline_run.code == 0, offline_run.out
    conditions = [condition for _, _, condition, _ in offline_run.sessions]
    # Offline for 0 s, 1.25 s (from the 3rd failed request at 2.75 s) and 0.75 s of 2 s each.
    assert conditions == ["online", "offline", "online"], offline_run.out


def test_consent_and_guard_keeps_the_referrers_origin_and_the_players_yes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert example_main("consent_and_guard")(["--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '"referrer": "https://anisota.net"' in out
    assert "alice" not in out
    assert out.rstrip().endswith("consent: granted")
    (row,) = stored_records(tmp_path).values()
    assert row.record["sessionContext"]["referrer"] == "https://anisota.net"
    store = Store.open(tmp_path / DB_FILENAME)
    try:
        assert store.consent() == {"state": "granted", "by": "player"}
    finally:
        store.close()


@pytest.mark.parametrize(
    ("name", "fixture", "env"),
    [
        ("pygame_game", "pygame_display", {"SDL_VIDEODRIVER": "dummy", "SDL_AUDIODRIVER": "dummy"}),
        ("qt_game", "qt_app", {"QT_QPA_PLATFORM": "offscreen"}),
        ("pyglet_game", "pyglet_headless", {"PYGLET_HEADLESS": "true"}),
    ],
)
def test_each_game_window_records_a_session(
    name: str, fixture: str, env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A real window of the framework plays by itself, quits, and leaves its session."""
    request.getfixturevalue(fixture)  # the framework is here (else: skipped loudly / CI fails)
    environ = {k: v for k, v in os.environ.items() if k != "DO_NOT_TRACK"} | env
    script = [sys.executable, str(EXAMPLES / f"{name}.py")]
    done = subprocess.run(
        [*script, "--data-dir", str(tmp_path), "--frames", "90"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr
    rkey = field(done.stdout, r"^session (\S+) recorded in ")
    (row,) = stored_records(tmp_path).values()
    assert row.rkey == rkey and row.outbox == "local"  # no account: kept on this machine
    validate_record(row.record)
    assert (row.record["status"], row.record["endReason"]) == ("ended", "app_close")
    summary = row.record["activitySummary"]
    assert summary["pagesVisited"] == ["/garden"]
    assert summary["gameActions"]["specimensCollected"] >= 1
