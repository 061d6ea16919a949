"""Where the app-password session is kept: a 0600 file, the OS keyring, or memory.

Plain standard library, so the uplink can ask whether a saved login exists
without importing httpx (a player who never logs in never pays for it).
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import json
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from ._files import make_private_dir, temp_path

__all__ = [
    "KEYRING_ENV",
    "MAX_TOKEN_FILE_BYTES",
    "SESSION_FILENAME",
    "FileTokenStore",
    "KeyringTokenStore",
    "MemoryTokenStore",
    "TokenStore",
    "token_store_for",
]

logger = logging.getLogger("anisota_agent")

#: A saved session (token file or keyring entry) bigger than this is not ours.
MAX_TOKEN_FILE_BYTES = 64 * 1024

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_POSIX = os.name == "posix"


def _parse_saved(raw: str | bytes, where: str) -> dict[str, Any] | None:
    """The saved session in ``raw``: a JSON object of at most
    :data:`MAX_TOKEN_FILE_BYTES`, or None (logged, naming ``where``) if it is not one.

    What the object holds is the session's business (``auth`` checks it).
    """
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        logger.error("ignoring %s: too large", where)
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        logger.error("ignoring %s: not valid JSON", where)
        return None
    if not isinstance(data, dict):
        logger.error("ignoring %s: not a JSON object", where)
        return None
    return data


class TokenStore(abc.ABC):
    """Where an app-password session's refresh JWT is kept between runs."""

    @abc.abstractmethod
    def load(self) -> dict[str, Any] | None:
        """The saved session, or None if there is none (or it cannot be trusted)."""

    @abc.abstractmethod
    def save(self, data: dict[str, Any]) -> None:
        """Replace the saved session with ``data``."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Forget the saved session (no error if there is none)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the session is kept, for ``status`` and ``doctor``."""


class MemoryTokenStore(TokenStore):
    """Keeps the session in this process only (nothing survives a restart)."""

    def __init__(self) -> None:
        self._data: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        """The saved session, if any."""
        return None if self._data is None else dict(self._data)

    def save(self, data: dict[str, Any]) -> None:
        """Keep a copy of ``data``."""
        self._data = dict(data)

    def clear(self) -> None:
        """Forget the session."""
        self._data = None

    def describe(self) -> str:
        """``"memory"``."""
        return "memory"


