"""Tests for anisota_agent.timing: hooks, transports, timed()."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from anisota_agent.network import NetworkMonitor
from anisota_agent.timing import (
    START_EXTENSION,
    AsyncTimedTransport,
    ExchangeTimer,
    Hooks,
    TimedTransport,
    async_event_hooks,
    classify_exception,
    classify_status,
    event_hooks,
    timed,
)

CLIENT_TIMEOUT = 5.0  # bounds every real request a test makes


class Reports:
    """A sink that remembers what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    def __call__(self, elapsed_ms: float, outcome: str) -> None:
        self.calls.append((elapsed_ms, outcome))

    @property
    def outcomes(self) -> list[str]:
        return [outcome for _, outcome in self.calls]


class FakeTimer:
    """perf_counter seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def mock_transport(timer: FakeTimer, seconds: float = 0.25) -> httpx.MockTransport:
    """Answers ``/<status>`` with that status, taking ``seconds`` of fake time."""

    def handler(request: httpx.Request) -> httpx.Response:
        timer.t += seconds
        path = request.url.path.strip("/")
        if path == "redirect":
            return httpx.Response(302, headers={"Location": "/200"})
        return httpx.Response(int(path), text="body")

    return httpx.MockTransport(handler)


def failing_transport(error: Exception) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    return httpx.MockTransport(handler)


# --- a real server on loopback -----------------------------------------------------


class _StatusHandler(BaseHTTPRequestHandler):
    """``GET /<status>`` answers with that status."""

    def do_GET(self) -> None:
        body = b"hello"
        self.send_response(int(self.path.strip("/")))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output clean


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(CLIENT_TIMEOUT)


@pytest.fixture
def closed_url() -> Iterator[str]:
    """A loopback port that refuses connections: bound, never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def real_client(
    *, transport: httpx.BaseTransport | None = None, event_hooks: Hooks | None = None
) -> httpx.Client:
    """A client for the loopback server: bounded, and blind to proxy settings."""
    return httpx.Client(
        transport=transport, event_hooks=event_hooks, timeout=CLIENT_TIMEOUT, trust_env=False
    )


# --- classification -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "ok"),
        (204, "ok"),
        (302, "ok"),
        (400, "ok"),
        (401, "ok"),
        (404, "ok"),
        (422, "ok"),
        (408, "server_error"),
        (429, "server_error"),
        (500, "server_error"),
        (502, "server_error"),
        (503, "server_error"),
    ],
)
def test_classify_status(status: int, outcome: str) -> None:
    assert classify_status(status) == outcome


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (httpx.ConnectError("refused"), "network_error"),
        (httpx.ReadTimeout("slow"), "network_error"),
        (httpx.RemoteProtocolError("reset"), "network_error"),
        (ConnectionRefusedError(), "network_error"),
        (TimeoutError(), "network_error"),
        (socket.gaierror(-2, "Name or service not known"), "network_error"),
        (ValueError("bad json"), "server_error"),
        (
            httpx.HTTPStatusError(
                "500", request=httpx.Request("GET", "http://x"), response=httpx.Response(500)
            ),
            "server_error",
        ),
    ],
)
def test_classify_exception(error: Exception, outcome: str) -> None:
    assert classify_exception(error) == outcome


# --- event hooks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, "ok"), (404, "ok"), (429, "server_error"), (500, "server_error")],
)
def test_hooks_time_each_request_and_classify_it(status: int, outcome: str) -> None:
    reports, timer = Reports(), FakeTimer()
    with httpx.Client(
        transport=mock_transport(timer), event_hooks=event_hooks(reports, timer=timer)
    ) as client:
        assert client.get(f"http://game.test/{status}").status_code == status
    assert reports.calls == [(250.0, outcome)]


def test_hooks_report_every_hop_of_a_redirect() -> None:
    reports, timer = Reports(), FakeTimer()
    with httpx.Client(
        transport=mock_transport(timer, 0.5),
        event_hooks=event_hooks(reports, timer=timer),
        follow_redirects=True,
    ) as client:
        assert client.get("http://game.test/redirect").status_code == 200
    assert reports.calls == [(500.0, "ok"), (500.0, "ok")]


