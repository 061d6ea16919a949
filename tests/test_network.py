"""Tests for anisota_agent.network: the condition rules, probes, interfaces."""

from __future__ import annotations

import itertools
import socket
import threading
from collections import namedtuple
from typing import Any

import psutil
import pytest
from agent_helpers import run_python

from anisota_agent.network import (
    CONDITIONS,
    MAX_PENDING_TRANSITIONS,
    NetworkMonitor,
    Transition,
    interfaces_up,
)

SLOW = 3000.0  # above the default 2000 ms threshold
FAST = 100.0  # below 0.75 x the threshold
BETWEEN = 1800.0  # neither slow nor fast: votes for nothing


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make(clock: FakeClock | None = None, **settings: Any) -> tuple[NetworkMonitor, FakeClock]:
    clock = clock or FakeClock()
    return NetworkMonitor(now=clock, **settings), clock


def online(clock: FakeClock | None = None, **settings: Any) -> tuple[NetworkMonitor, FakeClock]:
    """A monitor that has seen one fast answer (and forgot that transition)."""
    monitor, clock = make(clock, **settings)
    monitor.observe_interfaces(True)
    monitor.observe_request(FAST, "ok")
    assert monitor.condition == "online"
    monitor.pop_transitions()
    return monitor, clock


def conditions(monitor: NetworkMonitor) -> list[str]:
    return [t.new for t in monitor.pop_transitions()]


# --- the rules ---------------------------------------------------------------------


def test_unknown_until_the_first_signal_decides() -> None:
    monitor, _ = make()
    assert monitor.condition == "unknown"
    assert "unknown" in CONDITIONS
    monitor.observe_interfaces(True)  # up interfaces prove nothing
    monitor.observe_interfaces(None)
    assert monitor.condition == "unknown"
    assert monitor.pop_transitions() == []


def test_interfaces_down_is_offline_at_once() -> None:
    monitor, clock = online()
    clock.advance(7)
    monitor.observe_interfaces(False)
    assert monitor.condition == "offline"
    assert monitor.pop_transitions() == [Transition(1007.0, "online", "offline")]


def test_interfaces_down_beats_answers_from_loopback() -> None:
    monitor, _ = online()
    monitor.observe_interfaces(False)
    monitor.observe_request(FAST, "ok")
    monitor.observe_probe(20.0)
    assert monitor.condition == "offline"
    monitor.observe_interfaces(True)
    assert monitor.condition == "unknown"  # those answers proved nothing about the new path


def test_interfaces_back_up_is_unknown_until_an_answer() -> None:
    monitor, _ = online()
    monitor.observe_interfaces(False)
    monitor.observe_interfaces(True)
    assert monitor.condition == "unknown"
    assert monitor.probe_due()
    monitor.observe_probe(40.0)
    assert monitor.condition == "online"
    transitions = monitor.pop_transitions()
    assert [t.new for t in transitions] == ["offline", "unknown", "online"]
    assert [t.reconnected for t in transitions] == [False, False, True]


def test_psutil_failure_changes_nothing() -> None:
    monitor, _ = online()
    monitor.observe_interfaces(None)
    assert monitor.condition == "online"


def test_k_network_errors_go_offline_and_one_answer_comes_back() -> None:
    monitor, clock = online()
    monitor.observe_request(10_000.0, "network_error")
    monitor.observe_request(10_000.0, "network_error")
    assert monitor.condition == "online"  # two could be bad luck
    clock.advance(3)
    monitor.observe_request(10_000.0, "network_error")
    assert monitor.condition == "offline"
    clock.advance(60)
    monitor.observe_request(FAST, "ok")
    assert monitor.condition == "online"
    transitions = monitor.pop_transitions()
    assert transitions == [
        Transition(1003.0, "online", "offline"),
        Transition(1063.0, "offline", "online"),
    ]
    assert transitions[1].reconnected


def test_offline_after_is_configurable() -> None:
    monitor, _ = online(offline_after=1)
    monitor.observe_request(5.0, "network_error")
    assert monitor.condition == "offline"


def test_a_server_error_proves_the_network_works() -> None:
    monitor, _ = make()
    monitor.observe_request(30.0, "server_error")
    assert monitor.condition == "online"
    for _ in range(2):
        monitor.observe_request(5.0, "network_error")
    monitor.observe_request(30.0, "server_error")  # resets the streak
    for _ in range(2):
        monitor.observe_request(5.0, "network_error")
    assert monitor.condition == "online"


