"""The kill soak: SIGKILL a real game process at random moments, then count what was lost.

Shared by ``tests/test_kill_soak.py`` (a bounded number of kills) and
``benchmarks/kill_soak.py`` (500). :func:`run_soak` runs ``tests/soak_child.py``
again and again against one data dir, through a :class:`~faultproxy.FaultProxy`
in front of a real PDS:

- each run plays a random game (seeded) and is killed with SIGKILL at a moment
  drawn uniformly from a window after its spawn, so kills land during startup
  and login, recording, checkpoints, bursts, flushes and backlog drains; some
  runs are left to end by themselves with ``close()``;
- between runs, and sometimes in the middle of one, the link is cut or restored
  (``proxy.cut()`` / ``proxy.passthrough()``), so backlogs build up offline and
  drain through a restored link while kills keep landing; sometimes the saved
  login is removed before a run (the player logs in again), so kills also land
  while a login is in flight;
- after the last kill a clean child resumes the login and flushes until no
  session of the account is left unsynced (bounded), then journal, store and
  PDS are compared.

The rules (issue 7): a session whose ``start_session()`` returned at least
:data:`GRACE_NS` before the kill that ended its run (or in a run that ended by
itself) must be on the PDS (else ``early_lost``; younger ones missing are
``late_lost``, allowed); a session whose ``end_session()`` returned that early must be
there with ``status`` ``ended`` and the journaled ``endReason`` (else
``wrong_end``; a missing one counts as lost, not twice); the PDS holds nothing
but journaled sessions (``duplicates``), except one session per run killed
between ``start_session()`` being called and its journal line (``unjournaled``,
recognised by the TID's time).
"""

from __future__ import annotations

import compileall
import contextlib
import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faultproxy import FaultProxy
from pds_harness import Account, PdsServer

__all__ = [
    "GRACE_NS",
    "Loss",
    "SoakConfig",
    "SoakResult",
    "analyse",
    "run_soak",
    "tid_micros",
]

CHILD = Path(__file__).resolve().with_name("soak_child.py")
#: A session must have been started (or ended) this long before the kill to count.
GRACE_NS = 100_000_000
DB_FILENAME = "agent.sqlite3"
SAVED_LOGIN = "session.json"
_TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class SoakConfig:
    """How hard and how long to soak.

    Attributes:
        kills: SIGKILLs to deliver (runs that end by themselves come on top).
        seed: the whole soak's seed (each run's plan derives from it).
        kill_window: a run's kill lands uniformly this many seconds after its spawn.
        play_seconds: how long a run plays before it would ``close()`` by itself.
        spare_probability: a run is not killed at all and ends with ``close()``.
        link_probability: before a run, the link changes (cut or restored).
        toggle_probability: the link also flips once during the run.
        cut_share: of the link changes, the share that cut it.
        relogin_probability: the saved login is removed before a run (a new login).
        checkpoint_intervals: a run's ``checkpoint_interval`` is one of these.
        drain_deadline: seconds the final clean child may take to drain the outbox.
        run_timeout: seconds a spared run may take to exit before it is killed (a hang).
    """

    kills: int = 15
    seed: int = 0
    kill_window: tuple[float, float] = (0.0, 2.0)
    play_seconds: tuple[float, float] = (0.3, 2.5)
    spare_probability: float = 0.12
    link_probability: float = 0.35
    toggle_probability: float = 0.25
    cut_share: float = 0.5
    relogin_probability: float = 0.1
    checkpoint_intervals: tuple[float, ...] = (0.1, 0.3, 1.0, 5.0)
    drain_deadline: float = 60.0
    run_timeout: float = 30.0


@dataclass
class Loss:
    """A journaled session the PDS does not hold as it should, and what the store says."""

    rkey: str
    run: int
    kind: str  # early_lost, late_lost or wrong_end
    start_before_kill_ms: float | None
    end_before_kill_ms: float | None
    journaled_reason: str | None
    pds: dict[str, Any] | None
    store: dict[str, Any] | None


@dataclass
class RunInfo:
    """One child run as the parent saw it."""

    index: int
    seed: int
    pid: int
    link_at_start: str
    link_at_end: str
    relogin: bool
    kill_ns: int | None = None
    returncode: int | None = None
    phase_at_kill: str | None = None
    unsynced_before: int = 0
    stderr_tail: str = ""