def test_hooks_cannot_see_network_errors() -> None:
    reports = Reports()
    client = httpx.Client(
        transport=failing_transport(httpx.ConnectError("refused")),
        event_hooks=event_hooks(reports),
    )
    with client, pytest.raises(httpx.ConnectError):
        client.get("http://game.test/200")
    assert reports.calls == []  # why TimedTransport exists


def test_hooks_added_to_an_existing_client() -> None:
    reports, timer = Reports(), FakeTimer()
    with httpx.Client(transport=mock_transport(timer)) as client:
        for name, hooks in event_hooks(reports, timer=timer).items():
            client.event_hooks[name] += hooks
        client.get("http://game.test/503")
    assert reports.calls == [(250.0, "server_error")]


def test_a_response_without_a_start_is_not_reported() -> None:
    reports = Reports()
    on_response = event_hooks(reports)["response"][0]
    response = httpx.Response(200, request=httpx.Request("GET", "http://game.test/"))
    on_response(response)
    assert reports.calls == []
    response.request.extensions[START_EXTENSION] = 0.0
    on_response(response)
    assert reports.outcomes == ["ok"]


def test_hooks_against_a_loopback_server(server: str, closed_url: str) -> None:
    reports = Reports()
    with real_client(event_hooks=event_hooks(reports)) as client:
        for status in (200, 500, 404, 429):
            assert client.get(f"{server}/{status}").status_code == status
        with pytest.raises(httpx.ConnectError):
            client.get(f"{closed_url}/200")
    assert reports.outcomes == ["ok", "server_error", "ok", "server_error"]
    assert all(0 < ms < CLIENT_TIMEOUT * 1000 for ms, _ in reports.calls)


def test_a_failing_sink_never_breaks_the_request(caplog: pytest.LogCaptureFixture) -> None:
    def broken(elapsed_ms: float, outcome: str) -> None:
        raise RuntimeError("sink bug")

    timer = FakeTimer()
    with (
        caplog.at_level(logging.DEBUG, logger="anisota_agent"),
        httpx.Client(transport=mock_transport(timer), event_hooks=event_hooks(broken)) as client,
    ):
        for _ in range(3):
            assert client.get("http://game.test/200").status_code == 200
    ours = [r for r in caplog.records if r.name == "anisota_agent"]
    assert [r.levelno for r in ours] == [logging.ERROR, logging.DEBUG, logging.DEBUG]
    assert "sink bug" in caplog.text


def test_exchange_timer_reports_answers_and_the_calls_that_got_none() -> None:
    reports, timer = Reports(), FakeTimer()
    exchanges = ExchangeTimer(reports, timer=timer)
    refused = failing_transport(httpx.ConnectError("refused"))
    with (
        httpx.Client(transport=mock_transport(timer, 0.5), event_hooks=exchanges.hooks()) as ok,
        httpx.Client(transport=refused, event_hooks=exchanges.hooks()) as cut,
    ):
        ok.get("http://game.test/500")
        started = exchanges.start()
        try:
            timer.t += 0.75
            cut.get("http://game.test/200")
        except httpx.TransportError:
            exchanges.no_answer(started)
    assert reports.calls == [(500.0, "server_error"), (750.0, "network_error")]


def test_exchange_timer_guards_its_sink(caplog: pytest.LogCaptureFixture) -> None:
    def broken(elapsed_ms: float, outcome: str) -> None:
        raise RuntimeError("sink bug")

    exchanges = ExchangeTimer(broken)
    with caplog.at_level(logging.DEBUG, logger="anisota_agent"):
        exchanges.no_answer(exchanges.start())
        exchanges.no_answer(exchanges.start())
    ours = [r for r in caplog.records if r.name == "anisota_agent"]
    assert [r.levelno for r in ours] == [logging.ERROR, logging.DEBUG]


