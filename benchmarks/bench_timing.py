"""What response timing costs the game per request: ``hook_overhead_us()``.

Every variant sends the same requests through an ``httpx.Client`` over an
``httpx.MockTransport`` (no sockets, so the client's own work is the whole
cost and the difference is the hooks'). Variants run interleaved, and each
figure is the best of 9 runs of the mean µs per request: the overhead is a
difference of two ~75 µs figures, and the best run is far less noisy than
the median (scheduling noise only ever adds time).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import httpx

from anisota_agent.network import NetworkMonitor
from anisota_agent.timing import START_EXTENSION, TimedTransport, event_hooks

_REPEATS = 9
_URL = "http://game.test/"


def _answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b"{}")


def _noop(elapsed_ms: float, outcome: str) -> None:
    pass


def _clients() -> dict[str, httpx.Client]:
    monitor = NetworkMonitor(now=time.monotonic)
    mock = httpx.MockTransport(_answer)
    return {
        "plain": httpx.Client(transport=mock),
        "hooks": httpx.Client(transport=mock, event_hooks=event_hooks(_noop)),
        "transport": httpx.Client(transport=TimedTransport(_noop, mock)),
        "hooks_with_monitor": httpx.Client(
            transport=mock, event_hooks=event_hooks(monitor.observe_request)
        ),
    }


def _mean_us(call: Callable[[], object], count: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(count):
        call()
    return (time.perf_counter_ns() - start) / count / 1000


def _direct_costs(count: int) -> dict[str, float]:
    """The hook pair and ``observe_request`` called by themselves, no client around."""
    hooks = event_hooks(_noop)
    on_request, on_response = hooks["request"][0], hooks["response"][0]
    response = httpx.Response(200, request=httpx.Request("GET", _URL))
    request = response.request
    monitor = NetworkMonitor(now=time.monotonic)

    def pair() -> None:
        on_request(request)
        on_response(response)

    pair_runs = [_mean_us(pair, count * 10) for _ in range(_REPEATS)]
    observe_runs = [
        _mean_us(lambda: monitor.observe_request(42.0, "ok"), count * 10) for _ in range(_REPEATS)
    ]
    request.extensions.pop(START_EXTENSION, None)
    return {
        "hook_pair_direct_us": round(min(pair_runs), 3),
        "monitor_observe_request_us": round(min(observe_runs), 3),
    }


def hook_overhead_us(requests: int = 2000) -> dict[str, float]:
    """µs per request without and with timing, and the difference (the overhead).

    Keys: ``<variant>_us`` for ``plain``, ``hooks`` (event hooks, no-op sink),
    ``transport`` (TimedTransport, no-op sink), ``hooks_with_monitor`` (event
    hooks feeding a NetworkMonitor); ``<variant>_overhead_us`` = variant - plain;
    ``hook_pair_direct_us`` and ``monitor_observe_request_us``: the hook pair
    and ``observe_request`` timed by themselves, the most precise figures.
    """
    clients = _clients()
    for client in clients.values():  # warm up: imports, pools, caches
        for _ in range(50):
            client.get(_URL)
    runs: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(_REPEATS):
        for name, client in clients.items():
            runs[name].append(_mean_us(functools.partial(client.get, _URL), requests))
    for client in clients.values():
        client.close()
    results: dict[str, float] = {"requests": float(requests)}
    plain = min(runs["plain"])
    for name, values in runs.items():
        results[f"{name}_us"] = round(min(values), 2)
        if name != "plain":
            results[f"{name}_overhead_us"] = round(min(values) - plain, 2)
    results.update(_direct_costs(requests))
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(hook_overhead_us(), indent=2))