@dataclass
class SoakResult:
    """The figures of a soak, plus the detail to debug any loss."""

    kills: int = 0
    runs: int = 0
    spared_runs: int = 0
    killed_returncodes: list[int] = field(default_factory=list)
    crashed_runs: list[dict[str, Any]] = field(default_factory=list)
    sessions: int = 0
    early_sessions: int = 0
    late_sessions: int = 0
    ended_early: int = 0
    early_lost: int = 0
    late_lost: int = 0
    wrong_end: int = 0
    duplicates: int = 0
    unjournaled: int = 0
    on_pds: int = 0
    synced_not_on_pds: int = 0
    store_differs_from_pds: int = 0
    unattributed_in_store: int = 0
    store_outbox: dict[str, int] = field(default_factory=dict)
    kill_phases: dict[str, int] = field(default_factory=dict)
    kills_during_drain: int = 0
    kills_with_link_cut: int = 0
    drain: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    seed: int = 0
    losses: list[Loss] = field(default_factory=list)
    unknown_on_pds: list[dict[str, Any]] = field(default_factory=list)
    malformed_journal_lines: int = 0
    run_log: list[RunInfo] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        """The headline figures (no per-loss detail)."""
        keep = (
            "kills",
            "runs",
            "spared_runs",
            "sessions",
            "early_sessions",
            "late_sessions",
            "ended_early",
            "early_lost",
            "late_lost",
            "wrong_end",
            "duplicates",
            "unjournaled",
            "on_pds",
            "synced_not_on_pds",
            "store_differs_from_pds",
            "unattributed_in_store",
            "kill_phases",
            "kills_during_drain",
            "kills_with_link_cut",
            "seconds",
            "seed",
        )
        return {name: getattr(self, name) for name in keep} | {
            "crashed_runs": len(self.crashed_runs)
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return dataclasses.asdict(self)

    def summary(self, limit: int = 10) -> str:
        """A readable account for an assertion message."""
        lines = [json.dumps(self.figures(), indent=1)]
        for loss in self.losses[:limit]:
            lines.append(json.dumps(dataclasses.asdict(loss)))
        for item in self.unknown_on_pds[:limit]:
            lines.append("unknown on PDS: " + json.dumps(item))
        for crash in self.crashed_runs[:limit]:
            lines.append("crashed run: " + json.dumps(crash))
        lines.append("drain: " + json.dumps(self.drain))
        return "\n".join(lines)


def tid_micros(rkey: str) -> int | None:
    """The microseconds since the epoch a TID record key was made at (None: not a TID)."""
    if len(rkey) != 13:
        return None
    value = 0
    for char in rkey:
        digit = _TID_ALPHABET.find(char)
        if digit < 0:
            return None
        value = value * 32 + digit
    return value >> 10


# -- the runs ---------------------------------------------------------------------------


class _Link:
    """The proxy's link state, switched between and during runs."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.up = True

    def set(self, up: bool) -> None:
        if up:
            self.proxy.passthrough()
        else:
            self.proxy.cut()
        self.up = up

    @property
    def name(self) -> str:
        return "pass" if self.up else "cut"


def _journal_append(path: Path, *fields: object) -> None:
    """The parent's own journal lines (written only while no child runs)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (" ".join(str(f) for f in fields) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _child_env(account: Account) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DO_NOT_TRACK", "ANISOTA_AGENT_KEYRING", "ANISOTA_AGENT_DATA_DIR")
    }
    env["ANISOTA_SOAK_PASSWORD"] = account.password
    return env