def test_network_errors_from_unknown_go_offline() -> None:
    monitor, _ = make()
    for _ in range(3):
        monitor.observe_request(5.0, "network_error")
    assert conditions(monitor) == ["offline"]


def test_alternating_good_and_bad_results_do_not_flap() -> None:
    monitor, _ = online()
    for i in range(300):  # bad, good, bad, good, ...
        monitor.observe_request(FAST, "network_error" if i % 2 == 0 else "ok")
    for i in range(300):  # two bad, one answer, two bad, ...: never three in a row
        monitor.observe_request(FAST, "server_error" if i % 3 == 2 else "network_error")
    assert monitor.condition == "online"
    assert monitor.pop_transitions() == []


def test_slow_needs_four_of_the_last_five() -> None:
    monitor, clock = online()
    for latency in (SLOW, SLOW, SLOW):
        monitor.observe_request(latency, "ok")
    assert monitor.condition == "online"  # 3 slow of 4 samples: not yet
    clock.advance(1)
    monitor.observe_request(SLOW, "ok")
    assert monitor.condition == "slow"
    assert monitor.pop_transitions() == [Transition(1001.0, "online", "slow")]


def test_one_stray_sample_never_flips_the_latency_state() -> None:
    monitor, _ = online()
    for _ in range(10):
        monitor.observe_request(FAST, "ok")
    monitor.observe_request(60_000.0, "ok")
    assert monitor.condition == "online"
    for _ in range(5):
        monitor.observe_request(SLOW, "ok")
    assert monitor.condition == "slow"
    monitor.observe_request(1.0, "ok")
    assert monitor.condition == "slow"


def test_slow_recovers_only_below_the_lower_threshold() -> None:
    monitor, _ = online()
    for _ in range(5):
        monitor.observe_request(SLOW, "ok")
    for _ in range(20):  # under the threshold, above 0.75 x: hysteresis holds
        monitor.observe_request(BETWEEN, "ok")
    assert monitor.condition == "slow"
    for _ in range(3):
        monitor.observe_request(FAST, "ok")
    assert monitor.condition == "slow"
    monitor.observe_request(FAST, "ok")
    assert monitor.condition == "online"
    assert conditions(monitor) == ["slow", "online"]


def test_samples_between_the_thresholds_keep_online() -> None:
    monitor, _ = online()
    for _ in range(20):
        monitor.observe_request(BETWEEN, "ok")
    assert monitor.condition == "online"


@pytest.mark.parametrize("start", ["online", "slow"])
@pytest.mark.parametrize(("fast", "slow"), [(FAST, SLOW), (0.0, 3500.0), (1400.0, 2100.0)])
def test_alternating_fast_and_slow_samples_do_not_flap(
    start: str, fast: float, slow: float
) -> None:
    monitor, _ = online()
    if start == "slow":
        for _ in range(5):
            monitor.observe_request(SLOW, "ok")
    monitor.pop_transitions()
    for i in range(200):
        monitor.observe_request(slow if i % 2 else fast, "ok")
    assert monitor.condition == start
    assert monitor.pop_transitions() == []


def test_server_errors_and_probes_give_no_latency_sample() -> None:
    monitor, _ = online()
    for _ in range(10):
        monitor.observe_request(SLOW, "server_error")
        monitor.observe_probe(SLOW)
    assert monitor.condition == "online"


def test_going_offline_forgets_latency() -> None:
    monitor, _ = online()
    for _ in range(5):
        monitor.observe_request(SLOW, "ok")
    monitor.observe_interfaces(False)
    monitor.observe_interfaces(True)
    monitor.observe_request(SLOW, "ok")
    assert monitor.condition == "online"  # one slow sample on the new path is not enough
    assert conditions(monitor) == ["slow", "offline", "unknown", "online"]


def test_custom_threshold() -> None:
    monitor, _ = online(slow_threshold_ms=200.0)
    for _ in range(4):
        monitor.observe_request(250.0, "ok")
    assert monitor.condition == "slow"
    for _ in range(4):
        monitor.observe_request(160.0, "ok")  # 0.8 x 200: not fast enough
    assert monitor.condition == "slow"
    for _ in range(4):
        monitor.observe_request(140.0, "ok")
    assert monitor.condition == "online"


