"""Risk levels as the policy layer sees them, and where they come from.

The detection layer decides *how suspicious* a client is; the policy layer only reads the
verdict through :class:`RiskSource`, a one-method protocol read on every request (so it
must answer from memory). Until detection is wired in, :class:`NormalRisk` says "normal"
for everyone, and :class:`RiskOverrides` lets an operator pin a client's level through
the admin API::

    risk = RiskOverrides(NormalRisk())
    risk.set("acme", RiskLevel.HIGH)     # next request of "acme" gets the high profile
    risk.level_for("acme")               # RiskLevel.HIGH
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class RiskLevel(StrEnum):
    NORMAL = "normal"
    ELEVATED = "elevated"
    HIGH = "high"


# Detection's graded actions -> the hardening level that goes with them. "block" never
# reaches the output stage in normal operation; if it does, it gets the strongest profile.
ACTION_LEVELS: dict[str, RiskLevel] = {
    "observe": RiskLevel.NORMAL,
    "alert": RiskLevel.NORMAL,
    "tighten": RiskLevel.ELEVATED,
    "degrade": RiskLevel.HIGH,
    "block": RiskLevel.HIGH,
}


def level_for_action(action: str) -> RiskLevel:
    """The hardening level for a detection action; unknown actions count as normal."""
    return ACTION_LEVELS.get(action, RiskLevel.NORMAL)


_ORDER = {RiskLevel.NORMAL: 0, RiskLevel.ELEVATED: 1, RiskLevel.HIGH: 2}


def stronger(a: RiskLevel, b: RiskLevel) -> RiskLevel:
    """The level with the stronger hardening profile of the two."""
    return b if _ORDER[b] > _ORDER[a] else a


class RiskSource(Protocol):
    def level_for(self, client: str) -> RiskLevel: ...


class NormalRisk:
    """Everyone is normal: the source used when no detector is wired in."""

    def level_for(self, client: str) -> RiskLevel:
        return RiskLevel.NORMAL


class RiskOverrides:
    """Operator pins on top of another source; the higher of the two levels wins, so a pin
    can raise a client's level but never hide what detection found."""

    def __init__(self, inner: RiskSource) -> None:
        self.inner = inner
        self._pins: dict[str, RiskLevel] = {}

    def set(self, client: str, level: RiskLevel) -> None:
        self._pins[client] = level

    def clear(self, client: str) -> None:
        self._pins.pop(client, None)

    def pins(self) -> dict[str, RiskLevel]:
        return dict(self._pins)

    def level_for(self, client: str) -> RiskLevel:
        found = self.inner.level_for(client)
        pinned = self._pins.get(client)
        return found if pinned is None else stronger(found, pinned)