# --- transports -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, "ok"), (404, "ok"), (408, "server_error"), (429, "server_error"), (500, "server_error")],
)
def test_transport_times_answers(status: int, outcome: str) -> None:
    reports, timer = Reports(), FakeTimer()
    transport = TimedTransport(reports, mock_transport(timer, 1.5), timer=timer)
    with httpx.Client(transport=transport) as client:
        assert client.get(f"http://game.test/{status}").status_code == status
    assert reports.calls == [(1500.0, outcome)]


@pytest.mark.parametrize(
    "error", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), RuntimeError("odd")]
)
def test_transport_reports_failures_and_reraises_them_unchanged(error: Exception) -> None:
    reports = Reports()
    transport = TimedTransport(reports, failing_transport(error))
    with httpx.Client(transport=transport) as client, pytest.raises(type(error)) as raised:
        client.get("http://game.test/200")
    assert raised.value is error
    assert reports.outcomes == ["network_error"]


def test_transport_against_a_loopback_server(server: str, closed_url: str) -> None:
    reports = Reports()
    with real_client(transport=TimedTransport(reports)) as client:
        for status in (200, 500, 404, 429):
            assert client.get(f"{server}/{status}").status_code == status
        with pytest.raises(httpx.ConnectError):
            client.get(f"{closed_url}/200")
    assert reports.outcomes == ["ok", "server_error", "ok", "server_error", "network_error"]
    assert all(0 < ms < CLIENT_TIMEOUT * 1000 for ms, _ in reports.calls)


def test_transport_closes_its_inner_transport() -> None:
    closed = threading.Event()

    class Inner(httpx.BaseTransport):
        def close(self) -> None:
            closed.set()

    with httpx.Client(transport=TimedTransport(Reports(), Inner())):
        pass
    assert closed.is_set()


def test_refused_connections_take_the_monitor_offline(closed_url: str, server: str) -> None:
    clock = [0.0]
    monitor = NetworkMonitor(now=lambda: clock[0])
    with real_client(transport=TimedTransport(monitor.observe_request)) as client:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError):
                client.get(f"{closed_url}/200")
        assert monitor.condition == "offline"
        client.get(f"{server}/200")
    assert monitor.condition == "online"
    assert [t.new for t in monitor.pop_transitions()] == ["offline", "online"]


# --- async ------------------------------------------------------------------------------------


def test_async_hooks_and_transport_with_a_mock() -> None:
    hook_reports, transport_reports, timer = Reports(), Reports(), FakeTimer()

    async def handler(request: httpx.Request) -> httpx.Response:
        timer.t += 0.125
        return httpx.Response(int(request.url.path.strip("/")))

    async def main() -> None:
        transport = AsyncTimedTransport(
            transport_reports, httpx.MockTransport(handler), timer=timer
        )
        hooks = async_event_hooks(hook_reports, timer=timer)
        async with httpx.AsyncClient(transport=transport, event_hooks=hooks) as client:
            for status in (200, 500, 404, 429):
                await client.get(f"http://game.test/{status}")

    asyncio.run(main())
    expected = [(125.0, o) for o in ("ok", "server_error", "ok", "server_error")]
    assert hook_reports.calls == expected
    assert transport_reports.calls == expected


def test_async_transport_reraises_failures_unchanged() -> None:
    reports = Reports()
    error = httpx.ConnectTimeout("no route")

    async def handler(request: httpx.Request) -> httpx.Response:
        raise error

    async def main() -> BaseException | None:
        transport = AsyncTimedTransport(reports, httpx.MockTransport(handler))
        async with httpx.AsyncClient(transport=transport) as client:
            try:
                await client.get("http://game.test/200")
            except httpx.ConnectTimeout as raised:
                return raised
        return None

    assert asyncio.run(main()) is error
    assert reports.outcomes == ["network_error"]


