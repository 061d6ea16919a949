"""Checks of what the host passes in: types, bounds, choices and atproto syntax.

Every checker returns the value when it is good and raises ``TypeError`` or
``ValueError`` naming the field otherwise. Each opens with the cheapest test
that accepts a good value, so the game's hot path can call it directly; the
slower work of building the message runs only for a bad value.
"""

from __future__ import annotations

from typing import TypeVar

from .syntax import MAX_DID_LEN, is_did, is_record_uri

T = TypeVar("T")

__all__ = [
    "MAX_URI_LEN",
    "check_at_uri",
    "check_bool",
    "check_choice",
    "check_clock",
    "check_did",
    "check_int",
    "check_number",
    "check_optional_bool",
    "check_path",
    "check_pds_url",
    "check_seconds",
    "check_text",
    "is_loopback_host",
    "shown",
]

#: The longest at-uri a session links (its own collection and a TID make ~100).
MAX_URI_LEN = 200
#: How much of a bad value a message shows: a 10 MB string must not become a
#: 10 MB message (nor cost the game's thread the time to build one).
_SHOWN_CHARS = 40


def shown(value: object) -> str:
    """A short, safe rendering of a bad value for an error message."""
    if isinstance(value, str):
        if len(value) <= _SHOWN_CHARS:
            return repr(value)
        return f"{value[:_SHOWN_CHARS]!r}... ({len(value):,} characters)"
    if isinstance(value, int) and value.bit_length() > 64:
        # str() of a huge int is slow, and refused past 4,300 digits.
        return f"an int of {value.bit_length():,} bits"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return f"a {type(value).__name__}"


def _bound(number: float) -> str:
    """A bound as a message shows it: 86,400,000 and 0.5, not 8.64e+07."""
    return f"{int(number):,}" if float(number).is_integer() else f"{number:g}"


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise naming the field.

    Comparing a str compares lengths first, so a huge value is refused as fast as
    a short one; only its message costs more, and :func:`shown` cuts it.
    """
    if type(value) is str and value in allowed:
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(allowed)}; got {shown(value)}")
    raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {shown(value)}")


def check_text(name: str, value: object, max_len: int) -> str:
    """Return a non-empty ``str`` of at most ``max_len`` characters, else raise.

    The text must be one UTF-8 can carry: a lone surrogate (``"\\ud800"``) has no
    encoding, and would fail the record's checkpoint and upload later.
    """
    # isascii() reads a flag of the str: ASCII text needs no encoding check.
    if type(value) is str and 0 < len(value) <= max_len and value.isascii():
        return value
    if type(value) is not str:
        raise TypeError(f"{name} must be a str; got {type(value).__name__}")
    if not 0 < len(value) <= max_len:
        raise ValueError(f"{name} must be 1 to {max_len:,} characters; got {len(value):,}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{name} must be text UTF-8 can encode; got a lone surrogate at {error.start}"
        ) from None
    return value


def check_int(name: str, value: object, minimum: int, maximum: int) -> int:
    """Return an ``int`` (not a bool) within ``[minimum, maximum]``, else raise."""
    if type(value) is int and minimum <= value <= maximum:
        return value
    if type(value) is not int:
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    raise ValueError(f"{name} must be between {minimum:,} and {maximum:,}; got {shown(value)}")


def check_number(name: str, value: object, minimum: float, maximum: float) -> float:
    """Return an ``int`` or ``float`` (not a bool) within ``[minimum, maximum]``, else raise.

    NaN fails the bounds, as it should.
    """
    if type(value) is float or type(value) is int:
        if minimum <= value <= maximum:
            return value
    else:
        raise TypeError(f"{name} must be an int or float; got {type(value).__name__}")
    raise ValueError(
        f"{name} must be between {_bound(minimum)} and {_bound(maximum)}; got {shown(value)}"
    )


def check_seconds(name: str, value: object, minimum: float, maximum: float) -> float:
    """Return a duration in seconds within ``[minimum, maximum]`` as a float, else raise."""
    if type(value) not in (int, float):
        raise TypeError(f"{name} must be a number of seconds; got {type(value).__name__}")
    # Compared before the conversion: an int too large for a float is out of bounds.
    if not minimum <= value <= maximum:  # type: ignore[operator]
        raise ValueError(
            f"{name} must be between {_bound(minimum)} and {_bound(maximum)} s; got {shown(value)}"
        )
    return float(value)  # type: ignore[arg-type]


def check_bool(name: str, value: object) -> bool:
    """Return ``True`` or ``False``, else raise naming the field."""
    if type(value) is bool:
        return value
    raise TypeError(f"{name} must be a bool; got {type(value).__name__}")


def check_path(name: str, value: object) -> str:
    """Return a non-empty file-system path (``str`` or ``os.PathLike``) as a ``str``."""
    import os

    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike; got {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str):
        raise TypeError(f"{name} must be a str path, not bytes")
    if not path:
        raise ValueError(f"{name} must not be empty")
    return path


def check_clock(value: T) -> T:
    """Return ``value`` if it has the clock's methods (``wall_ns``, ``monotonic_ns``)."""
    if callable(getattr(value, "wall_ns", None)) and callable(getattr(value, "monotonic_ns", None)):
        return value
    raise TypeError(f"clock must have wall_ns() and monotonic_ns(); got {shown(value)}")


def check_optional_bool(name: str, value: object) -> bool | None:
    """Return ``True``, ``False`` or ``None``, else raise naming the field."""
    if value is None or type(value) is bool:
        return value
    raise TypeError(f"{name} must be a bool or None; got {type(value).__name__}")


def check_at_uri(name: str, value: object) -> str:
    """Return the at-uri of a record (``at://did/collection/rkey``), else raise.

    At most :data:`MAX_URI_LEN` characters, in the atproto syntax (see
    :func:`~anisota_agent.syntax.is_record_uri`).
    """
    if type(value) is str and len(value) <= MAX_URI_LEN and is_record_uri(value):
        return value
    uri = check_text(name, value, MAX_URI_LEN)
    raise ValueError(
        f"{name} must be a record's at-uri, at://<did or handle>/<collection NSID>/<record key>;"
        f" got {shown(uri)}"
    )


def check_did(name: str, value: object) -> str:
    """Return a DID in atproto's syntax (``did:<method>:<id>``), else raise naming the field."""
    did = check_text(name, value, MAX_DID_LEN)
    if not is_did(did):
        raise ValueError(f"{name} must be a DID like did:plc:... or did:web:...; got {shown(did)}")
    return did


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1``."""
    import ipaddress  # only when a PDS URL is given

    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_pds_url(url: object) -> str:
    """Validate a PDS base URL and return it without a trailing slash.

    Only ``https`` is accepted, except ``http`` to a loopback host (a local dev
    PDS): tokens must never cross a network in clear text.

    Raises:
        TypeError: not a str.
        ValueError: empty, over 2,048 characters, not UTF-8 text, another
            scheme, plain http to a remote host, a URL with credentials, a
            query or a fragment.
    """
    from urllib.parse import urlsplit

    text = check_text("pds_url", url, 2048).strip()
    try:
        parts = urlsplit(text)
        host = parts.hostname
        parts.port  # noqa: B018  (read for its check: a port out of range raises)
    except ValueError:  # "Invalid IPv6 URL", "Port out of range": urllib's words
        raise ValueError(f"pds_url must be https://host; got {shown(text)}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError(f"pds_url must be https://host; got {shown(text)}")
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ValueError(
            f"pds_url: refusing plain http to a non-loopback PDS ({shown(host)}): use https"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("pds_url must not carry credentials, a query or a fragment")
    return text.rstrip("/")
