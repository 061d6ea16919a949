"""Local files are private: the data dir 0700, every file in it 0600, whatever the umask.

The data dir holds the player's DID and handle, every record not yet public and
the refresh token. Each test runs under a usual umask (022) and under none at
all (000), restored after; real files in ``tmp_path``, a real agent, and a
scripted PDS (``httpx.MockTransport``) where a login is needed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from anisota_agent import Agent
from anisota_agent.store import DB_FILENAME, Store
from anisota_agent.tokens import SESSION_FILENAME, FileTokenStore

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")

DID = "did:plc:privacy"
HANDLE = "me.test"
PDS_URL = "https://pds.example"


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under this umask; the old one is back after it."""
    value: int = request.param
    old = os.umask(value)
    try:
        yield value
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(directory: Path) -> dict[str, int]:
    """The mode of every entry of ``directory`` (none of them a dir)."""
    found = {entry.name: mode(entry) for entry in directory.iterdir()}
    assert not [entry for entry in directory.iterdir() if entry.is_dir()]
    return found


def assert_private(directory: Path) -> dict[str, int]:
    """``directory`` is 0700 and every file in it 0600; returns the files' modes."""
    found = modes(directory)
    assert (oct(mode(directory)), {name: oct(bits) for name, bits in found.items()}) == (
        oct(0o700),
        {name: oct(0o600) for name in found},
    )
    return found


def scripted_pds(request: httpx.Request) -> httpx.Response:
    """A PDS that logs in ``me.test`` and is unavailable for anything else."""
    nsid = request.url.path.removeprefix("/xrpc/")
    if nsid == "com.atproto.server.createSession":
        return httpx.Response(
            200,
            json={"did": DID, "handle": HANDLE, "accessJwt": "access", "refreshJwt": "refresh"},
        )
    if nsid == "_health":
        return httpx.Response(200, json={"version": "test"})
    return httpx.Response(503, json={"error": "Unavailable", "message": "the test says so"})


def record_a_session(agent: Agent) -> None:
    agent.start_session()
    agent.page("/garden")
    agent.end_session("user_initiated")
    agent.start_session()  # a live one too: the store is mid-use, -wal and -shm open
    agent.touch()
    assert agent.flush(sync=False)


