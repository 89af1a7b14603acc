"""Thieves that adapt to the defences: paced under the published lines, one batch per
account, rotating keys, a hydra of independent accounts, and a white-box thief that
checks itself against the calibrated detector (see each module). ``base.py`` is the
interface the contest plays them through; ``library.py`` builds the sets a run sends."""

from modelfence.redteam.thieves.base import Budget, Knowledge, Reaction, Thief, text_pool
from modelfence.redteam.thieves.hydra import HydraThief
from modelfence.redteam.thieves.library import (
    Scale,
    adaptive_library,
    hydra_library,
    paced_hydra_library,
)
from modelfence.redteam.thieves.naive import NaiveThief, RotatingThief
from modelfence.redteam.thieves.one_batch import OneBatchThief
from modelfence.redteam.thieves.paced import PacedThief
from modelfence.redteam.thieves.white_box import SelfCheckCost, WhiteBoxThief

__all__ = [
    "Budget",
    "HydraThief",
    "Knowledge",
    "NaiveThief",
    "OneBatchThief",
    "PacedThief",
    "Reaction",
    "RotatingThief",
    "Scale",
    "SelfCheckCost",
    "Thief",
    "WhiteBoxThief",
    "adaptive_library",
    "hydra_library",
    "paced_hydra_library",
    "text_pool",
]
