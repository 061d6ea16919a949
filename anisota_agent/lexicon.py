"""The shipped ``net.anisota.beta.game.session`` lexicon and record validation.

The PDS does not know this lexicon (``validate: true`` fails there), so the
client is the only place a record is checked before it is written.
:func:`validate_record` walks the record along the shipped lexicon: objects
(required, nullable, open to unknown fields), strings (enum, the strict atproto
``datetime``), integers (minimum, maximum; never a bool), booleans, arrays and
local refs, which is every construct the lexicon uses; it refuses to run on a
lexicon that uses any other. It adds ``$type`` and the data model (no floats,
string keys only, no non-JSON types).

It is ours rather than a general validator's because one lexicon needs little:
lexrpc, the general one (the tests check that the two agree), loads all 576 of
its bundled lexicons when imported, 111 ms and 21,000 objects that set off a
full garbage collection of ~20 ms on whichever thread imports it: the game's
frames wait for that.
"""

from __future__ import annotations

import functools
import reprlib
from collections.abc import Mapping
from typing import Any

from anisota_agent.clock import parse_datetime

__all__ = [
    "SESSION_NSID",
    "RecordValidationError",
    "is_valid_datetime",
    "load_session_lexicon",
    "validate_record",
]

SESSION_NSID = "net.anisota.beta.game.session"
_LEXICON_PATH = ("lexicons", "net", "anisota", "beta", "game", "session.json")

# A field location: property names and array indexes from the record root.
_Path = tuple[str | int, ...]

#: The keys each kind of schema may have: anything else is a construct this
#: validator does not enforce, so it refuses the lexicon rather than pass records
#: the lexicon would refuse.
_SCHEMA_KEYS = {
    "record": {"type", "key", "record", "description"},
    "object": {"type", "properties", "required", "nullable", "description"},
    "string": {"type", "enum", "format", "description"},
    "integer": {"type", "minimum", "maximum", "description"},
    "boolean": {"type", "description"},
    "array": {"type", "items", "description"},
    "ref": {"type", "ref", "description"},
}

_short_repr = reprlib.Repr()
_short_repr.maxstring = 60
_short_repr.maxother = 60


class RecordValidationError(ValueError):
    """A session record does not match the lexicon.

    ``field`` is the dotted path of the offending value, e.g.
    ``activitySummary.gameActions.levelUps``, ``relatedLogUris[2]`` or
    ``$type``; it is ``""`` when the record as a whole is wrong.
    """

    def __init__(self, field: str, message: str) -> None:
        """Store ``field`` and prefix the message with it."""
        super().__init__(f"{field or 'record'}: {message}")
        self.field = field


def load_session_lexicon() -> dict[str, Any]:
    """Return the session lexicon shipped inside the package.

    The file is read once; each call returns a fresh copy so a caller cannot
    change what the validator sees.
    """
    import copy  # here, like json below: the package's import need not pay for either

    return copy.deepcopy(_session_lexicon())


@functools.cache
def _session_lexicon() -> dict[str, Any]:
    """Read and parse the packaged lexicon once (shared, never mutate)."""
    # Imported here: importlib.resources pulls in pathlib/zipfile/tempfile, and
    # json costs ~1 ms, which importing the package should not pay for.
    import json
    from importlib.resources import files

    resource = files("anisota_agent")
    for part in _LEXICON_PATH:
        resource = resource / part
    lexicon: dict[str, Any] = json.loads(resource.read_text(encoding="utf-8"))
    return lexicon


def is_valid_datetime(s: str) -> bool:
    """True if ``s`` is a valid atproto lexicon datetime.

    RFC 3339 ∩ ISO 8601: timezone required, uppercase ``T``/``Z``, whole
    seconds required, fractional seconds allowed, no ``-00:00``, and a real
    calendar date and time.
    """
    try:
        parse_datetime(s)
    except ValueError:
        return False
    return True


def validate_record(record: Mapping[str, Any]) -> None:
    """Check a session record against the shipped lexicon.

    Raises RecordValidationError (with ``field`` set) on the first problem;
    returns None if the record may be written. The record is not modified.
    """
    if not isinstance(record, Mapping):
        raise RecordValidationError("", f"must be a JSON object, got {type(record).__name__}")
    # Nested objects must be real dicts (what a record decoded from JSON holds);
    # only the top level may be any Mapping, so copy it into one (shallow, cheap).
    plain = dict(record)
    _check_type_field(plain)
    _check_data_model(plain, ())
    lexicon = _checked_lexicon()
    _check_value(lexicon, plain, lexicon["defs"]["main"], ())


def _check_type_field(record: Mapping[str, Any]) -> None:
    """``$type`` must name the collection, or the PDS answers 400."""
    if "$type" not in record:
        raise RecordValidationError("$type", f"is required and must be {SESSION_NSID!r}")
    if record["$type"] != SESSION_NSID:
        raise RecordValidationError(
            "$type", f"must be {SESSION_NSID!r}, got {_short_repr.repr(record['$type'])}"
        )


