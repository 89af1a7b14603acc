"""Timing and volume: machine-regular arrivals, and volume far above the tier's clients.

Scripts send at a fixed cadence; people and real applications do not. The regularity
statistic is 1 minus the coefficient of variation of inter-arrival gaps (1.0: a metronome).
Volume compares the client's queries in the window span with the median client of its
tier, which the engine tracks as the population (``Population``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from modelfence.detect.features import View
from modelfence.detect.reference import Reference

MIN_GAPS = 30


class Regularity:
    code = "machine_timing"
    direction: Literal[1, -1] = 1
    default_threshold: float | None = 0.9

    def statistic(self, view: View, reference: Reference | None) -> float | None:
        times = np.array([e.ts for e in view.events])
        if len(times) <= MIN_GAPS:
            return None
        gaps = np.diff(times)
        mean = float(gaps.mean())
        if mean <= 0:
            return 1.0
        return 1.0 - float(gaps.std()) / mean

    def describe(self, value: float, threshold: float) -> str:
        return f"machine-regular timing (inter-arrival variation {1 - value:.0%})"


class Volume:
    """Queries per hour relative to the tier's median client; needs ``tier_median_rate``."""

    code = "volume_vs_tier"
    direction: Literal[1, -1] = 1
    default_threshold: float | None = 10.0

    def __init__(self) -> None:
        self.tier_median_rate: dict[str, float] = {}

    def statistic(self, view: View, reference: Reference | None) -> float | None:
        queries = view.queries
        if len(queries) < MIN_GAPS:
            return None
        median = self.tier_median_rate.get(queries[-1].event.tier)
        span = max(queries[-1].event.ts - queries[0].event.ts, 60.0)
        if not median:
            return None
        return (len(queries) / span * 3600.0) / median

    def describe(self, value: float, threshold: float) -> str:
        return f"query rate {value:.0f}× the tier median"
