"""What every thief strategy is: a budget, what it knows, the requests it plans and how
it reacts when the gateway refuses one.

A thief plans every request ahead (so replay and live send the same traffic); the
simulator (``redteam/contest.py``) sends them in time order through the gateway's
limits and detection and tells the thief about each refusal through ``react``, which is
where key rotation and retries happen. What the thief *gets* is measured afterwards from
its answered ``extraction`` requests (``redteam/theft.py``).

    thief = PacedThief("classifier", budget=Budget(days=7), knowledge=Knowledge.published())
    profiles, plans = thief.accounts(), thief.plans()
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from modelfence.detect.reference import Reference
from modelfence.redteam.prompts import PromptCorpus
from modelfence.redteam.tariff import example_config
from modelfence.redteam.traffic import ClientProfile, PlannedRequest

Asset = Literal["chat", "embeddings", "classifier"]
ASSETS: tuple[Asset, ...] = ("chat", "embeddings", "classifier")
DAY = 86_400.0
HELD_OUT_TEXTS = 200


@dataclass(frozen=True, slots=True)
class Budget:
    """What one campaign may spend: identities (the first included), days and dollars, and
    how many days before it its first accounts signed up (a patient thief ages them past
    probation; the fresh accounts it rotates to sign up when they first send)."""

    accounts: int = 1
    days: float = 7.0
    usd: float = 100.0
    aged_days: float = 0.0

    def __post_init__(self) -> None:
        if self.accounts < 1 or self.days <= 0 or self.usd <= 0 or self.aged_days < 0:
            raise ValueError(
                f"a budget needs accounts >= 1, days > 0, usd > 0 and aged_days >= 0, got {self}")


@dataclass(frozen=True, slots=True)
class Knowledge:
    """What an informed thief knows of the defences.

    ``published`` is what the README, ``modelfence.example.yaml`` and
    ``docs/DETECTION.md`` say about the defaults; ``white_box`` adds the calibrated
    reference itself (thresholds, tier medians, k-means cells), as an insider or a leaked
    ``reference.npz`` would give.
    """

    requests_per_minute: float = 60.0  # the default tier of modelfence.example.yaml
    tokens_per_minute: float = 100_000.0
    usd_per_day: float = 10.0
    volume_threshold: float = 24.3  # x the tier's median queries in ten minutes (docs/DETECTION.md)
    tier_median_queries: float = 4.0  # queries in ten minutes of the median honest client
    harvesting_share: float = 0.5  # llm_harvesting's weighted share (docs/DETECTION.md)
    thresholds: Mapping[str, float] = field(default_factory=dict)  # code -> threshold (white box)
    reference: Reference | None = None  # white box only

    @property
    def volume_line(self) -> float:
        """Queries in ten minutes above which the volume detector fires."""
        return self.volume_threshold * self.tier_median_queries

    @classmethod
    def published(cls, tier: str = "default") -> Knowledge:
        """What anyone can read: ``tier``'s limits in ``modelfence.example.yaml`` and the
        documented detection numbers above (a test keeps the field defaults in step with
        the example)."""
        limits = example_config().limits.tiers[tier]

        def line(value: float | None) -> float:
            return math.inf if value is None else float(value)  # no limit: no line to stay under

        return cls(requests_per_minute=line(limits.requests_per_minute),
                   tokens_per_minute=line(limits.tokens_per_minute), usd_per_day=line(limits.usd_per_day))

    @classmethod
    def white_box(cls, reference: Reference, tier: str = "default") -> Knowledge:
        """Everything in ``published`` plus the calibrated reference's own numbers."""
        base = cls()
        return cls(
            volume_threshold=reference.thresholds.get("volume_vs_tier", base.volume_threshold),
            tier_median_queries=reference.tier_medians.get(tier, base.tier_median_queries),
            thresholds=dict(reference.thresholds), reference=reference,
        )


@dataclass(frozen=True, slots=True)
class Reaction:
    """What a thief does about a refused request: send it again at ``retry_at`` (virtual
    seconds; ``None`` gives it up), first switching the account to a fresh one when
    ``rotate`` (which spends one of ``Budget.accounts``)."""

    retry_at: float | None = None
    rotate: bool = False


GIVE_UP = Reaction()


class Thief(Protocol):
    """One campaign. ``name`` is unique in a run; every profile it returns has role
    ``"attacker"`` and ``campaign == name``; plans name one of ``accounts()`` as client,
    carry purpose ``"extraction"`` or ``"cover"`` and lie before ``horizon`` (virtual
    seconds: ``budget.days`` after the campaign's start)."""

    name: str
    strategy: str
    asset: Asset
    budget: Budget

    @property
    def horizon(self) -> float: ...

    def accounts(self) -> list[ClientProfile]: ...

    def plans(self) -> list[PlannedRequest]: ...

    def react(self, plan: PlannedRequest, status: int, at: float) -> Reaction: ...

    def fresh_account(self, slot: str, burnt: int) -> ClientProfile:
        """A new identity for the account ``slot`` after ``burnt`` earlier ones: its own
        /24, client library and header order."""
        ...


@dataclass(frozen=True, slots=True)
class TextPool:
    """The thief's own texts and the held-out texts its student is judged on (never sent)."""

    pool: tuple[str, ...]
    held_out: tuple[str, ...]


def text_pool(corpus: PromptCorpus, seed: int, held_out: int = HELD_OUT_TEXTS) -> TextPool:
    """Split the public corpus the thief draws from: the same seed gives every thief and
    the student's judge the same split."""
    texts: Sequence[str] = corpus.all()
    order = np.random.default_rng([seed, 0x7E57]).permutation(len(texts))
    return TextPool(tuple(texts[int(i)] for i in order[held_out:]),
                    tuple(texts[int(i)] for i in order[:held_out]))
