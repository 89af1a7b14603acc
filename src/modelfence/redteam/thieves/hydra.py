"""A distributed thief: many accounts behind residential proxies, each acting like a person.

Every account has its own /24, client library and header order, and its own timer: a
Poisson process of ``requests_per_day`` with its own diurnal phase (a person somewhere),
independent of every other account's, and none sends enough to stand out (volume,
timing, coverage need a history). Lockstep linking needs two keys to share two 10-second
slots within ten minutes; independent timers still do that by chance now and then (three
chance pairs in the thousand-account classifier hydra without it), so each account stays
quiet for ten minutes after a request, which makes a shared pair of slots impossible. A
share of each account's requests is cover: a person's chat question, a few real digits,
a few texts. The rest are small extraction batches: 4–8 images, 4–16 texts, or one
chain-of-thought task under a varied system frame. The campaign stops when its data target
is bought, so with thousands of accounts most send a request or two.

A paced hydra (``signups_per_day``) knows about sign-up surge watches: its accounts sign up
one after another at that rate, each sending only from then on, so the crowd never stands
out from the business's own newcomers and each account it has sends more.

The timers are drawn as one superposed process (candidate times uniform over the
accounts, thinned by each account's own diurnal weight, then by its quiet period), which
is the same in law as independent per-account processes and costs only the requests
actually sent, so ten thousand accounts plan in well under a second. The candidate rate
is raised so that ``requests_per_day`` survive the quiet periods (a process with rate
``c`` and dead time ``q`` keeps ``c / (1 + c q)``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from modelfence.redteam.replay_attacks import SUBNET_BASE
from modelfence.redteam.thieves.base import DAY, Asset, Budget
from modelfence.redteam.thieves.campaign import GENEROUS_USD, Campaign
from modelfence.redteam.thieves.inputs import Requests, inputs_for
from modelfence.redteam.timing import diurnal_weight
from modelfence.redteam.traffic import PlannedRequest

# Mean of diurnal_weight over a day: 0.1 + 0.9 * E[((1 + cos) / 2)^2] = 0.1 + 0.9 * 3/8.
MEAN_DIURNAL_WEIGHT = 0.4375
QUIET_SECONDS = 600.0  # after each request: lockstep linking compares ten minutes of slots
BATCHES: dict[Asset, tuple[int, int]] = {"classifier": (4, 8), "embeddings": (4, 16), "chat": (1, 1)}


class HydraThief(Campaign):
    strategy = "hydra"

    def __init__(self, asset: Asset, accounts: int = 1000, requests_per_day: float = 26.0, cover_share: float = 0.3,
                 *, seed: int = 0, target: int | None = None, days: float = 7.0, name: str | None = None,
                 subnet_base: int = SUBNET_BASE, start: float = 0.0, signups_per_day: float | None = None) -> None:
        if requests_per_day <= 0 or not 0 <= cover_share < 1 or start < 0:
            raise ValueError("a hydra needs requests_per_day > 0, 0 <= cover_share < 1 and start >= 0")
        if signups_per_day is not None and signups_per_day <= 0:
            raise ValueError("signups_per_day must be above 0 (None: every account at once)")
        self.start = start  # seconds into the run: a library's hydras take turns, not one crowd
        # Paced: account k signs up k / signups_per_day days after the start and sends
        # nothing before, so the crowd stays under a sign-up surge watch's floors.
        self.signups_per_day = signups_per_day
        if self._peak(requests_per_day) * QUIET_SECONDS >= 1:
            raise ValueError(f"{requests_per_day} requests a day do not fit between quiet periods of "
                             f"{QUIET_SECONDS:.0f} s")
        paced = "" if signups_per_day is None else f"-paced{signups_per_day:g}"
        super().__init__(asset, name=name or f"{self.strategy}{paced}-{accounts}/{asset}", seed=seed, target=target,
                         budget=Budget(accounts=accounts, days=days, usd=GENEROUS_USD), slots=accounts,
                         subnet_base=subnet_base)
        self.requests_per_day = requests_per_day
        self.cover_share = cover_share

    @property
    def horizon(self) -> float:
        """Its days count from its start."""
        return self.start + self.budget.days * DAY

    @staticmethod
    def _peak(requests_per_day: float) -> float:
        """Requests per second of one account at the top of its day."""
        return requests_per_day / DAY / MEAN_DIURNAL_WEIGHT

    def arrivals(self, rng: np.random.Generator, start: float, end: float, phases: np.ndarray,
                 last: np.ndarray) -> tuple[list[float], list[int]]:
        """(times, accounts) of every account's requests in ``[start, end)``, in time order;
        ``last`` (each account's latest request, updated) carries the quiet periods over."""
        peak = self._peak(self.requests_per_day)
        ceiling = peak / (1 - peak * QUIET_SECONDS)  # the candidate rate at the top of the day
        count = int(rng.poisson(ceiling * len(phases) * (end - start)))
        times = rng.uniform(start, end, size=count)
        accounts = rng.integers(len(phases), size=count)
        wanted = peak * np.fromiter((diurnal_weight(t, p) for t, p in zip(times, phases[accounts], strict=True)),
                                    dtype=np.float64, count=count)
        keep = rng.random(count) * ceiling < wanted / (1 - wanted * QUIET_SECONDS)
        order = np.argsort(times[keep], kind="stable")
        out_times, out_accounts = [], []
        opens = self._opens(len(phases))
        for at, account in zip(times[keep][order].tolist(), accounts[keep][order].tolist(), strict=True):
            if at >= opens[account] and at - last[account] >= QUIET_SECONDS:
                last[account] = at
                out_times.append(at)
                out_accounts.append(account)
        return out_times, out_accounts

    def _opens(self, accounts: int) -> np.ndarray:
        """When each account may first send: at the start, or paced one after another."""
        if self.signups_per_day is None:
            return np.full(accounts, self.start)
        return self.start + np.arange(accounts) * (DAY / self.signups_per_day)

    def _plan(self) -> list[PlannedRequest]:
        rng = self.rng("plan")
        low, high = BATCHES[self.asset]
        accounts = self.budget.accounts
        phases = rng.uniform(0, DAY, size=accounts)  # where in the world each proxy's person lives
        requests = Requests(self.asset, inputs_for(self.asset, self.seed, self.target, rng), rng, self.seed)
        # Requests needed, and the stretch of time that many accounts take to send them.
        needed = self.target / ((low + high) / 2) / (1 - self.cover_share)
        stretch = max(600.0, 1.5 * needed / (accounts * self.requests_per_day / DAY))
        plans: list[PlannedRequest] = []
        last = np.full(accounts, -np.inf)
        start = self.start
        while requests.left > 0 and start < self.horizon:
            end = min(self.horizon, start + stretch)
            for at, account in zip(*self.arrivals(rng, start, end, phases, last), strict=True):
                if requests.left <= 0:
                    break
                request = requests.cover() if rng.random() < self.cover_share else requests.extraction(
                    int(rng.integers(low, high + 1)))
                assert request is not None  # inputs are left
                plans.append(replace(request, at=at, client=self.identities.slot_name(account)))
            start = end
        return plans
