"""Property-based fuzz of the whole public API of :class:`Agent`.

A hypothesis state machine builds one agent per run (its constructor fed fuzzed
settings), then calls every public method in random order with arguments drawn
from a mix of valid values, boundary values and garbage: ``None``, bools, ints
up to ``10**5000``, NaN and infinities, 10 MB strings, lone surrogates, NUL,
non-ASCII text, lists, dicts, bytes, ``Decimal``, plain objects. A model of what
the session should hold changes only on the calls the agent accepts. The
properties, after every call:

- nothing but ``ValueError`` / ``TypeError`` escapes a call, and such an error
  names one of the parameters it refuses, in at most :data:`MAX_MESSAGE`
  characters, even for a 10 MB value;
- a value the README's bounds refuse is refused, a value within them accepted
  (values the README leaves open, like a lone surrogate, may go either way, and
  then the properties below judge what was recorded);
- a refused call changes nothing: ``status()`` shows the model's live session and
  drop counts, and after ``flush(sync=False)``, and again after ``close()``, the
  store holds exactly the model's sessions with the model's content;
- every record the agent writes, and every record read back from the store
  (``anisota_agent.local_sessions``), validates against the lexicon.

Nothing reaches a network: the agent's ``transport`` is an ``httpx.MockTransport``
that refuses every connection, and the game's timed requests go to one too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from agent_helpers import Bearer
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from anisota_agent import (
    AUTHENTICATION_METHODS,
    CONSENT_STATES,
    ENTRY_POINTS,
    GAME_ACTIONS,
    HOST_END_REASONS,
    PLATFORMS,
    Agent,
    SystemClock,
    local_sessions,
    validate_record,
)
from anisota_agent.settings import DEFAULT_CLOSE_TIMEOUT
from anisota_agent.syntax import is_did, is_record_uri

# The test does its own validation of every record the agent writes, inside
# hypothesis so that a failure shrinks to a minimal example: the suite-wide
# fixture's wrapper would let a validator error other than RecordValidationError
# (a lone surrogate raises UnicodeEncodeError) into ``Store._write`` and change
# what the agent does with the record.
pytestmark = pytest.mark.invalid_records

#: The longest error message accepted, whatever the size of the value refused.
MAX_MESSAGE = 300
#: The size of the huge strings (10 MB).
HUGE = 10_000_000

# What the README (and the docstrings) allow; the test's own copy of the spec.
MAX_CLIENT_VERSION = 64
MAX_REFERRER = 512
MAX_ROUTE = 128
MAX_PAGES = 32
MAX_FEATURE = 48
MAX_FEATURES = 32
MAX_URI = 200
MAX_LINKED = 16
MAX_COUNT = 1_000_000
MAX_RESPONSE_MS = 3_600_000
MAX_XP = 2**53 - 1
MAX_LEVEL = 1_000_000
MAX_IDENTIFIER = 2048
MAX_PASSWORD = 1024
MAX_TIMEOUT = 3600
DAY = 24 * 3600

# A value's verdict: the agent must accept it, may do either, must refuse it.
GOOD, EITHER, BAD = 0, 1, 2

T = TypeVar("T")
P = ParamSpec("P")


class Arg:
    """A drawn argument, with a short repr (hypothesis prints it in a falsifying example)."""

    __slots__ = ("label", "value")

    def __init__(self, value: Any, label: str | None = None) -> None:
        self.value: Any = value
        self.label = label if label is not None else short(value)

    def __repr__(self) -> str:
        return self.label


def short(value: object, limit: int = 60) -> str:
    """A repr of at most about ``limit`` characters (a 10 MB string, a 5,000-digit int)."""
    if type(value) is int and value.bit_length() > 128:
        return f"<int of {value.bit_length()} bits>"
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[: limit // 2]!r}...<{len(value)} chars>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class Opaque:
    """An object of no type the agent knows."""

    def __repr__(self) -> str:
        return "Opaque()"


class NotAnAuth:
    """Has ``sync_auth_flow``, but not callable."""

    sync_auth_flow = "not a method"

    def __repr__(self) -> str:
        return "NotAnAuth()"


class DuckAuth:
    """Duck-types ``httpx.Auth`` without being one."""

    def sync_auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        yield request

    def __repr__(self) -> str:
        return "DuckAuth()"


class DuckClock:
    """A clock that is not a SystemClock."""

    def wall_ns(self) -> int:
        return SystemClock().wall_ns()

    def monotonic_ns(self) -> int:
        return SystemClock().monotonic_ns()

    def __repr__(self) -> str:
        return "DuckClock()"


#: Values of no type any parameter takes (numbers and bools are not garbage
#: everywhere: each numeric parameter says which of these it accepts).
GARBAGE: list[object] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**63,
    -(2**63) - 1,
    10**400,
    10**5000,  # past Python's int-to-str digit limit: "got {value}" raises ValueError
    0.0,
    -0.0,
    0.5,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    b"",
    b"/home",
    bytearray(b"x"),
    [],
    ["/home"],
    {},
    {"route": "/home"},
    (),
    ("a", "b"),
    Decimal("1.5"),
    Decimal("NaN"),
    Fraction(1, 3),
    1j,
    Opaque(),
    print,
]


@functools.cache
def huge_string(kind: str) -> str:
    """A 10 MB string (built once): plain, non-ASCII, with a lone surrogate, or prefixed."""
    if kind == "non-ascii":
        return "é" * HUGE
    if kind == "surrogate":
        return "\ud800" + "x" * HUGE
    return kind + "x" * HUGE


def huge(*kinds: str) -> st.SearchStrategy[Arg]:
    return st.sampled_from(kinds).map(
        lambda kind: Arg(huge_string(kind), f"<10 MB string: {kind!r} + 'x'...>")
    )


def values(*items: object) -> st.SearchStrategy[Arg]:
    return st.sampled_from([Arg(item) for item in items])


def garbage(*keep: type) -> st.SearchStrategy[Arg]:
    """:data:`GARBAGE` without the values of the types in ``keep`` (those are drawn apart)."""
    return values(*(item for item in GARBAGE if not isinstance(item, keep)))


ANY_CHAR = st.one_of(st.characters(), st.characters(categories=["Cs"]))
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
SPECIAL = ["\x00", "\ud800", "a\udfff", "\udc80/x", "\u200b", " ", "\n", "🎮", "é"]


def wild_text(max_size: int) -> st.SearchStrategy[str]:
    """Any text, lone surrogates and control characters included."""
    return st.lists(ANY_CHAR, max_size=max_size).map("".join)


@dataclass(frozen=True)
class Param:
    """One parameter: the values to draw (valid ones, and everything) and its verdict."""

    good: st.SearchStrategy[Arg]
    full: st.SearchStrategy[Arg]
    verdict: Callable[[object], int]


def has_surrogate(text: str) -> bool:
    return re.search("[\ud800-\udfff]", text) is not None


def text_verdict(max_len: int) -> Callable[[object], int]:
    def verdict(value: object) -> int:
        if type(value) is not str or not 0 < len(value) <= max_len:
            return BAD
        return EITHER if has_surrogate(value) else GOOD

    return verdict


def text_param(max_len: int, examples: list[str], *, prefix: str = "") -> Param:
    good = st.one_of(
        st.sampled_from(examples),
        st.text(PRINTABLE, min_size=1, max_size=min(max_len, 24)),
        st.just("a" * max_len),
        st.just("é" * max_len),
    ).map(Arg)
    full = st.one_of(
        good,
        values("", "a" * (max_len + 1), "é" * (max_len + 1)),
        values(*SPECIAL, prefix + "\ud800", prefix + "\x00"),
        wild_text(max_len + 2).map(Arg),
        huge("", "non-ascii", "surrogate", *([prefix] if prefix else [])),
        garbage(str),
    )
    return Param(good, full, text_verdict(max_len))


def choice_param(allowed: tuple[str, ...]) -> Param:
    good = st.sampled_from(allowed).map(Arg)
    near = [allowed[0].upper(), allowed[0] + " ", allowed[0] + "\x00", allowed[0][:-1], ""]
    full = st.one_of(
        good,
        values(*near, "\ud800", "é"),
        wild_text(12).map(Arg),
        huge(""),
        garbage(str),
    )

    def verdict(value: object) -> int:
        return GOOD if type(value) is str and value in allowed else BAD

    return Param(good, full, verdict)


def int_param(minimum: int, maximum: int) -> Param:
    good = st.one_of(
        st.sampled_from([minimum, maximum]), st.integers(minimum, min(maximum, minimum + 1000))
    ).map(Arg)
    full = st.one_of(
        good,
        values(minimum - 1, maximum + 1, float(minimum), float(maximum), str(minimum)),
        st.integers().map(Arg),
        garbage(str),
    )

    def verdict(value: object) -> int:
        return GOOD if type(value) is int and minimum <= value <= maximum else BAD

    return Param(good, full, verdict)


def number_param(
    minimum: float, maximum: float, *, good_max: float | None = None, over: int = BAD
) -> Param:
    """An int or float within bounds (not a bool, not NaN); ``over``: the verdict past the top.

    ``good_max`` caps the valid values drawn (a timeout a call may really wait out).
    """
    top = maximum if good_max is None else good_max
    good = st.one_of(
        st.sampled_from([minimum, float(minimum), top, -0.0 if minimum == 0 else minimum]),
        st.floats(minimum, top),
        st.integers(math.ceil(minimum), math.floor(top)),
    ).map(Arg)
    full = st.one_of(
        good,
        values(
            math.nextafter(minimum, -math.inf),
            minimum - 1,
            math.nextafter(maximum, math.inf),
            maximum + 1,
            2**63,
            -(2**63),
            10**400,
            str(minimum),
        ),
        st.floats().map(Arg),
        garbage(str),
    )

    def verdict(value: object) -> int:
        if type(value) not in (int, float):
            return BAD
        number: float = value  # type: ignore[assignment]
        if minimum <= number <= maximum:
            return GOOD
        return over if number > maximum and number < math.inf else BAD

    return Param(good, full, verdict)


def bool_param(*, optional: bool = False) -> Param:
    good = values(True, False, *([None] if optional else []))
    full = st.one_of(good, values("yes", "", 0, 1, 1.0), garbage(bool))

    def verdict(value: object) -> int:
        return GOOD if type(value) is bool or (optional and value is None) else BAD

    return Param(good, full, verdict)


def optional(param: Param, *, none_is: int = GOOD) -> Param:
    """``param`` or None (a valid "not given", unless ``none_is`` says otherwise)."""

    def verdict(value: object) -> int:
        return none_is if value is None else param.verdict(value)

    return Param(st.one_of(values(None), param.good), st.one_of(values(None), param.full), verdict)


# -- the parameters of the API ---------------------------------------------------------

ROUTE = text_param(MAX_ROUTE, ["/home", "/garden", "/inventory", "/p1", "/p2"], prefix="/")
FEATURE = text_param(MAX_FEATURE, ["lens", "map", "chat", "f1"])
CLIENT_VERSION = text_param(MAX_CLIENT_VERSION, ["1.0", "1.4.2", "2.0.0-beta+7"])
REFERRER = optional(
    text_param(
        MAX_REFERRER,
        ["https://bsky.app/profile/x?ref=1#top", "https://example.com/", "android-app://x"],
        prefix="https://",
    )
)
IDENTIFIER = text_param(MAX_IDENTIFIER, ["alice.test", "bob.bsky.social"])
PASSWORD = text_param(MAX_PASSWORD, ["app-pass-word", "hunter2"])
ENTRY_POINT = optional(choice_param(ENTRY_POINTS))
AUTH_METHOD = optional(choice_param(AUTHENTICATION_METHODS))
REASON = choice_param(HOST_END_REASONS)
KIND = choice_param(GAME_ACTIONS)
PLATFORM = choice_param(PLATFORMS)
CONSENT = choice_param(CONSENT_STATES)
OUTCOME = choice_param(("ok", "server_error", "network_error"))
COUNT = int_param(1, MAX_COUNT)
XP = int_param(0, MAX_XP)
LEVEL = optional(int_param(1, MAX_LEVEL))
MS = number_param(0, MAX_RESPONSE_MS)
#: report_request clamps a time past the maximum (documented: min(elapsed_ms, max)).
ELAPSED = number_param(0, MAX_RESPONSE_MS, over=EITHER)
FLUSH_TIMEOUT = number_param(0, MAX_TIMEOUT, good_max=10)
#: A close must have time to finish (its result is checked).
CLOSE_TIMEOUT = Param(
    values(2, 2.5, 5, 10.0),
    st.one_of(
        values(2, 2.5, 5, 10.0),
        values(-1e-9, math.nextafter(MAX_TIMEOUT, math.inf), MAX_TIMEOUT + 1, 2**63, math.nan, "2"),
        garbage(str),
    ),
    number_param(0, MAX_TIMEOUT).verdict,
)
FLAG = bool_param()
OPTIONAL_FLAG = bool_param(optional=True)


def uri_param(kind: str) -> Param:
    base = f"at://did:plc:abc/net.anisota.beta.game.{kind}/"
    good = st.one_of(
        st.text("abcdefghijklmnopqrstuvwxyz234567", min_size=1, max_size=13).map(
            lambda rkey: base + rkey
        ),
        # The longest a link may be: a long DID fills it to MAX_URI.
        st.just(f"at://did:plc:{'a' * (MAX_URI - 14 - len(base[16:]))}{base[16:]}k"),
        st.just("at://alice.example.com/com.example.thing/self"),
    ).map(Arg)
    full = st.one_of(
        good,
        values(
            "at://",
            "at://x",
            "at://" + "x" * (MAX_URI - 4),
            base,  # no record key
            base + "3k#frag",
            base + ".",
            "https://example.com",
            "AT://x",
            "at:/x",
            "at://\ud800",
            "at://\x00",
            "at://é",
            "\ud800" * MAX_URI,  # its repr is six times as long
        ),
        wild_text(12).map(lambda tail: Arg("at://" + tail)),
        wild_text(MAX_URI + 2).map(Arg),
        huge("at://", "", "surrogate"),
        garbage(str),
    )

    def verdict(value: object) -> int:
        # The syntax itself is test_syntax.py's to check, against the spec's examples.
        ok = type(value) is str and len(value) <= MAX_URI and is_record_uri(value)
        return GOOD if ok else BAD

    return Param(good, full, verdict)


LOG_URI = uri_param("log")
PROGRESS_URI = uri_param("progress")

DIDS = ["did:plc:abc", "did:plc:xyz", "did:web:example.com"]


def did_verdict(value: object) -> int:
    return GOOD if type(value) is str and is_did(value) else BAD


DID = Param(
    st.sampled_from(DIDS).map(Arg),
    st.one_of(
        st.sampled_from(DIDS).map(Arg),
        values(
            "",
            "alice",
            "did:",
            "did:plc:",
            "plc:abc",
            "did:" + "x" * 2000,
            "did:plc:" + "x" * 3000,
            "did:plc:\ud800",
            "did:é:x",
        ),
        wild_text(16).map(lambda tail: Arg("did:plc:" + tail)),
        wild_text(16).map(Arg),
        huge("did:plc:", "did:"),
        garbage(str),
    ),
    did_verdict,
)

GOOD_URLS = [
    "https://pds.example",
    "https://pds.example/",
    "https://pds.example:8443",
    "http://127.0.0.1:9",
    "http://localhost:9",
    "http://[::1]:9",
]


def url_verdict(value: object) -> int:
    if type(value) is not str:
        return BAD
    if value in GOOD_URLS:
        return GOOD
    try:
        parts = urlsplit(value.strip())
        host = parts.hostname
    except ValueError:
        return BAD  # not a URL at all: refused, and the message must say pds_url
    if parts.scheme not in ("https", "http") or not host:
        return BAD
    if parts.scheme == "http" and host not in ("localhost", "::1") and not host.startswith("127."):
        return BAD
    if parts.username or parts.password or parts.query or parts.fragment:
        return BAD
    return EITHER


PDS_URL = Param(
    st.sampled_from(GOOD_URLS).map(Arg),
    st.one_of(
        st.sampled_from(GOOD_URLS).map(Arg),
        values(
            "",
            "pds.example",
            "ftp://pds.example",
            "http://pds.example",
            "https://",
            "https://u:p@pds.example",
            "https://pds.example?x=1",
            "https://pds.example#top",
            "https://[::1",
            "http://[",
            "https://pds\x00.example",
            "https://pds\ud800.example",
            "https://\u2102@pds.example",  # NFKC: "C"
            "https://" + "a" * 3000,
            "ftp://" + "a" * 3000,
        ),
        wild_text(16).map(lambda tail: Arg("https://" + tail)),
        wild_text(16).map(Arg),
        huge("https://", "ftp://", "http://"),
        garbage(str),
    ),
    url_verdict,
)


def auth_verdict(value: object) -> int:
    if isinstance(value, httpx.Auth):
        return GOOD
    return EITHER if callable(getattr(value, "sync_auth_flow", None)) else BAD


AUTH = Param(
    values(httpx.BasicAuth("u", "p"), Bearer("token"), httpx.Auth()),
    st.one_of(
        values(httpx.BasicAuth("u", "p"), Bearer("token"), httpx.Auth()),
        values("token", NotAnAuth(), DuckAuth(), httpx.BasicAuth),
        huge(""),
        garbage(),
    ),
    auth_verdict,
)


def refusing(request: httpx.Request) -> httpx.Response:
    """Nothing listens: every request of the agent fails to connect."""
    raise httpx.ConnectError("nothing listens here (test)", request=request)


AGENT_TRANSPORT = httpx.MockTransport(refusing)
_MOCK = "<MockTransport>"


def transport_verdict(asynchronous: bool) -> Callable[[object], int]:
    kind = httpx.AsyncBaseTransport if asynchronous else httpx.BaseTransport

    def verdict(value: object) -> int:
        return GOOD if value is None or value == _MOCK or isinstance(value, kind) else BAD

    return verdict


def inner_param(asynchronous: bool) -> Param:
    other = httpx.HTTPTransport() if asynchronous else httpx.AsyncHTTPTransport()
    return Param(
        values(_MOCK, None),
        st.one_of(values(_MOCK, None), values("http://x", other), garbage()),
        transport_verdict(asynchronous),
    )


INNER = inner_param(False)
ASYNC_INNER = inner_param(True)
#: What the game's server answers its timed requests (None: no answer).
ANSWERS = st.sampled_from([200, 204, 404, 408, 429, 500, 503, None])


# -- the constructor ----------------------------------------------------------------

_TMP = "<tmp dir>"
_TMP_PATH = "<tmp dir as a Path>"
_DEFAULT = object()  # an argument not given

#: name -> (parameter, where a valid value comes from). ``data_dir``,
#: ``transport``, ``in_memory``, ``keyring`` and ``clock`` are drawn so that a
#: started agent writes into the test's dir and never reaches a network or the OS
#: keyring; :func:`test_constructor_with_arbitrary_values` fuzzes them freely.
SETTINGS: dict[str, Param] = {
    "platform": PLATFORM,
    "enabled": FLAG,
    "checkpoint_interval": number_param(0.01, 3600, good_max=30),
    "inactivity_timeout": number_param(60, DAY),
    "continuation_window": number_param(0, DAY),
    "background_timeout": number_param(10, DAY),
    "max_session_age": number_param(60, 7 * DAY),
    "write_reserve": int_param(0, 1_000_000),
    "mirror_interval": optional(number_param(60, DAY)),
    "slow_threshold_ms": number_param(1, 600_000),
    "max_store_bytes": int_param(100_000, 2**40),
    "retention_days": number_param(1, 3650),
    "consent": CONSENT,
}


def path_verdict(value: object) -> int:
    if value in (_TMP, _TMP_PATH) or value is None:
        return GOOD
    if isinstance(value, Path):
        return GOOD
    if isinstance(value, str):
        return GOOD if value and not has_surrogate(value) else (BAD if not value else EITHER)
    return BAD


def clock_verdict(value: object) -> int:
    if value is None or isinstance(value, (SystemClock, DuckClock)):
        return GOOD
    return BAD


CONFINED: dict[str, Param] = {
    "data_dir": Param(
        values(_TMP, _TMP_PATH), values(_TMP, b"/tmp/x", 7, [], Opaque()), path_verdict
    ),
    "transport": Param(
        values(_MOCK),
        values(_MOCK, "http://x", httpx.AsyncHTTPTransport(), Opaque(), 0),
        transport_verdict(False),
    ),
    "in_memory": Param(values(False), values(False, 0, 1, "yes", None), FLAG.verdict),
    "keyring": Param(values(None, False), values(None, False, 0, "yes", []), OPTIONAL_FLAG.verdict),
    "clock": Param(
        values(None, SystemClock(), DuckClock()),
        values(None, SystemClock(), DuckClock(), 0, "", [], 5, "clock", Opaque()),
        clock_verdict,
    ),
}

FREE: dict[str, Param] = {
    "data_dir": Param(
        values(None, "/nonexistent/anisota-fuzz", Path("/nonexistent/anisota-fuzz")),
        st.one_of(
            values(None, "/nonexistent/anisota-fuzz", Path("relative"), ""),
            wild_text(8).map(Arg),
            garbage(str),
        ),
        path_verdict,
    ),
    "transport": Param(
        values(None, _MOCK),
        st.one_of(values(None, _MOCK, "http://x", httpx.AsyncHTTPTransport()), garbage()),
        transport_verdict(False),
    ),
    "in_memory": FLAG,
    "keyring": OPTIONAL_FLAG,
    "clock": CONFINED["clock"],
}


@st.composite
def constructor_kwargs(
    draw: st.DrawFn, confined: Mapping[str, Param], fuzzed_at_most: int
) -> dict[str, Arg]:
    """Constructor arguments: a few drawn from everything, the others valid or not given.

    ``client_version`` is always drawn from everything. Drawing every setting
    from everything would almost never give an agent that starts.
    """
    params = {**SETTINGS, **confined}
    fuzzed = draw(st.lists(st.sampled_from(sorted(params)), max_size=fuzzed_at_most, unique=True))
    kwargs = {"client_version": draw(CLIENT_VERSION.full)}
    for name, param in params.items():
        if name in fuzzed:
            kwargs[name] = draw(param.full)
        elif (name in confined and name in ("data_dir", "transport")) or draw(st.booleans()):
            kwargs[name] = draw(param.good)
    return kwargs


def constructor_verdicts(kwargs: Mapping[str, Arg], params: Mapping[str, Param]) -> dict[str, int]:
    verdicts = {"client_version": CLIENT_VERSION.verdict(kwargs["client_version"].value)}
    for name, arg in kwargs.items():
        if name != "client_version":
            verdicts[name] = params[name].verdict(arg.value)
    return verdicts


def resolve(value: Any, data_dir: Path) -> Any:
    """A drawn placeholder (the test's dir, the mock transport) made real."""
    if value == _TMP:
        return str(data_dir)
    if value == _TMP_PATH:
        return data_dir
    if value == _MOCK:
        return AGENT_TRANSPORT
    return value


# -- the checks of one call ---------------------------------------------------------------


def check_refusal(label: str, error: Exception, verdicts: Mapping[str, int]) -> None:
    """A refusal: allowed by the verdicts, short, and naming a parameter it refuses."""
    message = str(error)
    suspects = [name for name, verdict in verdicts.items() if verdict != GOOD]
    assert suspects, f"{label} refused valid values: {type(error).__name__}: {short(message, 300)}"
    assert len(message) <= MAX_MESSAGE, (
        f"{label}: the {type(error).__name__} message is {len(message)} characters "
        f"(at most {MAX_MESSAGE}): {short(message, 200)}"
    )
    assert any(name in message for name in suspects), (
        f"{label}: the {type(error).__name__} names none of {suspects}: {short(message, 300)}"
    )


def attempt(
    label: str, call: Callable[[], T], verdicts: Mapping[str, int]
) -> tuple[bool, T | None]:
    """Make the call; (True, its result) if it was accepted, (False, None) if refused.

    Fails the test if anything but ValueError/TypeError escapes, if a refusal is
    not allowed or badly worded, or if a value that must be refused is accepted.
    """
    note(label)
    try:
        result = call()
    except (ValueError, TypeError) as error:
        check_refusal(label, error, verdicts)
        return False, None
    except Exception as error:
        raise AssertionError(
            f"{label} raised {type(error).__name__}: {short(str(error), 300)}"
        ) from error
    refused = [name for name, verdict in verdicts.items() if verdict == BAD]
    assert not refused, f"{label} accepted a bad value for {refused}"
    return True, result


def call_label(method: str, **kwargs: object) -> str:
    return f"{method}({', '.join(f'{name}={value!r}' for name, value in kwargs.items())})"


# -- the model --------------------------------------------------------------------------

_MISSING = object()
_UNKNOWN = object()


@dataclass
class Session:
    """What one session should hold, changed only by the calls the agent accepted."""

    rkey: str
    context: dict[str, Any] | object
    did: str | None
    status: str = "active"
    end_reason: str | None = None
    total_events: int = 0
    pages: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    actions: dict[str, int] = field(default_factory=dict)
    first_xp: int | None = None
    current_xp: int | None = None
    current_level: int | None = None
    responses: int = 0
    response_ms: float = 0.0
    errors: int = 0
    timing_known: bool = True
    log_uris: list[str] = field(default_factory=list)
    progress_uris: list[str] = field(default_factory=list)

    def respond(self, ms: float | None, ok: bool) -> None:
        """One measured response (``ms`` None: timed by the agent, value unknown)."""
        self.responses += 1
        if ms is None:
            self.timing_known = False
        else:
            self.response_ms += ms
        self.errors += not ok

    def expected(self, client_version: str, platform: str) -> dict[tuple[str, ...], object]:
        """The record's fields as the model knows them (path -> value or _MISSING)."""
        if self.responses == 0:
            average: object = _MISSING
        elif self.timing_known:
            average = int(self.response_ms / self.responses + 0.5)
        else:
            average = _UNKNOWN
        gained = (
            _MISSING
            if self.current_xp is None or self.first_xp is None
            else max(0, self.current_xp - self.first_xp)
        )
        return {
            ("status",): self.status,
            ("endReason",): self.end_reason or _MISSING,
            ("clientVersion",): client_version,
            ("platform",): platform,
            ("activitySummary", "totalEvents"): self.total_events,
            ("activitySummary", "pagesVisited"): self.pages,
            ("activitySummary", "gameActions"): {
                name: self.actions.get(name, 0) for name in GAME_ACTIONS
            },
            ("activitySummary", "currentXP"): _MISSING
            if self.current_xp is None
            else self.current_xp,
            ("activitySummary", "xpGainedThisSession"): gained,
            ("activitySummary", "currentLevel"): (
                _MISSING if self.current_level is None else self.current_level
            ),
            ("metadata", "features"): self.features,
            ("metadata", "performanceMetrics", "errorCount"): self.errors,
            ("metadata", "performanceMetrics", "averageResponseTime"): average,
            ("relatedLogUris",): self.log_uris or _MISSING,
            ("relatedProgressUris",): self.progress_uris or _MISSING,
            ("sessionContext",): self.context or _MISSING,
        }


def field_at(record: Mapping[str, Any], path: tuple[str, ...]) -> object:
    node: object = record
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return _MISSING
        node = node[key]
    return node


def clean_referrer(referrer: str, keep_query: bool) -> str:
    """The README: the referrer loses its query string and fragment unless kept."""
    if keep_query:
        return referrer
    parts = urlsplit(referrer)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def step(
    method: Callable[Concatenate[AgentMachine, P], None],
) -> Callable[Concatenate[AgentMachine, P], None]:
    """A rule: runs the call, then the checks every call is followed by."""

    @functools.wraps(method)
    def run(machine: AgentMachine, /, *args: P.args, **kwargs: P.kwargs) -> None:
        machine.failed = True  # until the step and its checks pass
        method(machine, *args, **kwargs)
        machine.check_status()
        machine.failed = False

    return run


class AgentMachine(RuleBasedStateMachine):
    """One agent, driven through its whole public API, against a model."""

    #: Errors of the records the agent wrote, validated as it wrote them
    #: (filled by the ``written`` fixture's hook on the recorder's thread).
    write_errors: ClassVar[list[str]] = []

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="anisota-fuzz-"))
        self.agent: Agent | None = None
        self.failed = False
        self.enabled = True
        #: The consent in force (each run has a fresh store: nobody chose yet).
        self.consent = "granted"
        self.client_version = "1.0"
        self.platform = "desktop"
        self.did: str | None = None
        self.live: Session | None = None
        self.sessions: dict[str, Session] = {}
        self.dropped: Counter[str] = Counter()
        self.closed = False
        #: The store as it must stay once the agent is closed.
        self.at_close: dict[str, dict[tuple[str, ...], object]] | None = None
        self.write_errors.clear()

    @property
    def a(self) -> Agent:
        assert self.agent is not None
        return self.agent

    # -- the model's bookkeeping ---------------------------------------------------------

    def refused(self) -> None:
        self.dropped["refused_calls"] += 1

    def activity(self) -> Session | None:
        """An accepted activity call: the live session, with the call counted."""
        if self.live is None:
            if self.enabled and self.consent != "denied":
                self.dropped["calls_without_session"] += 1
            return None
        self.live.total_events += 1
        return self.live

    def add_unique(self, items: list[str], item: str, cap: int, overflow: str) -> None:
        if item in items:
            return
        if len(items) < cap:
            items.append(item)
        else:
            self.dropped[overflow] += 1

    def end_live(self, status: str, reason: str) -> str | None:
        live, self.live = self.live, None
        if live is None:
            return None
        live.status, live.end_reason = status, reason
        return live.rkey

    def respond(self, ms: float | None, ok: bool) -> None:
        if self.live is not None:
            self.live.respond(ms, ok)

    def expected_store(self) -> dict[str, dict[tuple[str, ...], object]]:
        if not self.enabled:
            return {}
        return {
            rkey: session.expected(self.client_version, self.platform)
            for rkey, session in self.sessions.items()
        }

    # -- the checks ------------------------------------------------------------------------

    def check_status(self) -> None:
        """After every call: the live session and the drop counts are the model's."""
        status = self.a.status()
        live = self.live.rkey if self.live is not None else None
        assert status.session == live, f"status().session is {status.session}, expected {live}"
        assert status.enabled == self.enabled
        assert status.consent == self.consent, f"consent {status.consent}, not {self.consent}"
        if self.enabled:
            expected = {kind: count for kind, count in self.dropped.items() if count}
            assert status.dropped == expected, (
                f"status().dropped is {status.dropped}, expected {expected}"
            )

    def check_store(self, expected: Mapping[str, Mapping[tuple[str, ...], object]]) -> None:
        """The store holds the expected sessions, each record valid and as the model says."""
        assert not self.write_errors, (
            f"the agent wrote records the lexicon refuses: {self.write_errors[:3]}"
        )
        if not self.enabled:
            assert not (self.dir / "agent.sqlite3").exists(), "a disabled agent made a store"
            return
        rows = {row["rkey"]: row for row in local_sessions(self.dir)}
        for rkey, row in rows.items():
            try:
                validate_record(row["record"])
            except Exception as error:
                raise AssertionError(
                    f"stored session {rkey} does not validate: {type(error).__name__}: "
                    f"{short(str(error), 300)}"
                ) from error
        assert sorted(rows) == sorted(expected), (
            f"the store holds sessions {sorted(rows)}, the model {sorted(expected)}"
        )
        for rkey, fields in expected.items():
            record, outbox = rows[rkey]["record"], rows[rkey]["outbox"]
            for path, want in fields.items():
                got = field_at(record, path)
                if want is _UNKNOWN:
                    continue
                assert got == want, (
                    f"session {rkey}: {'.'.join(path)} is "
                    f"{'missing' if got is _MISSING else short(got, 200)}, expected "
                    f"{'it missing' if want is _MISSING else short(want, 200)}"
                )
            assert (outbox == "live") == (record["status"] == "active"), (
                f"session {rkey}: outbox {outbox} for a record {record['status']}"
            )

    # -- the constructor -----------------------------------------------------------------------

    @initialize(kwargs=constructor_kwargs(CONFINED, 2))
    def construct(self, kwargs: dict[str, Arg]) -> None:
        self.failed = True
        verdicts = constructor_verdicts(kwargs, {**SETTINGS, **CONFINED})
        real = {name: resolve(arg.value, self.dir) for name, arg in kwargs.items()}
        label = call_label("Agent", **kwargs)
        _, agent = attempt(label, lambda: Agent(**real), verdicts)
        if agent is None:
            agent = Agent("1.0", data_dir=self.dir, transport=AGENT_TRANSPORT)
            note("fell back to Agent('1.0')")
        else:
            self.enabled = bool(real.get("enabled", True))
            self.consent = str(real.get("consent", "granted"))
            self.client_version = str(real["client_version"])
            self.platform = str(real.get("platform", "desktop"))
            assert (agent.client_version, agent.platform, agent.enabled) == (
                self.client_version,
                self.platform,
                self.enabled,
            )
        self.agent = agent
        _, started = attempt("start()", agent.start, {})
        assert started is agent
        self.check_status()
        self.failed = False

    @rule()
    @step
    def start_again(self) -> None:
        _, started = attempt("start()", self.a.start, {})
        assert started is self.a  # a no-op, also after close()

    # -- sessions ----------------------------------------------------------------------------

    @rule(
        entry_point=ENTRY_POINT.full,
        authentication_method=AUTH_METHOD.full,
        is_new_user=OPTIONAL_FLAG.full,
        referrer=REFERRER.full,
        keep_referrer_query=st.one_of(st.none(), FLAG.full),
    )
    @step
    def start_session(
        self,
        entry_point: Arg,
        authentication_method: Arg,
        is_new_user: Arg,
        referrer: Arg,
        keep_referrer_query: Arg | None,
    ) -> None:
        kwargs = {
            "entry_point": entry_point,
            "authentication_method": authentication_method,
            "is_new_user": is_new_user,
            "referrer": referrer,
        }
        if keep_referrer_query is not None:
            kwargs["keep_referrer_query"] = keep_referrer_query
        keep = keep_referrer_query.value if keep_referrer_query is not None else False
        verdicts = {
            "entry_point": ENTRY_POINT.verdict(entry_point.value),
            "authentication_method": AUTH_METHOD.verdict(authentication_method.value),
            "is_new_user": OPTIONAL_FLAG.verdict(is_new_user.value),
            "referrer": REFERRER.verdict(referrer.value),
            "keep_referrer_query": GOOD if keep_referrer_query is None else FLAG.verdict(keep),
        }
        context: dict[str, Any] | object = {}
        cleaned: str | None = None
        if verdicts["referrer"] != BAD and isinstance(referrer.value, str):
            try:
                cleaned = clean_referrer(referrer.value, keep is True)
            except ValueError:
                verdicts["referrer"] = max(verdicts["referrer"], EITHER)
                context = _UNKNOWN  # how the agent cleans what urllib cannot split is open
        ok, rkey = attempt(
            call_label("start_session", **kwargs),
            lambda: self.a.start_session(**{name: arg.value for name, arg in kwargs.items()}),
            verdicts,
        )
        if not ok:
            self.refused()
            return
        if not self.enabled or self.consent == "denied":
            assert rkey is None
            return
        assert isinstance(rkey, str) and rkey not in self.sessions, rkey
        self.end_live("ended", "user_initiated")
        if isinstance(context, dict):
            for key, arg in (
                ("entryPoint", entry_point),
                ("authenticationMethod", authentication_method),
                ("isNewUser", is_new_user),
            ):
                if arg.value is not None:
                    context[key] = arg.value
            if cleaned is not None:
                context["referrer"] = cleaned
        self.live = Session(rkey=rkey, context=context, did=self.did)
        self.sessions[rkey] = self.live

    @rule(reason=st.one_of(st.none(), REASON.full))
    @step
    def end_session(self, reason: Arg | None) -> None:
        args = [reason.value] if reason is not None else []
        verdicts = {"reason": REASON.verdict(reason.value) if reason is not None else GOOD}
        label = call_label("end_session", reason=reason)
        ok, rkey = attempt(label, lambda: self.a.end_session(*args), verdicts)
        if not ok:
            self.refused()
            return
        expected = self.end_live("ended", str(reason.value) if reason else "user_initiated")
        assert rkey == expected, f"{label} returned {rkey}, expected {expected}"

    @rule()
    @step
    def invalidate(self) -> None:
        _, rkey = attempt("invalidate()", self.a.invalidate, {})
        expected = self.end_live("invalidated", "forced_end")
        assert rkey == expected, f"invalidate() returned {rkey}, expected {expected}"

    # -- activity ----------------------------------------------------------------------------

    @rule()
    @step
    def touch(self) -> None:
        attempt("touch()", self.a.touch, {})
        self.activity()

    @rule(route=ROUTE.full)
    @step
    def page(self, route: Arg) -> None:
        verdicts = {"route": ROUTE.verdict(route.value)}
        ok, _ = attempt(call_label("page", route=route), lambda: self.a.page(route.value), verdicts)
        if not ok:
            self.refused()
        elif (session := self.activity()) is not None:
            self.add_unique(session.pages, str(route.value), MAX_PAGES, "pages_over_cap")

    @rule(name=FEATURE.full)
    @step
    def feature(self, name: Arg) -> None:
        verdicts = {"feature": FEATURE.verdict(name.value)}
        label = call_label("feature", name=name)
        ok, _ = attempt(label, lambda: self.a.feature(name.value), verdicts)
        if not ok:
            self.refused()
        elif (session := self.activity()) is not None:
            self.add_unique(session.features, str(name.value), MAX_FEATURES, "features_over_cap")

    @rule(kind=KIND.full, count=st.one_of(st.none(), COUNT.full))
    @step
    def action(self, kind: Arg, count: Arg | None) -> None:
        args = [kind.value] + ([count.value] if count is not None else [])
        verdicts = {
            "kind": KIND.verdict(kind.value),
            "count": COUNT.verdict(count.value) if count is not None else GOOD,
        }
        label = call_label("action", kind=kind, count=count)
        ok, _ = attempt(label, lambda: self.a.action(*args), verdicts)
        if not ok:
            self.refused()
        elif (session := self.activity()) is not None:
            name = str(kind.value)
            session.actions[name] = session.actions.get(name, 0) + int(
                1 if count is None else count.value
            )

    @rule(xp=XP.full, level=st.one_of(st.none(), LEVEL.full))
    @step
    def progress(self, xp: Arg, level: Arg | None) -> None:
        args = [xp.value] + ([level.value] if level is not None else [])
        verdicts = {
            "xp": XP.verdict(xp.value),
            "level": LEVEL.verdict(level.value) if level is not None else GOOD,
        }
        label = call_label("progress", xp=xp, level=level)
        ok, _ = attempt(label, lambda: self.a.progress(*args), verdicts)
        if not ok:
            self.refused()
        elif (session := self.activity()) is not None:
            assert isinstance(xp.value, int)
            if session.first_xp is None:
                session.first_xp = xp.value
            session.current_xp = xp.value
            if level is not None and isinstance(level.value, int):
                session.current_level = level.value

    @rule(ms=MS.full, ok_flag=st.one_of(st.none(), FLAG.full))
    @step
    def response(self, ms: Arg, ok_flag: Arg | None) -> None:
        args = [ms.value] + ([ok_flag.value] if ok_flag is not None else [])
        verdicts = {
            "ms": MS.verdict(ms.value),
            "ok": FLAG.verdict(ok_flag.value) if ok_flag is not None else GOOD,
        }
        label = call_label("response", ms=ms, ok=ok_flag)
        ok, _ = attempt(label, lambda: self.a.response(*args), verdicts)
        if not ok:
            self.refused()
        elif (session := self.activity()) is not None:
            assert isinstance(ms.value, (int, float))
            session.respond(ms.value, ok_flag is None or ok_flag.value is True)

    @rule(foreground=FLAG.full)
    @step
    def set_foreground(self, foreground: Arg) -> None:
        """The argument's check; a stay behind is undone at once (the model keeps no
        time: a stay past the timeout is tested with a driven clock in test_focus)."""
        label = call_label("set_foreground", foreground=foreground)
        verdicts = {"foreground": FLAG.verdict(foreground.value)}
        ok, _ = attempt(label, lambda: self.a.set_foreground(foreground.value), verdicts)
        if not ok:
            self.refused()
        elif foreground.value is False:
            self.a.set_foreground(True)

    @rule(uri=LOG_URI.full, progress=st.booleans())
    @step
    def link(self, uri: Arg, progress: bool) -> None:
        param, method = (
            (PROGRESS_URI, self.a.link_progress) if progress else (LOG_URI, self.a.link_log)
        )
        label = call_label("link_progress" if progress else "link_log", uri=uri)
        ok, _ = attempt(label, lambda: method(uri.value), {"uri": param.verdict(uri.value)})
        if not ok:
            self.refused()
        elif (session := self.activity()) is not None:
            items = session.progress_uris if progress else session.log_uris
            overflow = "progress_uris_over_cap" if progress else "log_uris_over_cap"
            self.add_unique(items, str(uri.value), MAX_LINKED, overflow)

    @rule(
        kind=st.sampled_from(["page", "feature", "link_log", "link_progress"]),
        first=st.integers(0, 40),
        count=st.integers(1, 40),
    )
    @step
    def burst(self, kind: str, first: int, count: int) -> None:
        """Many valid unique values at once, to fill the lists past their caps."""
        for index in range(first, first + count):
            if kind == "page":
                self.a.page(f"/b{index}")
                if (session := self.activity()) is not None:
                    self.add_unique(session.pages, f"/b{index}", MAX_PAGES, "pages_over_cap")
            elif kind == "feature":
                self.a.feature(f"b{index}")
                if (session := self.activity()) is not None:
                    self.add_unique(
                        session.features, f"b{index}", MAX_FEATURES, "features_over_cap"
                    )
            else:
                uri = f"at://did:plc:abc/net.anisota.beta.game.x/b{index}"
                getattr(self.a, kind)(uri)
                if (session := self.activity()) is not None:
                    progress = kind == "link_progress"
                    items = session.progress_uris if progress else session.log_uris
                    overflow = "progress_uris_over_cap" if progress else "log_uris_over_cap"
                    self.add_unique(items, uri, MAX_LINKED, overflow)

    # -- the game's own requests -------------------------------------------------------------

    @rule(elapsed_ms=ELAPSED.full, outcome=OUTCOME.full)
    @step
    def report_request(self, elapsed_ms: Arg, outcome: Arg) -> None:
        verdicts = {
            "elapsed_ms": ELAPSED.verdict(elapsed_ms.value),
            "outcome": OUTCOME.verdict(outcome.value),
        }
        label = call_label("report_request", elapsed_ms=elapsed_ms, outcome=outcome)
        ok, _ = attempt(
            label,
            lambda: self.a.report_request(elapsed_ms.value, outcome.value),
            verdicts,
        )
        if not ok:
            self.refused()
            return
        assert isinstance(elapsed_ms.value, (int, float))
        self.respond(min(elapsed_ms.value, MAX_RESPONSE_MS), outcome.value == "ok")

    def game_request(self, client: httpx.Client, answer: int | None, hooks_only: bool) -> None:
        """One request of the game through ``client`` (its transport answers ``answer``)."""
        try:
            client.get("https://game.example/api")
        except httpx.ConnectError:
            assert answer is None
            if not hooks_only:  # event hooks never hear of a request without an answer
                self.respond(None, False)
            return
        assert answer is not None
        self.respond(None, answer < 500 and answer not in (408, 429))

    @rule(mode=st.sampled_from(["ok", "OSError", "KeyError"]), decorate=st.booleans())
    @step
    def timed(self, mode: str, decorate: bool) -> None:
        errors: dict[str, Exception] = {"OSError": OSError("down"), "KeyError": KeyError("k")}

        def block() -> None:
            if mode in errors:
                raise errors[mode]

        _, timer = attempt("timed()", self.a.timed, {})
        assert timer is not None
        try:
            if decorate:
                timer(block)()
            else:
                with timer:
                    block()
        except (OSError, KeyError) as error:
            assert error is errors[mode]  # re-raised unchanged
        else:
            assert mode == "ok"
        self.respond(None, mode == "ok")

    @rule(asynchronous=st.one_of(st.none(), FLAG.full), answer=ANSWERS)
    @step
    def httpx_event_hooks(self, asynchronous: Arg | None, answer: int | None) -> None:
        kwargs = {"asynchronous": asynchronous.value} if asynchronous is not None else {}
        verdicts = {
            "asynchronous": GOOD if asynchronous is None else FLAG.verdict(asynchronous.value)
        }
        label = call_label("httpx_event_hooks", asynchronous=asynchronous)
        ok, hooks = attempt(label, lambda: self.a.httpx_event_hooks(**kwargs), verdicts)
        if not ok:
            self.refused()
            return
        assert hooks is not None and sorted(hooks) == ["request", "response"], hooks
        if kwargs.get("asynchronous"):
            asyncio.run(self.async_request(hooks, None, answer, hooks_only=True))
            return
        with httpx.Client(transport=game_server(answer), event_hooks=hooks) as client:
            self.game_request(client, answer, hooks_only=True)

    async def async_request(
        self,
        hooks: dict[str, list[Any]] | None,
        transport: httpx.AsyncBaseTransport | None,
        answer: int | None,
        hooks_only: bool,
    ) -> None:
        async with httpx.AsyncClient(
            transport=transport or game_server(answer), event_hooks=hooks
        ) as client:
            try:
                await client.get("https://game.example/api")
            except httpx.ConnectError:
                assert answer is None
                if not hooks_only:
                    self.respond(None, False)
                return
        assert answer is not None
        self.respond(None, answer < 500 and answer not in (408, 429))

    @rule(inner=INNER.full, answer=ANSWERS)
    @step
    def timed_transport(self, inner: Arg, answer: int | None) -> None:
        value = game_server(answer) if inner.value == _MOCK else inner.value
        label = call_label("timed_transport", inner=inner)
        verdicts = {"inner": INNER.verdict(inner.value)}
        ok, transport = attempt(label, lambda: self.a.timed_transport(value), verdicts)
        if not ok:
            self.refused()
            return
        assert isinstance(transport, httpx.BaseTransport)
        if inner.value != _MOCK:  # httpx's own transport: it would reach a network
            transport.close()
            return
        with httpx.Client(transport=transport) as client:
            self.game_request(client, answer, hooks_only=False)

    @rule(inner=ASYNC_INNER.full, answer=ANSWERS)
    @step
    def async_timed_transport(self, inner: Arg, answer: int | None) -> None:
        value = game_server(answer) if inner.value == _MOCK else inner.value
        label = call_label("async_timed_transport", inner=inner)
        verdicts = {"inner": ASYNC_INNER.verdict(inner.value)}
        ok, transport = attempt(label, lambda: self.a.async_timed_transport(value), verdicts)
        if not ok:
            self.refused()
            return
        assert isinstance(transport, httpx.AsyncBaseTransport)
        if inner.value == _MOCK:
            asyncio.run(self.async_request(None, transport, answer, hooks_only=False))

    # -- the account -----------------------------------------------------------------------------

    @rule(identifier=IDENTIFIER.full, password=PASSWORD.full, pds_url=PDS_URL.full)
    @step
    def login(self, identifier: Arg, password: Arg, pds_url: Arg) -> None:
        verdicts = {
            "identifier": IDENTIFIER.verdict(identifier.value),
            "password": PASSWORD.verdict(password.value),
            "pds_url": PDS_URL.verdict(pds_url.value),
        }
        label = call_label("login", identifier=identifier, password=password, pds_url=pds_url)
        ok, _ = attempt(
            label,
            lambda: self.a.login(identifier.value, password.value, pds_url=pds_url.value),
            verdicts,
        )
        if not ok:
            self.refused()
        # The login never succeeds (nothing answers): no session changes hands.

    @rule(auth=AUTH.full, did=DID.full, pds_url=PDS_URL.full)
    @step
    def use_auth(self, auth: Arg, did: Arg, pds_url: Arg) -> None:
        verdicts = {
            "auth": AUTH.verdict(auth.value),
            "did": DID.verdict(did.value),
            "pds_url": PDS_URL.verdict(pds_url.value),
        }
        label = call_label("use_auth", auth=auth, did=did, pds_url=pds_url)
        ok, _ = attempt(
            label,
            lambda: self.a.use_auth(auth.value, did=did.value, pds_url=pds_url.value),
            verdicts,
        )
        if not ok:
            self.refused()
            return
        account = str(did.value)
        self.did = account
        live = self.live
        if live is not None and live.did is None:
            live.did = account  # recorded before any account: now this one's
        elif live is not None and live.did != account:
            self.end_live("invalidated", "forced_end")  # an account switch

    @rule()
    @step
    def logout(self) -> None:
        attempt("logout()", self.a.logout, {})
        self.end_live("ended", "logout")
        self.did = None

    # -- the store -------------------------------------------------------------------------------

    @rule(timeout=st.one_of(st.none(), FLUSH_TIMEOUT.full), sync=st.one_of(st.none(), FLAG.full))
    @step
    def flush(self, timeout: Arg | None, sync: Arg | None) -> None:
        kwargs = {
            name: arg.value
            for name, arg in (("timeout", timeout), ("sync", sync))
            if arg is not None
        }
        verdicts = {
            "timeout": FLUSH_TIMEOUT.verdict(timeout.value) if timeout is not None else GOOD,
            "sync": FLAG.verdict(sync.value) if sync is not None else GOOD,
        }
        label = call_label("flush", timeout=timeout, sync=sync)
        ok, done = attempt(label, lambda: self.a.flush(**kwargs), verdicts)
        if not ok:
            self.refused()
            return
        assert isinstance(done, bool)

    @rule()
    @step
    def checkpoint_and_compare(self) -> None:
        """``flush(sync=False)``, then the store must hold exactly the model's sessions."""
        done = self.a.flush(10, sync=False)
        if self.closed:
            assert self.at_close is not None
            self.check_store(self.at_close)  # nothing is written after close()
        elif self.enabled:
            assert done, "flush(10, sync=False) did not finish within 10 s"
            self.check_store(self.expected_store())
        else:
            self.check_store({})

    @rule(state=CONSENT.full)
    @step
    def set_consent(self, state: Arg) -> None:
        ok, _ = attempt(
            call_label("set_consent", state=state),
            lambda: self.a.set_consent(state.value),
            {"consent": CONSENT.verdict(state.value)},
        )
        if not ok:
            self.refused()
            return
        self.consent = state.value
        if state.value == "denied" and self.enabled:
            # Dropped, not ended; nothing here reaches a PDS, so nothing is kept.
            self.live = None
            self.sessions.clear()

    @rule()
    @step
    def purge(self) -> None:
        attempt("purge()", self.a.purge, {})
        self.live = None  # forgotten, not ended
        self.sessions.clear()

    @rule()
    @step
    def status(self) -> None:
        _, status = attempt("status()", self.a.status, {})
        assert status is not None and status.running == (self.enabled and not self.closed)

    @rule(
        timeout=st.one_of(st.none(), CLOSE_TIMEOUT.full),
        how=st.sampled_from(["close", "with", "async with"]),
    )
    @step
    def close(self, timeout: Arg | None, how: str) -> None:
        agent = self.a
        if how == "with":

            def leave() -> bool:
                with agent:
                    pass
                return True

        elif how == "async with":

            async def leave_async() -> None:
                async with agent:
                    pass

            def leave() -> bool:
                asyncio.run(leave_async())
                return True

        else:
            args = [timeout.value] if timeout is not None else []

            def leave() -> bool:
                return agent.close(*args)

        if how != "close":
            timeout = None
        verdicts = {"timeout": GOOD if timeout is None else CLOSE_TIMEOUT.verdict(timeout.value)}
        label = call_label(how, timeout=timeout)
        ok, done = attempt(label, leave, verdicts)
        if not ok:
            self.refused()
            return
        self.end_live("ended", "app_close")
        if self.closed:
            return
        self.closed = True
        # Shorter than the default, close may give up waiting (and say so).
        if self.enabled and (timeout is None or timeout.value >= DEFAULT_CLOSE_TIMEOUT):
            assert done, f"{label} did not finish in time"
        self.at_close = self.expected_store()
        self.check_store(self.at_close)

    def teardown(self) -> None:
        agent = self.agent
        try:
            if agent is not None and not self.failed:
                if not self.closed:
                    assert agent.close(10) or not self.enabled, "close(10) did not finish in time"
                    self.end_live("ended", "app_close")
                    self.at_close = self.expected_store()
                assert self.at_close is not None
                self.check_store(self.at_close)
        finally:
            if agent is not None:
                with contextlib.suppress(Exception):  # keep the run's first error
                    agent.close(5)
            shutil.rmtree(self.dir, ignore_errors=True)