def _check_data_model(value: object, path: _Path) -> None:
    """Reject what the atproto data model cannot hold, anywhere in the record.

    The lexicon only types the fields it names, but the PDS answers 400 for a
    float in any field, including ones it does not know.
    """
    if isinstance(value, float):
        raise RecordValidationError(
            _join(path), f"floats are not allowed in records (the PDS rejects them), got {value!r}"
        )
    if isinstance(value, dict):  # a concrete dict, as in a decoded record; faster than Mapping
        for key, item in value.items():
            if not isinstance(key, str):
                raise RecordValidationError(
                    _join((*path, str(key))), f"object keys must be strings, got {key!r}"
                )
            _check_data_model(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_data_model(item, (*path, index))
    elif value is not None and not isinstance(value, (str, int)):  # bool is an int
        raise RecordValidationError(_join(path), f"{type(value).__name__} is not a JSON data type")


@functools.cache
def _checked_lexicon() -> dict[str, Any]:
    """The shipped lexicon, once it is known to use only what is enforced here."""
    lexicon = _session_lexicon()
    for name, schema in lexicon["defs"].items():
        _check_supported(lexicon, schema, name)
    return lexicon


def _check_supported(lexicon: Mapping[str, Any], schema: Mapping[str, Any], where: str) -> None:
    """Raise ValueError at the first construct of ``schema`` the validator does not enforce."""
    kind = schema.get("type")
    allowed = _SCHEMA_KEYS.get(kind) if isinstance(kind, str) else None
    unknown = sorted(set(schema) - allowed) if allowed is not None else ["type"]
    if not unknown and schema.get("format", "datetime") != "datetime":
        unknown = [f"format {schema['format']}"]
    if kind == "ref" and _local_def_name(lexicon, schema["ref"]) not in lexicon["defs"]:
        unknown = [f"ref {schema['ref']}"]  # another lexicon's
    if unknown:
        raise ValueError(
            f"lexicon {lexicon['id']}: {where} ({kind}) uses {', '.join(unknown)}: not enforced"
        )
    children: Mapping[str, Any] = {}
    if kind == "record":
        children = {"record": schema["record"]}
    elif kind == "object":
        children = schema.get("properties", {})
    elif kind == "array":
        children = {"[]": schema["items"]}
    for name, child in children.items():
        _check_supported(lexicon, child, f"{where}.{name}")


def _check_value(
    lexicon: Mapping[str, Any], value: Any, schema: Mapping[str, Any], path: _Path
) -> None:
    """Raise RecordValidationError at the first part of ``value`` that ``schema`` refuses.

    Properties are checked in the lexicon's order, so the first problem reported
    is the same whatever order the record's keys are in.
    """
    kind = schema["type"]
    if kind == "ref":
        target = lexicon["defs"][_local_def_name(lexicon, schema["ref"])]
        _check_value(lexicon, value, target, path)
    elif kind == "record":
        _check_value(lexicon, value, schema["record"], path)
    elif kind == "object":
        _expect(type(value) is dict, "object", value, path)
        _check_object(lexicon, value, schema, path)
    elif kind == "array":
        _expect(type(value) is list, "array", value, path)
        for index, item in enumerate(value):
            _check_value(lexicon, item, schema["items"], (*path, index))
    elif kind == "string":
        _expect(type(value) is str, "string", value, path)
        _check_string(value, schema, path)
    elif kind == "integer":
        _expect(type(value) is int, "integer", value, path)  # a bool is not one
        _check_bounds(value, schema, path)
    else:
        _expect(type(value) is bool, "boolean", value, path)


def _check_object(
    lexicon: Mapping[str, Any], value: dict[str, Any], schema: Mapping[str, Any], path: _Path
) -> None:
    required, nullable = schema.get("required", ()), schema.get("nullable", ())
    for prop, prop_schema in schema.get("properties", {}).items():
        if prop not in value:
            if prop in required:
                raise RecordValidationError(_join((*path, prop)), "is required but missing")
        elif value[prop] is None:
            if prop not in nullable:
                raise RecordValidationError(_join((*path, prop)), "must not be null")
        else:
            _check_value(lexicon, value[prop], prop_schema, (*path, prop))


def _check_string(value: str, schema: Mapping[str, Any], path: _Path) -> None:
    allowed = schema.get("enum")
    if allowed is not None and value not in allowed:
        raise RecordValidationError(
            _join(path),
            f"{_short_repr.repr(value)} is not one of the allowed values: "
            + ", ".join(repr(v) for v in allowed),
        )
    if schema.get("format") == "datetime" and not is_valid_datetime(value):
        raise RecordValidationError(
            _join(path),
            f"{_short_repr.repr(value)} is not a valid datetime "
            "(RFC 3339 with seconds and a timezone, e.g. 2026-11-24T10:00:00.000Z)",
        )


def _check_bounds(value: int, schema: Mapping[str, Any], path: _Path) -> None:
    minimum, maximum = schema.get("minimum"), schema.get("maximum")
    if minimum is not None and value < minimum:
        raise RecordValidationError(_join(path), f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise RecordValidationError(_join(path), f"must be at most {maximum}, got {value}")


def _expect(ok: bool, kind: str, value: object, path: _Path) -> None:
    if not ok:
        raise RecordValidationError(
            _join(path),
            f"must be {'an' if kind[0] in 'aei' else 'a'} {kind},"
            f" got {type(value).__name__} {_short_repr.repr(value)}",
        )


def _local_def_name(lexicon: Mapping[str, Any], ref: str) -> str | None:
    """``#foo`` or ``<this nsid>#foo`` -> ``foo``; refs to other lexicons -> None."""
    nsid, _, name = ref.partition("#")
    if nsid not in ("", lexicon["id"]):
        return None
    return name or "main"


def _join(path: _Path) -> str:
    """Render a path as ``a.b[3].c``."""
    out = ""
    for segment in path:
        if isinstance(segment, int):
            out += f"[{segment}]"
        else:
            out += f".{segment}" if out else segment
    return out
