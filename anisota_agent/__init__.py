"""anisota-agent: client-side session telemetry for AT Protocol games.

Embed it in a game::

    from anisota_agent import Agent

    agent = Agent(client_version="1.4.2").start()
    agent.start_session(entry_point="direct", authentication_method="oauth")
    agent.page("/garden")
    agent.close()

Importing this package is cheap: the store, HTTP client and lexicon validator
are imported by the agent's background threads when they need them.
"""

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
    "RecordValidationError",
    "SystemClock",
    "__version__",
    "local_sessions",
    "validate_record",
]
