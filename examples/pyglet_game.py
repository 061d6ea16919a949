"""A small pyglet game that records its play session, focus included.

A square (arrow keys) collects the green specimens in a garden. The agent's
pyglet integration (arcade windows are pyglet windows too) watches the window:
deactivated or hidden puts the session in the background (five minutes there
and it ends; coming back before keeps it), closing the window ends it as
``app_close``. Needs ``pip install 'anisota-agent[pyglet]'``.

Run::

    python examples/pyglet_game.py --data-dir /tmp/anisota-example
    anisota-agent --data-dir /tmp/anisota-example sessions

``--frames N`` plays N frames by itself, then closes its window (the tests run
it so, with ``PYGLET_HEADLESS=true``: no display server needed).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import pyglet
from pyglet.window import key

from anisota_agent import Agent
from anisota_agent.integrations.pyglet import watch

WIDTH, HEIGHT = 320, 240
STEP = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, help="where the SQLite store lives")
    parser.add_argument("--frames", type=int, help="play this many frames by itself, then quit")
    args = parser.parse_args(argv)

    agent = Agent(client_version="1.0.0", data_dir=args.data_dir).start()
    window = pyglet.window.Window(WIDTH, HEIGHT, caption="Anisota garden")
    watch(agent, window)  # focus and visibility → background; close → app_close
    keys = key.KeyStateHandler()
    window.push_handlers(keys)
    rng = random.Random(7)
    batch = pyglet.graphics.Batch()
    player = pyglet.shapes.Rectangle(10, 10, 16, 16, color=(230, 230, 200), batch=batch)
    specimen = pyglet.shapes.Rectangle(0, 0, 8, 8, color=(90, 200, 90), batch=batch)

    def place() -> None:
        specimen.position = (rng.randrange(WIDTH - 8), rng.randrange(HEIGHT - 8))

    place()
    frames = [0]

    def update(_dt: float) -> None:
        frames[0] += 1
        if args.frames is not None:  # autoplay: walk to the specimen, close when done
            dx, dy = specimen.x - player.x, specimen.y - player.y
            player.x += max(-STEP, min(STEP, dx))
            player.y += max(-STEP, min(STEP, dy))
            if frames[0] >= args.frames:
                window.dispatch_event("on_close")  # as the player's close button does
                return
        else:
            moved_x = keys[key.RIGHT] - keys[key.LEFT]
            moved_y = keys[key.UP] - keys[key.DOWN]
            player.x += STEP * moved_x
            player.y += STEP * moved_y
            if moved_x or moved_y:
                agent.touch()
        if abs(player.x - specimen.x) < 12 and abs(player.y - specimen.y) < 12:
            agent.action("specimensCollected")
            place()

    def on_draw() -> None:
        window.clear()
        batch.draw()

    window.push_handlers(on_draw=on_draw)

    rkey = agent.start_session(entry_point="direct", authentication_method="anonymous")
    agent.page("/garden")
    pyglet.clock.schedule_interval(update, 1 / 60)
    pyglet.app.run(1 / 60)  # returns once the window closed
    agent.close()
    print(f"session {rkey} recorded in {agent.status().store_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
