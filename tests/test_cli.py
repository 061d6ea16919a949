"""The ``anisota-agent`` command line, in process and as the installed console script."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from anisota_agent import Agent, cli, store
from anisota_agent._version import __version__
from anisota_agent.cli import main
from anisota_agent.lexicon import validate_record
from anisota_agent.store import OUTBOX_STATES

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
    # Recorded with no account: local, never uploaded.
    counts = "live 1, pending 0, local 2, synced 0, quarantined 0, withheld 0, deleted 0"
    assert f"sessions: {counts}\n" in out
    assert str(data_dir / "agent.sqlite3") in out


def test_sessions_table_and_json(capsys: pytest.CaptureFixture[str], recorded: Recorded) -> None:
    data_dir, rkeys = recorded
    code, out, _ = run(capsys, "--data-dir", str(data_dir), "sessions")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("RKEY")
    assert [line.split()[0] for line in lines[1:]] == sorted(rkeys, reverse=True)
    code, out, _ = run(
        capsys, "--data-dir", str(data_dir), "sessions", "--json", "--state", "local"
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
    code, _, err = run(capsys, "--data-dir", str(data_dir), "purge")
    assert code == 1 and "--yes" in err and "Traceback" not in err
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
    assert {line["outbox"] for line in lines} == {"local", "live"}
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
    assert "sessions: live 0, pending 0, local 1" in status  # the demo has no account


def test_an_unreadable_store_is_reported_not_raised(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "agent.sqlite3").mkdir()  # a directory where the file should be
    code, _, err = run(capsys, "--data-dir", str(tmp_path), "status")
    assert code == 1 and err.startswith("anisota-agent: ") and "Traceback" not in err


def usage(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Like ``run``, for what argparse ends itself (usage errors, --help, --version)."""
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    out, err = capsys.readouterr()
    assert isinstance(stop.value.code, int)
    return stop.value.code, out, err


def test_readme_documents_every_exit_code() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## CLI\n", 1)[1].split("\n## ", 1)[0]
    documented = [int(code) for code in re.findall(r"^\| `?(\d+)`? \|", section, re.M)]
    codes = [value for name, value in vars(cli).items() if name.startswith("EXIT_")]
    assert sorted(documented) == sorted(codes)  # one table, one row a code


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert usage(capsys, "--version") == (0, f"anisota-agent {__version__}\n", "")


def test_nothing_recorded_is_an_empty_report_not_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh"
    code, out, err = run(capsys, "--data-dir", str(fresh), "status")
    assert code == 0, err
    assert f"store:    {fresh / 'agent.sqlite3'} (nothing recorded yet)\n" in out
    assert "sessions: " + ", ".join(f"{state} 0" for state in OUTBOX_STATES) + "\n" in out
    assert "dropped:  none\n" in out
    code, out, _ = run(capsys, "--data-dir", str(fresh), "sessions")
    assert code == 0 and out.splitlines()[0].startswith("RKEY") and len(out.splitlines()) == 1
    assert run(capsys, "--data-dir", str(fresh), "sessions", "--json") == (0, "", "")
    assert run(capsys, "--data-dir", str(fresh), "export") == (0, "", "")
    code, _, err = run(capsys, "--data-dir", str(fresh), "show", "3lbyzq2a3v22c")
    assert code == 1 and "no session with record key" in err
    assert run(capsys, "--data-dir", str(fresh), "purge", "--yes") == (
        0,
        "purged 0 session(s)\n",
        "",
    )
    assert not fresh.exists()  # inspecting a machine leaves it as it was


