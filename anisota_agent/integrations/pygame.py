"""pygame: the window's focus, minimize and hide events, and ``QUIT``.

Call :func:`handle_event` for every event of the game's loop (pygame 2)::

    for event in pygame.event.get():
        handle_event(agent, event)
        ...

``WINDOWFOCUSLOST``, ``WINDOWMINIMIZED`` and ``WINDOWHIDDEN`` put the game in
the background, ``WINDOWFOCUSGAINED``, ``WINDOWRESTORED`` and ``WINDOWSHOWN``
bring it back (:meth:`~anisota_agent.Agent.set_foreground`); ``QUIT`` ends the
session as ``app_close``. Every other event is ignored: one dictionary look-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pygame

if TYPE_CHECKING:
    from anisota_agent import Agent

__all__ = ["handle_event"]

#: Event type → whether the window is in front after it.
_FOREGROUND: dict[int, bool] = {
    pygame.WINDOWFOCUSLOST: False,
    pygame.WINDOWMINIMIZED: False,
    pygame.WINDOWHIDDEN: False,
    pygame.WINDOWFOCUSGAINED: True,
    pygame.WINDOWRESTORED: True,
    pygame.WINDOWSHOWN: True,
}


def handle_event(agent: Agent, event: pygame.event.Event) -> None:
    """Tell ``agent`` what ``event`` says of the game's window (no I/O, never raises)."""
    foreground = _FOREGROUND.get(event.type)
    if foreground is not None:
        agent.set_foreground(foreground)
    elif event.type == pygame.QUIT:
        agent.end_session("app_close")