def test_the_data_dir_and_every_file_an_agent_makes_are_private(umask: int, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    agent = Agent("1.0", data_dir=data_dir, transport=httpx.MockTransport(scripted_pds)).start()
    try:
        agent.login(HANDLE, "pw", pds_url=PDS_URL)
        record_a_session(agent)
        assert agent.flush()  # the uplink's round: the login done, its session saved
        assert agent.status().account is not None
        found = assert_private(data_dir)
        assert {DB_FILENAME, f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm", SESSION_FILENAME} <= set(
            found
        )
    finally:
        agent.close()
    assert_private(data_dir)


def test_an_older_versions_open_dir_and_files_are_tightened(umask: int, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    path = data_dir / DB_FILENAME
    Store.open(path).close()
    # As an older version left them, its process killed: the WAL and its index
    # still there (another connection holds them open), everything readable.
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("PRAGMA journal_mode=WAL")
        other.execute("INSERT INTO counters(name, value) VALUES ('older', 1)")
        for name in (DB_FILENAME, f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm"):
            (data_dir / name).chmod(0o644)
        data_dir.chmod(0o755)

        agent = Agent("1.0", data_dir=data_dir).start()
        try:
            record_a_session(agent)
            found = assert_private(data_dir)
            assert set(found) == {DB_FILENAME, f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm"}
        finally:
            agent.close()
    finally:
        other.close()
    assert_private(data_dir)
    store = Store.open(path)  # the same store, not a new one
    try:
        assert store.counters().get("older") == 1 and len(store.sessions()) == 2
    finally:
        store.close()


def test_a_corrupt_file_moved_aside_is_private(umask: int, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / DB_FILENAME).write_bytes(b"this is not a database" * 100)
    (data_dir / DB_FILENAME).chmod(0o644)

    agent = Agent("1.0", data_dir=data_dir).start()
    try:
        record_a_session(agent)
        assert agent.status().counters.get("store_corrupt") == 1
        (aside,) = data_dir.glob(f"{DB_FILENAME}.corrupt-*")
        assert aside.read_bytes() == b"this is not a database" * 100
        assert mode(aside) == 0o600
        assert aside.name in assert_private(data_dir)
    finally:
        agent.close()
    assert_private(data_dir)


def test_a_corrupt_files_wal_and_index_moved_aside_are_private(umask: int, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    path = data_dir / DB_FILENAME
    store = Store.open(path)
    # A second game window holds the file open: its -wal and -shm stay beside it.
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.executemany(
            "INSERT INTO meta(key, value) VALUES(?, ?)",
            [(f"key{index}", json.dumps("x" * 500)) for index in range(40)],
        )
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        other.execute("INSERT INTO counters(name, value) VALUES ('after', 1)")  # in the WAL
        (page,) = other.execute("PRAGMA page_size").fetchone()
        size = path.stat().st_size
        with open(path, "r+b") as raw:  # every page but the first: garbage
            raw.seek(page)
            raw.write(os.urandom(size - page))
        for name in (DB_FILENAME, f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm"):
            (data_dir / name).chmod(0o644)

        salvage = store.verify()
        assert salvage is not None
        asides = {f"{salvage.aside.name}{side}" for side in ("", "-wal", "-shm")}
        assert {name: oct(mode(data_dir / name)) for name in asides} == dict.fromkeys(
            asides, oct(0o600)
        )
        assert asides < set(assert_private(data_dir))
    finally:
        store.close()
        other.close()


def test_the_token_file_and_its_temp_file_are_private_in_an_open_dir(
    umask: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o755)
    temp_modes: list[int] = []
    replace = os.replace

    def watched(source: Any, target: Any) -> None:
        temp_modes.append(mode(Path(source)))
        replace(source, target)

    monkeypatch.setattr(os, "replace", watched)
    store = FileTokenStore(data_dir / SESSION_FILENAME)
    store.save({"version": 1, "kind": "app_password", "refresh_jwt": "secret"})
    assert temp_modes == [0o600]
    assert assert_private(data_dir) == {SESSION_FILENAME: 0o600}


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a process that runs until the test ends."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        yield child.pid
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)


def dead_pid() -> int:
    """The pid of a process that ran, exited and was reaped."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        check=True,
        text=True,
    )
    return int(done.stdout)


def test_temp_files_of_killed_writers_are_removed_at_the_next_start(
    umask: int, tmp_path: Path, live_pid: int
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    secret = json.dumps({"refresh_jwt": "secret"})

    def temp(pid: int, rand: str, name: str = SESSION_FILENAME) -> Path:
        path = data_dir / f".{name}.{pid}.{rand}.tmp"
        path.write_text(secret)
        return path

    killed = temp(dead_pid(), "0badc0de")
    killed_other_name = temp(dead_pid(), "12345678", "other.json")
    writing_now = temp(live_pid, "a1b2c3d4")
    writing_here = temp(os.getpid(), "feedf00d")
    reused_pid = temp(live_pid, "deadbeef")  # its writer long gone, its pid reused since
    an_hour_ago = time.time() - 3600
    os.utime(reused_pid, (an_hour_ago, an_hour_ago))
    not_ours = [data_dir / name for name in (".session.json.tmp", "notes.tmp", ".x.1.abc.tmp")]
    for path in not_ours:
        path.write_text("the player's")

    agent = Agent("1.0", data_dir=data_dir).start()
    try:
        assert agent.flush(sync=False)  # the store is open: the start's sweep is done
        left = {path.name for path in data_dir.iterdir()}
    finally:
        agent.close()
    for gone in (killed, killed_other_name, reused_pid):
        assert gone.name not in left
    for kept in (writing_now, writing_here, *not_ours):
        assert kept.name in left
        assert kept.read_text() in (secret, "the player's")
