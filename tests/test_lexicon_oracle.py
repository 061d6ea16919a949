"""Our validator against lexrpc's, the general one: they agree on every record.

The agent validates with its own walk of the one lexicon it ships
(:mod:`anisota_agent.lexicon`); lexrpc, a test dependency only, is the oracle.
Records are drawn along the lexicon: valid ones, and valid ones with one value
made wrong (another JSON type, ``None``, under a minimum, outside an enum, not
a datetime), so that each rule alone decides. Left out, as the agent is stricter
there on purpose (``test_lexicon.py`` covers it): datetimes lexrpc lets through
(``2026-11-24T10:00Z``) and floats, which the PDS refuses anywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from lexrpc.base import Base, ValidationError

from anisota_agent.lexicon import (
    SESSION_NSID,
    RecordValidationError,
    load_session_lexicon,
    validate_record,
)

LEXICON = load_session_lexicon()
MAIN = LEXICON["defs"]["main"]["record"]
#: Values of every JSON type but float: what a wrong value may be instead.
OTHERS = [None, 0, -1, 3, True, False, "", "x", [], ["x"], {}, {"a": 1}]


@functools.cache
def oracle() -> Base:
    return Base([load_session_lexicon()])


def resolved(schema: dict[str, Any]) -> dict[str, Any]:
    return LEXICON["defs"][schema["ref"].lstrip("#")] if schema["type"] == "ref" else schema


def valid(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that fit ``schema``."""
    schema = resolved(schema)
    kind = schema["type"]
    if kind == "object":
        properties = {name: valid(sub) for name, sub in schema["properties"].items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {name: s for name, s in properties.items() if name in required},
            optional={name: s for name, s in properties.items() if name not in required},
        )
    if kind == "array":
        return st.lists(valid(schema["items"]), max_size=3)
    if kind == "integer":
        return st.integers(schema.get("minimum", -5), schema.get("minimum", 0) + 5)
    if kind == "boolean":
        return st.booleans()
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if schema.get("format") == "datetime":
        return st.sampled_from(["2026-11-24T10:00:00.000Z", "1985-04-12T23:20:50.123-07:00"])
    return st.text(max_size=5)


def wrong(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A value ``schema`` refuses, or now and then one it happens to take."""
    schema = resolved(schema)
    near: list[Any] = []
    if "minimum" in schema:
        near.append(schema["minimum"] - 1)
    if "enum" in schema:
        near.append(schema["enum"][0].upper())
    if schema.get("format") == "datetime":
        near += ["yesterday", "2026-02-30T10:00:00Z"]
    return st.sampled_from(near + OTHERS)


def slots(value: Any, schema: dict[str, Any]) -> Iterator[tuple[Any, Any, dict[str, Any]]]:
    """Every place of ``value`` that a value could be put in: (container, key, schema)."""
    schema = resolved(schema)
    if schema["type"] == "object" and isinstance(value, dict):
        for name, sub in schema["properties"].items():
            yield value, name, sub
            if name in value:
                yield from slots(value[name], sub)
    elif schema["type"] == "array" and isinstance(value, list):
        for index, item in enumerate(value):
            yield value, index, schema["items"]
            yield from slots(item, schema["items"])


def ours(record: dict[str, Any]) -> bool:
    try:
        validate_record(record)
    except RecordValidationError:
        return False
    return True


def lexrpc(record: dict[str, Any]) -> bool:
    try:
        oracle().validate(SESSION_NSID, "record", record)
    except ValidationError:
        return False
    return True


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    """A valid record, or (as often) one with one value made wrong."""
    record: dict[str, Any] = {"$type": SESSION_NSID, **draw(valid(MAIN))}
    if draw(st.booleans()):
        container, key, schema = draw(st.sampled_from(list(slots(record, MAIN))))
        container[key] = draw(wrong(schema))
    return record


@settings(max_examples=1000, deadline=None)
@given(records())
def test_the_agent_and_lexrpc_accept_the_same_records(record: dict[str, Any]) -> None:
    assert ours(record) == lexrpc(record), record


def test_both_see_records_of_each_kind() -> None:
    """The strategy draws valid and invalid records alike (else the agreement says little)."""
    seen = {True: 0, False: 0}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(records())
    def draw(record: dict[str, Any]) -> None:
        seen[lexrpc(record)] += 1

    draw()
    # A wrong value sometimes fits (3 for an integer): about a quarter come out invalid.
    assert seen[True] >= 30 and seen[False] >= 30, seen
