"""Tests for anisota_agent.lexicon: the shipped lexicon and record validation."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
from collections import OrderedDict
from typing import Any

import pytest
from agent_helpers import race

from anisota_agent.lexicon import (
    SESSION_NSID,
    RecordValidationError,
    _check_supported,
    _check_value,
    is_valid_datetime,
    load_session_lexicon,
    validate_record,
)

MINIMAL: dict[str, Any] = {
    "$type": SESSION_NSID,
    "startedAt": "2026-11-24T10:00:00.000Z",
    "status": "active",
    "platform": "desktop",
    "clientVersion": "1.2.3",
}

FULL: dict[str, Any] = {
    **MINIMAL,
    "status": "ended",
    "endedAt": "2026-11-24T11:00:00.000Z",
    "duration": 3_600_000,
    "createdAt": "2026-11-24T10:00:00.000Z",
    "updatedAt": "2026-11-24T11:00:00.000+01:00",
    "lastActivityAt": "2026-11-24T10:59:59.5Z",
    "endReason": "app_close",
    "parentSessionUri": "at://did:plc:abc/net.anisota.beta.game.session/3jzfcijpj2z2a",
    "relatedLogUris": ["at://did:plc:abc/net.anisota.beta.game.log/3jzfcijpj2z2b"],
    "relatedSessionUris": [],
    "relatedProgressUris": ["at://did:plc:abc/net.anisota.beta.game.progress/self"],
    "metadata": {
        "features": ["inventory", "map"],
        "networkCondition": "slow",
        "performanceMetrics": {"errorCount": 0, "averageResponseTime": 120},
    },
    "sessionContext": {
        "referrer": "https://example.com/",
        "isNewUser": False,
        "entryPoint": "deep_link",
        "authenticationMethod": "existing_session",
    },
    "activitySummary": {
        "currentXP": 0,
        "currentLevel": 1,
        "totalEvents": 42,
        "xpGainedThisSession": 0,
        "pagesVisited": ["/", "/map"],
        "gameActions": {
            "levelUps": 0,
            "feedsLoaded": 1,
            "postsViewed": 2,
            "itemsCollected": 3,
            "specimensCollected": 4,
            "dailyRewardsClaimed": 5,
        },
    },
    "someFutureField": {"nested": [1, "two", None, True]},  # unknown fields are allowed
}

# (dotted path, value) -> the field err.field must name.
REJECTIONS: list[tuple[str, Any, str]] = [
    # enums
    ("status", "paused", "status"),
    ("status", "Active", "status"),
    ("platform", "console", "platform"),
    ("endReason", "crash", "endReason"),
    ("metadata.networkCondition", "2g", "metadata.networkCondition"),
    ("sessionContext.entryPoint", "push", "sessionContext.entryPoint"),
    ("sessionContext.authenticationMethod", "password", "sessionContext.authenticationMethod"),
    # integer minimums
    ("duration", -1, "duration"),
    ("metadata.performanceMetrics.errorCount", -1, "metadata.performanceMetrics.errorCount"),
    (
        "metadata.performanceMetrics.averageResponseTime",
        -1,
        "metadata.performanceMetrics.averageResponseTime",
    ),
    ("activitySummary.currentXP", -1, "activitySummary.currentXP"),
    ("activitySummary.currentLevel", 0, "activitySummary.currentLevel"),
    ("activitySummary.totalEvents", -1, "activitySummary.totalEvents"),
    ("activitySummary.xpGainedThisSession", -1, "activitySummary.xpGainedThisSession"),
    *[
        (f"activitySummary.gameActions.{name}", -1, f"activitySummary.gameActions.{name}")
        for name in (
            "levelUps",
            "feedsLoaded",
            "postsViewed",
            "itemsCollected",
            "specimensCollected",
            "dailyRewardsClaimed",
        )
    ],
    # floats, in known integer fields and in fields the lexicon does not name
    ("duration", 1.0, "duration"),
    ("activitySummary.gameActions.levelUps", 1.5, "activitySummary.gameActions.levelUps"),
    ("someFutureField.nested", [1, 2.5], "someFutureField.nested[1]"),
    ("someFutureField", float("nan"), "someFutureField"),
    # bools where integers are required, and ints where a bool is
    ("duration", True, "duration"),
    ("activitySummary.currentLevel", True, "activitySummary.currentLevel"),
    ("metadata.performanceMetrics.errorCount", False, "metadata.performanceMetrics.errorCount"),
    ("sessionContext.isNewUser", 1, "sessionContext.isNewUser"),
    # wrong types, including inside arrays
    ("clientVersion", 123, "clientVersion"),
    ("duration", "60", "duration"),
    ("metadata", "fast", "metadata"),
    ("activitySummary.gameActions", [], "activitySummary.gameActions"),
    ("relatedLogUris", "at://x", "relatedLogUris"),
    ("relatedLogUris", ["at://a", 7], "relatedLogUris[1]"),
    ("relatedSessionUris", [None], "relatedSessionUris[0]"),
    (
        "activitySummary.pagesVisited",
        ["/", "/map", {"path": "/"}],
        "activitySummary.pagesVisited[2]",
    ),
    ("metadata.features", ["a", ["b"]], "metadata.features[1]"),
    ("relatedProgressUris", ("a", "b"), "relatedProgressUris"),  # tuple is not JSON
    ("someFutureField", {1, 2}, "someFutureField"),  # nor is a set
    # null in a non-nullable field
    ("endedAt", None, "endedAt"),
    # datetimes, every datetime field
    *[
        (name, value, name)
        for name in ("startedAt", "endedAt", "createdAt", "updatedAt", "lastActivityAt")
        for value in ("2026-11-24T10:00Z", "2026-11-24T10:00:00-00:00")
    ],
    ("startedAt", "2026-11-24t10:00:00Z", "startedAt"),
    ("startedAt", "2026-11-24T10:00:00z", "startedAt"),
    ("startedAt", "2026-11-24T10:00:00", "startedAt"),
    ("startedAt", "2026-02-30T10:00:00Z", "startedAt"),
    ("startedAt", "yesterday", "startedAt"),
    ("startedAt", 1_795_514_400_000, "startedAt"),
    # $type
    ("$type", "net.anisota.beta.game.log", "$type"),
    ("$type", None, "$type"),
]


def _with(record: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``record`` with the value at ``dotted`` replaced."""
    out = copy.deepcopy(record)
    *parents, last = dotted.split(".")
    node = out
    for name in parents:
        node = node[name]
    node[last] = value
    return out


