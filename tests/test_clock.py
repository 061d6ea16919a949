"""Tests for anisota_agent.clock: clocks, datetimes and TIDs."""

from __future__ import annotations

import threading

import pytest
from agent_helpers import race
from freezegun import freeze_time

from anisota_agent.clock import (
    SystemClock,
    TidGenerator,
    format_datetime,
    is_valid_tid,
    parse_datetime,
    tid_to_datetime_us,
)

TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
# 2026-11-24T10:00:00Z
NOV_24_MS = 1_795_514_400_000


class FakeClock:
    """A Clock whose wall time the test sets by hand."""

    def __init__(self, wall_ns: int) -> None:
        self.now_ns = wall_ns

    def wall_ns(self) -> int:
        return self.now_ns

    def monotonic_ns(self) -> int:
        return 0


# --- SystemClock ---------------------------------------------------------------


def test_system_clock_follows_freezegun() -> None:
    with freeze_time("2026-11-24T10:00:00Z") as frozen:
        clock = SystemClock()  # made inside the freeze: freezegun drives it
        assert clock.wall_ns() == NOV_24_MS * 1_000_000
        mono = clock.monotonic_ns()
        frozen.tick(5)
        assert clock.wall_ns() == (NOV_24_MS + 5_000) * 1_000_000
        assert clock.monotonic_ns() - mono == 5_000_000_000


def test_system_clock_monotonic_override_is_independent_of_freezegun() -> None:
    ticks = iter([10, 20])
    with freeze_time("2026-11-24T10:00:00Z"):
        clock = SystemClock(monotonic_ns=lambda: next(ticks))
        assert clock.monotonic_ns() == 10
        assert clock.monotonic_ns() == 20
        assert clock.wall_ns() == NOV_24_MS * 1_000_000


def test_system_clock_real_time_moves_forward() -> None:
    clock = SystemClock()
    first = clock.monotonic_ns()
    assert clock.monotonic_ns() >= first
    assert clock.wall_ns() > NOV_24_MS * 1_000_000 // 2  # sane epoch, not seconds


# --- datetimes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch_ms", "text"),
    [
        (NOV_24_MS, "2026-11-24T10:00:00.000Z"),
        (0, "1970-01-01T00:00:00.000Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (NOV_24_MS + 7, "2026-11-24T10:00:00.007Z"),
        (951_782_400_123, "2000-02-29T00:00:00.123Z"),
        (-58_979_923_200_000, "0101-01-01T00:00:00.000Z"),  # year zero-padded
    ],
)
def test_format_and_parse_round_trip(epoch_ms: int, text: str) -> None:
    assert format_datetime(epoch_ms) == text
    assert parse_datetime(text) == epoch_ms


def test_format_datetime_out_of_range() -> None:
    with pytest.raises(ValueError, match="outside years"):
        format_datetime(10**18)


@pytest.mark.parametrize(
    ("text", "epoch_ms"),
    [
        ("2026-11-24T10:00:00Z", NOV_24_MS),
        ("2026-11-24T10:00:00.1Z", NOV_24_MS + 100),
        ("2026-11-24T10:00:00.123456789Z", NOV_24_MS + 123),  # truncated, not rounded
        ("2026-11-24T11:00:00+01:00", NOV_24_MS),
        ("2026-11-24T03:00:00.000-07:00", NOV_24_MS),
        ("2026-11-24T11:45:00+01:45", NOV_24_MS),
        ("2026-11-24T10:00:00+00:00", NOV_24_MS),
        ("2024-02-29T00:00:00Z", 1_709_164_800_000),  # leap day
    ],
)
def test_parse_datetime_accepts(text: str, epoch_ms: int) -> None:
    assert parse_datetime(text) == epoch_ms


REJECTED_DATETIMES = [
    "2026-11-24T10:00Z",  # no seconds
    "2026-11-24T10:00:0Z",  # one-digit seconds
    "2026-11-24t10:00:00Z",  # lowercase t
    "2026-11-24T10:00:00z",  # lowercase z
    "2026-11-24T10:00:00-00:00",  # RFC 3339 "unknown offset", not ISO 8601
    "2026-11-24T10:00:00",  # missing timezone
    "2026-11-24T10:00:00.000",  # missing timezone
    "2026-11-24T10:00:00+0100",  # offset without colon
    "2026-11-24T10:00:00+01",  # offset without minutes
    "2026-11-24T10:00:00+24:00",  # offset out of range
    "2026-11-24T10:00:00+01:60",  # offset minutes out of range
    "2026-11-24T10:00:00.Z",  # dot without digits
    "2026-11-24 10:00:00Z",  # space instead of T
    "2026-02-30T10:00:00Z",  # Feb 30
    "2025-02-29T10:00:00Z",  # not a leap year
    "2026-13-01T10:00:00Z",  # month 13
    "2026-00-01T10:00:00Z",  # month 0
    "2026-11-00T10:00:00Z",  # day 0
    "2026-11-24T24:00:00Z",  # hour 24
    "2026-11-24T10:60:00Z",  # minute 60
    "2026-11-24T10:00:60Z",  # second 60 (leap seconds not accepted)
    "0000-01-01T00:00:00Z",  # year zero
    "+02026-11-24T10:00:00Z",  # expanded year
    "02026-11-24T10:00:00Z",
    "2026-11-24",
    " 2026-11-24T10:00:00Z",
    "2026-11-24T10:00:00Z ",
    "2026-11-24T10:00:00Z\n",  # a trailing newline must not pass a `$`
    "\uff12\uff10\uff12\uff16-11-24T10:00:00Z",  # fullwidth (non-ASCII) digits
    "",
]


