"""The thieves a v2 run sends: every strategy against every asset it makes sense for.

Each campaign gets its own block of /24s (no two thieves share an address prefix, so
linking never joins two actors by accident), its own seeded randomness and a generous
budget of dollars; the adaptive library's thieves and the hydra's are numbered apart, so
the two can run together.

    thieves = adaptive_library(Scale(), seed=1, knowledge=Knowledge(), white_box=None, embedder=embedder)
"""

from __future__ import annotations

from dataclasses import dataclass

from modelfence.detect.embedding import Embedder
from modelfence.redteam.replay_attacks import SUBNET_BASE
from modelfence.redteam.thieves.base import ASSETS, DAY, Asset, Budget, Knowledge, Thief
from modelfence.redteam.thieves.campaign import GENEROUS_USD
from modelfence.redteam.thieves.hydra import HydraThief
from modelfence.redteam.thieves.naive import NaiveThief, RotatingThief
from modelfence.redteam.thieves.one_batch import OneBatchThief
from modelfence.redteam.thieves.paced import PacedThief
from modelfence.redteam.thieves.white_box import WhiteBoxThief

HYDRA_SUBNET_BASE = SUBNET_BASE + 5_000  # the adaptive library stays below it


@dataclass(frozen=True)
class Scale:
    """How much each thief wants and how many accounts the multi-account ones hold."""

    classifier_images: int = 2000
    embedding_texts: int = 1536
    chat_prompts: int = 300
    days: float = 7.0
    one_batch_accounts: tuple[int, ...] = (8, 32)
    rotation_accounts: tuple[int, ...] = (3, 10)
    hydra_accounts: tuple[int, ...] = (100, 1000, 10000)
    # Hydras that sign up at a pace a sign-up surge watch lets through: 100 a day on top of
    # the honest week's ~500, ~425 from day 1 on counting its first day without newcomers
    # (the watch's day window needs 1.5x; docs/DETECTION.md).
    hydra_paced_accounts: tuple[int, ...] = (1000,)
    hydra_paced_signups_per_day: float = 100.0
    hydra_requests_per_day: float = 26.0
    hydra_chat_prompts: int = 3000
    hydra_embedding_texts: int = 1536
    hydra_classifier_images: int = 4000

    def target(self, asset: Asset) -> int:
        return {"classifier": self.classifier_images, "embeddings": self.embedding_texts,
                "chat": self.chat_prompts}[asset]

    def hydra_target(self, asset: Asset) -> int:
        return {"classifier": self.hydra_classifier_images, "embeddings": self.hydra_embedding_texts,
                "chat": self.hydra_chat_prompts}[asset]


class _Subnets:
    """Hands each campaign the next block of /24s, one per account of its budget."""

    def __init__(self, base: int, limit: int | None = None) -> None:
        self.next = base
        self.limit = limit

    def take(self, accounts: int) -> int:
        base, self.next = self.next, self.next + accounts
        if self.limit is not None and self.next > self.limit:
            raise ValueError(f"the adaptive library needs more than the /24s below {self.limit}")
        return base


def adaptive_library(scale: Scale, *, seed: int, knowledge: Knowledge, white_box: Knowledge | None,
                     embedder: Embedder) -> list[Thief]:
    """Naive, paced (and paced in-distribution for the classifier), one-batch, rotating
    and, when ``white_box`` is given, white-box thieves for each asset."""
    subnets = _Subnets(SUBNET_BASE, HYDRA_SUBNET_BASE)
    budget = Budget(days=scale.days, usd=GENEROUS_USD)
    days = scale.days
    thieves: list[Thief] = []
    for asset in ASSETS:
        target = scale.target(asset)
        thieves.append(NaiveThief(asset, seed=seed, target=target, days=days, subnet_base=subnets.take(1)))
        for in_distribution in (False, True) if asset == "classifier" else (False,):
            thieves.append(PacedThief(asset, knowledge, budget, in_distribution, seed=seed, target=target,
                                      subnet_base=subnets.take(1)))
        thieves.extend(OneBatchThief(asset, n, seed=seed, days=days, subnet_base=subnets.take(n))
                       for n in scale.one_batch_accounts)
        thieves.extend(RotatingThief(asset, n, seed=seed, target=target, days=days, subnet_base=subnets.take(n))
                       for n in scale.rotation_accounts)
        if white_box is not None:
            thieves.append(WhiteBoxThief(asset, white_box, embedder, seed=seed, target=target, days=days,
                                         subnet_base=subnets.take(1)))
    return thieves


def hydra_library(scale: Scale, *, seed: int) -> list[Thief]:
    """A hydra of each size in ``scale.hydra_accounts`` against each asset, starting in
    turn, evenly over the days: campaigns that all signed up in the same hour would be one
    crowd, each caught by the others' sign-up surge."""
    subnets = _Subnets(HYDRA_SUBNET_BASE)
    runs = [(n, asset) for n in scale.hydra_accounts for asset in ASSETS]
    return [
        HydraThief(asset, n, scale.hydra_requests_per_day, seed=seed, target=scale.hydra_target(asset),
                   days=scale.days, subnet_base=subnets.take(n), start=(i + 0.5) / len(runs) * scale.days * DAY)
        for i, (n, asset) in enumerate(runs)
    ]


def paced_hydra_library(scale: Scale, *, seed: int) -> list[Thief]:
    """Hydras that know about sign-up surge watches (``scale.hydra_paced_*``), one asset at
    a time: each starts once the previous one has bought its target (a thief running two
    would add their paces), and all end with the run, whose honest week they share."""
    subnets = _Subnets(HYDRA_SUBNET_BASE)
    starts = (0.05, 0.4, 0.7)  # shares of the run: chat needs the longest, embeddings the least
    return [
        HydraThief(asset, n, scale.hydra_requests_per_day, seed=seed, target=scale.hydra_target(asset),
                   days=(1 - share) * scale.days, subnet_base=subnets.take(n), start=share * scale.days * DAY,
                   signups_per_day=scale.hydra_paced_signups_per_day)
        for n in scale.hydra_paced_accounts
        for asset, share in zip(("chat", "classifier", "embeddings"), starts, strict=True)
    ]