def _rejected(record: Any) -> RecordValidationError:
    with pytest.raises(RecordValidationError) as info:
        validate_record(record)
    return info.value


def test_minimal_record_is_valid() -> None:
    validate_record(MINIMAL)


def test_full_record_is_valid() -> None:
    validate_record(FULL)


def test_full_record_covers_every_lexicon_property() -> None:
    defs = load_session_lexicon()["defs"]
    objects = [defs["main"]["record"], *(d for name, d in defs.items() if name != "main")]
    declared = {prop for obj in objects for prop in obj["properties"]}
    present: set[str] = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            present.update(node)
            for child in node.values():
                collect(child)

    collect(FULL)
    assert declared <= present


def test_validation_does_not_modify_the_record() -> None:
    record = copy.deepcopy(FULL)
    validate_record(record)
    assert record == FULL


def test_validate_accepts_any_mapping_at_the_top() -> None:
    validate_record(OrderedDict(MINIMAL))


@pytest.mark.parametrize(("dotted", "value", "field"), REJECTIONS)
def test_rejections_name_the_field(dotted: str, value: Any, field: str) -> None:
    err = _rejected(_with(FULL, dotted, value))
    assert err.field == field
    assert str(err).startswith(f"{field}: ")


@pytest.mark.parametrize("name", ["startedAt", "status", "platform", "clientVersion"])
def test_missing_required_field(name: str) -> None:
    record = dict(MINIMAL)
    del record[name]
    err = _rejected(record)
    assert err.field == name
    assert "missing" in str(err)


