"""One batch per account: every key sends a single request and is never used again.

Per-key detectors need a history (20 to 30 queries, a day of hours, a window of timing),
and linking needs something shared: this thief gives each key one 64-input batch (one
task for a chat), its own /24, client library and header order, and spreads the keys
over its days with jitter, so no two keys are busy in the same ten minutes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from modelfence.redteam.replay_attacks import ROWS_PER_REQUEST, SUBNET_BASE
from modelfence.redteam.thieves.base import Asset, Budget
from modelfence.redteam.thieves.campaign import GENEROUS_USD, Campaign
from modelfence.redteam.thieves.inputs import Requests, inputs_for
from modelfence.redteam.traffic import PlannedRequest


class OneBatchThief(Campaign):
    strategy = "one-batch"

    def __init__(self, asset: Asset, accounts: int = 32, *, seed: int = 0, days: float = 7.0,
                 name: str | None = None, subnet_base: int = SUBNET_BASE) -> None:
        batch = 1 if asset == "chat" else ROWS_PER_REQUEST
        super().__init__(asset, name=name or f"{self.strategy}-{accounts}/{asset}", seed=seed,
                         target=accounts * batch, budget=Budget(accounts=accounts, days=days, usd=GENEROUS_USD),
                         slots=accounts, subnet_base=subnet_base)
        self.batch = batch

    def _plan(self) -> list[PlannedRequest]:
        rng = self.rng("plan")
        accounts = self.budget.accounts
        requests = Requests(self.asset, inputs_for(self.asset, self.seed, self.target, rng), rng, self.seed)
        # One key per stretch of the days, at a random moment inside it.
        times = (np.arange(accounts) + rng.uniform(0.05, 0.95, size=accounts)) * self.horizon / accounts
        plans = []
        for slot, at in enumerate(times.tolist()):
            request = requests.extraction(self.batch)
            assert request is not None  # the inputs were drawn for exactly these batches
            plans.append(replace(request, at=at, client=self.identities.slot_name(slot)))
        return plans
