"""Pacing: sending as fast as the published lines allow, and no faster, on human hours.

A thief that knows the lines (requests, tokens and dollars of its tier, the volume
detector's queries per ten minutes) keeps every sliding window under a share of each,
sends with exponential gaps (a Poisson process: never regular) and only during a fixed
set of hours of the day, so that "active around the clock" never sees it either.

    pacer = Pacer(Pace.under(Knowledge()), rng, horizon=7 * DAY, mean_units=8)
    at = pacer.propose(units=8, tokens=8, usd=0.0001)   # None: past the horizon
    pacer.commit(at, 8, 8, 0.0001)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from modelfence.config import TierConfig
from modelfence.redteam.tariff import Tariff
from modelfence.redteam.thieves.base import DAY, Asset, Knowledge
from modelfence.redteam.traffic import PlannedRequest

TEN_MINUTES = 600.0
MINUTE = 60.0
HOUR = 3600.0
SHARE = 0.8  # of every line a paced thief allows itself
ACTIVE_HOURS = 16  # of 24: "around the clock" needs more than 20
MAX_BATCH = 16  # inputs per request: an application's batch, not a scraper's


@dataclass(frozen=True, slots=True)
class Pace:
    """The lines a careful thief stays under, already scaled down to its own share."""

    queries_per_ten_minutes: float
    requests_per_minute: float = math.inf
    tokens_per_minute: float = math.inf
    usd_per_day: float = math.inf
    active_hours: int = ACTIVE_HOURS
    load: float = 0.5  # mean rate as a share of the lines: Poisson bursts stay under them
    split_day: bool = False  # two blocks of hours with short nights, or one long night

    @classmethod
    def under(cls, knowledge: Knowledge, share: float = SHARE) -> Pace:
        """``share`` of every published line."""
        return cls(share * knowledge.volume_line, share * knowledge.requests_per_minute,
                   share * knowledge.tokens_per_minute, share * knowledge.usd_per_day)

    @classmethod
    def of_tier(cls, tier: TierConfig, volume_line: float, share: float, *, active_hours: int = ACTIVE_HOURS,
                split_day: bool = False) -> Pace:
        """``share`` of a configured tier's limits (None: no limit) and of ``volume_line``."""
        def scaled(limit: float | None) -> float:
            return math.inf if limit is None else share * limit

        return cls(share * volume_line, scaled(tier.requests_per_minute), scaled(tier.tokens_per_minute),
                   scaled(tier.usd_per_day), active_hours=active_hours, split_day=split_day)

    def batches(self, asset: Asset) -> tuple[int, int]:
        """The smallest and largest batch: an application's size (at most ``MAX_BATCH``),
        leaving room for a few requests in any ten minutes; one task for a chat."""
        if asset == "chat":
            return 1, 1
        high = max(1, min(MAX_BATCH, int(self.queries_per_ten_minutes // 4)))
        return max(1, high // 2), high


def awake_hours(rng: np.random.Generator, count: int, split: bool) -> np.ndarray:
    """Which hours of the day ``[24]`` bool are active: ``count`` of them from a random
    start, in one block or in two halves with equal nights between them."""
    start = int(rng.integers(24))
    if split:
        half, night = count // 2, (24 - count) // 2
        hours = [*range(half), *range(half + night, half + night + count - half)]
    else:
        hours = list(range(count))
    active = np.zeros(24, dtype=bool)
    active[[(start + h) % 24 for h in hours]] = True
    return active


class _Window:
    """Amounts sent in the last ``span`` seconds, and when another one would fit."""

    def __init__(self, span: float, cap: float) -> None:
        self.span = span
        self.cap = cap
        self.sent: deque[tuple[float, float]] = deque()

    def fits_at(self, t: float, amount: float) -> float:
        """The earliest time from ``t`` at which ``amount`` more stays within ``cap`` over
        any ``span`` (the detector counts both ends of its window)."""
        if math.isinf(self.cap):
            return t
        if amount > self.cap:
            raise ValueError(f"one request of {amount} is over the line of {self.cap}")
        inside = [(s, a) for s, a in self.sent if s >= t - self.span]
        total = sum(a for _, a in inside)
        for s, a in inside:
            if total + amount <= self.cap:
                break
            total -= a
            t = s + self.span + 1e-3
        return t

    def add(self, t: float, amount: float) -> None:
        self.sent.append((t, amount))
        while self.sent and self.sent[0][0] < t - self.span:
            self.sent.popleft()


class Pacer:
    """Send times for one account under a :class:`Pace` (see module docstring)."""

    def __init__(self, pace: Pace, rng: np.random.Generator, *, horizon: float, mean_units: float) -> None:
        self.pace = pace
        self.rng = rng
        self.horizon = horizon
        self.active = awake_hours(rng, pace.active_hours, pace.split_day)
        rate = pace.load * pace.queries_per_ten_minutes / TEN_MINUTES / max(mean_units, 1.0)
        if not math.isinf(pace.requests_per_minute):
            rate = min(rate, pace.load * pace.requests_per_minute / MINUTE)
        self.mean_gap = 1.0 / rate
        self.clock = 0.0
        self._windows = {
            "queries": _Window(TEN_MINUTES, pace.queries_per_ten_minutes),
            "requests": _Window(MINUTE, pace.requests_per_minute),
            "tokens": _Window(MINUTE, pace.tokens_per_minute),
        }
        self._usd: dict[int, float] = {}

    def propose(self, units: int, tokens: int, usd: float) -> float | None:
        """When the next request could go (after an exponential gap, in an active hour,
        under every line), or None past the horizon. Nothing is recorded until ``commit``."""
        t = self.clock + float(self.rng.exponential(self.mean_gap))
        while t < self.horizon:
            ready = max(self._awake(t), *(w.fits_at(t, a) for w, a in zip(
                self._windows.values(), (units, 1, tokens), strict=True)), self._affordable(t, usd))
            if ready <= t:
                return t
            t = ready + float(self.rng.exponential(MINUTE))  # never right on the line
        return None

    def commit(self, at: float, units: int, tokens: int, usd: float) -> None:
        for window, amount in zip(self._windows.values(), (units, 1, tokens), strict=True):
            window.add(at, amount)
        day = int(at // DAY)
        self._usd[day] = self._usd.get(day, 0.0) + usd
        self.clock = at

    def defer(self, until: float) -> None:
        """Send nothing before ``until``."""
        self.clock = max(self.clock, until)

    def _awake(self, t: float) -> float:
        hour = int(t // HOUR)
        for ahead in range(25):
            if self.active[(hour + ahead) % 24]:
                return t if ahead == 0 else (hour + ahead) * HOUR + float(self.rng.uniform(0, 10 * MINUTE))
        raise ValueError("a pace needs at least one active hour")

    def _affordable(self, t: float, usd: float) -> float:
        day = int(t // DAY)
        if usd > self.pace.usd_per_day:
            raise ValueError(f"one request of ${usd} is over the daily line of ${self.pace.usd_per_day}")
        return t if self._usd.get(day, 0.0) + usd <= self.pace.usd_per_day else (day + 1) * DAY


def schedule(requests: Iterable[PlannedRequest], pacer: Pacer, tariff: Tariff, *, client: str,
             usd: float) -> list[PlannedRequest]:
    """Paced send times for ``requests`` in order, until the horizon or ``usd`` run out."""
    out: list[PlannedRequest] = []
    spent = 0.0
    for request in requests:
        tokens, price = tariff.charge(request)
        at = pacer.propose(request.units, tokens, price)
        if at is None or spent + price > usd:
            break
        pacer.commit(at, request.units, tokens, price)
        spent += price
        out.append(replace(request, at=at, client=client))
    return out
