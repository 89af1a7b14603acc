"""Detection at population scale: calibrate on one honest population, score another.

A live gateway on a laptop serves a few dozen honest clients; a false-positive rate of
0.1% needs thousands. Both populations here are replayed (:func:`replay_events`) into
the :class:`~modelfence.detect.engine.DetectionEngine` the gateway's detector runs.
Thresholds come from a *calibration* population drawn with its own seed; the rate is
measured on a disjoint *evaluation* population, and never on the attacks scored later.

    reference = calibrated_reference(corpus, rng_a, 2_000, config, embedder)
    score = score_population(DetectionEngine(config, embedder=embedder, reference=reference),
                             population_events(corpus, rng_b, 10_000))
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from modelfence.config import DetectionConfig
from modelfence.detect.actions import rank
from modelfence.detect.calibration import calibrate
from modelfence.detect.embedding import CachedEmbedder, Embedder
from modelfence.detect.engine import DetectionEngine, Verdict
from modelfence.detect.reference import Reference
from modelfence.redteam.populations.benign import BenignPopulation
from modelfence.redteam.prompts import PromptCorpus
from modelfence.redteam.replay import replay_events
from modelfence.redteam.replay_attacks import answer_classifier, attack_population
from modelfence.redteam.traffic import ClientProfile
from modelfence.telemetry.events import RequestEvent

DAY = 86_400.0
START_TS = 1_767_225_600.0


def population(clients: int) -> BenignPopulation:
    """A mix like a real API's: 80% chat, 10% embeddings, 10% classifier users, and one
    heavy honest user of each steady kind (summariser, camera) per 500 clients."""
    heavy = max(1, clients // 500)
    return BenignPopulation(
        chat_users=clients * 8 // 10, embedding_users=clients // 10, classifier_users=clients // 10,
        batch_summarisers=heavy, image_streams=heavy, max_tokens=256,
    )


def population_events(
    corpus: PromptCorpus, rng: np.random.Generator, clients: int, horizon: float = DAY
) -> list[RequestEvent]:
    plans, profiles = population(clients).generate(corpus, rng, horizon)
    return replay_events(plans, {p.name: p for p in profiles}, START_TS)


def by_client(events: Iterable[RequestEvent]) -> dict[str, list[RequestEvent]]:
    out: dict[str, list[RequestEvent]] = defaultdict(list)
    for event in events:
        out[event.client].append(event)
    return dict(out)


def calibrated_reference(
    corpus: PromptCorpus, rng: np.random.Generator, clients: int, config: DetectionConfig,
    embedder: Embedder,
) -> Reference:
    """The reference and thresholds from an honest population of ``clients`` (own seed),
    its classifier answers from the real digits model."""
    threadpool_limits(1)  # as the detector process runs (see detect/process.py)
    events = population_events(corpus, rng, clients)
    answer_classifier(events)
    return calibrate(by_client(events), config=config, embedder=embedder)


@dataclass
class PopulationScore:
    """What the detector did to a population: each client's highest level and why."""

    clients: int = 0
    events: int = 0
    seconds: float = 0.0
    worst: dict[str, str] = field(default_factory=dict)  # client -> highest level reached
    reasons: dict[str, list[str]] = field(default_factory=dict)  # at that level
    first_flag: dict[str, int] = field(default_factory=dict)  # client -> queries seen then
    linked: dict[str, int] = field(default_factory=dict)  # client -> largest entity it was in

    def flagged(self) -> list[str]:
        """Clients raised to ``alert`` or above at any point."""
        return sorted(c for c, level in self.worst.items() if rank(level) >= rank("alert"))


