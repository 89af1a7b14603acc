"""Many attackers, by replay: one live attacker per scenario says little about a rate.

A detection rate of 99% per key needs a hundred attackers of each kind, each with its
own seed, address and client library. The attacks whose requests do not depend on the
answers (harvesting, the logit probe, embedding theft, KnockoffNets' random sampling,
CopycatCNN, and their Sybil and low-and-slow spreads) are planned here exactly as the
live scenarios send them (same planners) and replayed among an honest population.
The classifier's answers come from the real digits model, so detectors that read the
output margin see what they would see live. Adaptive attacks (adaptive KnockoffNets,
JBDA) choose each query from the last answer and are measured live only.

    plans, profiles = attack_population(corpus, rng, per_kind=100)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from modelfence.redteam.attacks import embeddings, llm, logits
from modelfence.redteam.attacks.classifier import DigitsData
from modelfence.redteam.prompts import PromptCorpus
from modelfence.redteam.timing import SteadyTiming
from modelfence.redteam.traffic import (
    DIGITS_INFER,
    ClientProfile,
    PlannedRequest,
    digits_body,
    make_profile,
)
from modelfence.telemetry.events import RequestEvent

if TYPE_CHECKING:  # the demo extra; imported when the first answers are needed
    from modelfence.demo.classifier import DigitsClassifier

# Budgets of one attacker instance: what the live ``full`` suite's largest checkpoint sends.
HARVEST_PROMPTS = 300
CLASSIFIER_ROWS = 2_000
EMBEDDING_TEXTS = 1_536
CARLINI_PROMPTS = 48
SYBIL_KEYS = 12
ROWS_PER_REQUEST = 64  # ART's query batch in the live scenarios
SUBNET_BASE = 40_000  # attackers' /24s, clear of the honest population's

Planner = Callable[[str, PromptCorpus, np.random.Generator], list[PlannedRequest]]


def _harvest(style: str) -> Planner:
    def plan(client: str, corpus: PromptCorpus, rng: np.random.Generator) -> list[PlannedRequest]:
        return llm.harvest_plan(style, client, corpus, rng, count=HARVEST_PROMPTS, max_tokens=512, rate=0.5)

    return plan


def _carlini(client: str, corpus: PromptCorpus, rng: np.random.Generator) -> list[PlannedRequest]:
    prompts = corpus.all()
    picks = rng.permutation(len(prompts))[:CARLINI_PROMPTS]
    probe = logits.LogitProbe([prompts[int(i)] for i in picks], "wide", 1000, 16)
    return probe.plans(client, 1.0, rng)


def _embedding_theft(client: str, corpus: PromptCorpus, rng: np.random.Generator) -> list[PlannedRequest]:
    texts = corpus.all()
    picks = rng.permutation(len(texts))[: min(EMBEDDING_TEXTS, len(texts))]
    return embeddings.theft_plan([texts[int(i)] for i in picks], client, 2.0, rng)


def _pool_rows(rng: np.random.Generator, shuffle: bool) -> np.ndarray:
    """The thief's own digits, padded with noisy copies, as ART's random sampling or
    CopycatCNN would send them."""
    data = DigitsData.split(int(rng.integers(1 << 30)))
    rows, _ = data.padded_pool(CLASSIFIER_ROWS, int(rng.integers(1 << 30)))
    rows = rows.reshape(-1, 64)
    return rows[rng.permutation(len(rows))] if shuffle else rows


def digit_batches(client: str, rows: np.ndarray, rng: np.random.Generator, rate: float = 1.0) -> list[PlannedRequest]:
    chunks = [rows[i : i + ROWS_PER_REQUEST] for i in range(0, len(rows), ROWS_PER_REQUEST)]
    times = SteadyTiming(rate).arrivals(rng, horizon=10 * len(chunks) / rate)
    return [PlannedRequest(at, client, DIGITS_INFER, digits_body(chunk), "extraction")
            for at, chunk in zip(times, chunks, strict=False)]


def _knockoff(client: str, corpus: PromptCorpus, rng: np.random.Generator) -> list[PlannedRequest]:
    return digit_batches(client, _pool_rows(rng, shuffle=True), rng)


def _copycat(client: str, corpus: PromptCorpus, rng: np.random.Generator) -> list[PlannedRequest]:
    return digit_batches(client, _pool_rows(rng, shuffle=False), rng)


def _low_and_slow(client: str, corpus: PromptCorpus, rng: np.random.Generator) -> list[PlannedRequest]:
    """KnockoffNets in batches of 16, each after four small in-distribution cover queries,
    one request a minute."""
    rows = _pool_rows(rng, shuffle=True)
    cover = DigitsData.split(int(rng.integers(1 << 30))).pool.reshape(-1, 64)
    plans, at = [], 0.0
    for i in range(0, len(rows), 16):
        for _ in range(4):
            at += float(rng.exponential(60.0))
            picks = cover[rng.integers(len(cover), size=int(rng.integers(1, 4)))]
            plans.append(PlannedRequest(at, client, DIGITS_INFER, digits_body(picks), "cover"))
        at += float(rng.exponential(60.0))
        plans.append(PlannedRequest(at, client, DIGITS_INFER, digits_body(rows[i : i + 16]), "extraction"))
    return plans


SINGLE_KEY: dict[str, Planner] = {
    "harvest-broad": _harvest("broad"),
    "harvest-template": _harvest("template"),
    "harvest-cot": _harvest("cot"),
    "carlini": _carlini,
    "embedding-theft": _embedding_theft,
    "knockoff-random": _knockoff,
    "copycat": _copycat,
    "low-and-slow": _low_and_slow,
}


def attack_population(
    corpus: PromptCorpus, rng: np.random.Generator, *, per_kind: int, horizon: float,
    sybils: int = 0,
) -> tuple[list[PlannedRequest], list[ClientProfile]]:
    """``per_kind`` single-key attackers of every kind in ``SINGLE_KEY`` and ``sybils``
    Sybil campaigns (KnockoffNets split round-robin over ``SYBIL_KEYS`` keys with
    distinct /24s and client libraries), each starting at a random time in ``horizon``."""
    plans: list[PlannedRequest] = []
    profiles: list[ClientProfile] = []
    subnet = SUBNET_BASE
    for kind, planner in SINGLE_KEY.items():
        for i in range(per_kind):
            subnet += 1
            profile = make_profile(rng, f"attack-{kind}-{i}", "attacker", subnet=subnet)
            start = float(rng.uniform(0, horizon / 2))
            profiles.append(profile)
            plans.extend(_shifted(planner(profile.name, corpus, rng), start))
    for c in range(sybils):
        names = []
        for k in range(SYBIL_KEYS):
            subnet += 1
            profile = make_profile(rng, f"attack-sybil-{c}-{k}", "attacker", subnet=subnet,
                                   campaign=f"attack-sybil-{c}")
            profiles.append(profile)
            names.append(profile.name)
        start = float(rng.uniform(0, horizon / 2))
        campaign = _knockoff(names[0], corpus, rng)
        plans.extend(_shifted([replace(p, client=names[j % SYBIL_KEYS]) for j, p in enumerate(campaign)], start))
    return plans, profiles


def _shifted(plans: Sequence[PlannedRequest], start: float) -> list[PlannedRequest]:
    return [replace(p, at=p.at + start) for p in plans]


@cache  # the victim is the same for every replay of a run
def victim_classifier() -> DigitsClassifier:
    from modelfence.demo.classifier import DigitsClassifier

    return DigitsClassifier.train(seed=0)


def shows_margins(body: Mapping[str, Any]) -> bool:
    """Whether a live gateway would record output margins for this OIP request: only an
    answer with probabilities has them (a labels-only answer, asked for or degraded to,
    records none)."""
    outputs = body.get("outputs")
    return not outputs or any(o.get("name") == "probabilities" for o in outputs)


def answer_classifier(events: Sequence[RequestEvent]) -> None:
    """Fill in each classifier event's per-row margins from the real digits model."""
    model = victim_classifier()
    digits = [e for e in events if e.input_rows]
    if not digits:
        return
    proba = model.predict_proba(np.asarray([row for e in digits for row in e.input_rows or []], dtype=np.float32))
    top2 = np.sort(proba, axis=1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0]).tolist()
    at = 0
    for event in digits:
        n = len(event.input_rows or [])
        event.output_margins = margins[at : at + n]
        event.output_label = int(proba[at].argmax())
        at += n
