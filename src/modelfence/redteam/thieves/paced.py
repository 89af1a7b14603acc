"""A thief that has read the documentation: one account, under every published line.

It knows the defaults (``Knowledge``): the default tier's limits and the volume detector's
queries per ten minutes. It sends with exponential gaps (never regular) at half of 80% of
those lines, never more than 80% of any in a sliding window, 16 hours a day (so never
"around the clock"), in batches small enough to leave room for several requests in ten
minutes. Its chat requests look like an application's: the chain-of-thought frame in the
system message, the task alone in the user turn, a sampling temperature and a varied
``max_tokens``, so no harvesting signal but saturation (which the answer decides) can
fire. It stops when its data target is bought or its days run out.

The in-distribution variant (classifier) sends the victim's own kind of data: real digits,
then the same digits moved by a fraction of a pixel, and asks for labels only.
"""

from __future__ import annotations

from modelfence.redteam.replay_attacks import SUBNET_BASE
from modelfence.redteam.thieves.base import Asset, Budget, Knowledge
from modelfence.redteam.thieves.campaign import Campaign
from modelfence.redteam.thieves.inputs import Requests, inputs_for
from modelfence.redteam.thieves.pacing import Pace, Pacer, schedule
from modelfence.redteam.traffic import PlannedRequest


class PacedThief(Campaign):
    strategy = "paced"

    def __init__(self, asset: Asset, knowledge: Knowledge, budget: Budget, in_distribution: bool = False, *,
                 seed: int = 0, target: int | None = None, name: str | None = None,
                 subnet_base: int = SUBNET_BASE) -> None:
        variant = "paced-in-distribution" if in_distribution else self.strategy
        super().__init__(asset, name=name or f"{variant}/{asset}", budget=budget, seed=seed, target=target,
                         subnet_base=subnet_base)
        self.in_distribution = in_distribution
        self.pace = Pace.under(knowledge)

    def _plan(self) -> list[PlannedRequest]:
        rng = self.rng("plan")
        low, high = self.pace.batches(self.asset)
        inputs = inputs_for(self.asset, self.seed, self.target, rng, in_distribution=self.in_distribution)
        requests = Requests(self.asset, inputs, rng, self.seed, labels_only=self.in_distribution)
        pacer = Pacer(self.pace, rng, horizon=self.horizon, mean_units=(low + high) / 2)
        batches = iter(lambda: requests.extraction(int(rng.integers(low, high + 1))), None)
        return schedule(batches, pacer, self.tariff, client=self.identities.slot_name(0), usd=self.budget.usd)
