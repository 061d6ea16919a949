"""Draining a backlog to a real PDS: ``drain_benchmark(sessions=1000)``.

Starts its own reference PDS (``tests/pds_harness.py``, rate limits on, as on a
real PDS), creates an account, seeds ``sessions`` finished sessions in a fresh
store, and drains them with :class:`~anisota_agent.sync.SyncEngine` (default
reserve) through a pass-through :class:`FaultProxy` that counts the requests.
Reports the wall time of the drain, its HTTP requests, the rate-limit points it
spent (create 3, put 2), and whether the PDS holds each session exactly once.

Target: 1,000 sessions in <= 5 s and <= 10 requests, 0 duplicates.

    python benchmarks/bench_sync.py [sessions]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from agent_helpers import seed  # tests/ is on the path (above)
from faultproxy import FaultProxy
from pds_harness import PdsServer

from anisota_agent.auth import AppPasswordSession
from anisota_agent.store import DB_FILENAME, Store
from anisota_agent.sync import DEFAULT_RESERVE_POINTS, SyncEngine
from anisota_agent.tokens import MemoryTokenStore

TARGET_SECONDS = 5.0
TARGET_REQUESTS = 10
_METHODS = (
    "com.atproto.repo.applyWrites",
    "com.atproto.repo.putRecord",
    "com.atproto.repo.getRecord",
    "com.atproto.repo.listRecords",
    "com.atproto.server.refreshSession",
)


def drain_benchmark(sessions: int = 1000, *, rate_limits: bool = True) -> dict[str, Any]:
    """Drain ``sessions`` pending sessions to a fresh local PDS; the figures as a dict."""
    pds = PdsServer().start(rate_limits=rate_limits)
    with pds, tempfile.TemporaryDirectory() as tmp:
        account = pds.create_account("bench")
        store = Store(Path(tmp) / DB_FILENAME)
        try:
            rkeys = seed(store, account.did, sessions)
            with FaultProxy(pds.url) as proxy:
                credentials = AppPasswordSession.login(
                    proxy.url, account.handle, account.password, MemoryTokenStore()
                )
                client = credentials.client()
                engine = SyncEngine(
                    store,
                    client,
                    credentials,
                    now=time.time,
                    reserve_points=DEFAULT_RESERVE_POINTS,
                )
                proxy.reset()  # count the drain only, not the login
                began = time.perf_counter()
                status = engine.sync()
                wall = time.perf_counter() - began
                requests = proxy.requests_seen()
                by_method = Counter(
                    {
                        method: proxy.requests_seen(f"/xrpc/{method}")
                        for method in _METHODS
                        if proxy.requests_seen(f"/xrpc/{method}")
                    }
                )
                client.close()
                credentials.close()
            remote = pds.list_records(account)
            outbox = store.outbox_counts()
        finally:
            store.close()
    remote_rkeys = [item["uri"].rsplit("/", 1)[-1] for item in remote]
    unique = set(remote_rkeys)
    result: dict[str, Any] = {
        "sessions": sessions,
        "rate_limits": rate_limits,
        "reserve_points": DEFAULT_RESERVE_POINTS,
        "wall_seconds": round(wall, 3),
        "requests": requests,
        "requests_by_method": dict(by_method),
        "points_spent": status.points_spent,
        "budget_remaining": status.budget.remaining if status.budget else None,
        "synced": status.synced,
        "outbox": outbox,
        "records_on_pds": len(remote_rkeys),
        "duplicates": len(remote_rkeys) - len(unique),
        "missing": len(set(rkeys) - unique),
        "last_error": status.sync_error,
    }
    result["target_met"] = (
        result["wall_seconds"] <= TARGET_SECONDS
        and requests <= TARGET_REQUESTS
        and result["duplicates"] == 0
        and result["missing"] == 0
        and result["records_on_pds"] == sessions
    )
    return result


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    print(json.dumps(drain_benchmark(count), indent=2))
