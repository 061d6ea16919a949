"""Qt (PySide6): the application's state, and its quit.

:func:`watch` connects to the ``QGuiApplication`` (a ``QApplication`` is one):
``applicationStateChanged`` to ``ApplicationActive`` brings the game to the
foreground, to any other state (inactive, hidden, suspended) puts it in the
background (:meth:`~anisota_agent.Agent.set_foreground`); ``aboutToQuit``
closes the agent (its session ends as ``app_close``), within the agent's close
timeout, so the application's exit never hangs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication

if TYPE_CHECKING:
    from anisota_agent import Agent

__all__ = ["watch"]


def watch(agent: Agent, app: QGuiApplication) -> Callable[[], None]:
    """Follow ``app``'s state and quit with ``agent``, from now on.

    The state the application is in already is not reported: a game starts in
    the foreground until Qt says otherwise. Returns a function that stops
    watching (disconnects both).
    """

    def state_changed(state: Qt.ApplicationState) -> None:
        agent.set_foreground(state == Qt.ApplicationState.ApplicationActive)

    def about_to_quit() -> None:
        agent.close()

    app.applicationStateChanged.connect(state_changed)
    app.aboutToQuit.connect(about_to_quit)

    def unwatch() -> None:
        app.applicationStateChanged.disconnect(state_changed)
        app.aboutToQuit.disconnect(about_to_quit)

    return unwatch
