"""From risk to action: observe → alert → tighten → degrade → block, per tier.

The ladder's thresholds come from ``detection.tiers`` in the config. An override set
through the admin API wins over the detector (``allow`` pins a client to normal; any
level pins it there); the allow-list in the config acts like ``allow``. In shadow mode
every decision is made and recorded but the published action is ``normal``. Two pins
leave the level to risk and change what gateways do with it: ``shadow`` is shadow mode for
one client, ``probation`` holds the client to the probation allowance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from modelfence.config import DetectionConfig

Level = Literal["normal", "alert", "tighten", "degrade", "block"]
LEVELS: tuple[Level, ...] = ("normal", "alert", "tighten", "degrade", "block")
OVERRIDES = ("allow", *LEVELS)  # pins that set the level (shadow and probation do not)


def rank(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else 0


def shadowed(pin: str | None, shadow_mode: bool) -> bool:
    """Whether gateways leave a client's level unapplied: its own ``shadow`` pin, or shadow
    mode unless an operator pinned the level (a pin acts in every mode)."""
    return pin == "shadow" or (shadow_mode and pin not in OVERRIDES)


@dataclass(frozen=True, slots=True)
class Action:
    """What every gateway replica applies to a client's next requests."""

    level: Level
    quota_share: float = 1.0  # multiply the client's limits by this (tighten and above)
    probation: bool = False  # held to the probation allowance (an operator's pin)

    @property
    def acts(self) -> bool:
        """Whether gateways do anything with it (the others are not published)."""
        return self.level != "normal" or self.probation

    @property
    def blocks(self) -> bool:
        return self.level == "block"

    @property
    def degrades(self) -> bool:
        return self.level in ("degrade", "block")


NORMAL = Action("normal")


class Policy:
    def __init__(self, config: DetectionConfig) -> None:
        self.config = config

    def level_for(self, risk: float, tier: str) -> Level:
        t = self.config.tier(tier)
        steps: tuple[tuple[Level, float], ...] = (
            ("block", t.block),
            ("degrade", t.degrade),
            ("tighten", t.tighten),
            ("alert", t.alert),
        )
        for level, threshold in steps:
            if risk >= threshold:
                return level
        return "normal"

    def action(self, level: Level, tier: str, *, members: int = 1) -> Action:
        """The action for ``level``; an entity's members share one tightened budget."""
        if rank(level) < rank("tighten"):
            return Action(level)
        return Action(level, self.config.tier(tier).tighten_share / max(members, 1))

    def decide(self, client: str, risk: float, tier: str, override: str | None) -> Level:
        """The level published: a pinned one, else the ladder's (``shadow`` and ``probation``
        pins leave it to risk)."""
        if override == "allow" or client in self.config.allow_list:
            return "normal"
        if override in LEVELS:
            return override
        return self.level_for(risk, tier)
