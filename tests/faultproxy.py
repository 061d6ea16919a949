"""A small loopback HTTP/1.1 fault proxy to put in front of the test PDS.

    with FaultProxy(pds.url) as proxy:
        client = httpx.Client(base_url=proxy.url)
        proxy.set_mode("cut")          # refuse new connections, reset open ones
        proxy.set_mode("hang")         # accept and read requests, never answer
        proxy.set_mode("pass")         # forward (the default)
        proxy.delay(2.0)               # forward, but hold every answer back 2 s
        proxy.delay(600, "/xrpc/com.atproto.repo.applyWrites")  # ... only these answers
        proxy.drop_response_once("/xrpc/com.atproto.repo.applyWrites")
        proxy.inject_response("/xrpc/com.atproto.repo.putRecord", 502)
        proxy.requests_seen("/xrpc/com.atproto.repo.")

Requests are parsed (Content-Length or chunked bodies) and each one is sent to
the upstream on a fresh connection with ``Connection: close``; the upstream's
answer (Content-Length, chunked or read-to-close) is read whole and sent back
with a Content-Length, so client keep-alive works. With a delay set, each
request is forwarded at once and its answer (forwarded or injected) held back
that long before it is sent, as from a slow PDS or a long link. Stdlib only: an asyncio loop
in a daemon thread; every control method is safe to call from the test thread
and takes effect before it returns. Only 127.0.0.1 is listened on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

__all__ = ["FaultProxy", "Mode"]

Mode = Literal["pass", "cut", "hang"]
_T = TypeVar("_T")

_MAX_HEADER = 64 * 1024
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class _ClientGone(Exception):
    pass


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return None

    @property
    def keep_alive(self) -> bool:
        conn = (self.header("connection") or "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


@dataclass
class _Injection:
    prefix: str
    status: int
    body: bytes
    headers: list[tuple[str, str]]
    remaining: int


@dataclass
class _Drop:
    prefix: str
    remaining: int


@dataclass
class _State:
    mode: Mode = "pass"
    drops: list[_Drop] = field(default_factory=list)
    injections: list[_Injection] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)
    forwarded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    connections: int = 0
    delay: float = 0.0
    delay_prefix: str = ""


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            # trailers, until an empty line
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    start = lines[0]
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return start, headers


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    low = name.lower()
    for k, v in headers:
        if k.lower() == low:
            return v
    return None


async def _read_body(
    reader: asyncio.StreamReader, headers: list[tuple[str, str]], *, to_eof: bool
) -> bytes:
    te = (_get(headers, "transfer-encoding") or "").lower()
    if "chunked" in te:
        return await _read_chunked(reader)
    length = _get(headers, "content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    if to_eof:
        return await reader.read()
    return b""


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0) rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Loopback HTTP/1.1 proxy whose failures are switched from the test thread."""

    def __init__(self, upstream_url: str, *, port: int = 0) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"FaultProxy needs an http:// upstream, not {upstream_url!r}")
        self._up_host = parts.hostname
        self._up_port = parts.port or 80
        self._up_netloc = parts.netloc
        self._port = port
        self._state = _State()
        self._lock = threading.Lock()
        # Notified whenever a request arrives (wait_for_request()) or an answer
        # starts being held back (wait_for_held()).
        self._arrived = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._hung: set[asyncio.StreamWriter] = set()
        # Answers held back by a delay: released early (to be reset) when the link is cut.
        self._holding: set[asyncio.Future[bool]] = set()

    # -- lifecycle ---------------------------------------------------------------

    @property
    def url(self) -> str:
        if not self._port:
            raise RuntimeError("FaultProxy is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def upstream_url(self) -> str:
        return f"http://{self._up_netloc}"

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        ready.wait()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):
            self._call(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> FaultProxy:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("FaultProxy is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self._port, reuse_address=True
        )
        sock = self._server.sockets[0]
        self._port = int(sock.getsockname()[1])

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            # Server.wait_closed() also waits for open connections on newer Pythons.
            await asyncio.sleep(0)

    async def _shutdown(self) -> None:
        await self._unlisten()
        for w in list(self._conns):
            _abort(w)
        self._conns.clear()
        self._hung.clear()
        self._cancel_holding()

    def _cancel_holding(self) -> None:
        for waiting in list(self._holding):
            if not waiting.done():
                waiting.set_result(False)
        self._holding.clear()

    # -- controls (test thread) -------------------------------------------------

    @property
    def mode(self) -> Mode:
        with self._lock:
            return self._state.mode

    def set_mode(self, mode: Mode) -> None:
        """``pass``: forward. ``cut``: stop listening (connections are refused) and
        reset every open client connection. ``hang``: accept and read requests but
        never answer (open hung requests stay hung until ``cut`` or ``stop``)."""
        if mode not in ("pass", "cut", "hang"):
            raise ValueError(f"unknown mode {mode!r}")
        self._call(self._set_mode(mode))

    async def _set_mode(self, mode: Mode) -> None:
        with self._lock:
            self._state.mode = mode
        if mode == "cut":
            await self._unlisten()
            for w in list(self._conns):
                _abort(w)
            self._conns.clear()
            self._hung.clear()
            self._cancel_holding()
        else:
            await self._listen()

    def cut(self) -> None:
        """Refuse connections and reset open ones (a delay setting is kept for later)."""
        self.set_mode("cut")

    def hang(self) -> None:
        self.set_mode("hang")

    def passthrough(self) -> None:
        """Forward every request and answer at once (clears a :meth:`delay`)."""
        with self._lock:
            self._state.delay = 0.0
            self._state.delay_prefix = ""
        self.set_mode("pass")

    def delay(self, seconds: float, path_prefix: str = "") -> None:
        """Forward, holding every answer back ``seconds`` before it is sent.

        With ``path_prefix``, only the answers to requests whose path starts
        with it wait (a write answered and held while the lists before it were
        not): the rest go at once.

        Each request still reaches the upstream at once (a write commits there
        right away); only its answer waits, as behind a slow PDS or a long link.
        Injected answers wait too; a dropped answer is dropped after the wait.
        Switches the proxy to ``pass`` if it was cut or hung (the delay is set
        first, so no answer leaves undelayed). :meth:`passthrough` and
        :meth:`reset` clear it; ``delay(0)`` does too. An answer already held
        keeps the delay it started with; ``cut`` resets its connection like any.
        """
        if not seconds >= 0:
            raise ValueError(f"delay must be >= 0 seconds; got {seconds!r}")
        with self._lock:
            self._state.delay = float(seconds)
            self._state.delay_prefix = path_prefix
        self.set_mode("pass")

    @property
    def delay_seconds(self) -> float:
        """The hold-back currently applied to each answer (0: none)."""
        with self._lock:
            return self._state.delay

    def drop_response_once(self, path_prefix: str, times: int = 1) -> None:
        """The next ``times`` requests whose path starts with ``path_prefix`` reach
        the upstream and are processed fully; then the client connection is closed
        without an answer ("committed, but the answer was lost")."""
        with self._lock:
            self._state.drops.append(_Drop(path_prefix, times))

    def inject_response(
        self,
        path_prefix: str,
        status: int,
        *,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` without
        forwarding them (e.g. a 502 from a reverse proxy, or a 429)."""
        body = b"" if json_body is None else json.dumps(json_body).encode()
        hdrs = list((headers or {}).items())
        if json_body is not None and _get(hdrs, "content-type") is None:
            hdrs.append(("Content-Type", "application/json; charset=utf-8"))
        with self._lock:
            self._state.injections.append(_Injection(path_prefix, status, body, hdrs, times))

    def requests_seen(self, path_prefix: str = "") -> int:
        """Requests read from clients (in every mode) whose path starts with the prefix."""
        with self._lock:
            return sum(1 for p in self._state.seen if p.startswith(path_prefix))

    def wait_for_request(self, path_prefix: str = "", timeout: float = 10.0) -> bool:
        """Block until a request whose path starts with the prefix has arrived."""
        with self._arrived:
            return self._arrived.wait_for(
                lambda: any(p.startswith(path_prefix) for p in self._state.seen), timeout
            )

    def wait_for_held(self, path_prefix: str = "", timeout: float = 10.0) -> bool:
        """Block until an answer to a request whose path starts with the prefix is
        being held back by a :meth:`delay` (the upstream has answered it)."""
        with self._arrived:
            return self._arrived.wait_for(
                lambda: any(p.startswith(path_prefix) for p in self._state.held), timeout
            )

    def answers_held(self, path_prefix: str = "") -> int:
        """Answers held back by a delay so far whose request path starts with the prefix."""
        with self._lock:
            return sum(1 for p in self._state.held if p.startswith(path_prefix))

    def requests_forwarded(self, path_prefix: str = "") -> int:
        """Requests sent to the upstream whose path starts with the prefix."""
        with self._lock:
            return sum(1 for p in self._state.forwarded if p.startswith(path_prefix))

    def connections_accepted(self) -> int:
        """Client connections accepted so far (keep-alive reuses one)."""
        with self._lock:
            return self._state.connections

    def responses_dropped(self, path_prefix: str = "") -> int:
        with self._lock:
            return sum(1 for p in self._state.dropped if p.startswith(path_prefix))

    def reset(self) -> None:
        """Back to ``pass`` with no delay, no pending drops/injections, zeroed counters."""
        with self._lock:
            self._state.delay = 0.0
            self._state.delay_prefix = ""
            self._state.held.clear()
            self._state.drops.clear()
            self._state.injections.clear()
            self._state.seen.clear()
            self._state.forwarded.clear()
            self._state.dropped.clear()
            self._state.connections = 0
        self.set_mode("pass")

    # -- connection handling (loop thread) ----------------------------------------

    def _take_drop(self, path: str) -> bool:
        with self._lock:
            for entry in self._state.drops:
                if path.startswith(entry.prefix) and entry.remaining > 0:
                    entry.remaining -= 1
                    if entry.remaining == 0:
                        self._state.drops.remove(entry)
                    return True
        return False

    def _take_injection(self, path: str) -> _Injection | None:
        with self._lock:
            for inj in self._state.injections:
                if path.startswith(inj.prefix) and inj.remaining > 0:
                    inj.remaining -= 1
                    if inj.remaining == 0:
                        self._state.injections.remove(inj)
                    return inj
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            _abort(writer)
            return
        self._conns.add(writer)
        with self._lock:
            self._state.connections += 1
        try:
            while True:
                req = await self._read_request(reader)
                if req is None:
                    break
                with self._lock:
                    self._state.seen.append(req.path)
                    mode = self._state.mode
                    self._arrived.notify_all()
                if mode == "cut":
                    _abort(writer)
                    return
                if mode == "hang":
                    self._hung.add(writer)
                    # Never answer; wait for the client (or cut/stop) to close.
                    with contextlib.suppress(Exception):
                        while await reader.read(65536):
                            pass
                    return
                inj = self._take_injection(req.path)
                if inj is not None:
                    if not await self._hold(req.path):
                        _abort(writer)
                        return
                    await self._send(
                        writer,
                        f"HTTP/1.1 {inj.status} {_REASONS.get(inj.status, 'Status')}",
                        inj.headers,
                        inj.body,
                        keep_alive=req.keep_alive,
                        head=req.method == "HEAD",
                    )
                    if not req.keep_alive:
                        break
                    continue
                drop = self._take_drop(req.path)
                try:
                    status_line, headers, body = await self._forward(req)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    # Upstream down or broken: the client sees its connection reset.
                    _abort(writer)
                    return
                if not await self._hold(req.path):
                    _abort(writer)  # cut while held: the answer never arrives
                    return
                if drop:
                    with self._lock:
                        self._state.dropped.append(req.path)
                    writer.close()
                    return
                await self._send(
                    writer,
                    status_line,
                    headers,
                    body,
                    keep_alive=req.keep_alive,
                    head=req.method == "HEAD",
                )
                if not req.keep_alive:
                    break
        except (_ClientGone, ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._conns.discard(writer)
            self._hung.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def _hold(self, path: str) -> bool:
        """Hold an answer back for the delay in force (none: at once).

        False if the link was cut (or the proxy stopped) meanwhile: do not answer.
        """
        with self._lock:
            seconds = self._state.delay if path.startswith(self._state.delay_prefix) else 0.0
            if seconds > 0:
                self._state.held.append(path)
                self._arrived.notify_all()
        if seconds <= 0:
            return True
        loop = asyncio.get_running_loop()
        waiting: asyncio.Future[bool] = loop.create_future()

        def release() -> None:
            if not waiting.done():
                waiting.set_result(True)

        timer = loop.call_later(seconds, release)
        self._holding.add(waiting)
        try:
            return await waiting
        finally:
            timer.cancel()
            self._holding.discard(waiting)

    async def _read_request(self, reader: asyncio.StreamReader) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise _ClientGone() from exc
            return None
        except asyncio.LimitOverrunError as exc:
            raise _ClientGone() from exc
        if len(head) > _MAX_HEADER:
            raise _ClientGone()
        start, headers = _parse_head(head[:-4])
        parts = start.split(" ")
        if len(parts) != 3:
            raise _ClientGone()
        method, target, version = parts
        body = await _read_body(reader, headers, to_eof=False)
        return _Request(method, target, version, headers, body)

    async def _forward(self, req: _Request) -> tuple[str, list[tuple[str, str]], bytes]:
        with self._lock:
            self._state.forwarded.append(req.path)
        up_reader, up_writer = await asyncio.open_connection(self._up_host, self._up_port)
        try:
            lines = [f"{req.method} {req.target} HTTP/1.1"]
            for k, v in req.headers:
                low = k.lower()
                if low in _HOP_BY_HOP or low == "host":
                    continue
                lines.append(f"{k}: {v}")
            lines.append(f"Host: {self._up_netloc}")
            lines.append("Connection: close")
            if req.body or req.method in ("POST", "PUT", "PATCH"):
                lines.append(f"Content-Length: {len(req.body)}")
            up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + req.body)
            await up_writer.drain()
            while True:
                head = await up_reader.readuntil(b"\r\n\r\n")
                status_line, headers = _parse_head(head[:-4])
                status = int(status_line.split(" ", 2)[1])
                if not 100 <= status < 200:
                    break
            if req.method == "HEAD" or status in (204, 304):
                body = b""
            else:
                body = await _read_body(up_reader, headers, to_eof=True)
            return status_line, headers, body
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        status_line: str,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        keep_alive: bool,
        head: bool,
    ) -> None:
        lines = [status_line]
        for k, v in headers:
            low = k.lower()
            if low in _HOP_BY_HOP and not (head and low == "content-length"):
                continue
            lines.append(f"{k}: {v}")
        if not head:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head:
            writer.write(body)
        await writer.drain()
