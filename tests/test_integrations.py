"""The pygame, Qt and pyglet integrations, with the real libraries, headless.

pygame runs on SDL's dummy video driver, its events posted to its real queue and
read back by a game loop; Qt on its offscreen platform, with the application's
real signals (its activation a real one, the rest emitted: offscreen has no
other window to lose focus to); pyglet in its headless mode, events dispatched
through the window's own dispatcher. Time is the agent's injected clock.
Without a framework these tests skip loudly, and fail under ``CI=true``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from agent_helpers import stored_record
from test_focus import ManualClock, ms_between

from anisota_agent import Agent


class Driver(Protocol):
    """A framework's window, moved the way the player would move it."""

    def lose_focus(self) -> None: ...
    def gain_focus(self) -> None: ...
    def minimize(self) -> None: ...
    def restore(self) -> None: ...
    def quit(self) -> None: ...


class PygameDriver:
    def __init__(self, agent: Agent) -> None:
        import pygame

        from anisota_agent.integrations.pygame import handle_event

        self.pygame, self.agent, self.handle_event = pygame, agent, handle_event
        pygame.display.set_mode((64, 48))
        self.loop()  # what the window said of itself when it opened

    def loop(self) -> None:
        """One pass of the game's event loop."""
        for event in self.pygame.event.get():
            self.handle_event(self.agent, event)

    def post(self, *kinds: int) -> None:
        for kind in kinds:
            self.pygame.event.post(self.pygame.event.Event(kind))
        self.loop()

    def lose_focus(self) -> None:
        self.post(self.pygame.WINDOWFOCUSLOST)

    def gain_focus(self) -> None:
        self.post(self.pygame.WINDOWFOCUSGAINED)

    def minimize(self) -> None:
        self.post(self.pygame.WINDOWFOCUSLOST, self.pygame.WINDOWMINIMIZED)

    def restore(self) -> None:
        self.post(self.pygame.WINDOWRESTORED, self.pygame.WINDOWFOCUSGAINED)

    def quit(self) -> None:
        self.post(self.pygame.QUIT)


class QtDriver:
    def __init__(self, agent: Agent, app: Any) -> None:
        from PySide6.QtCore import Qt
        from PySide6.QtGui import QWindow

        from anisota_agent.integrations.qt import watch

        self.app, self.states = app, Qt.ApplicationState
        self.unwatch = watch(agent, app)
        self.window = QWindow()
        self.window.resize(64, 48)
        self.window.show()
        self.window.requestActivate()  # a real activation (the first time: Inactive → Active)
        app.processEvents()

    def emit(self, state: Any) -> None:
        self.app.applicationStateChanged.emit(state)
        self.app.processEvents()

    def lose_focus(self) -> None:
        self.emit(self.states.ApplicationInactive)

    def gain_focus(self) -> None:
        self.emit(self.states.ApplicationActive)

    def minimize(self) -> None:
        self.window.showMinimized()
        self.emit(self.states.ApplicationHidden)

    def restore(self) -> None:
        self.window.showNormal()
        self.emit(self.states.ApplicationActive)

    def quit(self) -> None:
        from PySide6.QtCore import QTimer

        QTimer.singleShot(0, self.app.quit)
        self.app.exec()  # aboutToQuit, emitted by Qt as its loop ends

    def close(self) -> None:
        self.unwatch()
        self.window.destroy()


class PygletDriver:
    def __init__(self, agent: Agent) -> None:
        import pyglet

        from anisota_agent.integrations.pyglet import watch

        self.window = pyglet.window.Window(64, 48)
        watch(agent, self.window)

    def dispatch(self, *events: str) -> None:
        for event in events:
            self.window.dispatch_event(event)
        self.window.dispatch_events()

    def lose_focus(self) -> None:
        self.dispatch("on_deactivate")

    def gain_focus(self) -> None:
        self.dispatch("on_activate")

    def minimize(self) -> None:
        self.dispatch("on_deactivate", "on_hide")

    def restore(self) -> None:
        self.dispatch("on_show", "on_activate")

    def quit(self) -> None:
        self.dispatch("on_close")  # the window's own handler closes it after ours


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def agent(tmp_path: Path, clock: ManualClock) -> Iterator[Agent]:
    with Agent("1.0", data_dir=tmp_path, clock=clock, background_timeout=300.0).start() as agent:
        yield agent