class FileTokenStore(TokenStore):
    """A JSON file readable by its owner only (mode 0600 from the moment it exists).

    Writes go to a temporary file created with mode 0600 in the same directory,
    then :func:`os.replace` it over the old one: a crash leaves either the old or
    the new session, never a torn or briefly world-readable file. On read, a file
    that others may read is repaired to 0600 with a warning (its token may have
    leaked: log in again to rotate it); one owned by another user, or that cannot
    be repaired, is refused. On Windows the permission checks are skipped: the
    file lives in the user's profile, protected by its ACLs.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        """The saved session; None if absent, unsafe or unreadable (logged)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | _O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as error:
            logger.error("cannot open the token file %s: %s", self.path, error)
            return None
        with os.fdopen(fd, "rb") as handle:
            if not self._permissions_safe(handle.fileno()):
                return None
            raw = handle.read(MAX_TOKEN_FILE_BYTES + 1)
        return _parse_saved(raw, f"the token file {self.path}")

    def _permissions_safe(self, fd: int) -> bool:
        if not _POSIX:
            return True
        info = os.fstat(fd)
        if info.st_uid != os.getuid():
            logger.error("refusing the token file %s: it belongs to another user", self.path)
            return False
        if info.st_mode & 0o077 == 0:
            return True
        logger.warning(
            "token file %s was readable by others (mode %o); restricting it to 0600 "
            "(log in again to rotate the session if others had access)",
            self.path,
            info.st_mode & 0o777,
        )
        try:
            os.fchmod(fd, 0o600)
        except OSError as error:
            logger.error("refusing the token file %s: cannot make it private: %s", self.path, error)
            return False
        return True

    def save(self, data: dict[str, Any]) -> None:
        """Atomically replace the file with ``data`` (mode 0600).

        Raises:
            OSError: the directory or file cannot be written.
        """
        payload = json.dumps(data, indent=2, sort_keys=True).encode()
        make_private_dir(self.path.parent)
        # A kill before the replace leaves this file behind: the next start's
        # Store.open removes it (remove_stale_temp_files knows the name).
        temp = temp_path(self.path)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                if _POSIX:
                    os.fchmod(handle.fileno(), 0o600)  # exactly 0600, whatever the umask
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        _fsync_dir(self.path.parent)

    def clear(self) -> None:
        """Delete the file (no error if it is absent)."""
        self.path.unlink(missing_ok=True)

    def describe(self) -> str:
        """The file's path."""
        return str(self.path)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; best effort (not every platform can open a dir)."""
    if not _POSIX:
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class KeyringTokenStore(TokenStore):
    """The OS credential store (macOS Keychain, Windows Credential Locker, Secret
    Service on Linux) through the optional ``keyring`` package.

    Raises:
        RuntimeError: ``keyring`` is not installed or has no usable backend; see
            :meth:`available`.
    """

    def __init__(self, service: str = "anisota-agent", username: str = "session") -> None:
        module = _import_keyring()
        if module is None:
            raise RuntimeError("the OS keyring is not available (pip install keyring)")
        self._keyring = module
        self.service = service
        self.username = username

    @staticmethod
    def available() -> bool:
        """True when ``keyring`` is importable and has a real backend."""
        return _import_keyring() is not None

    def load(self) -> dict[str, Any] | None:
        """The saved session, or None (absent, unreadable or locked keyring)."""
        try:
            raw = self._keyring.get_password(self.service, self.username)
        except Exception as error:  # keyring backends raise many kinds
            logger.error("cannot read the session from the keyring: %s", type(error).__name__)
            return None
        if raw is None:
            return None
        return _parse_saved(raw, f"the keyring entry {self.service}")

    def save(self, data: dict[str, Any]) -> None:
        """Store ``data`` as one JSON secret."""
        self._keyring.set_password(self.service, self.username, json.dumps(data))

    def clear(self) -> None:
        """Delete the secret (no error if it is absent)."""
        with contextlib.suppress(self._keyring.errors.PasswordDeleteError):
            self._keyring.delete_password(self.service, self.username)

    def describe(self) -> str:
        """The keyring backend and service name."""
        return f"keyring {type(self._keyring.get_keyring()).__name__} ({self.service})"


#: The app-password session's file (refresh token, 0600) in the data dir.
SESSION_FILENAME = "session.json"
#: ``1`` keeps the session in the OS keyring instead (``pip install keyring``).
KEYRING_ENV = "ANISOTA_AGENT_KEYRING"


def token_store_for(data_dir: Path, keyring: bool | None = None) -> TokenStore:
    """Where the app-password session of ``data_dir`` is kept.

    The OS keyring when asked for (``keyring=True``, or ``ANISOTA_AGENT_KEYRING=1``
    when None) and usable; otherwise a 0600 file in the data dir. The game and
    the CLI call this alike, so they find the same session.
    """
    if keyring is None:
        keyring = os.environ.get(KEYRING_ENV, "").strip() == "1"
    if keyring:
        if KeyringTokenStore.available():
            return KeyringTokenStore(username=str(data_dir))
        logger.warning("no usable OS keyring: keeping the session in a 0600 file")
    return FileTokenStore(data_dir / SESSION_FILENAME)


def _import_keyring() -> ModuleType | None:
    try:
        module = importlib.import_module("keyring")
    except ImportError:
        return None
    # keyring falls back to a backend that fails every call (no D-Bus session,
    # no Secret Service): treat that as "no keyring".
    try:
        backend = module.get_keyring()
    except Exception as error:  # a broken backend configuration
        logger.warning("the OS keyring is unusable: %s", type(error).__name__)
        return None
    if type(backend).__module__.startswith("keyring.backends.fail"):
        return None
    return module
