"""Response timing: how long calls to a service take, and whether they got an answer.

Everything here reports to a sink ``report(elapsed_ms, outcome)`` (the agent
passes a bound method); ``outcome`` is one of:

- ``"ok"``: an answer the game can use, including most 4xx: 400, 401, 403, 404,
  409, 422 are the server's deliberate answers to the game's request, usually
  quick; counting them as errors would make ``errorCount`` measure the game's
  own logic (a missing record, an expired token) instead of the service.
- ``"server_error"``: an HTTP answer that is a failure of the service, not of
  the request: any 5xx, 408 (the server gave up waiting) and 429 (rate
  limited). The network delivered it, so it counts as connectivity.
- ``"network_error"``: no answer at all: the transport raised (connect, DNS,
  TLS, timeout, connection reset).

Ways to measure, pick one per client (using two reports every request twice):

- :func:`event_hooks` / :func:`async_event_hooks` for ``httpx.Client(event_hooks=
  ...)`` / ``httpx.AsyncClient``: time from just before the request is sent to
  the response headers, for every exchange (each redirect hop and auth retry).
  httpx never calls response hooks when the transport raises, so **hooks cannot
  see network errors**. :class:`ExchangeTimer` is the same timing for a client
  that catches httpx's transport errors itself and reports them
  (:meth:`ExchangeTimer.no_answer`), as the agent's XRPC client does.
- :class:`TimedTransport` / :class:`AsyncTimedTransport` wrap a transport and
  see every exchange including failures. Caveat: httpx builds its default
  transport from the client's ``verify``, ``cert``, ``http2``, ``limits``; pass
  an inner transport built with those, and note that proxy mounts (including
  ``HTTP(S)_PROXY`` from the environment) bypass the wrapper.
- :func:`timed`, a context manager and decorator (sync and async) for any other
  call: an exception that is an :class:`OSError` or ``httpx.TransportError``
  is a ``network_error``, any other exception a ``server_error`` (it answered,
  badly), no exception ``ok``. Exceptions are always re-raised unchanged.

Timings end when the response headers arrive; a failure while reading the body
later is not reported (an answer did arrive). Exceptions outside ``Exception``
(task cancellation, ``KeyboardInterrupt``) are not failures of the call and are
not reported. A sink that raises never breaks the host's request:
its first failure is logged with a traceback, later ones at debug level.

This module imports httpx, which takes tens of milliseconds: import it lazily
(from a function, or from the host that already uses httpx), never from the
package's import path.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from time import perf_counter
from types import TracebackType
from typing import Any, TypeVar, cast

import httpx

logger = logging.getLogger("anisota_agent")

__all__ = [
    "START_EXTENSION",
    "AsyncTimedTransport",
    "ExchangeTimer",
    "Hooks",
    "Report",
    "Timed",
    "TimedTransport",
    "Timer",
    "async_event_hooks",
    "classify_exception",
    "classify_status",
    "event_hooks",
    "timed",
]

#: The sink: ``report(elapsed_ms, outcome)``; it must be quick and thread-safe.
Report = Callable[[float, str], None]
#: A clock in seconds for measuring intervals (``time.perf_counter``).
Timer = Callable[[], float]
#: What :func:`event_hooks` returns: httpx's ``event_hooks`` mapping.
Hooks = dict[str, list[Callable[..., Any]]]

#: Where the request hook leaves its start time for the response hook.
START_EXTENSION = "anisota_agent.timing.start"
#: Statuses below 500 that are failures of the service rather than answers.
_SERVER_ERROR_4XX = frozenset({408, 429})

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T", bound="TimedTransport")
_AT = TypeVar("_AT", bound="AsyncTimedTransport")


def classify_status(status_code: int) -> str:
    """``server_error`` for 5xx, 408 and 429; ``ok`` for any other status."""
    if status_code >= 500 or status_code in _SERVER_ERROR_4XX:
        return "server_error"
    return "ok"


def classify_exception(error: BaseException) -> str:
    """``network_error`` for OSError and ``httpx.TransportError``, else ``server_error``."""
    if isinstance(error, (OSError, httpx.TransportError)):
        return "network_error"
    return "server_error"


_Transport = TypeVar("_Transport", httpx.BaseTransport, httpx.AsyncBaseTransport)


def _checked_inner(inner: object, kind: type[_Transport]) -> _Transport | None:
    """``inner`` if it is None or a transport of ``kind``, else a TypeError naming it."""
    if inner is None or isinstance(inner, kind):
        return inner
    raise TypeError(f"inner must be an httpx.{kind.__name__} or None; got {type(inner).__name__}")


def _guard(report: Report) -> Report:
    """Wrap the sink so that its failure never reaches the host's call."""
    failed = False

    def guarded(elapsed_ms: float, outcome: str) -> None:
        nonlocal failed
        try:
            report(elapsed_ms, outcome)
        except Exception:
            if failed:  # one traceback is enough; a broken sink fails on every call
                logger.debug("response timing sink failed again", exc_info=True)
            else:
                failed = True
                logger.exception("response timing sink failed (repeats logged at debug level)")

    return guarded


