"""What every strategy shares: identities, seeded plans kept within the budget, and the
plain reaction to a refusal (wait out a 429, give up on a 403).

A strategy only says what it sends and when (``_plan``); ``plans()`` sorts that, drops
whatever falls past the budget's days or dollars, and keeps it, so the same thief always
sends the same traffic.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from modelfence.redteam.replay_attacks import (
    CLASSIFIER_ROWS,
    EMBEDDING_TEXTS,
    HARVEST_PROMPTS,
    SUBNET_BASE,
)
from modelfence.redteam.tariff import Tariff, example_config
from modelfence.redteam.thieves.base import ASSETS, DAY, GIVE_UP, Asset, Budget, Reaction
from modelfence.redteam.thieves.identity import Identities, generator
from modelfence.redteam.traffic import ClientProfile, PlannedRequest

RETRY_SECONDS = 60.0  # after a 429: the limits' minute has passed by then
GENEROUS_USD = 1_000.0
# What one campaign wants to buy per asset: the v1 attacks' largest budgets.
TARGETS: dict[Asset, int] = {"classifier": CLASSIFIER_ROWS, "embeddings": EMBEDDING_TEXTS, "chat": HARVEST_PROMPTS}


@dataclass(frozen=True, slots=True)
class Spend:
    """What a list of plans costs at the published prices."""

    requests: int
    units: int
    usd: float


class Campaign:
    """Shared plumbing of the strategies (see module docstring); ``react`` is the v1
    thief's: retry a 429 after a minute, give up on a 403."""

    strategy: str

    def __init__(self, asset: Asset, *, name: str, budget: Budget, seed: int, target: int | None = None,
                 slots: int = 1, subnet_base: int = SUBNET_BASE) -> None:
        if asset not in ASSETS:
            raise ValueError(f"unknown asset {asset!r}; known: {', '.join(ASSETS)}")
        self.name = name
        self.asset: Asset = asset
        self.budget = budget
        self.seed = seed
        self.target = TARGETS[asset] if target is None else target
        self.identities = Identities(name, slots=slots, capacity=budget.accounts, subnet_base=subnet_base,
                                     seed=seed)
        self.tariff = Tariff(example_config())
        self._planned: list[PlannedRequest] | None = None

    def rng(self, purpose: str) -> np.random.Generator:
        return generator(self.seed, self.name, purpose)

    @property
    def horizon(self) -> float:
        return self.budget.days * DAY

    def accounts(self) -> list[ClientProfile]:
        """The first accounts; unless the budget aged them, each signs up when it first sends."""
        initial = self.identities.initial()
        if not self.budget.aged_days:
            return initial
        return [replace(p, signed_up=-self.budget.aged_days * DAY) for p in initial]

    def plans(self) -> list[PlannedRequest]:
        """The campaign's requests in time order; calling it (re)starts the campaign."""
        self.restart()
        if self._planned is None:
            self._planned = self._affordable(sorted(self._plan(), key=lambda p: (p.at, p.client)))
        return list(self._planned)

    def restart(self) -> None:
        """Forget what ``react`` learnt in an earlier run (nothing, unless overridden)."""

    def react(self, plan: PlannedRequest, status: int, at: float) -> Reaction:
        return Reaction(retry_at=at + RETRY_SECONDS) if status == 429 else GIVE_UP

    def fresh_account(self, slot: str, burnt: int) -> ClientProfile:
        return self.identities.fresh(slot, burnt)

    def spend(self, plans: list[PlannedRequest]) -> Spend:
        return Spend(len(plans), sum(p.units for p in plans if p.purpose == "extraction"),
                     sum(self.tariff.charge(p)[1] for p in plans))

    def _plan(self) -> list[PlannedRequest]:
        raise NotImplementedError

    def _affordable(self, plans: list[PlannedRequest]) -> list[PlannedRequest]:
        """The plans inside the budget's days, up to its dollars."""
        out: list[PlannedRequest] = []
        spent = 0.0
        for plan in plans:
            spent += self.tariff.charge(plan)[1]
            if plan.at >= self.horizon or spent > self.budget.usd:
                break
            out.append(plan)
        return out


def first_units(plans: list[PlannedRequest], target: int) -> list[PlannedRequest]:
    """The leading plans (in order) that buy ``target`` extraction units."""
    out: list[PlannedRequest] = []
    bought = 0
    for plan in plans:
        if bought >= target:
            break
        out.append(plan)
        bought += plan.units if plan.purpose == "extraction" else 0
    return out
