"""The few lines a game needs: start the agent, record a session, close.

Shows the whole embedding: ``Agent(...).start()`` at launch, one play session
with a handful of activity calls, ``close()`` at quit (it ends a running
session as ``app_close`` and writes it out within a bounded time). Then it
prints the finished session's record key and the agent's status.

Run::

    python examples/minimal_embed.py --data-dir /tmp/anisota-example
    anisota-agent --data-dir /tmp/anisota-example show <rkey>

Without ``--data-dir`` it records where a game would: the platform's user data
dir (``ANISOTA_AGENT_DATA_DIR`` overrides it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anisota_agent import Agent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, help="where the SQLite store lives")
    args = parser.parse_args(argv)

    # At launch: cheap, returns at once; a background thread opens the store.
    agent = Agent(client_version="1.4.2", data_dir=args.data_dir).start()
    try:
        # While playing: each call takes a lock, updates memory and returns.
        rkey = agent.start_session(entry_point="direct", authentication_method="anonymous")
        agent.page("/home")
        agent.page("/garden")
        agent.feature("specimen-lens")
        agent.action("specimensCollected", count=2)
        agent.progress(xp=1250, level=4)
        agent.response(ms=84.2, ok=True)
        agent.end_session("user_initiated")
    finally:
        # At quit: ends any running session as app_close and flushes it to disk.
        written = agent.close()

    if rkey is None:
        print("tracking is disabled (DO_NOT_TRACK): nothing was recorded")
        return 0
    status = agent.status()
    print(f"session:  {rkey}")
    print(f"store:    {status.store_path} ({status.store_mode})")
    print("outbox:   " + ", ".join(f"{state} {n}" for state, n in status.outbox.items()))
    print(f"dropped:  {status.dropped or 'nothing'}")
    print(f"written:  {'yes' if written else 'NO (close timed out)'}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
