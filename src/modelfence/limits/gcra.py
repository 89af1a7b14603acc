"""GCRA (generic cell rate algorithm): the rate-limit arithmetic, with no I/O and no clock.

A rate of ``limit`` units per ``period`` seconds admits one unit every *emission interval*
``T = period / limit`` seconds and lets up to ``capacity`` units (``B``, default ``limit``)
through at once. The whole state is one float, the *theoretical arrival time* (TAT, in the
same seconds as ``now``): the instant at which the bucket would be full again. A TAT in
the past means a full bucket, so a store may forget it (memory sweep, Redis ``PX``).

Admitting ``n`` units at ``now``::

    backlog  = max(tat - now, 0)          # seconds of capacity in use
    new_tat  = now + backlog + n * T
    allowed  = new_tat - now <= B * T     # (+ SLACK_SECONDS, see below)

The Lua scripts in ``lua/`` repeat these few lines for Redis; keep them in step.

>>> rate = Rate(limit=60)                 # 60 per minute: T = 1 s, B = 60
>>> v = admit(rate, tat=0.0, now=100.0, cost=10)
>>> v.allowed, v.tat, v.remaining, v.reset_seconds
(True, 110.0, 50, 10.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Epoch seconds (~1.7e9) carry ~2.4e-7 s of rounding per addition, so a bucket filled to
# the brim by many small steps may overshoot ``B * T`` by a few microseconds. This slack
# absorbs that and grants at most SLACK_SECONDS / T extra units, a vanishing fraction.
SLACK_SECONDS = 1e-5


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` units per ``period`` seconds, bursting to ``burst`` units (default ``limit``)."""

    limit: float
    period: float = 60.0
    burst: float | None = None
    # Derived once (every admission reads them several times per bucket):
    interval: float = field(init=False, repr=False, compare=False)
    """Emission interval ``T``: seconds one unit occupies the bucket."""
    capacity: float = field(init=False, repr=False, compare=False)
    """Bucket size ``B`` in units."""
    tolerance: float = field(init=False, repr=False, compare=False)
    """``B * T``: the most seconds of backlog the bucket holds."""

    def __post_init__(self) -> None:
        if not (self.limit > 0 and self.period > 0 and (self.burst is None or self.burst > 0)):
            raise ValueError(f"limit, period and burst must be positive: {self}")
        interval = self.period / self.limit
        capacity = self.limit if self.burst is None else self.burst
        object.__setattr__(self, "interval", interval)
        object.__setattr__(self, "capacity", capacity)
        object.__setattr__(self, "tolerance", capacity * interval)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Outcome of :func:`admit`. Times are seconds; ``tat`` is on the caller's clock."""

    allowed: bool
    tat: float  # the state to keep: the new TAT if allowed, the given one if denied
    remaining: int  # whole units admissible at ``now`` after this decision
    reset_seconds: float  # until the bucket is full again
    retry_after: float  # 0 if allowed; math.inf if ``cost`` exceeds the capacity


def _fits(rate: Rate, backlog: float) -> bool:
    return backlog <= rate.tolerance + SLACK_SECONDS


def _backlog(tat: float, now: float) -> float:
    return max(tat - now, 0.0)


def remaining(rate: Rate, tat: float, now: float) -> int:
    """Whole units that :func:`admit` would accept at ``now`` in a single call.

    Closed form: the quotient, then one step either way where the division rounded
    differently from the test admit() applies. No loop, so a rate too large for a float
    to count in single units (past 2**53) costs no more than a small one.
    """
    backlog = _backlog(tat, now)
    if not _fits(rate, backlog):
        return 0
    units = max(math.floor((rate.tolerance + SLACK_SECONDS - backlog) / rate.interval), 0)
    if units > 0 and not _fits(rate, backlog + units * rate.interval):
        return units - 1
    if _fits(rate, backlog + (units + 1) * rate.interval):
        return units + 1
    return units


def reset_seconds(tat: float, now: float) -> float:
    """Seconds until a bucket with this TAT is full again."""
    return _backlog(tat, now)


def admit(rate: Rate, tat: float, now: float, cost: float = 1) -> Verdict:
    """Try to take ``cost`` units at ``now``; a denial leaves the state as it was.

    ``tat`` is the stored TAT, or any time ``<= now`` (e.g. ``now``) for a bucket with no
    state. ``retry_after`` is the wait until the same cost fits, or ``math.inf`` when it
    never will (``cost > capacity``): the caller should answer "request too large".
    """
    backlog = _backlog(tat, now)
    after = backlog + cost * rate.interval
    if _fits(rate, after):
        new_tat = now + after
        return Verdict(True, new_tat, remaining(rate, new_tat, now), after, 0.0)
    never = not _fits(rate, cost * rate.interval)
    retry_after = math.inf if never else after - rate.tolerance
    return Verdict(False, tat, remaining(rate, tat, now), backlog, retry_after)


def adjust(rate: Rate, tat: float, now: float, units: float) -> float:
    """The TAT after charging ``units`` more (``> 0``) or refunding them (``< 0``).

    Used when settling a reservation with real usage. A charge may push the bucket past
    its capacity (the client then waits off the debt); a refund never makes it fuller
    than full, i.e. the result is never before ``now``.
    """
    return max(max(tat, now) + units * rate.interval, now)