@pytest.mark.parametrize("text", REJECTED_DATETIMES)
def test_parse_datetime_rejects(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_datetime(text)
    assert repr(text) in str(info.value)  # the message names the bad value


# --- TIDs ----------------------------------------------------------------------


def test_tid_shape_and_timestamp() -> None:
    clock = FakeClock(NOV_24_MS * 1_000_000 + 123_456_789)
    tid = TidGenerator(clock, clock_id=7).next()
    assert len(tid) == 13
    assert set(tid) <= set(TID_ALPHABET)
    assert tid[0] in "234567abcdefghij"
    assert is_valid_tid(tid)
    assert tid_to_datetime_us(tid) == NOV_24_MS * 1000 + 123_456  # ns truncated to µs


def test_tid_encoding_matches_the_spec_layout() -> None:
    # 64-bit value = timestamp_us << 10 | clock_id, big-endian base32-sortable.
    tid = TidGenerator(FakeClock(0), clock_id=0).next()
    assert tid == "2222222222222"
    tid = TidGenerator(FakeClock(1_000), clock_id=31).next()  # 1 µs, clock id 31
    value = (1 << 10) | 31
    assert tid == "2" * 10 + TID_ALPHABET[value >> 10] + TID_ALPHABET[(value >> 5) & 31] + "z"


def test_tids_sort_in_time_order_across_generators() -> None:
    early = TidGenerator(FakeClock(NOV_24_MS * 1_000_000), clock_id=1023).next()
    late = TidGenerator(FakeClock((NOV_24_MS + 1) * 1_000_000), clock_id=0).next()
    assert early < late


def test_tids_are_strictly_increasing_when_the_clock_stands_still() -> None:
    gen = TidGenerator(FakeClock(NOV_24_MS * 1_000_000), clock_id=5)
    tids = [gen.next() for _ in range(1000)]
    assert tids == sorted(tids)
    assert len(set(tids)) == len(tids)
    assert tid_to_datetime_us(tids[-1]) == NOV_24_MS * 1000 + 999  # bumped 1 µs each


def test_tids_stay_monotonic_when_the_wall_clock_steps_back() -> None:
    clock = FakeClock(NOV_24_MS * 1_000_000)
    gen = TidGenerator(clock, clock_id=5)
    before = gen.next()
    clock.now_ns -= 3_600 * 10**9  # NTP steps the clock back an hour
    after = [gen.next() for _ in range(3)]
    assert before < after[0] < after[1] < after[2]
    assert [tid_to_datetime_us(t) for t in after] == [NOV_24_MS * 1000 + n for n in (1, 2, 3)]
    clock.now_ns = (NOV_24_MS + 10) * 1_000_000  # once the clock passes us, follow it again
    assert tid_to_datetime_us(gen.next()) == (NOV_24_MS + 10) * 1000


def test_tid_generator_uses_freezegun_through_system_clock() -> None:
    with freeze_time("2026-11-24T10:00:00Z"):
        tid = TidGenerator(clock_id=1).next()
    assert tid_to_datetime_us(tid) == NOV_24_MS * 1000


def test_tid_default_clock_id_is_in_range() -> None:
    ids = {TidGenerator().clock_id for _ in range(50)}
    assert all(0 <= i < 1024 for i in ids)
    assert len(ids) > 1  # random, not a constant


@pytest.mark.parametrize("clock_id", [-1, 1024, True])
def test_tid_generator_rejects_bad_clock_id(clock_id: int) -> None:
    with pytest.raises(ValueError, match="clock_id"):
        TidGenerator(FakeClock(0), clock_id=clock_id)


def test_tids_unique_and_ordered_across_threads() -> None:
    # A clock that stands still makes every call contend for the same µs, and
    # a tiny switch interval makes threads hand over the GIL mid-call, so a
    # missing lock shows up as duplicates.
    gen = TidGenerator(FakeClock(NOV_24_MS * 1_000_000), clock_id=9)
    threads, calls = 4, 10_000
    results: list[list[str]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def work(out: list[str]) -> None:
        start.wait()
        out.extend(gen.next() for _ in range(calls))

    workers = [threading.Thread(target=work, args=(out,)) for out in results]
    race(workers)
    for out in results:
        assert out == sorted(out)  # each thread sees an increasing sequence
    assert len({tid for out in results for tid in out}) == threads * calls


@pytest.mark.parametrize(
    "tid", ["3jzfcijpj2z2a", "7777777777777", "3zzzzzzzzzzzz", "a222222222222", "j222222222222"]
)
def test_is_valid_tid_accepts(tid: str) -> None:
    assert is_valid_tid(tid)


@pytest.mark.parametrize(
    "tid",
    [
        "3jzfcijpj2z21",  # 1 is not in the alphabet
        "0000000000000",
        "3JZFCIJPJ2Z2A",  # case-sensitive
        "3jzfcijpj2z2aa",  # too long
        "3jzfcijpj2z2",  # too short
        "3jzf-cij-pj2z-2a",
        "zzzzzzzzzzzzz",  # top bit set
        "kjzfcijpj2z2a",
        "3jzfcijpj2z2a\n",
        "",
    ],
)
def test_is_valid_tid_rejects(tid: str) -> None:
    assert not is_valid_tid(tid)
    with pytest.raises(ValueError, match="not a valid TID"):
        tid_to_datetime_us(tid)


@pytest.mark.parametrize("first", list(TID_ALPHABET))
def test_is_valid_tid_first_character(first: str) -> None:
    assert is_valid_tid(first + "2" * 12) == (first in "234567abcdefghij")
