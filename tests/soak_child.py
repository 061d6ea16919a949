"""A game process for the kill soak (``tests/soak.py``): plays, journals, may be killed.

Run with ``sys.executable``; only the agent's public API is used. Two modes:

``play``
    ``Agent(client_version, data_dir, checkpoint_interval).start()``; if the data
    dir holds no saved login yet, ``login(handle, password, pds_url=PROXY_URL)``
    (the password comes from ``ANISOTA_SOAK_PASSWORD``, never from argv). Then a
    random play seeded by ``--seed``: sessions with a few page/action calls, ended
    with a random host reason (``user_initiated``, ``app_close``,
    ``device_switch``; never ``logout``, which would forget the login), bursts of
    many short sessions (a backlog), pauses, ``flush()`` now and then; finally
    ``close()``, sometimes with a session still live (close ends it as
    ``app_close``).
``drain``
    Resume (or make) the login and ``flush()`` until the store holds no session
    of the account (``--did``) that is not yet synced or quarantined, or until
    ``--deadline`` seconds have passed; then ``close()``. Prints one JSON line
    with what it saw.

The journal (``--journal``) is appended to with one line per event, each one
written and fsync'd before the game goes on, so a SIGKILL can only lose the
line being written. Times are ``time.monotonic_ns()`` (CLOCK_MONOTONIC is
system-wide: the parent compares them with the time of its kill)::

    up <t>                         the agent's start() returned
    login <t>                      login() is about to be called (no saved login)
    account <did> <t>              status() first names the account
    begin <t> <wall_us>            start_session() is about to be called
    start <rkey> <t>               start_session() returned rkey
    end <rkey> <reason> <t>        end_session(reason) returned (close(): app_close)
    burst <n> <t> / burst-done <t> a burst of n short sessions starts / ends
    flush <t> / flushed <ok> <t>   flush() is called / returned
    closing <t> / closed <ok> <t>  close() is called / returned
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from anisota_agent import Agent

PASSWORD_ENV = "ANISOTA_SOAK_PASSWORD"
#: The file an app-password login is saved in (the agent's default token store).
SAVED_LOGIN = "session.json"
DB_FILENAME = "agent.sqlite3"
CLIENT_VERSION = "soak-1.0"
#: Host reasons the soak ends sessions with (not ``logout``: it forgets the login).
END_REASONS = ("user_initiated", "app_close", "device_switch")
ROUTES = ("/garden", "/inventory", "/map", "/shop", "/profile", "/quests")
ACTIONS = ("postsViewed", "itemsCollected", "specimensCollected", "feedsLoaded")
ENTRY_POINTS = ("direct", "refresh", "deep_link")


class Journal:
    """An append-only, fsync'd-per-line event log shared by every run of a soak."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, *fields: object) -> None:
        """Append one line and make it durable before returning."""
        os.write(self._fd, (" ".join(str(f) for f in fields) + "\n").encode())
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


