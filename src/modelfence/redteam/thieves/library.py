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
from modelfence.redteam.thieves.base import ASSETS, Asset, Budget, Knowledge, Thief
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
    """A hydra of each size in ``scale.hydra_accounts`` against each asset."""
    subnets = _Subnets(HYDRA_SUBNET_BASE)
    return [
        HydraThief(asset, n, scale.hydra_requests_per_day, seed=seed, target=scale.hydra_target(asset),
                   days=scale.days, subnet_base=subnets.take(n))
        for n in scale.hydra_accounts
        for asset in ASSETS
    ]
