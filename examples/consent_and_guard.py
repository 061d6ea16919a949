"""Ask the player first, and publish only what they would: consent and a guard.

Records on a PDS are public. This game starts the agent with ``consent="pending"``
(sessions are recorded locally, nothing is uploaded until the player says yes)
and a ``before_record`` guard that keeps only the referrer's origin
(``https://anisota.net/profile/alice`` becomes ``https://anisota.net``). It
plays one session, then plays the player granting consent, and prints the
stored record and the agent's consent.

Run::

    python examples/consent_and_guard.py --data-dir /tmp/anisota-example
    anisota-agent --data-dir /tmp/anisota-example consent
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from anisota_agent import Agent, local_sessions


def referrer_origin_only(record: dict[str, Any]) -> dict[str, Any]:
    """Keep only the scheme and host of the referrer (the agent already drops the
    query string and fragment); everything else goes as recorded."""
    context = record.get("sessionContext", {})
    if "referrer" in context:
        parts = urlsplit(context["referrer"])
        context["referrer"] = f"{parts.scheme}://{parts.netloc}"
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, help="where the SQLite store lives")
    args = parser.parse_args(argv)

    agent = Agent(
        client_version="1.4.2",
        data_dir=args.data_dir,
        consent="pending",  # until the player answers; their answer is kept
        before_record=referrer_origin_only,  # runs on the agent's thread, not the game's
    ).start()
    try:
        rkey = agent.start_session(
            entry_point="deep_link", referrer="https://anisota.net/profile/alice?tab=garden"
        )
        agent.page("/garden")
        agent.end_session("user_initiated")
        # The settings screen: the player says yes (no: "denied" deletes what is local).
        agent.set_consent("granted")
        agent.flush(sync=False)
        consent = agent.status().consent
    finally:
        agent.close()
    for line in local_sessions(args.data_dir):
        if line["rkey"] == rkey:
            print(json.dumps(line["record"]["sessionContext"]))
    print(f"consent: {consent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
