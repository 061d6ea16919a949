"""anisota-agent: client-side session telemetry for AT Protocol games.

Embed it in a game::

    from anisota_agent import Agent

    agent = Agent(client_version="1.4.2").start()
    agent.start_session(entry_point="direct", authentication_method="oauth")
    agent.page("/garden")
    agent.close()

Importing this package is cheap: the store, HTTP client and lexicon validator
are imported by the agent's background threads when they need them, and
:mod:`anisota_agent.remote` (the records on the PDS, for a settings screen) at
the first use of one of its names.
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .agent import Agent
from .clock import Clock, SystemClock
from .data import local_sessions
from .lexicon import RecordValidationError, validate_record
from .records import (
    AUTHENTICATION_METHODS,
    ENTRY_POINTS,
    GAME_ACTIONS,
    HOST_END_REASONS,
    PLATFORMS,
)
from .settings import CONSENT_STATES
from .status import AgentStatus

if TYPE_CHECKING:
    from .remote import (
        DeleteReport,
        RemoteAccount,
        RemoteError,
        delete_remote_sessions,
        remote_sessions,
    )

__all__ = [
    "AUTHENTICATION_METHODS",
    "CONSENT_STATES",
    "ENTRY_POINTS",
    "GAME_ACTIONS",
    "HOST_END_REASONS",
    "PLATFORMS",
    "Agent",
    "AgentStatus",
    "Clock",
    "DeleteReport",
    "RecordValidationError",
    "RemoteAccount",
    "RemoteError",
    "SystemClock",
    "__version__",
    "delete_remote_sessions",
    "local_sessions",
    "remote_sessions",
    "validate_record",
]

#: Names of :mod:`anisota_agent.remote`, imported at first use (about 1 ms of
#: class creation that a game's start need not pay).
_REMOTE = frozenset(
    {"DeleteReport", "RemoteAccount", "RemoteError", "delete_remote_sessions", "remote_sessions"}
)


def __getattr__(name: str) -> Any:
    """A name of :mod:`anisota_agent.remote`, imported now (PEP 562)."""
    if name in _REMOTE:
        from . import remote

        return getattr(remote, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The package's names, the lazily imported ones included."""
    return sorted(set(globals()) | _REMOTE)