# -- httpx event hooks ------------------------------------------------------------


class ExchangeTimer:
    """Times each httpx exchange from its request hook to its response hook.

    :meth:`hooks` go in ``httpx.Client(event_hooks=...)``; they report each
    answer's time and :func:`classify_status`. The hooks never hear of a
    request whose transport raised, so a client that catches
    ``httpx.TransportError`` around its call reports that call with
    :meth:`no_answer`, timed from :meth:`start`.
    """

    def __init__(self, report: Report, *, timer: Timer = perf_counter) -> None:
        self._sink = _guard(report)
        self._timer = timer

    def hooks(self) -> Hooks:
        """The ``event_hooks`` mapping: ``{"request": [...], "response": [...]}``."""
        return {"request": [self.on_request], "response": [self.on_response]}

    def on_request(self, request: httpx.Request) -> None:
        """Request hook: note when the exchange began."""
        request.extensions[START_EXTENSION] = self._timer()

    def on_response(self, response: httpx.Response) -> None:
        """Response hook: report the time to the headers and the status's outcome."""
        started = response.request.extensions.get(START_EXTENSION)
        if started is not None:  # no start: hooks were added while it was in flight
            self._sink((self._timer() - started) * 1000.0, classify_status(response.status_code))

    def start(self) -> float:
        """The timer's reading now: pass it to :meth:`no_answer` if the call fails."""
        return self._timer()

    def no_answer(self, started: float) -> None:
        """Report a call begun at ``started`` (from :meth:`start`) whose transport
        raised, as ``network_error``."""
        self._sink((self._timer() - started) * 1000.0, "network_error")


def event_hooks(report: Report, *, timer: Timer = perf_counter) -> Hooks:
    """Hooks for ``httpx.Client(event_hooks=...)`` that time every exchange.

    They see answers only (see the module docstring); to add them to an existing
    client: ``for name, hooks in event_hooks(r).items(): client.event_hooks[name]
    += hooks``.
    """
    return ExchangeTimer(report, timer=timer).hooks()


def async_event_hooks(report: Report, *, timer: Timer = perf_counter) -> Hooks:
    """The same hooks as :func:`event_hooks`, as coroutines for ``httpx.AsyncClient``."""
    exchanges = ExchangeTimer(report, timer=timer)

    async def on_request(request: httpx.Request) -> None:
        exchanges.on_request(request)

    async def on_response(response: httpx.Response) -> None:
        exchanges.on_response(response)

    return {"request": [on_request], "response": [on_response]}


# -- transports ---------------------------------------------------------------------


