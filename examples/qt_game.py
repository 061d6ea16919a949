"""A small Qt (PySide6) game that records its play session, focus included.

Click the green specimens in the garden to collect them. The agent's Qt
integration follows the application's state: any state but active (another
window in front, minimized, hidden) puts the session in the background (five
minutes there and it ends; coming back before keeps it); quitting closes the
agent, which ends the session as ``app_close``. Needs
``pip install 'anisota-agent[qt]'``.

Run::

    python examples/qt_game.py --data-dir /tmp/anisota-example
    anisota-agent --data-dir /tmp/anisota-example sessions

``--frames N`` plays N frames by itself (a click on each specimen), then quits
(the tests run it so, with ``QT_QPA_PLATFORM=offscreen``).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from PySide6.QtCore import QPoint, QRect, QTimer
from PySide6.QtGui import QColor, QGuiApplication, QMouseEvent, QPainter, QPaintEvent, QRasterWindow

from anisota_agent import Agent
from anisota_agent.integrations.qt import watch

WIDTH, HEIGHT = 320, 240


class Garden(QRasterWindow):
    """The game's window: one specimen at a time, collected by a click."""

    def __init__(self, agent: Agent) -> None:
        super().__init__()
        self.agent = agent
        self.rng = random.Random(7)
        self.specimen = QRect()
        self.place()
        self.resize(WIDTH, HEIGHT)
        self.setTitle("Anisota garden")

    def place(self) -> None:
        self.specimen = QRect(
            self.rng.randrange(WIDTH - 12), self.rng.randrange(HEIGHT - 12), 12, 12
        )

    def click(self, point: QPoint) -> None:
        self.agent.touch()
        if self.specimen.contains(point):
            self.agent.action("specimensCollected")
            self.place()
            self.update()

    def mousePressEvent(self, event: QMouseEvent) -> None:
        self.click(event.position().toPoint())

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.fillRect(QRect(0, 0, self.width(), self.height()), QColor(24, 32, 24))
        painter.fillRect(self.specimen, QColor(90, 200, 90))
        painter.end()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, help="where the SQLite store lives")
    parser.add_argument("--frames", type=int, help="play this many frames by itself, then quit")
    args = parser.parse_args(argv)

    app = QGuiApplication(sys.argv[:1])
    agent = Agent(client_version="1.0.0", data_dir=args.data_dir).start()
    watch(agent, app)  # focus and minimize → background; quit → agent.close()
    garden = Garden(agent)
    garden.show()
    rkey = agent.start_session(entry_point="direct", authentication_method="anonymous")
    agent.page("/garden")
    if args.frames is not None:
        frames = [0]

        def autoplay() -> None:
            frames[0] += 1
            garden.click(garden.specimen.center())
            if frames[0] >= args.frames:
                app.quit()

        timer = QTimer(app)
        timer.timeout.connect(autoplay)
        timer.start(16)
    app.exec()  # aboutToQuit has closed the agent: the session is written out
    print(f"session {rkey} recorded in {agent.status().store_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
