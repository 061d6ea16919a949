"""``Agent(transport=...)``: a fault put in the network without a socket proxy.

The transport wraps httpx's real one, so every request still reaches the real
reference PDS unless the test says otherwise.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
from agent_helpers import SteppedClock, stored
from pds_harness import Account, PdsServer

from anisota_agent import Agent

APPLY_WRITES = "/xrpc/com.atproto.repo.applyWrites"


class Faulty(httpx.BaseTransport):
    """httpx's transport, with a switch that makes chosen paths fail to connect."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self._lock = threading.Lock()
        self.failing: set[str] = set()
        self.seen: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.seen.append(request.url.path)
            failing = request.url.path in self.failing
        if failing:
            raise httpx.ConnectError("the test cut this path", request=request)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


def test_every_request_of_the_agent_goes_through_the_transport(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    transport = Faulty()
    with Agent("1.0", data_dir=tmp_path, transport=transport) as agent:
        agent.login(account.handle, account.password, pds_url=pds.url)
        agent.start_session()
        agent.end_session("logout")
        assert agent.flush()
    assert "/xrpc/com.atproto.server.createSession" in transport.seen
    assert APPLY_WRITES in transport.seen


def test_a_sync_cut_by_the_transport_is_kept_and_synced_when_it_heals(
    tmp_path: Path, pds: PdsServer, account: Account
) -> None:
    transport, clock = Faulty(), SteppedClock()
    transport.failing.add(APPLY_WRITES)
    agent = Agent("1.0", data_dir=tmp_path, transport=transport, clock=clock).start()
    agent.login(account.handle, account.password, pds_url=pds.url)
    rkey = str(agent.start_session())
    agent.end_session("logout")
    assert agent.flush()
    status = agent.status()
    assert status.sync_error is not None and "ConnectError" in status.sync_error
    assert stored(tmp_path, rkey).outbox == "pending"
    assert pds.list_records(account) == []
    transport.failing.clear()
    clock.step(700)  # past any backoff and probe interval
    assert agent.flush()
    agent.close()
    assert stored(tmp_path, rkey).outbox == "synced"
    assert [item["uri"].rsplit("/", 1)[1] for item in pds.list_records(account)] == [rkey]


def test_a_transport_that_is_not_one_is_refused_at_the_call() -> None:
    try:
        Agent("1.0", in_memory=True, transport="http://proxy")  # type: ignore[arg-type]
    except TypeError as error:
        assert "transport" in str(error)
    else:
        raise AssertionError("a str was taken for a transport")