class TimedTransport(httpx.BaseTransport):
    """A transport that times every request it forwards to ``inner``, failures too.

    ``httpx.Client(transport=TimedTransport(report))``; ``inner`` defaults to a
    plain ``httpx.HTTPTransport()``. Any exception from ``inner`` is reported as
    ``network_error`` (no answer came) and re-raised unchanged.
    """

    def __init__(
        self,
        report: Report,
        inner: httpx.BaseTransport | None = None,
        *,
        timer: Timer = perf_counter,
    ) -> None:
        self._report = _guard(report)
        self._inner = _checked_inner(inner, httpx.BaseTransport) or httpx.HTTPTransport()
        self._timer = timer

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Forward the request, report its time to the headers and its outcome."""
        started = self._timer()
        try:
            response = self._inner.handle_request(request)
        except Exception:
            self._report((self._timer() - started) * 1000.0, "network_error")
            raise
        self._report((self._timer() - started) * 1000.0, classify_status(response.status_code))
        return response

    def close(self) -> None:
        """Close the inner transport."""
        self._inner.close()

    def __enter__(self: _T) -> _T:
        self._inner.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self._inner.__exit__(exc_type, exc_value, traceback)


class AsyncTimedTransport(httpx.AsyncBaseTransport):
    """:class:`TimedTransport` for ``httpx.AsyncClient``; ``inner`` defaults to
    ``httpx.AsyncHTTPTransport()``."""

    def __init__(
        self,
        report: Report,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        timer: Timer = perf_counter,
    ) -> None:
        self._report = _guard(report)
        self._inner = _checked_inner(inner, httpx.AsyncBaseTransport) or httpx.AsyncHTTPTransport()
        self._timer = timer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Forward the request, report its time to the headers and its outcome."""
        started = self._timer()
        try:
            response = await self._inner.handle_async_request(request)
        except Exception:
            self._report((self._timer() - started) * 1000.0, "network_error")
            raise
        self._report((self._timer() - started) * 1000.0, classify_status(response.status_code))
        return response

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self._inner.aclose()

    async def __aenter__(self: _AT) -> _AT:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self._inner.__aexit__(exc_type, exc_value, traceback)


# -- any other call ---------------------------------------------------------------------


class Timed:
    """Times a block or each call of a function; made by :func:`timed`.

    As a context manager (``with`` or ``async with``) one instance times one block
    at a time, and ``elapsed_ms`` holds the last block's time afterwards. As a
    decorator every call is timed on its own, so the decorated function may run
    concurrently. Decorate plain functions and coroutine functions, not
    generators (only their creation would be timed).
    """

    def __init__(self, report: Report, timer: Timer = perf_counter) -> None:
        self._report = _guard(report)
        self._timer = timer
        self._started = 0.0
        self.elapsed_ms: float | None = None

    def __enter__(self) -> Timed:
        self._started = self._timer()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.elapsed_ms = self._finish(self._started, exc)

    async def __aenter__(self) -> Timed:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, func: _F) -> _F:
        """Decorate ``func`` (sync or async) so that each call is timed."""
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def timed_coroutine(*args: Any, **kwargs: Any) -> Any:
                started = self._timer()
                try:
                    result = await func(*args, **kwargs)
                except BaseException as error:
                    self._finish(started, error)
                    raise
                self._finish(started, None)
                return result

            return cast(_F, timed_coroutine)

        @functools.wraps(func)
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            started = self._timer()
            try:
                result = func(*args, **kwargs)
            except BaseException as error:
                self._finish(started, error)
                raise
            self._finish(started, None)
            return result

        return cast(_F, timed_call)

    def _finish(self, started: float, error: BaseException | None) -> float:
        """Report the call that began at ``started``; return its elapsed ms."""
        elapsed_ms = (self._timer() - started) * 1000.0
        if error is None:
            self._report(elapsed_ms, "ok")
        elif isinstance(error, Exception):  # cancellation etc. is not the call failing
            self._report(elapsed_ms, classify_exception(error))
        return elapsed_ms


def timed(report: Report, *, timer: Timer = perf_counter) -> Timed:
    """Time any call, as ``with timed(report): ...`` or ``@timed(report)``.

    No exception: ``ok``; an OSError or ``httpx.TransportError``: ``network_error``;
    any other exception: ``server_error``. Exceptions propagate unchanged.
    """
    return Timed(report, timer)
