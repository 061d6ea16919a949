"""An asyncio game client whose ``httpx.AsyncClient`` calls are timed automatically.

Shows: the game builds its client with ``transport=agent.async_timed_transport()``
and from then on every request it makes is reported to the agent (its time to
the response headers, and whether it failed), with no code at the call sites.
The session's record gets ``averageResponseTime`` (mean ms) and ``errorCount``
(5xx, 408, 429 and requests that got no answer). A 404 is an answer, not an error.

The game talks to a tiny flaky API that this script serves itself on loopback
(stdlib ``http.server``, in a thread): it answers some requests with 500 and
some slowly, decided by ``--seed``. At the end the script reads the finished
record back from the store and prints its metrics beside the server's tally.

If the game's client needs its own transport (proxies, HTTP/2, ...), pass
``event_hooks=agent.httpx_event_hooks(asynchronous=True)`` instead; hooks only
see answers, so requests that got none are not counted as errors then.

Run::

    python examples/asyncio_client.py [--turns 8] [--seed 3] [--data-dir DIR]

Without ``--data-dir`` it records into a temporary directory, deleted at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from anisota_agent import Agent, local_sessions

#: What the game fetches each turn, concurrently.
ROUTES = ("/feed", "/garden", "/inventory")


class FlakyApi(ThreadingHTTPServer):
    """A loopback JSON API that fails ``error_rate`` of requests with 500 and
    answers ``slow_rate`` of them after ``slow_seconds``; it counts what it did."""

    def __init__(
        self, seed: int, error_rate: float = 0.2, slow_rate: float = 0.2, slow_seconds: float = 0.3
    ) -> None:
        super().__init__(("127.0.0.1", 0), _FlakyHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.error_rate, self.slow_rate, self.slow_seconds = error_rate, slow_rate, slow_seconds
        self.requests = self.errors = self.slow = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def fate(self) -> tuple[bool, bool]:
        """(fail with 500?, answer slowly?) for the next request, counted."""
        with self._lock:
            fail = self._rng.random() < self.error_rate
            slow = self._rng.random() < self.slow_rate
            self.requests += 1
            self.errors += fail
            self.slow += slow
        return fail, slow


class _FlakyHandler(BaseHTTPRequestHandler):
    server: FlakyApi

    def do_GET(self) -> None:
        fail, slow = self.server.fate()
        if slow:
            time.sleep(self.server.slow_seconds)
        body = json.dumps({"error": "InternalServerError"} if fail else {"items": [1, 2, 3]})
        self.send_response(500 if fail else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the example's output readable


async def play(agent: Agent, api_url: str, turns: int) -> int:
    """The game: each turn fetches every route at once; returns the failed fetches."""
    failed = 0
    transport = agent.async_timed_transport()  # every request below is timed
    async with httpx.AsyncClient(base_url=api_url, transport=transport, timeout=5.0) as api:
        for turn in range(1, turns + 1):
            agent.page(ROUTES[turn % len(ROUTES)])
            answers = await asyncio.gather(*(api.get(route) for route in ROUTES))
            for route, answer in zip(ROUTES, answers, strict=True):
                if answer.is_success:
                    agent.action("feedsLoaded" if route == "/feed" else "itemsCollected")
                else:
                    failed += 1  # the game shows cached data and carries on
            codes = " ".join(str(answer.status_code) for answer in answers)
            print(f"turn {turn:2}: {codes}")
            await asyncio.sleep(0.05)  # the rest of the frame
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=8, help="turns to play (default 8)")
    parser.add_argument("--seed", type=int, default=3, help="the API's luck (default 3)")
    parser.add_argument("--data-dir", type=Path, help="the agent's store (default: a temp dir)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="anisota-example-") as scratch:
        server = FlakyApi(seed=args.seed)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        agent = Agent(client_version="1.4.2", data_dir=args.data_dir or scratch).start()
        try:
            rkey = agent.start_session(entry_point="direct", authentication_method="anonymous")
            failed = asyncio.run(play(agent, server.url, args.turns))
            agent.end_session("user_initiated")
        finally:
            agent.close()
            server.shutdown()
            server.server_close()
        if rkey is None:
            print("tracking is disabled (DO_NOT_TRACK): nothing was recorded")
            return 0

        # Read the finished record back, as `anisota-agent show <rkey>` would.
        store_path = agent.status().store_path
        if store_path is None:
            print("the store could not be opened; the session was kept in memory only")
            return 1
        kept = {line["rkey"]: line for line in local_sessions(Path(store_path).parent)}
        row = kept.get(rkey)
    if row is None:
        print(f"session {rkey} is not in the store")
        return 1
    metrics = row["record"]["metadata"]["performanceMetrics"]
    print(f"session:  {rkey}")
    print(f"server:   {server.requests} requests, {server.errors} answered 500, {server.slow} slow")
    print(f"game:     {failed} fetches failed")
    print(f"averageResponseTime: {metrics.get('averageResponseTime')} ms")
    print(f"errorCount: {metrics['errorCount']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
