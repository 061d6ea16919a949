"""pyglet (and arcade, whose windows are pyglet windows): the window's events.

:func:`watch` pushes handlers onto the window: ``on_deactivate`` and
``on_hide`` put the game in the background, ``on_activate`` and ``on_show``
bring it back (:meth:`~anisota_agent.Agent.set_foreground`), ``on_close`` ends
the session as ``app_close``. The handlers return nothing, so the window's own
(and the game's) handlers of the same events still run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pyglet

if TYPE_CHECKING:
    from anisota_agent import Agent

__all__ = ["watch"]


def watch(agent: Agent, window: pyglet.window.BaseWindow) -> Callable[[], None]:
    """Follow ``window``'s focus, visibility and close with ``agent``, from now on.

    Returns a function that stops watching (removes the handlers).
    """

    def on_activate() -> None:
        agent.set_foreground(True)

    def on_deactivate() -> None:
        agent.set_foreground(False)

    def on_close() -> None:
        agent.end_session("app_close")

    handlers = {
        "on_activate": on_activate,
        "on_show": on_activate,
        "on_deactivate": on_deactivate,
        "on_hide": on_deactivate,
        "on_close": on_close,
    }
    window.push_handlers(**handlers)

    def unwatch() -> None:
        window.remove_handlers(**handlers)

    return unwatch