class Game:
    """One run of the simulated game: the agent, the journal and the random plan."""

    def __init__(self, agent: Agent, journal: Journal, rng: random.Random) -> None:
        self.agent = agent
        self.journal = journal
        self.rng = rng
        self.account_seen = False

    def note_account(self) -> None:
        """Journal the moment ``status()`` first names an account (reads no file)."""
        if not self.account_seen:
            account = self.agent.status().account
            if account:
                self.account_seen = True
                self.journal.write("account", account, time.monotonic_ns())

    def pause(self, low: float, high: float) -> None:
        """The game's own pacing between two calls (play time, not a wait for the agent)."""
        time.sleep(self.rng.uniform(low, high))

    def begin(self) -> str:
        """``start_session()``, journaled before the call and right after it returns."""
        self.note_account()
        self.journal.write("begin", time.monotonic_ns(), time.time_ns() // 1000)
        rkey = self.agent.start_session(entry_point=self.rng.choice(ENTRY_POINTS))
        returned = time.monotonic_ns()
        if rkey is None:  # disabled agent: nothing to prove
            raise SystemExit("start_session() returned None: is DO_NOT_TRACK set?")
        self.journal.write("start", rkey, returned)
        return rkey

    def finish(self, rkey: str) -> None:
        """``end_session(reason)`` with a random host reason, journaled when it returned."""
        reason = self.rng.choice(END_REASONS)
        self.agent.end_session(reason)
        self.journal.write("end", rkey, reason, time.monotonic_ns())

    def session(self) -> None:
        """A session with a few page/action calls at play pace."""
        rkey = self.begin()
        for _ in range(self.rng.randint(1, 6)):
            self.pause(0.0, 0.08)
            if self.rng.random() < 0.5:
                self.agent.page(self.rng.choice(ROUTES))
            else:
                self.agent.action(self.rng.choice(ACTIONS), self.rng.randint(1, 5))
            self.note_account()
        self.pause(0.0, 0.05)
        self.finish(rkey)

    def burst(self) -> None:
        """Many short sessions back to back: a backlog for the sync."""
        count = self.rng.randint(5, 40)
        self.journal.write("burst", count, time.monotonic_ns())
        for _ in range(count):
            rkey = self.begin()
            self.agent.page(self.rng.choice(ROUTES))
            self.finish(rkey)
        self.journal.write("burst-done", time.monotonic_ns())

    def flush(self) -> None:
        """A blocking ``flush()``, as a tool or a loading screen might do."""
        self.journal.write("flush", time.monotonic_ns())
        ok = self.agent.flush(timeout=self.rng.uniform(0.2, 2.0))
        self.journal.write("flushed", int(ok), time.monotonic_ns())

    def play(self, seconds: float) -> None:
        """Random play for about ``seconds``, then ``close()``."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self.note_account()
            roll = self.rng.random()
            if roll < 0.55:
                self.session()
            elif roll < 0.70:
                self.burst()
            elif roll < 0.80:
                self.flush()
            else:
                self.pause(0.02, 0.3)
        live = self.begin() if self.rng.random() < 0.3 else None
        if live is not None:
            self.agent.page(self.rng.choice(ROUTES))
        self.journal.write("closing", time.monotonic_ns())
        ok = self.agent.close()
        returned = time.monotonic_ns()
        if live is not None:
            self.journal.write("end", live, "app_close", returned)
        self.journal.write("closed", int(ok), returned)


def unsynced_of(db_path: Path, did: str) -> int:
    """Sessions of ``did`` in the store that are neither synced nor quarantined."""
    if not db_path.exists():
        return 0
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        row = conn.execute(
            "SELECT count(*) FROM sessions"
            " WHERE did = ? AND outbox NOT IN ('synced', 'quarantined')",
            (did,),
        ).fetchone()
    finally:
        conn.close()
    return int(row[0])


def drain(agent: Agent, data_dir: Path, did: str, deadline_s: float) -> dict[str, Any]:
    """Flush until no session of ``did`` is left unsynced, or the deadline passes."""
    began = time.monotonic()
    rounds = 0
    left = unsynced_of(data_dir / DB_FILENAME, did)
    while True:
        remaining = deadline_s - (time.monotonic() - began)
        if remaining <= 0:
            break
        agent.flush(timeout=min(10.0, remaining))
        rounds += 1
        left = unsynced_of(data_dir / DB_FILENAME, did)
        if left == 0 and agent.status().account:
            agent.flush(timeout=min(5.0, max(0.1, deadline_s - (time.monotonic() - began))))
            left = unsynced_of(data_dir / DB_FILENAME, did)
            if left == 0:
                break
    status = agent.status()
    return {
        "left": left,
        "rounds": rounds,
        "seconds": round(time.monotonic() - began, 3),
        "account": status.account,
        "auth_problem": status.auth_problem,
        "outbox": status.outbox,
        "counters": status.counters,
        "recovered": status.recovered,
        "sync_error": status.sync_error,
        "store_mode": status.store_mode,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run one game process."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("play", "drain"))
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--journal", type=Path, required=True)
    parser.add_argument("--proxy-url", required=True)
    parser.add_argument("--handle", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-interval", type=float, default=5.0)
    parser.add_argument("--play-seconds", type=float, default=2.0)
    parser.add_argument("--did", default="")
    parser.add_argument("--deadline", type=float, default=60.0)
    args = parser.parse_args(argv)
    password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        parser.error(f"{PASSWORD_ENV} is not set")
    journal = Journal(args.journal)
    agent = Agent(
        CLIENT_VERSION, data_dir=args.data_dir, checkpoint_interval=args.checkpoint_interval
    ).start()
    journal.write("up", time.monotonic_ns())
    if not (args.data_dir / SAVED_LOGIN).exists():
        journal.write("login", time.monotonic_ns())
        agent.login(args.handle, password, pds_url=args.proxy_url)
    if args.mode == "play":
        Game(agent, journal, random.Random(args.seed)).play(args.play_seconds)
    else:
        report = drain(agent, args.data_dir, args.did, args.deadline)
        report["closed"] = agent.close(timeout=5.0)
        print(json.dumps(report), flush=True)
    journal.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
