"""When a training run stops besides its epochs: the time budget of --max-minutes, and SIGINT/SIGTERM.

`BudgetClock` counts the seconds spent in training steps, by the wall clock or this process's CPU
clock (--clock), carried across resumes: a resumed run starts from the seconds its checkpoint
recorded, so a budget counts on from there. Epoch-end checkpoints and sample grids run with the
clock paused. The cosine LR of SGDR (Loshchilov & Hutter 2017, arXiv:1608.03983) decays over the
budget's seconds (loop.py). `StopSignals` turns SIGINT and SIGTERM into a flag the loop reads
before each step, so the run saves last.pt and exits.

Example:
    clock = BudgetClock("cpu", banked=0.0, max_minutes=15)
    with StopSignals() as signals:
        clock.start()
        while not signals.received and clock.seconds() < clock.budget:
            ...  # one training step
        clock.pause()
"""

from __future__ import annotations

import math
import signal
import time
from types import FrameType
from typing import Any

CLOCK_READERS = {"wall": time.perf_counter, "cpu": time.process_time}
SECONDS_PER_MINUTE = 60
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class BudgetClock:
    """Seconds spent in training steps by the wall or the process CPU clock, carried across resumes
    (`banked`: the seconds of the checkpoint), and the budget they count against (inf without one)."""

    def __init__(self, clock: str, banked: float, max_minutes: float | None):
        self.read, self.banked = CLOCK_READERS[clock], banked
        self.since: float | None = None
        self.budget = math.inf if max_minutes is None else max_minutes * SECONDS_PER_MINUTE

    def start(self) -> None:
        self.since = self.read()

    def pause(self) -> None:
        if self.since is not None:
            self.banked += self.read() - self.since
            self.since = None

    def seconds(self) -> float:
        return self.banked + (self.read() - self.since if self.since is not None else 0.0)


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received`; the loop then saves and exits.

    A second signal gets the previous handler (Ctrl-C twice interrupts at once).
    """

    def __enter__(self) -> StopSignals:
        self.received: int | None = None
        self.previous: dict[int, Any] = {
            number: signal.signal(number, self._handle) for number in STOP_SIGNALS
        }
        return self

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.received = number
        signal.signal(number, self.previous[number])

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
