"""Shared fixtures: a real reference PDS on loopback (see ``pds_harness``).

``pds`` (session): one PDS for the whole run, rate limits off.
``pds_ratelimited`` (session, started only if a test asks for it): rate limits on.
``account`` (function): a fresh account on ``pds``.

If the node kit cannot be installed or started (no node/npm, no registry, ...),
tests using these fixtures are skipped with a loud reason, except under
``CI=true`` where they fail. The same holds for the game frameworks' fixtures
(``pygame_display``, ``qt_app``, ``pyglet_headless``), when the extra is not
installed or cannot open a window headless here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import freezegun
import freezegun.config
import pytest
from pds_harness import Account, PdsServer, PdsUnavailable, ensure_kit

# The agent reads its clock on its worker thread too. freezegun's default ignore
# list hands any call made under a ``threading`` frame the real time, which
# would leave the worker unfrozen while the test's thread is frozen.
freezegun.configure(
    default_ignore_list=[
        name for name in freezegun.config.DEFAULT_IGNORE_LIST if name not in ("threading", "queue")
    ]
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> NoReturn:
    _not_run(f"REAL-PDS TESTS NOT RUN: the test PDS is unavailable: {reason}")


def _not_run(message: str) -> NoReturn:
    """Skip the test with a loud warning, or fail it under ``CI=true``."""
    if _in_ci():
        pytest.fail(message, pytrace=False)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pds_kit(pytestconfig: pytest.Config) -> Path:
    """The installed node kit (cold install: about 3 min, then cached)."""
    reporter = pytestconfig.pluginmanager.getplugin("terminalreporter")

    def say(line: str) -> None:
        # Past pytest's capture: the line is for whoever watches the run.
        if reporter is not None:
            reporter.write_line(line)

    try:
        return ensure_kit(say=say)
    except PdsUnavailable as exc:
        _unavailable(exc.reason)


def _start(kit: Path, *, rate_limits: bool) -> PdsServer:
    server = PdsServer(kit)
    try:
        server.start(rate_limits=rate_limits)
    except PdsUnavailable as exc:
        _unavailable(exc.reason)
    return server


@pytest.fixture(scope="session")
def pds(pds_kit: Path) -> Iterator[PdsServer]:
    server = _start(pds_kit, rate_limits=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pds_ratelimited(pds_kit: Path) -> Iterator[PdsServer]:
    server = _start(pds_kit, rate_limits=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def account(pds: PdsServer, request: pytest.FixtureRequest) -> Account:
    return pds.create_account(request.node.name[:8])


@pytest.fixture(autouse=True)
def every_record_is_valid(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Fail any test in which the agent stores a record the lexicon refuses.

    Every write of a record goes through ``Store._write`` (checkpoints, finals) or
    ``Store.expire`` (recovery); both are checked here, in every test. A test that
    plants an invalid record on purpose says so with ``@pytest.mark.invalid_records``.
    """
    from anisota_agent.lexicon import RecordValidationError, validate_record
    from anisota_agent.store import Store

    if request.node.get_closest_marker("invalid_records"):
        yield
        return
    refused: list[str] = []

    def checked(method: Any, position: int) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                validate_record(args[position])
            except RecordValidationError as error:
                refused.append(str(error))
            return method(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(Store, "_write", checked(Store._write, 3))
    monkeypatch.setattr(Store, "expire", checked(Store.expire, 2))
    yield
    assert refused == [], f"the agent stored records the lexicon refuses: {refused}"


def _framework_unavailable(extra: str, failure: BaseException) -> NoReturn:
    _not_run(
        f"{extra.upper()} TESTS NOT RUN: {type(failure).__name__}: {failure} "
        f"(pip install -e '.[{extra}]')"
    )


@pytest.fixture(scope="session")
def pygame_display() -> Iterator[None]:
    """pygame's display on SDL's dummy video driver (no screen needed)."""
    os.environ["SDL_VIDEODRIVER"] = "dummy"
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    try:
        import pygame

        pygame.display.init()
    except Exception as failure:
        _framework_unavailable("pygame", failure)
    yield
    pygame.display.quit()


@pytest.fixture(scope="session")
def qt_app() -> Any:
    """The process's one ``QGuiApplication``, on Qt's offscreen platform."""
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    try:
        from PySide6.QtGui import QGuiApplication

        return QGuiApplication.instance() or QGuiApplication([])
    except Exception as failure:
        _framework_unavailable("qt", failure)


@pytest.fixture(scope="session")
def pyglet_headless() -> None:
    """pyglet in its headless mode (EGL: no display server needed)."""
    try:
        import pyglet

        pyglet.options["headless"] = True
        import pyglet.window

        pyglet.window.Window(16, 16, visible=False).close()
    except Exception as failure:
        _framework_unavailable("pyglet", failure)
