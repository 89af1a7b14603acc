"""When simulated clients send requests: human rhythm for people, steady rates for bots.

All times are *virtual* seconds since the scenario started. A live run compresses them
(``VirtualClock``) so that a simulated day passes in a minute; replay keeps them as they
are, so detectors see the rhythm a real day would have. Randomness comes from a seeded
``numpy.random.Generator`` passed in, never from global state.

    rng = np.random.default_rng(7)
    times = HumanTiming().arrivals(rng, horizon=86_400.0)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DAY = 86_400.0


def diurnal_weight(t: float, phase: float = 0.0) -> float:
    """Relative activity at virtual time ``t``: 1 at the afternoon peak, ~0.1 at night.

    ``phase`` (seconds) shifts the day, e.g. for users in other time zones.
    """
    hour_angle = 2 * math.pi * (((t + phase) % DAY) / DAY - 15 / 24)
    return 0.1 + 0.9 * (0.5 + 0.5 * math.cos(hour_angle)) ** 2


@dataclass(frozen=True, slots=True)
class HumanTiming:
    """Sessions start at a diurnally modulated Poisson rate; inside a session a person
    thinks for a log-normal time between requests (median ``think_median`` seconds).
    """

    sessions_per_day: float = 3.0
    requests_per_session: float = 4.0  # mean of a geometric distribution
    think_median: float = 25.0
    think_sigma: float = 0.9

    def arrivals(self, rng: np.random.Generator, horizon: float, phase: float = 0.0) -> list[float]:
        times: list[float] = []
        peak_rate = self.sessions_per_day / DAY / 0.4  # the weight averages ~0.4 over a day
        t = 0.0
        while True:
            t += rng.exponential(1 / peak_rate)
            if t >= horizon:
                return times
            if rng.random() > diurnal_weight(t, phase):  # thinning: fewer sessions at night
                continue
            at = t
            for _ in range(rng.geometric(1 / self.requests_per_session)):
                if at >= horizon:
                    break
                times.append(at)
                at += float(rng.lognormal(math.log(self.think_median), self.think_sigma))


@dataclass(frozen=True, slots=True)
class SteadyTiming:
    """A script: ``rate`` requests per second with exponential jitter (or none)."""

    rate: float
    jitter: bool = True

    def arrivals(self, rng: np.random.Generator, horizon: float, phase: float = 0.0) -> list[float]:
        count = int(horizon * self.rate)
        if not self.jitter:
            return [phase + i / self.rate for i in range(count)]
        gaps = rng.exponential(1 / self.rate, size=count)
        return [float(t) for t in phase + np.cumsum(gaps) if t < horizon + phase]


class VirtualClock:
    """Maps virtual scenario time onto wall time, ``compression`` times faster.

    ``sleep_until(at)`` waits until virtual time ``at`` has come; injected ``now`` and
    ``sleep`` let tests run without real waiting.
    """

    def __init__(
        self,
        compression: float,
        *,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if compression <= 0:
            raise ValueError("compression must be positive")
        self.compression = compression
        self._now = now
        self._start = now()

    def virtual_now(self) -> float:
        return (self._now() - self._start) * self.compression

    def delay_until(self, at: float) -> float:
        """Wall-clock seconds to wait before virtual time ``at`` (0 if it has passed)."""
        return max(0.0, at / self.compression - (self._now() - self._start))