@functools.cache
def game_server(answer: int | None) -> httpx.MockTransport:
    """The game's own server: answers ``answer`` to everything (None: nothing listens)."""
    if answer is None:
        return httpx.MockTransport(refusing)
    return httpx.MockTransport(lambda request: httpx.Response(answer))


#: Every public name of Agent, and the rules that drive it.
COVERED = {
    "client_version": "construct",
    "platform": "construct",
    "enabled": "construct",
    "start": "start_again",
    "close": "close",
    "flush": "flush",
    "purge": "purge",
    "set_consent": "set_consent",
    "use_auth": "use_auth",
    "login": "login",
    "logout": "logout",
    "start_session": "start_session",
    "end_session": "end_session",
    "invalidate": "invalidate",
    "touch": "touch",
    "set_foreground": "set_foreground",
    "page": "page",
    "feature": "feature",
    "action": "action",
    "progress": "progress",
    "response": "response",
    "link_log": "link",
    "link_progress": "link",
    "report_request": "report_request",
    "httpx_event_hooks": "httpx_event_hooks",
    "timed_transport": "timed_transport",
    "async_timed_transport": "async_timed_transport",
    "timed": "timed",
    "status": "status",
}


def test_every_public_method_is_driven() -> None:
    public = {name for name in dir(Agent) if not name.startswith("_")}
    assert public == set(COVERED), f"not driven: {public - set(COVERED)}"
    for rule_name in COVERED.values():
        assert callable(getattr(AgentMachine, rule_name))


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Validate every record the store is given, as it is given (on the recorder's thread)."""
    from anisota_agent.store import Store

    errors: list[str] = []
    write = Store._write

    def validated(store: Store, rkey: str, did: str | None, record: Any, *args: Any) -> bool:
        try:
            validate_record(record)
        except Exception as error:
            errors.append(f"{rkey}: {type(error).__name__}: {short(str(error), 200)}")
        return write(store, rkey, did, record, *args)

    monkeypatch.setattr(Store, "_write", validated)
    return errors


def test_public_api_state_machine(monkeypatch: pytest.MonkeyPatch, written: list[str]) -> None:
    for name in ("DO_NOT_TRACK", "ANISOTA_AGENT_DATA_DIR", "ANISOTA_AGENT_KEYRING"):
        monkeypatch.delenv(name, raising=False)
    AgentMachine.write_errors = written
    run_state_machine_as_test(
        AgentMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=30,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(kwargs=constructor_kwargs(FREE, 3))
def test_constructor_with_arbitrary_values(kwargs: dict[str, Arg]) -> None:
    """``Agent(...)`` refuses what it must, accepts what it should; nothing else escapes.

    Not started: a constructor does no I/O, so any data dir may be named.
    """
    verdicts = constructor_verdicts(kwargs, {**SETTINGS, **FREE})
    real: dict[str, Any] = {
        name: AGENT_TRANSPORT if arg.value == _MOCK else arg.value for name, arg in kwargs.items()
    }
    _, agent = attempt(call_label("Agent", **kwargs), lambda: Agent(**real), verdicts)
    if agent is None:
        return
    assert agent.client_version == real["client_version"]
    assert agent.platform == real.get("platform", "desktop")
    assert agent.status().running is False
    assert agent.close() is True