def test_missing_type() -> None:
    record = dict(MINIMAL)
    del record["$type"]
    assert _rejected(record).field == "$type"


def test_enum_message_lists_allowed_values() -> None:
    err = _rejected(_with(MINIMAL, "status", "paused"))
    for allowed in ("'active'", "'ended'", "'expired'", "'invalidated'", "'paused'"):
        assert allowed in str(err)


def test_float_message_explains_why() -> None:
    assert "floats are not allowed" in str(_rejected(_with(MINIMAL, "duration", 2.0)))
    assert "floats are not allowed" in str(_rejected({**MINIMAL, "unknown": 0.5}))


def test_non_string_keys_are_rejected() -> None:
    err = _rejected({**MINIMAL, "extra": {1: "one"}})
    assert err.field == "extra.1"
    assert "keys must be strings" in str(err)


def test_type_errors_say_what_was_expected() -> None:
    message = str(_rejected(_with(MINIMAL, "duration", True)))
    assert "integer" in message
    assert "bool" in message


def test_field_paths_are_right_under_concurrent_validation() -> None:
    # Each thread's record fails at a different depth; shared path-tracking
    # state between threads would mix the paths up.
    cases = [
        (
            _with(FULL, "activitySummary.gameActions.levelUps", -1),
            "activitySummary.gameActions.levelUps",
        ),
        (_with(FULL, "relatedLogUris", ["a", "b", 3]), "relatedLogUris[2]"),
        (_with(FULL, "status", "x"), "status"),
        (
            _with(FULL, "metadata.performanceMetrics.errorCount", -1),
            "metadata.performanceMetrics.errorCount",
        ),
    ]
    seen: list[set[str]] = [set() for _ in cases]

    def work(record: dict[str, Any], out: set[str]) -> None:
        for _ in range(300):
            try:
                validate_record(record)
            except RecordValidationError as err:
                out.add(err.field)

    validate_record(MINIMAL)  # build the shared validator before the race
    workers = [
        threading.Thread(target=work, args=(record, out))
        for (record, _), out in zip(cases, seen, strict=True)
    ]
    race(workers)
    assert seen == [{field} for _, field in cases]


def test_non_mapping_record() -> None:
    assert _rejected(["not", "a", "record"]).field == ""


def test_first_problem_in_lexicon_order_is_reported() -> None:
    record = _with(MINIMAL, "status", "nope")
    record["platform"] = "nope"
    assert _rejected(record).field == "status"


NESTED: dict[str, Any] = {
    "id": "com.example.nested",
    "defs": {
        "main": {
            "type": "record",
            "record": {
                "type": "object",
                "required": ["name"],
                "nullable": ["note"],
                "properties": {
                    "name": {"type": "string"},
                    "note": {"type": "string"},
                    "at": {"type": "string", "format": "datetime"},
                    "inner": {"type": "ref", "ref": "#inner"},
                    "log": {"type": "array", "items": {"type": "ref", "ref": "#inner"}},
                },
            },
        },
        "inner": {
            "type": "object",
            "properties": {
                "when": {"type": "string", "format": "datetime"},
                "stamps": {"type": "array", "items": {"type": "string", "format": "datetime"}},
                "count": {"type": "integer", "minimum": 1, "maximum": 9},
                "again": {"type": "ref", "ref": "com.example.nested#inner"},  # recursive
            },
        },
    },
}
BAD_TIME = "2026-11-24T10:00Z"


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"name": "n", "at": BAD_TIME}, "at"),
        ({"name": "n", "inner": {"when": BAD_TIME}}, "inner.when"),
        ({"name": "n", "inner": {"stamps": ["2026-11-24T10:00:00Z", BAD_TIME]}}, "inner.stamps[1]"),
        (
            {"name": "n", "log": [{}, {"again": {"again": {"when": BAD_TIME}}}]},
            "log[1].again.again.when",
        ),
        ({"name": "n", "inner": {"count": 10}}, "inner.count"),
        ({"name": "n", "log": [{"count": 0}]}, "log[0].count"),
        ({"note": None}, "name"),
        ({"name": None}, "name"),
    ],
)
def test_every_rule_applies_through_refs_and_arrays(record: dict[str, Any], field: str) -> None:
    with pytest.raises(RecordValidationError) as info:
        _check_value(NESTED, record, NESTED["defs"]["main"], ())
    assert info.value.field == field


