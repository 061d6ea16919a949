"""The atproto identifier syntaxes: DID, handle, NSID, record key and at-uri.

Pure predicates, written from the specs at https://atproto.com/specs/ (``did``,
``handle``, ``nsid``, ``record-key``, ``at-uri-scheme``). They check syntax only:
a DID that parses may not resolve, a handle may belong to nobody. Each is a
regular expression plus the length caps the grammar cannot express.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_DID_LEN",
    "MAX_HANDLE_LEN",
    "MAX_NSID_LEN",
    "MAX_RECORD_KEY_LEN",
    "is_did",
    "is_handle",
    "is_nsid",
    "is_record_key",
    "is_record_uri",
]

#: The DID spec's hard limit for atproto.
MAX_DID_LEN = 2048
#: A handle is a DNS name: 253 characters at most.
MAX_HANDLE_LEN = 253
#: An NSID: a domain authority of 253 characters, a dot and a 63-character name.
MAX_NSID_LEN = 317
#: A record key: 1 to 512 characters.
MAX_RECORD_KEY_LEN = 512

# A DNS label: 1 to 63 letters, digits or hyphens, no hyphen at either end
# (said with lookarounds: they cost less than the backtracking of a nested group).
_LABEL = r"(?!-)[a-zA-Z0-9-]{1,63}(?<!-)"
# The same, starting with a letter: a top-level domain may not start with a digit.
_TLD = r"(?![0-9-])[a-zA-Z0-9-]{1,63}(?<!-)"

# ``did:``, a method of lowercase letters, ``:``, then an identifier of letters,
# digits, ``._:-`` and %-escapes (a ``%`` followed by two hex digits), that does
# not end in ``:``. Query, fragment and path are DID-URL parts, not a DID's.
# One class for the plain characters, then a look back for the ``:`` the
# identifier may not end in: no alternation of two classes at every character.
_DID = r"did:[a-z]+:(?:[a-zA-Z0-9._:-]|%[0-9a-fA-F]{2})+(?<!:)"
# Two labels at least, the last a TLD. Case does not matter (handles are normalised
# to lowercase, and a check of syntax accepts both).
_HANDLE = rf"(?:{_LABEL}\.)+{_TLD}"
# A reversed domain (its first segment the TLD), then a name of letters and digits
# that starts with a letter: three segments at least.
_NSID = rf"{_TLD}(?:\.{_LABEL})+\.[a-zA-Z][a-zA-Z0-9]{{0,62}}"
_RECORD_KEY = r"[a-zA-Z0-9._:~-]{1,512}"
# Those four stay strings that re compiles (and caches) at their first use: a DID
# is checked at a login, the others in a long at-uri only, so the package's
# import need not pay for them.

# A record's at-uri in one match, compiled at import: the game's thread checks
# every link_log and link_progress with it, and one match costs a third of four. Up
# to this length no part can pass its own cap (a handle in it is under 253 characters).
_RECORD_URI = re.compile(rf"at://(?:{_DID}|{_HANDLE})/{_NSID}/(?!\.\.?\Z){_RECORD_KEY}")
_RECORD_URI_ONE_MATCH_LEN = 256


def is_did(text: str) -> bool:
    """True if ``text`` is a DID in atproto's syntax (``did:plc:…``, ``did:web:…``)."""
    return len(text) <= MAX_DID_LEN and re.fullmatch(_DID, text) is not None


def is_handle(text: str) -> bool:
    """True if ``text`` is a handle: a domain name of two labels or more."""
    return len(text) <= MAX_HANDLE_LEN and re.fullmatch(_HANDLE, text) is not None


def is_nsid(text: str) -> bool:
    """True if ``text`` is a namespaced identifier (``net.anisota.beta.game.session``)."""
    if len(text) > MAX_NSID_LEN or re.fullmatch(_NSID, text) is None:
        return False
    authority, _, _name = text.rpartition(".")
    return len(authority) <= MAX_HANDLE_LEN


def is_record_key(text: str) -> bool:
    """True if ``text`` is a record key: ``A-Za-z0-9._:~-``, 1-512 long, not ``.`` or ``..``."""
    return re.fullmatch(_RECORD_KEY, text) is not None and text not in (".", "..")


def is_record_uri(text: str) -> bool:
    """True if ``text`` is the at-uri of one record: ``at://AUTHORITY/COLLECTION/RKEY``.

    The restricted syntax that Lexicon ``at-uri`` fields use, pointing at a
    record: the authority a DID or a handle, the collection an NSID, the key a
    record key; no query, no fragment, no empty or extra path segment.
    """
    if len(text) <= _RECORD_URI_ONE_MATCH_LEN:
        return _RECORD_URI.fullmatch(text) is not None
    if not text.startswith("at://"):
        return False
    parts = text[5:].split("/")
    if len(parts) != 3:
        return False
    authority, collection, rkey = parts
    return (
        (is_did(authority) or is_handle(authority)) and is_nsid(collection) and is_record_key(rkey)
    )