@pytest.fixture(params=["pygame", "qt", "pyglet"])
def window(request: pytest.FixtureRequest, agent: Agent) -> Iterator[Driver]:
    """The agent watching a real window of each framework."""
    made: Callable[[], Any]
    if request.param == "pygame":
        request.getfixturevalue("pygame_display")
        made = lambda: PygameDriver(agent)  # noqa: E731
    elif request.param == "qt":
        app = request.getfixturevalue("qt_app")
        made = lambda: QtDriver(agent, app)  # noqa: E731
    else:
        request.getfixturevalue("pyglet_headless")
        made = lambda: PygletDriver(agent)  # noqa: E731
    driver = made()
    yield driver
    if isinstance(driver, QtDriver):
        driver.close()
    elif isinstance(driver, PygletDriver) and not driver.window.has_exit:
        driver.window.close()


def test_background_past_the_timeout_ends_the_session_at_the_focus_loss(
    window: Driver, agent: Agent, clock: ManualClock, tmp_path: Path
) -> None:
    rkey = str(agent.start_session())
    clock.advance(30)
    agent.touch()
    went_behind = clock.iso()
    window.lose_focus()
    clock.advance(300.5)
    assert agent.flush(sync=False)
    assert agent.status().session is None
    record = stored_record(tmp_path, rkey)
    assert (record["status"], record["endReason"]) == ("ended", "inactivity")
    assert abs(ms_between(went_behind, record["endedAt"])) <= 50


def test_back_before_the_timeout_is_the_same_session(
    window: Driver, agent: Agent, clock: ManualClock, tmp_path: Path
) -> None:
    rkey = agent.start_session()
    window.lose_focus()
    clock.advance(299)
    window.gain_focus()
    clock.advance(299)  # the return was the player's presence
    assert agent.flush(sync=False)
    assert agent.status().session == rkey


def test_minimize_and_restore(
    window: Driver, agent: Agent, clock: ManualClock, tmp_path: Path
) -> None:
    rkey = str(agent.start_session())
    window.minimize()
    clock.advance(120)
    window.restore()
    assert agent.status().session == rkey
    clock.advance(10)
    window.minimize()
    minimized = clock.iso()
    clock.advance(301)
    assert agent.flush(sync=False)
    record = stored_record(tmp_path, rkey)
    assert record["endReason"] == "inactivity" and record["endedAt"] == minimized
    window.restore()  # back: play resumes, as a continuation
    second = agent.status().session
    assert second not in (None, rkey)


def test_quit_ends_the_session_as_app_close(
    window: Driver, agent: Agent, clock: ManualClock, tmp_path: Path
) -> None:
    rkey = str(agent.start_session())
    clock.advance(3)
    window.quit()
    assert agent.status().session is None
    assert agent.flush(sync=False) or isinstance(window, QtDriver)  # Qt closed the agent
    record = stored_record(tmp_path, rkey)
    assert (record["status"], record["endReason"]) == ("ended", "app_close")
    assert record["duration"] == 3_000


def test_a_poller_of_timed_requests_does_not_keep_a_session_behind(
    window: Driver, agent: Agent, clock: ManualClock, tmp_path: Path
) -> None:
    rkey = str(agent.start_session())
    went_behind = clock.iso()
    window.lose_focus()
    for _ in range(40):  # a poll every 10 s for 400 s
        clock.advance(10)
        agent.report_request(25.0, "ok")
    assert agent.flush(sync=False)
    record = stored_record(tmp_path, rkey)
    assert record["endReason"] == "inactivity" and record["endedAt"] == went_behind


def test_focus_events_with_no_session_running(
    window: Driver, agent: Agent, clock: ManualClock, tmp_path: Path
) -> None:
    window.lose_focus()
    window.gain_focus()
    window.minimize()
    window.restore()
    assert agent.status().session is None
    assert agent.status().dropped.get("calls_without_session", 0) == 0
    rkey = agent.start_session()  # in front: only the inactivity timeout runs
    clock.advance(400)
    assert agent.flush(sync=False)
    assert agent.status().session == rkey
