"""The kill soak, bounded: "never loses a session" under random SIGKILLs (``tests/soak.py``).

A real game process (``tests/soak_child.py``) is killed 14 times at random
moments while it logs in, records, checkpoints, flushes and drains backlogs
through a link that is cut and restored; then a clean process drains the outbox
and journal, store and PDS are compared. ``ANISOTA_SOAK_SEED`` replays a soak;
``benchmarks/kill_soak.py`` runs 500 kills.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
from pathlib import Path
from typing import Any

from pds_harness import SESSION_COLLECTION, Account, PdsServer
from soak import RunInfo, SoakConfig, analyse, run_soak, tid_micros

KILLS = 14


def test_random_sigkills_lose_no_session_started_100_ms_before_the_kill(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    seed = int(os.environ.get("ANISOTA_SOAK_SEED") or random.SystemRandom().getrandbits(32))
    result = run_soak(pds, account, tmp_path, SoakConfig(kills=KILLS, seed=seed))
    detail = f"(replay with ANISOTA_SOAK_SEED={seed})\n{result.summary()}"

    figures = result.figures()
    # The processes were really killed, each by SIGKILL, and no run crashed or hung.
    assert figures["kills"] == KILLS, detail
    assert result.killed_returncodes == [-signal.SIGKILL] * KILLS, detail
    assert figures["crashed_runs"] == 0, detail
    assert figures["sessions"] > 0, detail
    assert result.drain.get("returncode") == 0, detail

    assert figures["early_lost"] == 0, detail
    assert figures["wrong_end"] == 0, detail
    assert figures["duplicates"] == 0, detail
    assert figures["synced_not_on_pds"] == 0, detail


def _tid(micros: int, clock_id: int = 7) -> str:
    value = (micros << 10) | clock_id
    alphabet = "234567abcdefghijklmnopqrstuvwxyz"
    return "".join(alphabet[(value >> (5 * i)) & 31] for i in reversed(range(13)))


def test_the_comparison_counts_each_kind_of_loss(tmp_path: Path) -> None:
    """``analyse`` on a hand-made journal, store and PDS listing (no processes)."""
    ms = 1_000_000
    kill = 10_000 * ms
    wall = 1_795_514_400_000_000
    rk = {name: _tid(wall + i * 1000) for i, name in enumerate("abcdefghij")}
    assert tid_micros(rk["a"]) == wall
    journal = tmp_path / "journal.log"
    journal.write_text(
        "\n".join(
            [
                f"run 0 1 {0}",
                "up 1",
                f"start {rk['a']} {kill - 500 * ms}",  # early, ended early: fine
                f"end {rk['a']} device_switch {kill - 400 * ms}",
                f"start {rk['b']} {kill - 300 * ms}",  # early, missing: early_lost
                f"start {rk['c']} {kill - 250 * ms}",  # ended early, wrong reason
                f"end {rk['c']} app_close {kill - 200 * ms}",
                f"start {rk['d']} {kill - 150 * ms}",  # ended late, expired: fine
                f"end {rk['d']} app_close {kill - 50 * ms}",
                f"start {rk['e']} {kill - 20 * ms}",  # late, missing: late_lost
                f"begin {kill - 5 * ms} {wall + 9_000}",  # killed before its start line
                f"kill 0 {kill}",
                "run 1 2 0",
                f"start {rk['f']} {kill + 1}",  # a run that ended by itself: all early
                f"end {rk['f']} user_initiated {kill + 2}",
                "exit 1 0 0",
                "",
            ]
        )
    )
    db = sqlite3.connect(tmp_path / "agent.sqlite3")
    db.execute("CREATE TABLE sessions (rkey TEXT PRIMARY KEY, did, status, outbox, record)")
    db.execute(
        "INSERT INTO sessions VALUES (?, 'did:x', 'active', 'live', ?)",
        (rk["b"], '{"status": "active"}'),
    )
    db.commit()
    db.close()

    def record(rkey: str, status: str, reason: str) -> dict[str, Any]:
        value = {"status": status, "endReason": reason}
        return {"uri": f"at://did:x/{SESSION_COLLECTION}/{rkey}", "value": value}

    remote = [
        record(rk["a"], "ended", "device_switch"),
        record(rk["c"], "ended", "user_initiated"),
        record(rk["d"], "expired", "timeout"),
        record(rk["f"], "ended", "user_initiated"),
        record(_tid(wall + 9_100), "expired", "timeout"),  # the unjournaled one
        record(_tid(wall + 60_000_000), "ended", "app_close"),  # nobody's: a duplicate
    ]
    runs = [
        RunInfo(0, 1, 10, "pass", "pass", False, kill_ns=kill, returncode=-signal.SIGKILL),
        RunInfo(1, 2, 11, "pass", "pass", False, returncode=0),
    ]
    result = analyse(journal, tmp_path, remote, runs)
    assert (result.sessions, result.early_sessions, result.late_sessions) == (6, 5, 1)
    assert (result.early_lost, result.late_lost, result.wrong_end) == (1, 1, 1)
    assert (result.unjournaled, result.duplicates, result.on_pds) == (1, 1, 6)
    assert (result.kills, result.spared_runs) == (1, 1)
    lost = {loss.kind: loss for loss in result.losses}
    assert lost["early_lost"].rkey == rk["b"]
    assert lost["early_lost"].store == {
        "did": "did:x",
        "status": "active",
        "outbox": "live",
        "record_status": "active",
        "record_end_reason": None,
    }
    assert lost["early_lost"].start_before_kill_ms == 300.0
    assert lost["wrong_end"].rkey == rk["c"]
    assert lost["wrong_end"].pds == {"status": "ended", "endReason": "user_initiated"}
    assert lost["late_lost"].rkey == rk["e"] and lost["late_lost"].store is None