# --- probes -------------------------------------------------------------------------


def test_a_probe_is_due_at_once_when_unknown() -> None:
    monitor, clock = make()
    assert monitor.next_probe_at() == clock.t
    assert monitor.probe_due()


def test_no_probe_while_online_and_fresh() -> None:
    monitor, clock = online()
    assert not monitor.probe_due()
    clock.advance(299)
    assert not monitor.probe_due()


def test_a_stale_condition_is_confirmed_once() -> None:
    monitor, clock = online()
    assert monitor.next_probe_at() == clock.t + 300
    clock.advance(300)
    assert monitor.probe_due()
    monitor.observe_probe(30.0)
    assert not monitor.probe_due()
    assert monitor.next_probe_at() == clock.t + 300


def test_stale_probes_can_be_disabled() -> None:
    monitor, clock = online(stale_after=None)
    clock.advance(10_000)
    assert monitor.next_probe_at() is None
    assert not monitor.probe_due()


def test_no_probe_while_the_interfaces_are_down() -> None:
    monitor, clock = online()
    monitor.observe_interfaces(False)
    clock.advance(3600)
    assert monitor.next_probe_at() is None
    assert not monitor.probe_due()


def test_failed_probes_back_off_exponentially_up_to_the_cap() -> None:
    monitor, clock = make()
    monitor.observe_interfaces(True)
    waits = []
    for _ in range(10):
        assert monitor.probe_due()
        monitor.observe_probe(None)
        due = monitor.next_probe_at()
        assert due is not None
        waits.append(due - clock.t)
        clock.advance(waits[-1] - 0.5)
        assert not monitor.probe_due()  # never early
        clock.advance(0.5)
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300, 300, 300]
    assert monitor.condition == "offline"  # after 3 failed probes


def test_a_failed_probe_counts_as_one_network_error() -> None:
    monitor, _ = make()
    monitor.observe_probe(None)
    monitor.observe_probe(None)
    assert monitor.condition == "unknown"
    monitor.observe_probe(None)
    assert monitor.condition == "offline"


def test_a_probe_already_counted_as_a_request_is_not_counted_twice() -> None:
    monitor, clock = make()
    waits, seen = [], []
    for _ in range(3):  # the instrumented client reported each failure already
        monitor.observe_request(5000.0, "network_error")
        monitor.observe_probe(None, counted=True)
        seen.append(monitor.condition)
        due = monitor.next_probe_at()
        assert due is not None
        waits.append(due - clock.t)
        clock.advance(waits[-1])
    assert waits == [5, 10, 20]  # the backoff still advances
    assert seen == ["unknown", "unknown", "offline"]  # three failures, not six
    monitor.observe_request(40.0, "server_error")  # the PDS answered its health check, sick
    monitor.observe_probe(None, counted=True)
    assert monitor.condition == "online"  # the network works


def test_any_answer_resets_the_backoff() -> None:
    monitor, clock = make()
    for _ in range(5):
        monitor.observe_probe(None)
    monitor.observe_request(FAST, "ok")  # the game's own request got through
    assert monitor.condition == "online"
    monitor.observe_request(FAST, "network_error")  # doubt: probe after the quiet time
    assert monitor.next_probe_at() == clock.t + 5
    monitor.observe_probe(None)
    assert monitor.next_probe_at() == clock.t + 5


def test_interfaces_coming_back_reset_the_backoff() -> None:
    monitor, clock = make()
    for _ in range(6):
        monitor.observe_probe(None)
    assert monitor.next_probe_at() == clock.t + 160
    monitor.observe_interfaces(False)
    clock.advance(30)
    monitor.observe_interfaces(True)
    assert monitor.condition == "unknown"
    assert monitor.probe_due()


def test_the_hosts_traffic_makes_probes_unnecessary() -> None:
    monitor, clock = online()
    for _ in range(3):
        monitor.observe_request(100.0, "network_error")
    assert monitor.condition == "offline"
    for _ in range(100):  # the game keeps failing every second: it probes for us
        clock.advance(1)
        monitor.observe_request(100.0, "network_error")
        assert not monitor.probe_due()
    clock.advance(5)
    assert monitor.probe_due()