@contextlib.contextmanager
def _store(data_dir: Path) -> Iterator[sqlite3.Connection | None]:
    path = data_dir / DB_FILENAME
    if not path.exists():
        yield None
        return
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def _unsynced(data_dir: Path, did: str) -> int:
    try:
        with _store(data_dir) as conn:
            if conn is None:
                return 0
            row = conn.execute(
                "SELECT count(*) FROM sessions WHERE did = ?"
                " AND outbox NOT IN ('synced', 'quarantined')",
                (did,),
            ).fetchone()
            return int(row[0])
    except sqlite3.Error:
        return -1


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _spawn(
    mode: str,
    *,
    data_dir: Path,
    journal: Path,
    proxy: FaultProxy,
    account: Account,
    stderr_path: Path,
    extra: list[str],
    stdout: int | None = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    with open(stderr_path, "wb") as err:
        return subprocess.Popen(
            [
                sys.executable,
                str(CHILD),
                mode,
                "--data-dir",
                str(data_dir),
                "--journal",
                str(journal),
                "--proxy-url",
                proxy.url,
                "--handle",
                account.handle,
                *extra,
            ],
            env=_child_env(account),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=err,
        )


def _phase_at_kill(lines: list[list[str]]) -> str:
    """What the killed child was doing, from its journal lines of that run."""
    phase = "startup"
    in_login = False
    for fields in lines:
        tag = fields[0]
        if tag == "up":
            phase = "idle"
        elif tag == "login":
            in_login = True
        elif tag == "account":
            in_login = False
        elif tag == "begin":
            phase = "start_session" if phase != "burst" else "burst"
        elif tag == "start":
            phase = "recording" if phase not in ("burst",) else "burst"
        elif tag == "end":
            phase = "between_sessions" if phase != "burst" else "burst"
        elif tag == "burst":
            phase = "burst"
        elif tag == "burst-done":
            phase = "between_sessions"
        elif tag == "flush":
            phase = "flush"
        elif tag == "flushed":
            phase = "between_sessions"
        elif tag == "closing":
            phase = "close"
        elif tag == "closed":
            phase = "exiting"
    if in_login and phase != "startup":
        return f"login+{phase}"
    return phase


def _read_journal(path: Path) -> tuple[list[list[str]], int]:
    lines: list[list[str]] = []
    malformed = 0
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            fields = line.decode().split()
        except UnicodeDecodeError:
            malformed += 1
            continue
        if fields:
            lines.append(fields)
    return lines, malformed


def _lines_from(journal: Path, offset: int) -> list[list[str]]:
    """The journal's lines written from byte ``offset`` on (one run's, while it ran)."""
    try:
        with open(journal, "rb") as fh:
            fh.seek(offset)
            raw = fh.read()
    except FileNotFoundError:
        return []
    out: list[list[str]] = []
    for line in raw.split(b"\n"):
        with contextlib.suppress(UnicodeDecodeError):
            fields = line.decode().split()
            if fields:
                out.append(fields)
    return out


def compile_package() -> None:
    """Byte-compile the agent, so game processes load it as an installed one does.

    pip compiles a package at install; where ``PYTHONDONTWRITEBYTECODE`` is set
    (this machine's environment does), every fresh game process would compile
    it from source instead, tens of ms before its first write.
    """
    import anisota_agent

    compileall.compile_dir(str(Path(anisota_agent.__file__).parent), quiet=1)


def run_soak(
    pds: PdsServer,
    account: Account,
    workdir: Path,
    config: SoakConfig,
    *,
    progress: Any = None,
) -> SoakResult:
    """Run the soak in ``workdir`` (data dir, journal, child stderr) and analyse it."""
    compile_package()
    began = time.monotonic()
    rng = random.Random(config.seed)
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    journal = workdir / "journal.log"
    runs: list[RunInfo] = []
    kills = 0
    with FaultProxy(pds.url) as proxy:
        link = _Link(proxy)
        while kills < config.kills:
            index = len(runs)
            if index > 0 and rng.random() < config.link_probability:
                link.set(rng.random() >= config.cut_share)
            relogin = index > 0 and rng.random() < config.relogin_probability
            if relogin:
                with contextlib.suppress(FileNotFoundError):
                    (data_dir / SAVED_LOGIN).unlink()
            spare = rng.random() < config.spare_probability
            kill_after = rng.uniform(*config.kill_window)
            toggle_after = (
                rng.uniform(0.0, kill_after) if rng.random() < config.toggle_probability else None
            )
            seed = rng.getrandbits(32)
            play = rng.uniform(*config.play_seconds)
            interval = rng.choice(config.checkpoint_intervals)
            info = RunInfo(
                index=index,
                seed=seed,
                pid=0,
                link_at_start=link.name,
                link_at_end=link.name,
                relogin=relogin,
                unsynced_before=_unsynced(data_dir, account.did),
            )
            _journal_append(journal, "run", index, seed, time.monotonic_ns())
            offset = journal.stat().st_size
            stderr_path = workdir / f"run-{index}.stderr"
            proc = _spawn(
                "play",
                data_dir=data_dir,
                journal=journal,
                proxy=proxy,
                account=account,
                stderr_path=stderr_path,
                extra=[
                    "--seed",
                    str(seed),
                    "--checkpoint-interval",
                    str(interval),
                    "--play-seconds",
                    f"{play:.3f}",
                ],
            )
            info.pid = proc.pid
            spawned = time.monotonic()
            events: list[tuple[float, str]] = []
            if toggle_after is not None:
                events.append((toggle_after, "toggle"))
            if not spare:
                events.append((kill_after, "kill"))
            events.sort()
            exited = False
            for at, what in events:
                try:
                    proc.wait(timeout=max(0.0, spawned + at - time.monotonic()))
                    exited = True
                    break
                except subprocess.TimeoutExpired:
                    pass
                if what == "toggle":
                    link.set(not link.up)
                else:
                    info.kill_ns = time.monotonic_ns()
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    exited = True
                    break
            if not exited:
                try:
                    proc.wait(timeout=config.run_timeout)
                except subprocess.TimeoutExpired:
                    # A run that does not exit by itself: a hang (close() must be bounded).
                    info.kill_ns = time.monotonic_ns()
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    info.phase_at_kill = "hung"
            info.returncode = proc.returncode
            info.link_at_end = link.name
            if info.kill_ns is not None:
                if info.phase_at_kill is None:
                    info.phase_at_kill = _phase_at_kill(_lines_from(journal, offset))
                _journal_append(journal, "kill", index, info.kill_ns)
            else:
                _journal_append(journal, "exit", index, proc.returncode, time.monotonic_ns())
            if proc.returncode not in (0, -signal.SIGKILL):
                info.stderr_tail = _tail(stderr_path)
            runs.append(info)
            if progress is not None:
                progress(info, kills)
        # The final clean run: the link is up, the login resumed, the outbox drained.
        link.set(True)
        _journal_append(journal, "run", "drain", 0, time.monotonic_ns())
        stderr_path = workdir / "drain.stderr"
        proc = _spawn(
            "drain",
            data_dir=data_dir,
            journal=journal,
            proxy=proxy,
            account=account,
            stderr_path=stderr_path,
            extra=["--did", account.did, "--deadline", str(config.drain_deadline)],
            stdout=subprocess.PIPE,
        )
        try:
            out, _ = proc.communicate(timeout=config.drain_deadline + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        _journal_append(journal, "exit", "drain", proc.returncode, time.monotonic_ns())
        drain_report: dict[str, Any] = {"returncode": proc.returncode}
        with contextlib.suppress(ValueError, IndexError):
            drain_report |= json.loads(out.decode().strip().splitlines()[-1])
        if proc.returncode != 0:
            drain_report["stderr_tail"] = _tail(stderr_path)
    result = analyse(journal, data_dir, pds.list_records(account), runs)
    result.drain = drain_report
    result.seed = config.seed
    result.seconds = round(time.monotonic() - began, 1)
    return result


# -- the comparison ---------------------------------------------------------------------


@dataclass
class _Session:
    rkey: str
    run: int
    start_ns: int
    end_ns: int | None = None
    reason: str | None = None


def _store_rows(data_dir: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    with _store(data_dir) as conn:
        if conn is None:
            return rows
        for row in conn.execute("SELECT * FROM sessions"):
            item = dict(row)
            record_text = item.pop("record", None)
            try:
                record = json.loads(record_text) if record_text else {}
            except ValueError:
                record = {"unreadable": True}
            item["record_status"] = record.get("status")
            item["record_end_reason"] = record.get("endReason")
            item["_record"] = record
            rows[str(item["rkey"])] = item
    return rows


def _store_detail(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    keep = (
        "did",
        "status",
        "outbox",
        "record_status",
        "record_end_reason",
        "owner_pid",
        "in_flight",
        "attempts",
        "last_error",
        "checkpointed_at",
        "awaiting_login",
    )
    return {k: row[k] for k in keep if k in row}


def analyse(
    journal: Path,
    data_dir: Path,
    remote: list[dict[str, Any]],
    runs: list[RunInfo],
) -> SoakResult:
    """Compare the journal with the store and the PDS's records of the account."""
    result = SoakResult()
    lines, result.malformed_journal_lines = _read_journal(journal)
    by_index = {info.index: info for info in runs}
    sessions: dict[str, _Session] = {}
    dangling_begins: list[int] = []  # wall µs of begins with no start line (killed between)
    run: int | None = None
    pending_begin: int | None = None
    for fields in lines:
        tag = fields[0]
        try:
            if tag == "run":
                run = int(fields[1]) if fields[1].isdigit() else None
                pending_begin = None
            elif tag in ("kill", "exit"):
                if pending_begin is not None:
                    dangling_begins.append(pending_begin)
                pending_begin = None
                run = None
            elif run is None:
                continue
            elif tag == "begin":
                pending_begin = int(fields[2])
            elif tag == "start":
                pending_begin = None
                sessions[fields[1]] = _Session(fields[1], run, int(fields[2]))
            elif tag == "end" and fields[1] in sessions:
                sessions[fields[1]].reason = fields[2]
                sessions[fields[1]].end_ns = int(fields[3])
        except (IndexError, ValueError):
            result.malformed_journal_lines += 1

    pds_by_rkey: dict[str, dict[str, Any]] = {}
    rkey_counts: Counter[str] = Counter()
    for entry in remote:
        rkey = str(entry["uri"]).rsplit("/", 1)[-1]
        rkey_counts[rkey] += 1
        pds_by_rkey[rkey] = entry
    store = _store_rows(data_dir)

    result.runs = len(runs)
    result.run_log = list(runs)
    result.kills = sum(1 for info in runs if info.kill_ns is not None)
    result.spared_runs = result.runs - result.kills
    result.killed_returncodes = [
        int(info.returncode)
        for info in runs
        if info.kill_ns is not None and info.returncode is not None
    ]
    result.crashed_runs = [
        {"run": info.index, "returncode": info.returncode, "stderr": info.stderr_tail}
        for info in runs
        if info.returncode not in (0, -signal.SIGKILL) or info.phase_at_kill == "hung"
    ]
    phases: Counter[str] = Counter(
        str(info.phase_at_kill) for info in runs if info.kill_ns is not None
    )
    result.kill_phases = dict(sorted(phases.items()))
    result.kills_during_drain = sum(
        1
        for info in runs
        if info.kill_ns is not None and info.unsynced_before > 0 and info.link_at_end == "pass"
    )
    result.kills_with_link_cut = sum(
        1 for info in runs if info.kill_ns is not None and info.link_at_end == "cut"
    )

    result.sessions = len(sessions)
    for session in sessions.values():
        info = by_index.get(session.run)
        kill_ns = info.kill_ns if info is not None else None
        limit = (kill_ns - GRACE_NS) if kill_ns is not None else None

        def before_kill_ms(t: int | None, kill: int | None = kill_ns) -> float | None:
            if t is None or kill is None:
                return None
            return round((kill - t) / 1e6, 1)

        early = limit is None or session.start_ns <= limit
        ended_early = session.end_ns is not None and (limit is None or session.end_ns <= limit)
        result.early_sessions += early
        result.late_sessions += not early
        result.ended_early += ended_early
        item = pds_by_rkey.get(session.rkey)
        kind: str | None = None
        if item is None:
            kind = "early_lost" if early else "late_lost"
        elif ended_early:
            value = item.get("value", {})
            if (value.get("status"), value.get("endReason")) != ("ended", session.reason):
                kind = "wrong_end"
        if kind is None:
            continue
        setattr(result, kind, getattr(result, kind) + 1)
        result.losses.append(
            Loss(
                rkey=session.rkey,
                run=session.run,
                kind=kind,
                start_before_kill_ms=before_kill_ms(session.start_ns),
                end_before_kill_ms=before_kill_ms(session.end_ns),
                journaled_reason=session.reason,
                pds=None
                if item is None
                else {
                    "status": item.get("value", {}).get("status"),
                    "endReason": item.get("value", {}).get("endReason"),
                },
                store=_store_detail(store.get(session.rkey)),
            )
        )
    order = {"early_lost": 0, "wrong_end": 1, "late_lost": 2}
    result.losses.sort(key=lambda loss: (order[loss.kind], loss.run, loss.rkey))

    # On the PDS but not in the journal: a duplicate, unless a run was killed
    # between calling start_session() and journaling its rkey (matched by TID time).
    unknown = [rkey for rkey in pds_by_rkey if rkey not in sessions]
    explained = 0
    for rkey in unknown:
        micros = tid_micros(rkey)
        match = next(
            (
                begin
                for begin in dangling_begins
                if micros is not None and abs(micros - begin) < 2_000_000
            ),
            None,
        )
        if match is not None:
            dangling_begins.remove(match)
            explained += 1
            continue
        value = pds_by_rkey[rkey].get("value", {})
        result.unknown_on_pds.append(
            {
                "rkey": rkey,
                "status": value.get("status"),
                "endReason": value.get("endReason"),
                "startedAt": value.get("startedAt"),
                "store": _store_detail(store.get(rkey)),
            }
        )
    result.unjournaled = explained
    result.duplicates = len(result.unknown_on_pds) + sum(n - 1 for n in rkey_counts.values())
    result.on_pds = len(pds_by_rkey)

    outbox: Counter[str] = Counter()
    for rkey, row in store.items():
        outbox[str(row.get("outbox"))] += 1
        if row.get("did") is None and row.get("outbox") not in ("synced",):
            result.unattributed_in_store += 1
        if row.get("outbox") == "synced":
            copy = pds_by_rkey.get(rkey)
            if copy is None:
                result.synced_not_on_pds += 1
            elif copy.get("value") != row.get("_record"):
                result.store_differs_from_pds += 1
    result.store_outbox = dict(sorted(outbox.items()))
    return result
