"""Host time per stage of the engine's steps, on every rank, when ``SERVER_STEP_PROFILE=1``.

Only decode steps are profiled (a step that turns out not to be one is cancelled). A stage's time is the wall
time from the previous mark of the same step to its own mark, so the stages of a step add up to the step; a stage
that ends in a device sync (reading sampled tokens) includes the wait for the device. Off by default: then every
mark is a call of an empty method (:class:`NoStepProfile`). ``bench_decode.py`` prints rank 0's table per cell, and
each worker logs its own at shutdown.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict


class StepProfile:
    """Sums of host time per named stage over the profiled steps (see the module docstring)."""

    enabled = True

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.pending: dict[str, float] = {}
        self.steps = 0
        self.last = 0.0
        self.active = False

    def start(self) -> None:
        self.pending.clear()
        self.active = True
        self.last = time.perf_counter()

    def cancel(self) -> None:
        """This step is not profiled (not a decode step); its marks so far are dropped."""
        self.active = False
        self.pending.clear()

    def mark(self, stage: str) -> None:
        if not self.active:
            return
        now = time.perf_counter()
        self.pending[stage] = self.pending.get(stage, 0.0) + now - self.last
        self.last = now

    def end(self) -> None:
        if self.active:
            self.steps += 1
            for k, v in self.pending.items():
                self.totals[k] += v
        self.cancel()

    def reset(self) -> None:
        self.totals.clear()
        self.steps = 0

    def table(self) -> str:
        """``stage ms/step`` for every stage, in the order first seen."""
        n = max(1, self.steps)
        return "  ".join(f"{k} {v / n * 1e3:.3f}" for k, v in self.totals.items()) + f"  (ms/step over {n} steps)"


class NoStepProfile:
    """The profile when it is off: every call does nothing, so the call sites need no test."""

    enabled = False

    def start(self) -> None: ...

    def cancel(self) -> None: ...

    def mark(self, stage: str) -> None: ...

    def end(self) -> None: ...

    def reset(self) -> None: ...

    def table(self) -> str:
        return "step profile off (set SERVER_STEP_PROFILE=1)"


PROFILE: StepProfile | NoStepProfile = StepProfile() if os.environ.get("SERVER_STEP_PROFILE") == "1" \
    else NoStepProfile()