def test_a_network_error_while_online_asks_for_a_probe_if_nothing_else_comes() -> None:
    monitor, clock = online()
    monitor.observe_request(100.0, "network_error")
    assert monitor.condition == "online"
    assert monitor.next_probe_at() == clock.t + 5
    clock.advance(5)
    assert monitor.probe_due()
    monitor.observe_probe(25.0)
    assert monitor.next_probe_at() == clock.t + 300  # doubt resolved


# --- transitions and threads ------------------------------------------------------------


def test_pop_transitions_returns_each_once() -> None:
    monitor, _ = online()
    monitor.observe_interfaces(False)
    assert len(monitor.pop_transitions()) == 1
    assert monitor.pop_transitions() == []


def test_pending_transitions_are_capped() -> None:
    monitor, _ = online()
    for _ in range(MAX_PENDING_TRANSITIONS):
        monitor.observe_interfaces(False)
        monitor.observe_interfaces(True)
    assert len(monitor.pop_transitions()) == MAX_PENDING_TRANSITIONS
    assert monitor.dropped_transitions == MAX_PENDING_TRANSITIONS


def test_on_change_runs_outside_the_lock() -> None:
    seen: list[tuple[Transition, str]] = []

    def listener(transition: Transition) -> None:
        # Reading the monitor from another thread would deadlock if the lock
        # were held here; the event wait bounds the test instead of hanging it.
        read = threading.Event()
        result: list[str] = []

        def read_condition() -> None:
            result.append(monitor.condition)
            read.set()

        threading.Thread(target=read_condition, daemon=True).start()
        assert read.wait(5), "on_change was called with the lock held"
        seen.append((transition, result[0]))

    clock = FakeClock()
    monitor = NetworkMonitor(now=clock, on_change=listener)
    monitor.observe_request(FAST, "ok")
    monitor.observe_interfaces(False)
    assert seen == [
        (Transition(1000.0, "unknown", "online"), "online"),
        (Transition(1000.0, "online", "offline"), "offline"),
    ]


def test_a_failing_listener_does_not_reach_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    def listener(transition: Transition) -> None:
        raise RuntimeError("listener bug")

    monitor = NetworkMonitor(now=FakeClock(), on_change=listener)
    monitor.observe_request(FAST, "ok")
    assert monitor.condition == "online"
    assert "listener bug" in caplog.text


def test_concurrent_observers_leave_a_consistent_history() -> None:
    monitor, _ = make()
    start = threading.Barrier(4)

    def observe(outcome: str) -> None:
        start.wait()
        for _ in range(2000):
            monitor.observe_request(FAST, outcome)

    threads = [
        threading.Thread(target=observe, args=(outcome,))
        for outcome in ("ok", "network_error", "network_error", "server_error")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = monitor.pop_transitions()
    assert history, "the first answer must have made a transition"
    if len(history) < MAX_PENDING_TRANSITIONS:  # else the oldest were let go, by design
        assert history[0].old == "unknown"
    for before, after in itertools.pairwise(history):
        assert before.new == after.old  # an unbroken chain: no lost update
    assert history[-1].new == monitor.condition


class _NoLock:
    """Stands in for the monitor's lock where a call must not take it."""

    def __enter__(self) -> None:
        raise AssertionError("the lock was taken")

    def __exit__(self, *exc: object) -> None:
        raise AssertionError("the lock was taken")


def steady(**settings: Any) -> tuple[NetworkMonitor, FakeClock]:
    """Online with a window of fast answers: the state most requests find."""
    monitor, clock = online(**settings)
    for _ in range(4):
        monitor.observe_request(FAST, "ok")
    return monitor, clock


def test_a_fast_answer_in_a_steady_state_takes_no_lock() -> None:
    monitor, clock = steady()
    lock, monitor._lock = monitor._lock, _NoLock()  # type: ignore[assignment]
    clock.advance(100)
    monitor.observe_request(FAST, "ok")
    monitor.observe_request(FAST, "ok", clock.t + 20)  # the caller's own reading
    monitor._lock = lock
    # It still counts as the last outcome: the confirmation probe moves with it.
    assert monitor.next_probe_at() == clock.t + 20 + 300
    assert monitor.condition == "online"
    assert monitor.pop_transitions() == []


def test_anything_else_in_a_steady_state_still_counts() -> None:
    monitor, _ = steady()
    for _ in range(4):
        monitor.observe_request(SLOW, "ok")
    assert conditions(monitor) == ["slow"]
    monitor, _ = steady()
    for _ in range(3):
        monitor.observe_request(FAST, "network_error")
    assert conditions(monitor) == ["offline"]
    monitor.observe_request(FAST, "ok")
    assert conditions(monitor) == ["online"]


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "outcome"),
    [(-1.0, "ok"), (float("nan"), "ok"), (float("inf"), "ok"), (1.0, "timeout"), (1.0, "OK")],
)
def test_bad_observations_are_refused(elapsed: float, outcome: str) -> None:
    monitor, _ = make()
    with pytest.raises(ValueError):
        monitor.observe_request(elapsed, outcome)
    assert monitor.condition == "unknown"
    monitor, _ = steady()  # where a fast answer takes the path without the lock
    with pytest.raises(ValueError):
        monitor.observe_request(elapsed, outcome)
    assert monitor.condition == "online"


