"""The host's ``before_record`` guard: the last look at a record before it may become public.

Records on a PDS are public. :func:`apply_guard` hands the guard a deep copy of a
finished record; what it returns is what is stored and uploaded, once the lexicon
accepts it. ``None`` keeps the session off the PDS (outbox ``withheld``), and so
does a guard that raises, returns something that is not a record, or a record
the lexicon refuses: counted, logged without the record's content, and the agent
goes on. Runs on the recorder's thread, never the game's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from .lexicon import RecordValidationError, validate_record
from .records import to_json

__all__ = [
    "GUARD_ERRORS",
    "GUARD_INVALID",
    "GUARD_WITHHELD",
    "Guarded",
    "apply_guard",
    "raised_in",
]

logger = logging.getLogger("anisota_agent")

#: ``status().counters`` names: the guard returned None (the host's choice), raised,
#: or returned a non-record or an invalid record.
GUARD_WITHHELD = "guard_withheld"
GUARD_ERRORS = "guard_errors"
GUARD_INVALID = "guard_invalid"


class Guarded(NamedTuple):
    """What the guard made of one finished record."""

    #: The record to store: the guard's (valid, a plain copy) or, when withheld, the original.
    record: dict[str, Any]
    #: Why the session is kept off the PDS (None: it may be uploaded).
    withheld: str | None
    #: The counter this outcome adds one to (None: the guard's record was taken).
    counter: str | None


def apply_guard(
    guard: Callable[[dict[str, Any]], Any], record: dict[str, Any], rkey: str
) -> Guarded:
    """Run ``guard`` on a deep copy of ``record`` (session ``rkey``); never raises.

    The log says which session and what went wrong (an exception's type and
    where it was raised, an invalid record's field), never a value of the record.
    """
    # Here, on the recorder's thread: the uplink imports this module (for raised_in)
    # when the game's thread starts the agent, and json alone costs ~1 ms.
    import copy
    import json

    try:
        result = guard(copy.deepcopy(record))
    except BaseException as failure:  # the guard's bug, even a SystemExit, is not the agent's
        reason = f"before_record raised {type(failure).__name__}"
        logger.error(
            "%s for session %s (in %s): the session stays local, not uploaded",
            reason,
            rkey,
            raised_in(failure),
        )
        return Guarded(record, reason, GUARD_ERRORS)
    if result is None:
        logger.info("before_record kept session %s local: it will not be uploaded", rkey)
        return Guarded(record, "before_record returned None", GUARD_WITHHELD)
    if not isinstance(result, dict):
        reason = f"before_record returned a {type(result).__name__}, not a record (a dict)"
        logger.error("%s for session %s: the session stays local, not uploaded", reason, rkey)
        return Guarded(record, reason, GUARD_INVALID)
    try:
        validate_record(result)
        # A plain copy through the one JSON encoding: what is stored is what goes to
        # the PDS, and nothing the guard keeps a reference to can change it later.
        plain = json.loads(to_json(result))
    except Exception as error:  # RecordValidationError, or text no codec takes
        where = error.field or "the record" if isinstance(error, RecordValidationError) else None
        reason = (
            f"before_record returned an invalid record (at {where})"
            if where is not None
            else f"before_record returned a record that cannot be encoded ({type(error).__name__})"
        )
        logger.error("%s for session %s: the session stays local, not uploaded", reason, rkey)
        return Guarded(record, reason, GUARD_INVALID)
    return Guarded(plain, None, None)


def raised_in(failure: BaseException) -> str:
    """Where ``failure`` was raised, as ``file:line in function``: a clue without its message."""
    where = failure.__traceback__
    if where is None:
        return "an unknown place"
    while where.tb_next is not None:
        where = where.tb_next
    code = where.tb_frame.f_code
    return f"{code.co_filename}:{where.tb_lineno} in {code.co_name}"
