"""A small pygame game that records its play session, focus included.

A square (arrow keys) collects the green specimens in a garden. The agent's
pygame integration sees every event of the loop: the window losing focus or
being minimized puts the session in the background (five minutes there and it
ends; coming back before keeps it), closing the window ends it as
``app_close``. Needs ``pip install 'anisota-agent[pygame]'``.

Run::

    python examples/pygame_game.py --data-dir /tmp/anisota-example
    anisota-agent --data-dir /tmp/anisota-example sessions

``--frames N`` plays N frames by itself, then quits as a player would (the
tests run it so, with ``SDL_VIDEODRIVER=dummy``).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import pygame

from anisota_agent import Agent
from anisota_agent.integrations.pygame import handle_event

SIZE = (320, 240)
STEP = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, help="where the SQLite store lives")
    parser.add_argument("--frames", type=int, help="play this many frames by itself, then quit")
    args = parser.parse_args(argv)

    agent = Agent(client_version="1.0.0", data_dir=args.data_dir).start()
    pygame.display.init()
    screen = pygame.display.set_mode(SIZE)
    pygame.display.set_caption("Anisota garden")
    clock = pygame.time.Clock()
    rng = random.Random(7)
    player = pygame.Rect(10, 10, 16, 16)
    specimen = pygame.Rect(rng.randrange(SIZE[0] - 8), rng.randrange(SIZE[1] - 8), 8, 8)
    rkey = agent.start_session(entry_point="direct", authentication_method="anonymous")
    agent.page("/garden")
    frame, running = 0, True
    while running:
        for event in pygame.event.get():
            handle_event(agent, event)  # focus, minimize, hide, and QUIT
            if event.type == pygame.QUIT:
                running = False
        if args.frames is not None:  # autoplay: walk to the specimen, quit when done
            dx, dy = specimen.centerx - player.centerx, specimen.centery - player.centery
            player.move_ip(max(-STEP, min(STEP, dx)), max(-STEP, min(STEP, dy)))
            if frame == args.frames:
                pygame.event.post(pygame.event.Event(pygame.QUIT))
        else:
            keys = pygame.key.get_pressed()
            player.move_ip(
                STEP * (keys[pygame.K_RIGHT] - keys[pygame.K_LEFT]),
                STEP * (keys[pygame.K_DOWN] - keys[pygame.K_UP]),
            )
            if any(keys):
                agent.touch()
        player.clamp_ip(screen.get_rect())
        if player.colliderect(specimen):
            agent.action("specimensCollected")
            specimen.topleft = (rng.randrange(SIZE[0] - 8), rng.randrange(SIZE[1] - 8))
        screen.fill((24, 32, 24))
        pygame.draw.rect(screen, (90, 200, 90), specimen)
        pygame.draw.rect(screen, (230, 230, 200), player)
        pygame.display.flip()
        clock.tick(60)
        frame += 1
    pygame.display.quit()
    agent.close()  # the session ended at QUIT; close() writes it out
    print(f"session {rkey} recorded in {agent.status().store_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
