"""Risk: evidence accumulated over time into a score in [0, 1], with reasons in words.

Each evaluation turns the detectors' signals into one piece of evidence ``x`` in [0, 1]
(noisy-or of the signal scores). A CUSUM accumulates it::

    S <- max(0, S * decay(dt) + x - drift)        risk = 1 - exp(-S)

so one strong finding raises risk quickly, weak findings that keep coming (a
low-and-slow attacker) still add up, and a client whose traffic returns to normal loses
``drift`` per evaluation plus a time decay (half-life) while quiet.

Each reason keeps its evidence: the statistic last measured, the threshold it crossed and
``since``, when it first crossed it (event time, seconds). ``since`` is kept while the
reason stays listed and starts again once the reason has faded away.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from modelfence.detect.detectors import Signal

DRIFT = 0.1  # evidence an evaluation must bring just to hold the score
MAX_REASONS = 3


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    text: str
    score: float
    # Evidence, absent from records published before it was kept: the statistic measured,
    # the threshold it is compared with, and when (event time) it first crossed it.
    value: float | None = None
    threshold: float | None = None
    since: float | None = None


@dataclass(slots=True)
class RiskState:
    half_life_seconds: float
    cusum: float = 0.0
    last_ts: float | None = None
    reasons: dict[str, Reason] = field(default_factory=dict)
    # Lenses: the same CUSUM kept over part of the evidence, each leaving out the signal
    # codes it names, so a caller can ask what the rest alone would justify (the engine's
    # ceilings: habits or mere unusualness never block a client with history).
    without: Mapping[str, frozenset[str]] = field(default_factory=dict)
    partial: dict[str, float] = field(default_factory=dict)

    @property
    def risk(self) -> float:
        return 1.0 - math.exp(-self.cusum)

    def risk_without(self, lens: str) -> float:
        """The risk the evidence outside ``lens``'s left-out codes adds up to."""
        return 1.0 - math.exp(-self.partial.get(lens, 0.0))

    def update(self, signals: list[Signal], now: float, *, steps: int = 1) -> float:
        """Add one evaluation's signals at time ``now`` (``steps`` evaluations' worth: a
        view evaluated once for several that saw the same evidence); return the new risk."""
        if self.last_ts is not None and now > self.last_ts:
            factor = 0.5 ** ((now - self.last_ts) / self.half_life_seconds)
            self.cusum *= factor
            self.partial = {lens: part * factor for lens, part in self.partial.items()}
            self._fade(factor)
        self.last_ts = now
        self.cusum = _accumulate(self.cusum, signals, steps)
        for lens, left_out in self.without.items():
            kept = [s for s in signals if s.code not in left_out]
            self.partial[lens] = _accumulate(self.partial.get(lens, 0.0), kept, steps)
        self._fade(0.9**steps)
        for s in signals:
            before = self.reasons.get(s.code)
            since = before.since if before is not None and before.since is not None else now
            self.reasons[s.code] = Reason(s.code, s.text, s.score, s.value, s.threshold, since)
        return self.risk

    def absorb(self, other: RiskState, lens: str) -> None:
        """Raise this state to ``other``'s evidence as seen through ``lens`` (never lower):
        how an entity takes on what one member earned, without that member's habits."""
        seen = other.partial.get(lens, 0.0)
        # Each total is raised on its own: a group already high on weak evidence still takes
        # on a member's stronger evidence in the lenses that count it.
        for name in self.without:
            theirs = min(other.partial.get(name, 0.0), seen)
            self.partial[name] = max(self.partial.get(name, 0.0), theirs)
        if seen > self.cusum:
            self.cusum = seen
            left_out = self.without.get(lens, frozenset())
            self.reasons = {
                **self.reasons,
                **{code: r for code, r in other.reasons.items() if code not in left_out},
            }

    def _fade(self, factor: float) -> None:
        # Reasons not seen again fade with the risk they caused.
        self.reasons = {
            code: replace(r, score=r.score * factor)
            for code, r in self.reasons.items()
            if r.score * factor >= 0.05
        }

    def top_reasons(self) -> list[Reason]:
        return sorted(self.reasons.values(), key=lambda r: -r.score)[:MAX_REASONS]


def _accumulate(cusum: float, signals: list[Signal], steps: int = 1) -> float:
    """``steps`` CUSUM steps: each adds the signals' noisy-or evidence less the drift,
    floored at 0 (so the same evidence ``steps`` times is one step of ``steps`` times it)."""
    evidence = 1.0 - math.prod(1.0 - s.score for s in signals)
    return max(0.0, cusum + steps * (evidence - DRIFT))