def score_population(
    engine: DetectionEngine, events: Sequence[RequestEvent], *, chunk: int = 500
) -> PopulationScore:
    """Replay ``events`` (time-ordered) through ``engine`` in pipeline-sized batches."""
    score = PopulationScore(clients=len({e.client for e in events}), events=len(events))

    def note(verdict: Verdict) -> None:
        if verdict.entity_members > score.linked.get(verdict.client, 1):
            score.linked[verdict.client] = verdict.entity_members
        if rank(verdict.level) >= rank("alert"):
            score.first_flag.setdefault(verdict.client, verdict.queries)
        if rank(verdict.level) > rank(score.worst.get(verdict.client, "normal")):
            score.worst[verdict.client] = verdict.level
            score.reasons[verdict.client] = [r.text for r in verdict.reasons]

    engine.listener = note
    started = time.perf_counter()
    for start in range(0, len(events), chunk):
        for verdict in engine.process(events[start : start + chunk]):
            note(verdict)  # members raised through their entity's evaluation
    score.seconds = time.perf_counter() - started
    return score


def detection_at_scale(
    corpus: PromptCorpus, rng: Callable[[str], np.random.Generator], *, clients: int,
    calibration_clients: int, attackers: int, sybils: int, embedder: Embedder,
    config: DetectionConfig | None = None,
) -> dict[str, Any]:
    """Calibrate on one honest population; replay another with ``attackers`` of every
    replayable kind and ``sybils`` Sybil campaigns among it; report what was caught."""
    config = config or DetectionConfig.model_validate({})
    started = time.perf_counter()
    reference = calibrated_reference(corpus, rng("calibration"), calibration_clients, config, embedder)
    calibrated_in = time.perf_counter() - started
    plans, profiles = population(clients).generate(corpus, rng("honest"), DAY)
    attack_plans, attack_profiles = attack_population(
        corpus, rng("attackers"), per_kind=attackers, horizon=DAY, sybils=sybils)
    everyone = {p.name: p for p in (*profiles, *attack_profiles)}
    events = replay_events([*plans, *attack_plans], everyone, START_TS)
    answer_classifier(events)
    engine = DetectionEngine(config, embedder=embedder, reference=reference)
    score = score_population(engine, events)
    honest = [p.name for p in profiles]
    flagged = [c for c in score.flagged() if c in everyone and everyone[c].role == "benign"]
    return {
        "calibration": {"clients": calibration_clients,
                        "seconds": round(calibrated_in, 1), "thresholds": reference.thresholds,
                        "tier_medians": reference.tier_medians},
        "benign": {
            "clients": len(honest), "flagged": len(flagged),
            "flagged_share": len(flagged) / len(honest),
            "blocked": sum(score.worst.get(c) == "block" for c in honest),
            "heavy_users": {c: score.worst.get(c, "normal") for c in honest
                            if c.startswith(("benign-summariser", "benign-camera"))},
            "flagged_clients": {c: [score.worst[c], *score.reasons[c]] for c in flagged[:20]},
        },
        "attacks": _attack_outcomes(score, attack_profiles),
        "throughput": {"events": score.events, "seconds": round(score.seconds, 1),
                       "events_per_second": round(score.events / score.seconds),
                       "queries": sum(s.total for s in engine.clients.values()),
                       **_cache_stats(embedder)},
    }


def _attack_outcomes(score: PopulationScore, profiles: Sequence[ClientProfile]) -> dict[str, Any]:
    kinds: dict[str, list[str]] = defaultdict(list)
    for profile in profiles:
        kinds[profile.campaign.rsplit("-", 1)[0] if profile.campaign else profile.name.rsplit("-", 1)[0]].append(profile.name)
    out: dict[str, Any] = {}
    for kind, names in kinds.items():
        before = sorted(score.first_flag[n] for n in names if n in score.first_flag)
        out[kind.removeprefix("attack-")] = {
            "keys": len(names),
            "flagged": len(before),
            "detection_rate": len(before) / len(names),
            "blocked": sum(score.worst.get(n) == "block" for n in names),
            "queries_before_first_flag": {
                "median": float(np.median(before)), "p90": float(np.quantile(before, 0.9)),
                "max": before[-1]} if before else None,
            "largest_entity": max((score.linked.get(n, 1) for n in names), default=1),
        }
    return out


def _cache_stats(embedder: Embedder) -> dict[str, int]:
    if isinstance(embedder, CachedEmbedder):
        return {"embedder_cache_hits": embedder.hits, "texts_embedded": embedder.misses}
    return {}