def test_bad_probe_and_interface_values_are_refused() -> None:
    monitor, _ = make()
    with pytest.raises(ValueError):
        monitor.observe_probe(-5.0)
    with pytest.raises(TypeError):
        monitor.observe_interfaces(1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "settings",
    [
        {"slow_threshold_ms": 0},
        {"recover_ratio": 1.5},
        {"recover_ratio": 0},
        {"window": 5, "votes": 2},
        {"window": 5, "votes": 6},
        {"offline_after": 0},
        {"probe_min_interval": 10, "probe_max_interval": 5},
        {"stale_after": 0},
    ],
)
def test_meaningless_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        NetworkMonitor(now=FakeClock(), **settings)


# --- interfaces_up ----------------------------------------------------------------------

Stats = namedtuple("Stats", "isup")
Addr = namedtuple("Addr", "family address")
IPV4_LAN = Addr(socket.AF_INET, "192.168.1.20")
IPV6_LINK_LOCAL = Addr(socket.AF_INET6, "fe80::1%wlan0")
MAC = Addr(psutil.AF_LINK, "02:00:00:00:00:01")
LOOPBACKS = [Addr(socket.AF_INET, "127.0.0.1"), Addr(socket.AF_INET6, "::1")]


@pytest.mark.parametrize(
    ("stats", "addresses", "expected"),
    [
        ({"lo": True}, {"lo": LOOPBACKS}, False),
        ({"lo": True, "eth0": True}, {"lo": LOOPBACKS, "eth0": [MAC, IPV4_LAN]}, True),
        ({"lo": True, "eth0": False}, {"lo": LOOPBACKS, "eth0": [MAC, IPV4_LAN]}, False),
        ({"lo0": True}, {"lo0": LOOPBACKS}, False),  # macOS-style loopback name
        ({"lo": True}, {"lo": [IPV4_LAN]}, False),  # "lo" is ignored by name
        ({"eth0": True}, {"eth0": [MAC]}, False),  # no IP address: no traffic
        ({"eth0": True}, {}, False),
        ({"wlan0": True}, {"wlan0": [IPV6_LINK_LOCAL]}, True),
        ({"tun0": True}, {"tun0": [Addr(socket.AF_INET6, "::ffff:127.0.0.1")]}, False),
    ],
)
def test_interfaces_up_reads_psutil(
    monkeypatch: pytest.MonkeyPatch,
    stats: dict[str, bool],
    addresses: dict[str, list[Addr]],
    expected: bool,
) -> None:
    monkeypatch.setattr(psutil, "net_if_stats", lambda: {n: Stats(up) for n, up in stats.items()})
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: addresses)
    assert interfaces_up() is expected


def test_interfaces_up_is_none_when_psutil_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> dict[str, Any]:
        raise OSError("no /proc here")

    monkeypatch.setattr(psutil, "net_if_stats", broken)
    assert interfaces_up() is None


def test_interfaces_up_on_this_machine_is_a_bool() -> None:
    assert interfaces_up() in (True, False)


def test_importing_the_monitor_stays_light() -> None:
    script = (
        "import sys, anisota_agent.network\n"
        "print(sorted(m for m in ('psutil', 'httpx', 'ipaddress') if m in sys.modules))\n"
    )
    assert run_python(script).strip() == "[]"