def test_validate_refuses_a_file_without_records(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name, text in (("empty.json", ""), ("array.json", "[]"), ("blank.jsonl", "\n \n")):
        path = tmp_path / name
        path.write_text(text)
        code, out, err = run(capsys, "validate", str(path))
        assert (code, out) == (1, ""), name
        assert err == f"anisota-agent: {path} holds no record to validate\n"


def test_error_messages_name_no_python_class(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run(capsys, "--data-dir", str(tmp_path), "export", "-o", "/no/such/dir/x.jsonl")
    assert (code, err) == (
        1,
        "anisota-agent: cannot write /no/such/dir/x.jsonl: No such file or directory\n",
    )
    broken = tmp_path / "broken"
    (broken / "agent.sqlite3").mkdir(parents=True)  # a directory where the file should be
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        pds_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        monkeypatch.setenv("ANISOTA_AGENT_PASSWORD", "secret")
        failures = [
            ("--data-dir", str(tmp_path), "export", "-o", "/no/such/dir/x.jsonl"),
            ("--data-dir", str(broken), "status"),
            ("--data-dir", str(broken), "export"),
            ("validate", str(tmp_path)),
            ("validate", str(tmp_path / "missing.json")),
            ("--data-dir", str(tmp_path), "login", "--pds-url", pds_url, "--identifier", "a.b"),
        ]
        for args in failures:
            code, _, err = run(capsys, *args)
            assert code == 1 and err.startswith("anisota-agent: "), args
            assert "Traceback" not in err and "[Errno" not in err, err
            assert not re.search(r"[A-Z][a-zA-Z]+Error", err), err
    assert "cannot open the store at" in run(capsys, "--data-dir", str(broken), "status")[2]
    assert "no answer from the PDS (Connection refused)" in run(capsys, *failures[-1])[2]


def test_bad_numbers_are_usage_errors_naming_the_option(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = [
        ("sessions", "--limit", "0"),
        ("sessions", "--limit", "-1"),
        ("sessions", "--limit=-1"),
        ("sessions", "--limit", "many"),
        ("flush", "--timeout", "-5"),
        ("flush", "--timeout", "3601"),
        ("flush", "--timeout", "nan"),
        ("demo", "--seconds", "601"),
    ]
    for args in bad:
        code, out, err = usage(capsys, "--data-dir", str(tmp_path), *args)
        option = args[1].split("=")[0]
        assert (code, out) == (2, ""), args
        assert f"argument {option}: must be" in err, err
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_options_say_what_they_take(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = usage(capsys, "sessions", "--help")
    text = " ".join(out.split())
    assert code == 0
    assert "--state STATE only sessions in this outbox state: " + ", ".join(OUTBOX_STATES) in text
    assert "--limit N at most N sessions, newest first (default: 50)" in text
    code, out, _ = usage(capsys, "flush", "--help")
    assert "0 to 3600 (default: 300 s)" in " ".join(out.split())


def test_data_dir_before_or_after_the_command(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    recorded: Recorded,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data_dir, rkeys = recorded
    monkeypatch.setenv("ANISOTA_AGENT_DATA_DIR", str(tmp_path / "elsewhere"))
    before = run(capsys, "--data-dir", str(data_dir), "sessions", "--json")
    after = run(capsys, "sessions", "--json", "--data-dir", str(data_dir))
    both = run(
        capsys, "--data-dir", str(tmp_path / "other"), "sessions", "--data-dir", str(data_dir)
    )
    assert before == after and before[0] == 0
    assert {json.loads(line)["rkey"] for line in after[1].splitlines()} == set(rkeys)
    assert both[0] == 0 and len(both[1].splitlines()) == 1 + len(rkeys)  # the later one wins
    assert run(capsys, "sessions", "--json") == (0, "", "")  # neither: the default dir
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "other").exists()


def test_states_come_from_the_store(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = (*OUTBOX_STATES, "archived")  # a state a later version might add
    monkeypatch.setattr(store, "OUTBOX_STATES", states)
    assert run(capsys, "--data-dir", str(tmp_path), "sessions", "--state", "archived")[0] == 0
    code, out, _ = run(capsys, "--data-dir", str(tmp_path), "status")
    assert code == 0
    assert "sessions: " + ", ".join(f"{state} 0" for state in states) + "\n" in out
