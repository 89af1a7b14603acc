"""Timing and volume: machine-regular arrivals, and volume far above the tier's clients.

Scripts send at a fixed cadence; people and real applications do not. The regularity
statistic is 1 minus the coefficient of variation of inter-arrival gaps (1.0: a metronome).
Volume compares the client's queries in the last ``BURST_SECONDS`` with the same count for
the median client of its tier (the engine keeps the population's medians). Ten minutes is
long enough to smooth a person's burst of follow-ups and short enough that a script
stands out within its first minute, whatever its pace over a day.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from modelfence.detect.features import Query, View
from modelfence.detect.reference import Reference

MIN_GAPS = 30
BURST_SECONDS = 600.0
MIN_BURST = 10  # fewer queries than this in ten minutes is never "volume"


def recent_queries(queries: Sequence[Query] | Iterable[Query], seconds: float = BURST_SECONDS) -> int:
    """How many of ``queries`` (oldest first) fall in the ``seconds`` up to the latest.

    A sequence (a client's window is a deque) is read from its newest end without a copy:
    the engine counts every client's window each population pass.
    """
    ordered = queries if isinstance(queries, Sequence) else list(queries)
    if not ordered:
        return 0
    start = ordered[-1].event.ts - seconds
    count = 0
    for query in reversed(ordered):
        if query.event.ts < start:
            break
        count += 1
    return count


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


class AroundTheClock:
    """Distinct clock hours with activity in the client's last day (after a full day).

    People sleep; a harvesting script runs 24/7. Honest automation runs 24/7 too, which
    is why the threshold comes from calibration on real honest traffic when it has any.
    """

    code = "around_the_clock"
    direction: Literal[1, -1] = 1
    default_threshold: float | None = 20.0

    def statistic(self, view: View, reference: Reference | None) -> float | None:
        state = view.state
        if state is None or not state.hours or (state.hours[-1] + 1) * 3600 - state.first_ts < 86_400:
            return None
        latest = state.hours[-1]
        return float(sum(latest - hour < 24 for hour in state.hours))

    def describe(self, value: float, threshold: float) -> str:
        return f"active in {value:.0f} of the last 24 hours"


class Volume:
    """Queries in the last ten minutes relative to the tier's median client; needs
    ``tier_median`` (that count for the tier's median client)."""

    code = "volume_vs_tier"
    direction: Literal[1, -1] = 1
    default_threshold: float | None = 10.0

    def __init__(self) -> None:
        self.tier_median: dict[str, float] = {}

    def statistic(self, view: View, reference: Reference | None) -> float | None:
        count = recent_queries(view.queries)
        if count < MIN_BURST:
            return None
        median = self.tier_median.get(view.queries[-1].event.tier)
        return count / median if median else None

    def describe(self, value: float, threshold: float) -> str:
        return f"{value:.0f}× the tier's median query volume in ten minutes"
