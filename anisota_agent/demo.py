"""A short simulated play session, recorded end to end by a real agent."""

from __future__ import annotations

import random
import threading
from pathlib import Path

from .agent import Agent
from .status import AgentStatus

#: (route, feature, action) steps of the simulated game, played in order.
__all__ = [
    "play_demo",
]

_SCRIPT = (
    ("/home", None, "feedsLoaded"),
    ("/garden", "specimen-lens", "specimensCollected"),
    ("/feed", None, "postsViewed"),
    ("/garden", None, "itemsCollected"),
    ("/rewards", "daily-reward", "dailyRewardsClaimed"),
    ("/profile", None, "levelUps"),
)


def play_demo(data_dir: Path | None, seconds: float, seed: int = 7) -> tuple[str, AgentStatus]:
    """Play ``seconds`` of a simulated session; returns its record key and the status.

    Every call goes through the public API exactly as a game would make it,
    including one failed API response.
    """
    rng = random.Random(seed)
    pause = threading.Event()  # never set: waits stand in for the game's frames
    step_time = seconds / len(_SCRIPT)
    agent = Agent(client_version="demo-1.0", data_dir=data_dir).start()
    rkey = agent.start_session(
        entry_point="direct", authentication_method="anonymous", is_new_user=False
    )
    if rkey is None:  # DO_NOT_TRACK is set
        agent.close()
        raise SystemExit("tracking is disabled (DO_NOT_TRACK): the demo records nothing")
    xp = 1200
    agent.progress(xp, level=4)
    for number, (route, feature, action) in enumerate(_SCRIPT):
        agent.page(route)
        if feature:
            agent.feature(feature)
        agent.action(action, count=rng.randint(1, 3))
        agent.response(rng.uniform(40, 180), ok=number != 2)
        xp += rng.randint(10, 60)
        agent.progress(xp, level=4 + (action == "levelUps"))
        pause.wait(step_time)
    agent.end_session("user_initiated")
    agent.close(timeout=5.0)
    return rkey, agent.status()
