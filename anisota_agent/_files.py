"""The data dir's files are the player's alone: the dir 0700, every file in it 0600.

The data dir holds the player's DID and handle, every session not yet public,
and the refresh token; another user of the machine must read none of it,
whatever the umask of the process that made them. Each function here is used
by every place that creates or opens something in the data dir (the store, the
token file, and through them the CLI); none runs on the game's thread.

Permission bits are POSIX: elsewhere (Windows) every function leaves modes
alone (the data dir lives in the user's profile, protected by its ACLs), and
only creates the directory.

Plain standard library (psutil only when a stale temp file is there to judge),
imported only by the background threads and the CLI.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
import time
from pathlib import Path

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "STALE_TEMP_SECONDS",
    "create_private_file",
    "make_private_dir",
    "remove_stale_temp_files",
    "temp_path",
    "tighten",
]

logger = logging.getLogger("anisota_agent")

#: The data dir's mode, and every file's in it.
DIR_MODE = 0o700
FILE_MODE = 0o600
#: Group and other bits: what :func:`tighten` takes away.
_OTHERS = 0o077

_POSIX = os.name == "posix"

#: ``.<name>.<pid>.<8 hex digits>.tmp``: what :func:`temp_path` makes, and nothing else.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp")
#: A temp file of a live pid older than this is stale all the same. A write
#: (create, write, fsync, rename) takes milliseconds: a temp file this old
#: belongs to a dead writer whose pid was reused since (on a busy machine, or in
#: a container, where every run may get the same pid, this very process's too).
STALE_TEMP_SECONDS = 600.0


def make_private_dir(path: Path) -> None:
    """Create the data dir ``path`` with mode 0700, or make an existing one private.

    Missing parents are created as the platform makes them (only the data dir
    itself holds the player's data). A dir this call creates is set to exactly
    0700, whatever the umask; an existing one this user owns loses its group and
    other bits (0755 becomes 0700; a read-only 0500 stays read-only). A failure
    to change the mode is logged, not raised: the store still works.

    Raises:
        OSError: the dir cannot be created (or ``path`` is a file).
    """
    try:
        path.mkdir(mode=DIR_MODE, parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise
        tighten(path)
        return
    _set_mode(path, DIR_MODE)


def create_private_file(path: Path) -> None:
    """Make sure the file ``path`` exists with mode 0600 before SQLite opens it.

    SQLite creates a database (and its ``-wal``/``-shm``, which take the main
    file's mode) with the umask's 0644: created here first, empty (SQLite
    takes an empty file for a new database), with exactly 0600. An existing
    file (a store made by an older version) is tightened. When the file cannot
    be created (no such dir, a read-only disk, a directory in the way), nothing
    is raised: SQLite then fails to open it with its own error.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        tighten(path)
        return
    except OSError as error:
        logger.debug("cannot create %s ahead of SQLite: %s", path, error)
        return
    try:
        if _POSIX:
            os.fchmod(fd, FILE_MODE)  # exactly 0600, whatever the umask
    except OSError as error:
        logger.warning("cannot make %s private: %s", path, error)
    finally:
        os.close(fd)


def tighten(path: Path) -> None:
    """Take the group and other bits off ``path`` (a file or dir) if this user owns it.

    Nothing happens if ``path`` is absent, already private, or another user's
    (then its owner decides); a failure to change it is logged.
    """
    if not _POSIX:
        return
    try:
        info = os.stat(path)
    except OSError:
        return
    mode = stat.S_IMODE(info.st_mode)
    if not mode & _OTHERS or info.st_uid != os.getuid():
        return
    _set_mode(path, mode & ~_OTHERS)


def _set_mode(path: Path, mode: int) -> None:
    if not _POSIX:
        return
    try:
        os.chmod(path, mode)
    except OSError as error:
        logger.warning("cannot make %s private (mode %o): %s", path, mode, error)


def temp_path(path: Path) -> Path:
    """A fresh temp name beside ``path``, for an atomic replace of it.

    ``.<name>.<pid>.<8 hex digits>.tmp``: the pid says whose it is, so that
    :func:`remove_stale_temp_files` can tell a dead writer's from a live one's.
    """
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Remove the temp files of :func:`temp_path` that a killed writer left in ``directory``.

    A temp file is stale when the pid in its name runs no process, or when it is
    older than :data:`STALE_TEMP_SECONDS` (its pid reused since). The temp file
    of a process writing right now is left alone: its pid is alive and the file
    is fresh. Returns the files removed; errors are logged, never raised.
    """
    try:
        entries = [
            entry
            for entry in os.scandir(directory)
            if _TEMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
        ]
    except OSError as error:
        logger.debug("cannot look for stale temp files in %s: %s", directory, error)
        return []
    if not entries:
        return []  # the usual case: no import of psutil (~20 ms) before the first write
    import psutil

    removed: list[Path] = []
    now = time.time()
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        assert match is not None
        try:
            fresh = now - entry.stat(follow_symlinks=False).st_mtime < STALE_TEMP_SECONDS
            if fresh and psutil.pid_exists(int(match["pid"])):
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # its writer renamed it, or another process removed it
        except OSError as error:
            logger.warning("cannot remove the stale temp file %s: %s", entry.path, error)
            continue
        removed.append(Path(entry.path))
    if removed:
        logger.info(
            "removed %d temp file(s) left by a killed process in %s", len(removed), directory
        )
    return removed
