"""The shipped ``net.anisota.beta.game.session`` lexicon and record validation.

The PDS does not know this lexicon (``validate: true`` fails there), so the
client is the only place a record is checked before it is written.
:func:`validate_record` runs lexrpc against the shipped lexicon and adds the
rules lexrpc leaves out: the strict atproto datetime syntax, ``$type``, and the
data model (no floats, string keys only, no non-JSON types).

lexrpc takes ~140 ms to import (it loads every bundled lexicon), so it is only
imported on the first validation, never by ``import anisota_agent``.
"""

from __future__ import annotations

import functools
import re
import reprlib
import threading
from collections.abc import Callable, Iterator, Mapping
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
# A schema location: property names, with None standing for "every item".
_SchemaPath = tuple[str | None, ...]

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
    # Nested objects must be real dicts (lexrpc compares types exactly); only
    # the top level may be any Mapping, so copy it into one (shallow, cheap).
    plain = dict(record)
    _check_type_field(plain)
    _check_data_model(plain, ())
    _lexrpc_validator()(plain)
    _check_datetimes(plain)


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

    lexrpc only type-checks fields the lexicon names, but the PDS answers 400
    for a float in any field, including ones it does not know.
    """
    if isinstance(value, float):
        raise RecordValidationError(
            _join(path), f"floats are not allowed in records (the PDS rejects them), got {value!r}"
        )
    if isinstance(value, dict):  # concrete dict, as lexrpc requires; also faster than Mapping
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


def _check_datetimes(record: Mapping[str, Any]) -> None:
    """Apply the strict datetime rule to every ``format: datetime`` field.

    lexrpc accepts e.g. ``2026-01-01T00:00Z`` (no seconds) and ``-00:00``.
    Runs after lexrpc, so every value found here is already a string.
    """
    for schema_path in _datetime_paths():
        for path, value in _values_at(record, schema_path, ()):
            if not is_valid_datetime(value):
                raise _datetime_error(path, value)


def _datetime_error(path: _Path, value: str) -> RecordValidationError:
    """The error for a string that is not a strict lexicon datetime."""
    return RecordValidationError(
        _join(path),
        f"{_short_repr.repr(value)} is not a valid datetime "
        "(RFC 3339 with seconds and a timezone, e.g. 2026-11-24T10:00:00.000Z)",
    )


def _values_at(node: object, schema_path: _SchemaPath, path: _Path) -> Iterator[tuple[_Path, Any]]:
    """Yield (path, value) for each value present at ``schema_path``."""
    if not schema_path:
        yield path, node
        return
    head, rest = schema_path[0], schema_path[1:]
    if head is None and isinstance(node, list):
        for index, item in enumerate(node):
            yield from _values_at(item, rest, (*path, index))
    elif isinstance(head, str) and isinstance(node, Mapping) and head in node:
        yield from _values_at(node[head], rest, (*path, head))


@functools.cache
def _datetime_paths() -> tuple[_SchemaPath, ...]:
    """Every schema path in the lexicon whose string has ``format: datetime``."""
    lexicon = _session_lexicon()
    return tuple(_walk_schema(lexicon, lexicon["defs"]["main"]["record"], (), frozenset({"main"})))


def _walk_schema(
    lexicon: Mapping[str, Any], schema: Mapping[str, Any], path: _SchemaPath, seen: frozenset[str]
) -> Iterator[_SchemaPath]:
    """Yield datetime paths below ``schema``, following local refs.

    ``seen`` holds the defs on the current branch so a recursive ref stops
    instead of looping. Unions are not followed (the lexicon has none).
    """
    kind = schema.get("type")
    if kind == "string" and schema.get("format") == "datetime":
        yield path
    elif kind == "object":
        for name, prop in schema.get("properties", {}).items():
            yield from _walk_schema(lexicon, prop, (*path, name), seen)
    elif kind == "array":
        yield from _walk_schema(lexicon, schema["items"], (*path, None), seen)
    elif kind == "ref":
        name = _local_def_name(lexicon, schema["ref"])
        if name is not None and name not in seen:
            target = lexicon["defs"][name]
            target = target.get("record", target)  # a ref to a record def means its body
            yield from _walk_schema(lexicon, target, path, seen | {name})


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


# --- lexrpc, with field paths ------------------------------------------------


class _Frame:
    """One value lexrpc is validating: where it is and what it should be."""

    __slots__ = ("items_seen", "kind", "path")

    def __init__(self, path: _Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self.items_seen = 0  # array frames: index of the next item


@functools.cache
def _lexrpc_validator() -> Callable[[dict[str, Any]], None]:
    """Build (once) a lexrpc validator that reports field paths.

    lexrpc's errors only name the innermost property, without its parents or
    array index. lexrpc recurses through ``Base._validate_schema`` once per
    value, so a subclass keeps a per-thread stack of frames and turns the
    first error into a RecordValidationError at the failing frame's path.
    """
    from lexrpc.base import Base, ValidationError

    class _PathTrackingBase(Base):  # type: ignore[misc]  # lexrpc is untyped
        def __init__(self, lexicons: list[dict[str, Any]]) -> None:
            super().__init__(lexicons)
            self._local = threading.local()

        def _validate_schema(
            self,
            *,
            name: str,
            val: Any,
            type_name: str,
            lexicon: str,
            schema: dict[str, Any],
            ignore: Any = (),
        ) -> None:
            frames: list[_Frame] = self._local.__dict__.setdefault("frames", [])
            frame = _Frame(_child_path(frames, name), schema.get("type") or type_name)
            frames.append(frame)
            try:
                super()._validate_schema(
                    name=name,
                    val=val,
                    type_name=type_name,
                    lexicon=lexicon,
                    schema=schema,
                    ignore=ignore,
                )
            except ValidationError as exc:
                raise _located_error(frame, schema, val, exc) from exc
            finally:
                frames.pop()

    base = _PathTrackingBase([_session_lexicon()])

    def validate(record: dict[str, Any]) -> None:
        try:
            base.validate(SESSION_NSID, "record", record)
        except ValidationError as exc:  # raised outside any frame
            raise RecordValidationError("", str(exc)) from exc

    return validate


def _child_path(frames: list[_Frame], name: str) -> _Path:
    """Path of the value lexrpc is about to validate, from its parent frame.

    lexrpc names array items after the array, so an item's index is counted
    from the parent array frame instead.
    """
    if not frames:
        return ()  # the record itself
    parent = frames[-1]
    if parent.kind == "array":
        parent.items_seen += 1
        return (*parent.path, parent.items_seen - 1)
    return (*parent.path, name)


def _located_error(
    frame: _Frame, schema: Mapping[str, Any], val: Any, exc: Exception
) -> RecordValidationError:
    """Translate a lexrpc error raised while validating ``val`` at ``frame``."""
    path = frame.path
    if isinstance(val, dict) and (culprit := _bad_property(schema, val)) is not None:
        # Missing/null properties are reported by the parent object's frame.
        prop, reason = culprit
        return RecordValidationError(_join((*path, prop)), reason)
    allowed = schema.get("enum")
    if allowed and val not in allowed:
        return RecordValidationError(
            _join(path),
            f"{_short_repr.repr(val)} is not one of the allowed values: "
            + ", ".join(repr(v) for v in allowed),
        )
    if schema.get("format") == "datetime" and isinstance(val, str):
        return _datetime_error(path, val)  # lexrpc's message shows a mangled value
    return RecordValidationError(
        _join(path), f"{_lexrpc_reason(exc)} ({frame.kind} field), got {_short_repr.repr(val)}"
    )


def _bad_property(schema: Mapping[str, Any], val: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first property lexrpc rejects in the object itself, in its order."""
    required = schema.get("required", [])
    nullable = schema.get("nullable", [])
    for prop, prop_schema in schema.get("properties", {}).items():
        if prop not in val and prop in required:
            return prop, "is required but missing"
        if (
            prop in val
            and val[prop] is None
            and prop not in nullable
            and prop_schema.get("type") != "null"
        ):
            return prop, "must not be null"
    return None


# lexrpc formats errors as "<type> <name> with value `<repr>`: <reason>". A
# pattern, not compiled at import: re compiles it (and caches it) at the first error.
_LEXRPC_REASON = r".* with value `.*`: (?P<reason>.*)"


def _lexrpc_reason(exc: Exception) -> str:
    """The reason part of a lexrpc message, or all of it if the shape changed."""
    match = re.fullmatch(_LEXRPC_REASON, str(exc), re.DOTALL)
    return match["reason"] if match else str(exc)