def test_a_nested_record_that_keeps_the_rules_passes() -> None:
    _check_supported(NESTED, NESTED["defs"]["main"], "main")
    record = {"name": "n", "note": None, "log": [{"count": 9, "again": {"stamps": []}}]}
    _check_value(NESTED, record, NESTED["defs"]["main"], ())


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "string", "maxLength": 10}, "maxLength"),
        ({"type": "string", "format": "at-uri"}, "format at-uri"),
        ({"type": "union", "refs": ["#inner"]}, "type"),
        ({"type": "ref", "ref": "com.example.elsewhere#thing"}, "ref com.example.elsewhere#thing"),
        ({"type": "array", "items": {"type": "integer", "const": 3}}, "const"),
    ],
)
def test_a_construct_the_validator_does_not_enforce_is_refused(
    schema: dict[str, Any], named: str
) -> None:
    """A lexicon edit the validator would not enforce fails loudly, never passes records."""
    lexicon = copy.deepcopy(NESTED)
    lexicon["defs"]["inner"]["properties"]["new"] = schema
    with pytest.raises(ValueError, match=f"inner.*uses {named}"):
        _check_supported(lexicon, lexicon["defs"]["inner"], "inner")


def test_load_session_lexicon_is_the_shipped_file() -> None:
    lexicon = load_session_lexicon()
    assert lexicon["id"] == SESSION_NSID
    assert lexicon["defs"]["main"]["key"] == "tid"


def test_load_session_lexicon_returns_a_private_copy() -> None:
    load_session_lexicon()["defs"]["main"]["record"]["required"].clear()
    assert "status" in load_session_lexicon()["defs"]["main"]["record"]["required"]
    assert _rejected({k: v for k, v in MINIMAL.items() if k != "status"}).field == "status"


@pytest.mark.parametrize(
    "text",
    [
        "1985-04-12T23:20:50.123Z",
        "1985-04-12T23:20:50Z",
        "1985-04-12T23:20:50.123456789012Z",
        "1985-04-12T23:20:50.123+00:00",
        "1985-04-12T23:20:50.123-07:00",
        "0123-01-01T00:00:00.000Z",
        "2024-02-29T12:00:00Z",  # leap day
    ],
)
def test_is_valid_datetime_accepts(text: str) -> None:
    assert is_valid_datetime(text)
    validate_record(_with(MINIMAL, "startedAt", text))


@pytest.mark.parametrize(
    "text",
    [
        "1985-04-12T23:20Z",
        "1985-04-12t23:20:50Z",
        "1985-04-12T23:20:50z",
        "1985-04-12T23:20:50-00:00",
        "1985-04-12T23:20:50",
        "1985-02-29T23:20:50Z",
        "1985-04-31T23:20:50Z",
        "1985-04-12T23:20:50.Z",
        "",
    ],
)
def test_is_valid_datetime_rejects(text: str) -> None:
    assert not is_valid_datetime(text)


def test_validating_imports_no_general_validator() -> None:
    code = (
        "import sys, anisota_agent.lexicon\n"
        "anisota_agent.lexicon.validate_record({"
        "'$type': 'net.anisota.beta.game.session', 'startedAt': '2026-11-24T10:00:00Z',"
        " 'status': 'active', 'platform': 'web', 'clientVersion': '1'})\n"
        "assert 'lexrpc' not in sys.modules, 'lexrpc imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
