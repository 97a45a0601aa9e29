"""Where an OpenFL round's time goes, per phase, for the benchmarks."""

from __future__ import annotations

import json
import os
import time


class RoundTiming:
    """Seconds per phase of one OpenFL round, appended as one JSON line to ``$FEDFAIR_TIMING_LOG``
    when it is set (collaborators and the aggregator; benchmarks read it)."""

    def __init__(self, who: str, fl_round: int = 0) -> None:
        self.who, self.fl_round = who, int(fl_round)
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def lap(self, phase: str) -> None:
        """Time since the previous lap (or since this object was made) goes to ``phase``."""
        now = time.perf_counter()
        self.add(phase, now - self._last)
        self._last = now

    def write(self) -> None:
        path = os.environ.get("FEDFAIR_TIMING_LOG")
        if path and self.phases:
            line = {"site": self.who, "round": self.fl_round,
                    **{k: round(v, 6) for k, v in sorted(self.phases.items())}}
            with open(path, "a") as fh:
                fh.write(json.dumps(line) + "\n")
