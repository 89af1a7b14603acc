"""What every detector is: a window statistic, a direction and a calibrated threshold.

A detector maps a :class:`~modelfence.detect.features.View` to one number (or None while
it has too little data). Which side is suspicious is its ``direction``; where the line
lies is its threshold, taken from calibration on benign clients (see
``detect/calibration.py``) or, until calibrated, from a documented default. Turning the
statistic into a :class:`Signal` is shared here, so every detector scores the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from modelfence.detect.features import View
from modelfence.detect.reference import Reference

FULL_EXCESS = 0.5


@dataclass(frozen=True, slots=True)
class Signal:
    """One detector's finding: ``score`` in (0, 1], near 0 at the threshold, 1 far beyond."""

    code: str
    score: float
    text: str
    value: float | None = None  # the statistic measured
    threshold: float | None = None  # the line it crossed


class Detector(Protocol):
    code: str  # reason code, e.g. "prada_distance"
    direction: Literal[1, -1]  # 1: larger is suspicious; -1: smaller is
    default_threshold: float | None  # None: needs calibration (or a reference) to run

    def statistic(self, view: View, reference: Reference | None) -> float | None: ...

    def describe(self, value: float, threshold: float) -> str:
        """The finding in words, for alerts and the admin API."""
        ...


def signal(detector: Detector, value: float, threshold: float) -> Signal | None:
    """A :class:`Signal` when ``value`` is beyond ``threshold`` on the suspicious side.

    The score is the excess relative to the threshold's own size, reaching 1.0 at
    ``FULL_EXCESS`` (50%) beyond it. A value just past the line is weak evidence — the
    threshold is set where the most extreme benign clients sit — so it adds little, and
    the risk's drift (``risk.py``) absorbs it unless it keeps coming.
    """
    excess = (value - threshold) * detector.direction
    if excess <= 0:
        return None
    scale = max(abs(threshold), 1e-6)
    score = min(1.0, excess / (FULL_EXCESS * scale))
    return Signal(
        detector.code, score, detector.describe(value, threshold), float(value), float(threshold)
    )


def share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0
