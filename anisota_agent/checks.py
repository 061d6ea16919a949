"""Checks of what the host passes in: types, bounds, choices and atproto syntax.

Every checker returns the value when it is good and raises ``TypeError`` or
``ValueError`` naming the field otherwise. Each opens with the cheapest test
that accepts a good value, so the game's hot path can call it directly; the
slower work of building the message runs only for a bad value.
"""

from __future__ import annotations

__all__ = [
    "MAX_URI_LEN",
    "check_at_uri",
    "check_bool",
    "check_choice",
    "check_did",
    "check_int",
    "check_number",
    "check_optional_bool",
    "check_path",
    "check_pds_url",
    "check_seconds",
    "check_text",
    "is_loopback_host",
]

#: The longest at-uri a session links (its own collection and a TID make ~100).
MAX_URI_LEN = 200
#: The longest DID accepted (the DID spec allows up to 2 KB).
MAX_DID_LEN = 2048


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise naming the field."""
    if type(value) is str and value in allowed:
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(allowed)}; got {value!r}")
    raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def check_text(name: str, value: object, max_len: int) -> str:
    """Return a non-empty ``str`` of at most ``max_len`` characters, else raise."""
    if type(value) is str and 0 < len(value) <= max_len:
        return value
    if type(value) is not str:
        raise TypeError(f"{name} must be a str; got {type(value).__name__}")
    raise ValueError(f"{name} must be 1 to {max_len} characters; got {len(value)}")


def check_int(name: str, value: object, minimum: int, maximum: int) -> int:
    """Return an ``int`` (not a bool) within ``[minimum, maximum]``, else raise."""
    if type(value) is int and minimum <= value <= maximum:
        return value
    if type(value) is not int:
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    raise ValueError(f"{name} must be between {minimum} and {maximum}; got {value}")


def check_number(name: str, value: object, minimum: float, maximum: float) -> float:
    """Return an ``int`` or ``float`` (not a bool) within ``[minimum, maximum]``, else raise.

    NaN fails the bounds, as it should.
    """
    if type(value) is float or type(value) is int:
        if minimum <= value <= maximum:
            return value
    else:
        raise TypeError(f"{name} must be an int or float; got {type(value).__name__}")
    raise ValueError(f"{name} must be between {minimum:g} and {maximum:g}; got {value!r}")


def check_seconds(name: str, value: object, minimum: float, maximum: float) -> float:
    """Return a duration in seconds within ``[minimum, maximum]`` as a float, else raise."""
    if type(value) not in (int, float):
        raise TypeError(f"{name} must be a number of seconds; got {type(value).__name__}")
    seconds = float(value)  # type: ignore[arg-type]
    if not minimum <= seconds <= maximum:
        raise ValueError(f"{name} must be between {minimum:g} and {maximum:g} s; got {value!r}")
    return seconds


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


def check_optional_bool(name: str, value: object) -> bool | None:
    """Return ``True``, ``False`` or ``None``, else raise naming the field."""
    if value is None or type(value) is bool:
        return value
    raise TypeError(f"{name} must be a bool or None; got {type(value).__name__}")


def check_at_uri(name: str, value: object) -> str:
    """Return an ``at://`` uri of at most :data:`MAX_URI_LEN` characters, else raise."""
    if type(value) is str and 6 <= len(value) <= MAX_URI_LEN and value[:5] == "at://":
        return value
    uri = check_text(name, value, MAX_URI_LEN)
    raise ValueError(f"{name} must be an at:// uri; got {uri!r}")


def check_did(name: str, value: object) -> str:
    """Return a DID (``did:<method>:<id>``), else raise naming the field."""
    did = check_text(name, value, MAX_DID_LEN)
    method, _, rest = did.removeprefix("did:").partition(":")
    if not did.startswith("did:") or not method.isalnum() or not method.islower() or not rest:
        raise ValueError(f"{name} must be a DID like did:plc:… or did:web:…; got {did!r}")
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
        ValueError: another scheme, plain http to a remote host, a URL with
            credentials, a query or a fragment.
    """
    from urllib.parse import urlsplit

    if not isinstance(url, str):
        raise TypeError(f"pds_url must be a str, not {type(url).__name__}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"pds_url must be https://host; got {url!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            f"pds_url: refusing plain http to a non-loopback PDS ({parts.hostname}): use https"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("pds_url must not carry credentials, a query or a fragment")
    return url.strip().rstrip("/")
