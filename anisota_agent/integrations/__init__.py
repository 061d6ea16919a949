"""Window-focus integrations for game frameworks, one module each.

None is imported by ``import anisota_agent`` nor by this package: import the
one the game uses, after installing its extra.

- :mod:`anisota_agent.integrations.pygame` (``anisota-agent[pygame]``):
  ``handle_event(agent, event)`` for every event of the game's loop;
- :mod:`anisota_agent.integrations.qt` (``anisota-agent[qt]``, PySide6):
  ``watch(agent, app)`` on the ``QGuiApplication``;
- :mod:`anisota_agent.integrations.pyglet` (``anisota-agent[pyglet]``, arcade
  windows too): ``watch(agent, window)``.

Each turns the framework's focus, minimize and hide events into
:meth:`~anisota_agent.Agent.set_foreground`, and its quit into the end of the
session.
"""

from __future__ import annotations

__all__: list[str] = []
