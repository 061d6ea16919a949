"""Finding sessions whose process died, and expiring them.

A session belongs to one process (and one agent in it) while it is ``live``.
After a crash, a kill or a power loss its row is still ``live``: the next agent
to open the store expires it at its last activity (``expired``/``timeout``),
and never touches a session whose owner still runs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .clock import parse_datetime
from .records import expire_record

if TYPE_CHECKING:
    from .store import Store, StoredSession

__all__ = [
    "LIVE_OWNER_TOKENS",
    "RecordGuard",
    "expire_dead_sessions",
    "owner_alive",
    "process_started",
]

logger = logging.getLogger("anisota_agent")

#: Tokens of the agents alive in this process; recovery in this process uses it
#: to tell a crashed earlier agent's session from a running one's.
LIVE_OWNER_TOKENS: set[str] = set()


def process_started(pid: int) -> float:
    """When process ``pid`` was created (epoch seconds), as psutil tells it.

    On Linux it is read from ``/proc`` the way psutil does, without importing
    psutil: the recorder needs it before its first write, and the import costs
    ~20 ms there. Elsewhere (or if ``/proc`` fails) psutil answers.

    Raises:
        psutil.Error: no such process (where psutil answers).
    """
    if sys.platform.startswith("linux"):
        try:
            return _proc_started(pid)
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    import psutil

    return float(psutil.Process(pid).create_time())


def _proc_started(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        line = stat.read()
    # Field 22, starttime, in clock ticks since boot; counted after the command
    # name, which may itself hold spaces and parentheses.
    ticks = int(line[line.rindex(b")") + 2 :].split()[19])
    with open("/proc/stat", "rb") as system:
        boot = next(float(row.split()[1]) for row in system if row.startswith(b"btime"))
    return ticks / os.sysconf("SC_CLK_TCK") + boot


def owner_alive(pid: int | None, started: float | None, token: str | None) -> bool:
    """Whether the agent that owns a session still runs.

    A pid alone is not enough: pids are reused, so the process's create time must
    match too. In this very process, the owner's token must still be registered.
    """
    import psutil

    if pid is None or started is None:
        return False
    try:
        create_time = process_started(pid)
    except psutil.Error:
        return False
    if abs(create_time - started) > 0.01:
        return False
    if pid == os.getpid():
        return token in LIVE_OWNER_TOKENS
    return True


#: ``guard(rkey, record)``: the record to store and whether the host's guard
#: withheld it (see :mod:`anisota_agent.guard`).
RecordGuard = Callable[[str, dict[str, Any]], tuple[dict[str, Any], str | None]]


def expire_dead_sessions(
    store: Store, now_ms: int, max_age_ms: int, guard: RecordGuard | None = None
) -> int:
    """Expire the live sessions whose owner died or that outlived ``max_age_ms``.

    Returns how many were expired. Validation waits for the sync, which checks
    every record before it leaves. ``guard`` sees each expired record before it
    is stored final, as a finished session's (a reason it gives withholds it).
    """
    expired = 0
    for stale in store.live_sessions():
        if not _should_expire(stale, now_ms, max_age_ms):
            continue
        record, withheld = expire_record(stale.record, now_ms), None
        if guard is not None:
            record, withheld = guard(stale.rkey, record)
        if store.expire(stale, record, withheld, withheld=withheld is not None):
            expired += 1
    if expired:
        logger.info("recovered %d session(s) left active by a dead process", expired)
    return expired


def _should_expire(stale: StoredSession, now_ms: int, max_age_ms: int) -> bool:
    if now_ms - parse_datetime(stale.record["startedAt"]) > max_age_ms:
        return True
    return not owner_alive(stale.owner_pid, stale.owner_started, stale.owner_token)
