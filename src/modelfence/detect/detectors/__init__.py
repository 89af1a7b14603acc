"""The detectors, each a calibrated window statistic with a reason code (see ``base.py``)."""

from modelfence.detect.detectors.base import Detector, Signal, signal
from modelfence.detect.detectors.classifier import BoundaryProbing, OutOfDistribution
from modelfence.detect.detectors.coverage import Coverage
from modelfence.detect.detectors.harvesting import Harvesting
from modelfence.detect.detectors.mmd import Mmd
from modelfence.detect.detectors.prada import Prada
from modelfence.detect.detectors.sweeps import Sweeps
from modelfence.detect.detectors.timing import AroundTheClock, Regularity, Volume


def all_detectors() -> list[Detector]:
    """One fresh instance of every detector (``Volume`` keeps population state)."""
    return [
        Prada(),
        Mmd(),
        Coverage(),
        Sweeps(),
        Regularity(),
        AroundTheClock(),
        Volume(),
        Harvesting(),
        BoundaryProbing(),
        OutOfDistribution(),
    ]


__all__ = [
    "AroundTheClock",
    "BoundaryProbing",
    "Coverage",
    "Detector",
    "Harvesting",
    "Mmd",
    "OutOfDistribution",
    "Prada",
    "Regularity",
    "Signal",
    "Sweeps",
    "Volume",
    "all_detectors",
    "signal",
]
