"""Play through a network outage and watch the sessions sync when it comes back.

Shows the offline-first loop: the game records sessions whatever the network
does; the agent keeps finished ones in its local outbox (``pending``) while the
PDS is unreachable and writes each to the player's PDS exactly once
(``synced``) as soon as it is reachable again. Nothing in the game waits for it.

To make the outage real and observable, the script puts a small loopback TCP
relay (stdlib, below) between the game and the PDS and gives the agent the
relay's URL: the relay *is* the player's network. The game plays a few turns a
second, one session after another; ``--offline-at`` seconds in, the relay is
cut (open connections dropped, new ones closed at once), and ``--offline-for``
seconds later it is restored. The game's own requests (a ``_health`` poll each turn,
timed through ``agent.timed_transport()``) are what tell the agent the network
is gone and back. Twice a second it prints the agent's view: network condition
and outbox counts.

It ends when every session is synced (within ``--sync-timeout`` seconds after
the last one): exit 0, else 1.

Run against an account on a local (``http://127.0.0.1``) PDS::

    python examples/offline_sync.py --pds-url http://127.0.0.1:2583 \\
        --handle alice.test --password '...'

or set ``ANISOTA_AGENT_PDS_URL``, ``ANISOTA_AGENT_HANDLE`` and
``ANISOTA_AGENT_PASSWORD``. Records into a temporary directory unless
``--data-dir`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import socketserver
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from anisota_agent import Agent, local_sessions

TURNS_PER_SECOND = 4
REPORTS_PER_SECOND = 2


class Relay(socketserver.ThreadingTCPServer):
    """A loopback TCP relay to ``upstream_url``: the network cable the script can pull."""

    daemon_threads = True

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"the relay forwards plain http to a local PDS, not {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.online = True
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Pipe)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def cut(self) -> None:
        """The network goes away: drop every open connection, close new ones at once."""
        with self._lock:
            self.online = False
            for sock in self._open:
                _drop(sock)
            self._open.clear()

    def restore(self) -> None:
        """The network is back."""
        with self._lock:
            self.online = True

    def close(self) -> None:
        """Stop relaying for good."""
        self.shutdown()
        self.server_close()
        self.cut()

    def pipe(self, client: socket.socket) -> None:
        """Relay one client connection to the upstream, both ways, until either ends."""
        upstream = None
        if self.online:
            with contextlib.suppress(OSError):
                upstream = socket.create_connection(self.upstream, timeout=5)
        with self._lock:
            if upstream is None or not self.online:  # offline, or cut while connecting
                _drop(client)
                if upstream is not None:
                    _drop(upstream)
                return
            self._open.update((client, upstream))
        upstream.settimeout(None)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)
        with self._lock:
            self._open.difference_update((client, upstream))


class _Pipe(socketserver.BaseRequestHandler):
    server: Relay

    def handle(self) -> None:
        self.server.pipe(self.request)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    _drop(source)  # one side ended or was cut: the exchange is over for both
    _drop(sink)


def _drop(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv()
    sock.close()


# -- the game ------------------------------------------------------------------------

ROUTES = ("/garden", "/feed", "/profile")


def play_turn(agent: Agent, pds: httpx.Client, turn: int) -> None:
    """One turn of the game: a few activity calls and one request of its own."""
    agent.page(ROUTES[turn % len(ROUTES)])
    agent.action("postsViewed")
    agent.progress(xp=1000 + 10 * turn)
    # The game's own call to the PDS (a health check stands in for its feeds).
    # The timed transport reports it to the agent: that is how it notices the outage.
    with contextlib.suppress(httpx.TransportError):
        pds.get("/xrpc/_health")


def all_synced(agent: Agent, played: list[str]) -> bool:
    outbox = agent.status().outbox
    return (
        outbox.get("live", 0) == 0
        and outbox.get("pending", 0) == 0
        and outbox.get("synced", 0) >= len(played)
    )


def report(t: float, relay: Relay, agent: Agent, played: list[str]) -> None:
    status = agent.status()
    outbox = status.outbox
    print(
        f"{t:5.1f}s  session {len(played)}  cable {'up ' if relay.online else 'CUT'}"
        f"  agent sees {status.network:8}  outbox: live {outbox.get('live', 0)}"
        f" pending {outbox.get('pending', 0)} synced {outbox.get('synced', 0)}",
        flush=True,
    )


def play(agent: Agent, relay: Relay, args: argparse.Namespace) -> list[str]:
    """Play the sessions back to back, pulling the cable on schedule, then wait in
    the menu until the agent has synced them all (or time is up); returns their rkeys."""
    played: list[str] = []
    play_time = args.sessions * args.session_seconds
    outage_ends = args.offline_at + args.offline_for
    began = time.monotonic()
    with httpx.Client(base_url=relay.url, transport=agent.timed_transport(), timeout=2.0) as pds:
        turn = 0
        while (t := turn / TURNS_PER_SECOND) < play_time + args.sync_timeout:
            time.sleep(max(0.0, began + t - time.monotonic()))  # the game's frame pacing
            offline = args.offline_at <= t < outage_ends
            if offline and relay.online:
                relay.cut()
                print(f"{t:5.1f}s  --- the network goes away ---", flush=True)
            elif not offline and not relay.online:
                relay.restore()
                print(f"{t:5.1f}s  --- the network is back ---", flush=True)
            if t < play_time:
                if int(t // args.session_seconds) == len(played):  # the next session begins
                    agent.end_session("user_initiated")
                    rkey = agent.start_session(entry_point="direct")
                    if rkey is None:
                        return played  # DO_NOT_TRACK
                    played.append(rkey)
                play_turn(agent, pds, turn)
            else:
                agent.end_session("user_initiated")  # back in the menu (then a no-op)
                if all_synced(agent, played):
                    report(t, relay, agent, played)
                    break
            if turn % (TURNS_PER_SECOND // REPORTS_PER_SECOND) == 0:
                report(t, relay, agent, played)
            turn += 1
    return played


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    env = os.environ.get
    parser.add_argument("--pds-url", default=env("ANISOTA_AGENT_PDS_URL"), help="a local PDS")
    parser.add_argument("--handle", default=env("ANISOTA_AGENT_HANDLE"), help="the account")
    parser.add_argument("--password", default=env("ANISOTA_AGENT_PASSWORD"), help="its password")
    parser.add_argument("--sessions", type=int, default=3, help="sessions to play (default 3)")
    parser.add_argument("--session-seconds", type=float, default=3.0, help="each (default 3)")
    parser.add_argument("--offline-at", type=float, default=3.5, help="outage start (s, 3.5)")
    parser.add_argument("--offline-for", type=float, default=3.0, help="outage length (s, 3)")
    parser.add_argument("--sync-timeout", type=float, default=30.0, help="wait for sync (s, 30)")
    parser.add_argument("--data-dir", type=Path, help="the agent's store (default: a temp dir)")
    args = parser.parse_args(argv)
    if not (args.pds_url and args.handle and args.password):
        parser.error("--pds-url, --handle and --password (or their env vars) are required")

    with tempfile.TemporaryDirectory(prefix="anisota-example-") as scratch:
        relay = Relay(args.pds_url)
        threading.Thread(target=relay.serve_forever, daemon=True).start()
        agent = Agent(client_version="1.4.2", data_dir=args.data_dir or scratch).start()
        try:
            # At the loading screen: log in through the relay, and wait for it once.
            agent.login(args.handle, args.password, pds_url=relay.url)
            agent.flush(timeout=15.0)
            status = agent.status()
            if status.account is None:
                print(status.auth_problem or "login failed: no answer in time")
                return 1
            print(f"logged in: {status.account}")
            print(f"(the relay at {relay.url} forwards to the PDS at {args.pds_url})")
            played = play(agent, relay, args)
        finally:
            agent.close()
            relay.close()

        store_path = agent.status().store_path
        if not played or store_path is None:
            print("nothing was recorded (DO_NOT_TRACK, or no store)")
            return 1
        kept = {line["rkey"]: line for line in local_sessions(Path(store_path).parent)}
        rows = [kept.get(rkey) for rkey in played]
    ok = True
    for rkey, row in zip(played, rows, strict=True):
        if row is None:
            print(f"session {rkey}  MISSING from the store")
            ok = False
            continue
        ok = ok and row["outbox"] == "synced"
        condition = row["record"]["metadata"]["networkCondition"]
        uri = row["uri"] or "-"
        print(f"session {rkey}  {row['outbox']:8}  networkCondition {condition:8}  {uri}")
    print("every session is on the PDS" if ok else "NOT every session was synced in time")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
