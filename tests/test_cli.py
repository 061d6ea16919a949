"""The ``anisota-agent`` command line, in process and as the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from anisota_agent import Agent
from anisota_agent.cli import main
from anisota_agent.lexicon import validate_record

Recorded = tuple[Path, list[str]]


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[Recorded]:
    """A data dir with two ended sessions and one live one, its game still running."""
    agent = Agent("1.0", data_dir=tmp_path).start()
    rkeys = []
    for route in ("/a", "/b"):
        rkeys.append(str(agent.start_session(entry_point="direct")))
        agent.page(route)
        agent.end_session("logout")
    rkeys.append(str(agent.start_session()))
    assert agent.flush()
    yield tmp_path, rkeys
    agent.close()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_status_lists_the_queue(capsys: pytest.CaptureFixture[str], recorded: Recorded) -> None:
    data_dir, _ = recorded
    code, out, _ = run(capsys, "--data-dir", str(data_dir), "status")
    assert code == 0
    assert "sessions: live 1, pending 2, synced 0, quarantined 0" in out
    assert str(data_dir / "agent.sqlite3") in out


def test_sessions_table_and_json(capsys: pytest.CaptureFixture[str], recorded: Recorded) -> None:
    data_dir, rkeys = recorded
    code, out, _ = run(capsys, "--data-dir", str(data_dir), "sessions")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("RKEY")
    assert [line.split()[0] for line in lines[1:]] == sorted(rkeys, reverse=True)
    code, out, _ = run(
        capsys, "--data-dir", str(data_dir), "sessions", "--json", "--state", "pending"
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert {row["rkey"] for row in rows} == set(rkeys[:2])
    assert all(row["status"] == "ended" and row["endReason"] == "logout" for row in rows)


def test_show_prints_the_record(capsys: pytest.CaptureFixture[str], recorded: Recorded) -> None:
    data_dir, rkeys = recorded
    code, out, _ = run(capsys, "--data-dir", str(data_dir), "show", rkeys[1])
    assert code == 0
    record = json.loads(out)
    validate_record(record)
    assert record["activitySummary"]["pagesVisited"] == ["/b"]


def test_user_mistakes_exit_non_zero_without_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, recorded: Recorded
) -> None:
    data_dir, _ = recorded
    code, _, err = run(capsys, "--data-dir", str(data_dir), "show", "nope")
    assert (code, err) == (1, "anisota-agent: no session with record key 'nope'\n")
    code, _, err = run(capsys, "--data-dir", str(tmp_path / "empty"), "status")
    assert code == 1 and "no store at" in err and "Traceback" not in err
    code, _, err = run(capsys, "validate", str(tmp_path / "missing.json"))
    assert code == 1 and "cannot read" in err


def test_export_then_validate_round_trip(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, recorded: Recorded
) -> None:
    data_dir, rkeys = recorded
    target = tmp_path / "export.jsonl"
    assert run(capsys, "--data-dir", str(data_dir), "export", "-o", str(target))[0] == 0
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [line["rkey"] for line in lines] == sorted(rkeys)
    assert {line["outbox"] for line in lines} == {"pending", "live"}
    code, out, _ = run(capsys, "validate", str(target))
    assert (code, out) == (0, "3 valid, 0 invalid\n")


def test_validate_reports_each_invalid_record(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "$type": "net.anisota.beta.game.session",
                "status": "paused",
                "platform": "desktop",
                "clientVersion": "1",
                "startedAt": "2026-11-24T10:00:00.000Z",
            }
        )
    )
    code, out, err = run(capsys, "validate", str(bad))
    assert code == 1
    assert out == "0 valid, 1 invalid\n"
    assert "status" in err and "active" in err


def test_purge_needs_confirmation(capsys: pytest.CaptureFixture[str], recorded: Recorded) -> None:
    data_dir, _ = recorded
    code, _, err = run(capsys, "--data-dir", str(data_dir), "purge")
    assert code == 1 and "--yes" in err
    code, out, _ = run(capsys, "--data-dir", str(data_dir), "purge", "--yes")
    assert (code, out) == (0, "purged 3 session(s)\n")


def test_demo_console_script(tmp_path: Path) -> None:
    script = shutil.which("anisota-agent")
    assert script, "the console script is not installed (pip install -e .)"
    result = subprocess.run(
        [script, "--data-dir", str(tmp_path), "demo", "--seconds", "0.3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    record_text, _, status = result.stdout.rpartition("}\n")
    record = json.loads(record_text + "}")
    validate_record(record)
    assert record["status"] == "ended"
    assert record["metadata"]["performanceMetrics"]["errorCount"] == 1
    assert len(record["activitySummary"]["pagesVisited"]) == 5
    assert "sessions: live 0, pending 1" in status


def test_an_unreadable_store_is_reported_not_raised(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "agent.sqlite3").mkdir()  # a directory where the file should be
    code, _, err = run(capsys, "--data-dir", str(tmp_path), "status")
    assert code == 1 and err.startswith("anisota-agent: ") and "Traceback" not in err
