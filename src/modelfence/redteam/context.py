"""What every scenario shares: its result type, the run context, and the common ending
that measures what the defender did to the scenario's actors.

    result = ScenarioResult("sybil", "...", "fidelity")
    ...
    return await finish(ctx, result, identities, since, started)
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from modelfence.redteam import detection
from modelfence.redteam.metrics import (
    BenignOutcome,
    DefenderOutcome,
    Price,
    answered_before,
    defender_outcome,
    dollar_cost,
    quality_at,
)
from modelfence.redteam.prompts import PromptCorpus, load_prompts
from modelfence.redteam.runner import LiveGateway
from modelfence.redteam.suites import Suite
from modelfence.redteam.traffic import Exchange, make_profile

EVALUATOR = "harness-evaluator"


@dataclass
class CurvePoint:
    queries: int  # inputs the attacker paid for so far (images, prompts, texts, rows)
    requests: int  # HTTP requests sent so far
    quality: dict[str, float]
    cost_usd: float


@dataclass
class ScenarioResult:
    name: str
    description: str
    metric: str  # the headline key of CurvePoint.quality
    curve: list[CurvePoint] = field(default_factory=list)
    defender: DefenderOutcome | None = None
    benign: BenignOutcome | None = None
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Context:
    live: LiveGateway | None  # None when every scenario of the run is replayed
    suite: Suite
    seed: int
    prices: Mapping[str, Price]
    _subnet: int = 1000

    @property
    def gateway(self) -> LiveGateway:
        if self.live is None:
            raise RuntimeError("this run has no live gateway: replay-only scenarios were chosen")
        return self.live

    @cached_property
    def corpus(self) -> PromptCorpus:
        return load_prompts()

    def rng(self, scenario: str) -> np.random.Generator:
        """A generator per scenario, so running one scenario alone gives the same numbers."""
        return np.random.default_rng([self.seed, *scenario.encode()])

    async def attackers(self, scenario: str, count: int = 1) -> list[str]:
        rng = self.rng(scenario + "/identities")
        profiles = []
        for i in range(count):
            self._subnet += 1
            profiles.append(make_profile(rng, f"{scenario}-{i}" if count > 1 else scenario, "attacker",
                                         subnet=self._subnet, campaign=scenario if count > 1 else ""))
        await self.gateway.register(profiles)
        return [p.name for p in profiles]

    async def evaluator(self) -> str:
        """An identity for the harness's own measurements, kept out of every outcome."""
        if EVALUATOR not in self.gateway.keys:
            await self.gateway.register([make_profile(self.rng("evaluator"), EVALUATOR, "harness", subnet=999)])
        return EVALUATOR


def sent_by(gateway: LiveGateway, names: Sequence[str], since: int) -> list[Exchange]:
    """Exchanges since position ``since`` of the log that the actors ``names`` planned."""
    wanted = set(names)
    return [e for e in gateway.exchanges[since:] if e.request.client in wanted]


def point(queries: int, sent: Sequence[Exchange], quality: dict[str, float], prices: Mapping[str, Price]) -> CurvePoint:
    """A checkpoint: ``queries`` paid for, the extraction requests and the dollars so far."""
    requests = sum(e.request.purpose == "extraction" for e in sent)
    return CurvePoint(queries, requests, quality, round(dollar_cost(sent, prices), 6))


async def finish(ctx: Context, result: ScenarioResult, actors: Sequence[str], since: int, started: float) -> ScenarioResult:
    """Fill in the defender's side for ``actors`` (all of a campaign's identities) and
    the time taken; flags come from the detection admin API when there is one."""
    sent = sent_by(ctx.gateway, actors, since)
    outcome = defender_outcome(sent)
    found = await detection.flags(ctx.gateway, sorted({e.client for e in sent}))
    if found is None:
        result.details["detection"] = detection.NOT_AVAILABLE
    else:
        outcome.flagged = bool(found)
        if found:
            at = min(flag.at for flag in found.values())
            outcome.requests_before_first_flag, outcome.queries_before_first_flag = answered_before(sent, at)
            curve = [(p.queries, p.quality[result.metric]) for p in result.curve if result.metric in p.quality]
            outcome.quality_at_first_flag = quality_at(curve, outcome.queries_before_first_flag)
    result.defender = outcome
    result.seconds = round(time.perf_counter() - started, 1)
    return result
