"""The v1 floor and its key-rotating variant: machine speed, the v1 planners.

``NaiveThief`` is what the v1 harness measured: KnockoffNets with random sampling over
noisy padding (64 images a request, one a second), embedding theft (16 texts a request,
two a second), chain-of-thought harvesting (the frame in the user turn, one prompt every
two seconds), from one account that waits out a 429 and stops at a 403.
``RotatingThief`` sends the same, and on any refusal carries on from a fresh account
(new /24, client library and header order) while its budget has accounts left.
"""

from __future__ import annotations

from dataclasses import replace

from modelfence.redteam.replay_attacks import SINGLE_KEY, SUBNET_BASE, digit_batches
from modelfence.redteam.thieves.base import DAY, Asset, Budget, Reaction
from modelfence.redteam.thieves.campaign import GENEROUS_USD, Campaign, first_units
from modelfence.redteam.thieves.inputs import digit_rows, pool_corpus
from modelfence.redteam.traffic import PlannedRequest

ROTATION_PAUSE = 2.0  # seconds between a refusal and the same request from a fresh account


class NaiveThief(Campaign):
    strategy = "naive"

    def __init__(self, asset: Asset, *, seed: int = 0, target: int | None = None, days: float = 7.0,
                 name: str | None = None, subnet_base: int = SUBNET_BASE) -> None:
        super().__init__(asset, name=name or f"{self.strategy}/{asset}", seed=seed, target=target,
                         budget=Budget(days=days, usd=GENEROUS_USD), subnet_base=subnet_base)

    def _plan(self) -> list[PlannedRequest]:
        """The v1 planner's requests, from the thief's side of the splits only, starting
        at a random time of the first day."""
        rng = self.rng("plan")
        client = self.identities.slot_name(0)
        if self.asset == "classifier":
            rows = digit_rows(self.seed, self.target, rng, in_distribution=False)
            plans = digit_batches(client, rows, rng)  # the v1 KnockoffNets planner's batching
        else:
            kind = "embedding-theft" if self.asset == "embeddings" else "harvest-cot"
            plans = first_units(SINGLE_KEY[kind](client, pool_corpus(self.seed), rng), self.target)
        start = float(rng.uniform(0, DAY))
        return [replace(p, at=p.at + start) for p in plans]


class RotatingThief(NaiveThief):
    strategy = "rotating"

    def __init__(self, asset: Asset, accounts: int = 10, *, seed: int = 0, target: int | None = None,
                 days: float = 7.0, name: str | None = None, subnet_base: int = SUBNET_BASE) -> None:
        Campaign.__init__(self, asset, name=name or f"{self.strategy}-{accounts}/{asset}", seed=seed,
                          target=target, budget=Budget(accounts=accounts, days=days, usd=GENEROUS_USD),
                          subnet_base=subnet_base)
        self._rotations = 0

    def restart(self) -> None:
        self._rotations = 0

    def react(self, plan: PlannedRequest, status: int, at: float) -> Reaction:
        """A fresh account after any refusal while accounts remain; then the v1 reaction."""
        if self._rotations + 1 < self.budget.accounts:
            self._rotations += 1
            return Reaction(retry_at=at + ROTATION_PAUSE, rotate=True)
        return super().react(plan, status, at)