def test_async_client_against_a_loopback_server(server: str, closed_url: str) -> None:
    hook_reports, transport_reports = Reports(), Reports()

    async def main() -> None:
        async with httpx.AsyncClient(
            transport=AsyncTimedTransport(transport_reports),
            event_hooks=async_event_hooks(hook_reports),
            timeout=CLIENT_TIMEOUT,
            trust_env=False,
        ) as client:
            for status in (200, 500, 404, 429):
                assert (await client.get(f"{server}/{status}")).status_code == status
            with pytest.raises(httpx.ConnectError):
                await client.get(f"{closed_url}/200")

    asyncio.run(main())
    answers = ["ok", "server_error", "ok", "server_error"]
    assert hook_reports.outcomes == answers
    assert transport_reports.outcomes == [*answers, "network_error"]
    assert all(0 < ms < CLIENT_TIMEOUT * 1000 for ms, _ in transport_reports.calls)


# --- timed() ----------------------------------------------------------------------------------


def test_timed_block_ok() -> None:
    reports, timer = Reports(), FakeTimer()
    with timed(reports, timer=timer) as timing:
        timer.t += 0.0625
    assert reports.calls == [(62.5, "ok")]
    assert timing.elapsed_ms == 62.5


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ValueError("bad answer"), "server_error"),
        (ConnectionResetError(), "network_error"),
        (httpx.ConnectError("refused"), "network_error"),
    ],
)
def test_timed_block_failure_is_reported_and_reraised(error: Exception, outcome: str) -> None:
    reports = Reports()
    with pytest.raises(type(error)) as raised, timed(reports):
        raise error
    assert raised.value is error
    assert reports.outcomes == [outcome]


def test_timed_ignores_cancellation_and_interrupts() -> None:
    reports = Reports()
    with pytest.raises(KeyboardInterrupt), timed(reports):
        raise KeyboardInterrupt
    assert reports.calls == []


def test_timed_decorates_a_function() -> None:
    reports, timer = Reports(), FakeTimer()

    @timed(reports, timer=timer)
    def fetch(x: int, *, scale: int = 1) -> int:
        """Fetch something."""
        timer.t += 0.015625
        if x < 0:
            raise OSError("unreachable")
        return x * scale

    assert fetch(2, scale=3) == 6
    with pytest.raises(OSError):
        fetch(-1)
    assert fetch.__name__ == "fetch" and fetch.__doc__ == "Fetch something."
    assert reports.calls == [(15.625, "ok"), (15.625, "network_error")]


def test_timed_decorator_times_concurrent_calls_separately() -> None:
    reports, timer = Reports(), FakeTimer()
    entered, release = threading.Event(), threading.Event()

    @timed(reports, timer=timer)
    def call(wait: bool) -> None:
        if wait:
            entered.set()
            assert release.wait(CLIENT_TIMEOUT)
        else:
            timer.t += 2.0

    slow = threading.Thread(target=call, args=(True,))
    slow.start()  # starts at t=100
    assert entered.wait(CLIENT_TIMEOUT)
    timer.t += 1.0
    call(False)  # from t=101 to t=103
    release.set()
    slow.join(CLIENT_TIMEOUT)
    assert reports.calls == [(2000.0, "ok"), (3000.0, "ok")]


def test_timed_decorates_a_coroutine_function() -> None:
    reports, timer = Reports(), FakeTimer()

    @timed(reports, timer=timer)
    async def fetch(fail: bool) -> str:
        timer.t += 0.25
        await asyncio.sleep(0)
        if fail:
            raise httpx.ReadTimeout("slow")
        return "done"

    assert asyncio.run(fetch(False)) == "done"
    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(fetch(True))
    assert reports.calls == [(250.0, "ok"), (250.0, "network_error")]


def test_timed_as_an_async_context_manager() -> None:
    reports, timer = Reports(), FakeTimer()

    async def main() -> None:
        async with timed(reports, timer=timer):
            timer.t += 0.375
        with pytest.raises(LookupError):
            async with timed(reports, timer=timer):
                raise LookupError("no such level")

    asyncio.run(main())
    assert reports.calls == [(375.0, "ok"), (0.0, "server_error")]


def test_timed_cancelled_coroutine_is_not_reported() -> None:
    reports = Reports()

    @timed(reports)
    async def forever(ready: asyncio.Event) -> None:
        ready.set()
        await asyncio.Event().wait()

    async def main() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(forever(ready))
        await ready.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert reports.calls == []
