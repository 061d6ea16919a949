"""The player's own data, for a game's settings screen or a tool: what is kept locally.

Reads the store an agent keeps (the same file, opened on the caller's thread: call
it from a background thread or a settings screen, not from a frame).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from .checks import check_path

__all__ = ["local_sessions"]


def local_sessions(data_dir: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every session kept in the local store, oldest first, with its outbox state.

    Each item has ``rkey``, ``did``, ``outbox`` (one of
    :data:`~anisota_agent.store.OUTBOX_STATES`), ``uri`` and ``cid`` (once on the PDS),
    ``lastError``, ``backgroundMs`` (the time the game's window spent in the
    background: kept on this machine only, the record has no field for it)
    and the ``record`` itself: the lines ``anisota-agent export``
    writes. ``data_dir`` is the agent's (default: the platform's user data dir,
    or ``ANISOTA_AGENT_DATA_DIR``). A data dir where nothing was recorded yet
    yields nothing.
    """
    from pathlib import Path

    from .store import DB_FILENAME, Store, default_data_dir

    directory = default_data_dir() if data_dir is None else Path(check_path("data_dir", data_dir))
    path = directory / DB_FILENAME
    if not path.exists():
        return
    store = Store.open(path)
    try:
        for row in store.iter_sessions():
            yield {
                "rkey": row.rkey,
                "did": row.did,
                "outbox": row.outbox,
                "uri": row.uri,
                "cid": row.cid,
                "lastError": row.last_error,
                "backgroundMs": row.background_ms,
                "record": row.record,
            }
    finally:
        store.close()
