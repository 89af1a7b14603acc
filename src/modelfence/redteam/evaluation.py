"""The v2 yardstick: a week of honest customers and a library of thieves, undefended and
defended side by side, measured as what the thief gets and what honest customers suffer.

Three populations, three seeds: detection is calibrated on the v1 honest population
(``load_prompts`` corpus); the evaluated honest week comes from another generator
(``populations/week.py``), another corpus (``load_evaluation_prompts``) and segments the
calibration lacks (agents with tools, students, bulk, 24/7, NAT, launch bursts); the
thieves draw from their own split of the public corpus and are judged on texts and
images they never sent.

The honest week is replayed as a stratified sample: every segment's customers are drawn
uniformly (NAT and university keys whole, since they share addresses), each standing for
``N / n`` of its segment. Shares are weighted accordingly, with a Wilson interval on the
Kish effective sample size.

    details = evaluate("adaptive", SUITES["ci"].v2, seed=1, rng=ctx.rng)
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from modelfence.detect.embedding import CachedEmbedder, Embedder, load_embedder
from modelfence.detect.engine import DetectionEngine
from modelfence.detect.reference import Reference
from modelfence.redteam.contest import FRICTIONS, CampaignOutcome, Contest, ContestResult
from modelfence.redteam.populations.week import (
    GROUP_OF,
    GROUPS,
    RECENT_SIGNUP,
    HonestWeek,
    stratified_sample,
)
from modelfence.redteam.prompts import (
    load_evaluation_documents,
    load_evaluation_prompts,
    load_prompts,
)
from modelfence.redteam.replay_detection import calibrated_reference
from modelfence.redteam.tariff import example_config
from modelfence.redteam.theft import (
    Assessor,
    ChatAssessor,
    ClassifierAssessor,
    EmbeddingAssessor,
    accounts_needed,
    theft_reduction,
    trajectory,
    wilson,
)
from modelfence.redteam.thieves import Scale, adaptive_library, hydra_library, paced_hydra_library
from modelfence.redteam.thieves.base import DAY, Asset, Knowledge, Thief, text_pool
from modelfence.redteam.traffic import ClientProfile

Kind = Literal["adaptive", "hydra", "paced-hydra"]
QUALITY_SHARE = 0.95  # "accounts needed": accounts that had sent when quality reached this share of undefended
REPLAY_EMBEDDING_CACHE = 200_000  # distinct texts of a run; only speed depends on it


@dataclass(frozen=True, slots=True)
class Size:
    """How big one v2 run is: the honest week, its replayed sample and the thieves."""

    counts: Mapping[str, int]  # honest customers per segment
    sample: Mapping[str, int]  # customers replayed per segment (segments not named: all)
    days: float
    calibration_clients: int
    scale: Scale


def _library(kind: Kind, size: Size, seed: int, reference: Reference, embedder: Embedder) -> list[Thief]:
    """A fresh library (thieves keep state while they run, so each contest gets its own)."""
    if kind == "hydra":
        return hydra_library(size.scale, seed=seed)
    if kind == "paced-hydra":
        return paced_hydra_library(size.scale, seed=seed)
    return adaptive_library(size.scale, seed=seed, knowledge=Knowledge.published(),
                            white_box=Knowledge.white_box(reference), embedder=embedder)


def evaluate(kind: Kind, size: Size, *, seed: int, rng: Callable[[str], np.random.Generator]) -> dict[str, Any]:
    """Calibrate, replay the honest week with the thieves undefended and defended, judge."""
    started = time.perf_counter()
    config = example_config()  # the deployment evaluated: the defaults a new operator starts from
    # The served embedding model is the victim of embedding theft and the judge of chat
    # coverage; the detector runs it too (``embedder: auto`` picks it when installed).
    embedder = load_embedder("minilm", cache=REPLAY_EMBEDDING_CACHE)
    reference = calibrated_reference(load_prompts(), rng("calibration"), size.calibration_clients,
                                     config.detection, embedder)
    calibrated = time.perf_counter()
    week = HonestWeek(counts=size.counts, days=size.days, seed=int(rng("honest-week").integers(1 << 31)))
    customers = week.customers()
    sampled, weights = stratified_sample(customers, size.sample, rng("honest-sample"))
    plans, profiles = week.generate(load_evaluation_prompts(), load_evaluation_documents(), sampled)
    # Every customer's sign-up, sampled or not: the store holds the whole population's
    # accounts, so the sign-up surge watch sees the real arrival rate, not the sample's.
    # Its history starts a week before the week: earlier sign-ups are only the customers
    # still here two years on, far fewer a day than a business signs up.
    signups = sorted(((c.name, at) for c in customers if (at := week.account(c).signed_up) >= -RECENT_SIGNUP[0] * DAY),
                     key=lambda s: s[1])
    generated = time.perf_counter()
    runs: dict[bool, ContestResult] = {}
    thieves: list[Thief] = []
    for defended in (False, True):
        thieves = _library(kind, size, seed, reference, embedder)
        engine = DetectionEngine(config.detection, embedder=embedder, reference=reference) if defended else None
        runs[defended] = Contest(config, engine).run(plans, profiles, thieves, signups=signups)
    judged = time.perf_counter()
    attacks = _judge(thieves, runs, _assessors(seed, embedder))
    honest = _honest(customers, profiles, weights, runs)
    return {
        "kind": kind,
        "seed": seed,
        "honest": honest,
        "attacks": attacks,
        "calibration": {"clients": size.calibration_clients, "thresholds": reference.thresholds,
                        "tier_medians": reference.tier_medians},
        "events": {"undefended": runs[False].events, "defended": runs[True].events},
        "embedder": type(embedder.inner).__name__ if isinstance(embedder, CachedEmbedder) else type(embedder).__name__,
        "plans": len(plans),
        "seconds": {"calibration": round(calibrated - started, 1), "generation": round(generated - calibrated, 1),
                    "undefended": round(runs[False].seconds, 1), "defended": round(runs[True].seconds, 1),
                    "judging": round(time.perf_counter() - judged, 1)},
        "markdown": markdown_tables(kind, attacks, honest),
    }


# -- what the thieves got --------------------------------------------------------------


def _assessors(seed: int, embedder: Embedder) -> dict[Asset, Assessor]:
    held_out = text_pool(load_prompts(), seed).held_out
    return {"classifier": ClassifierAssessor(seed), "embeddings": EmbeddingAssessor(held_out, embedder),
            "chat": ChatAssessor(held_out, embedder)}


def _side(assessor: Assessor, outcome: CampaignOutcome) -> dict[str, Any]:
    answered = [plan for plan, _ in outcome.answered]
    return {"quality": round(assessor.quality(answered), 4), "units": sum(p.units for p in answered),
            "requests": outcome.requests, "answered_requests": len(answered) + outcome.cover_answered,
            "throttled": outcome.throttled, "blocked": outcome.blocked, "degraded": outcome.degraded,
            "accounts_used": len(outcome.senders), "accounts_flagged": outcome.accounts_flagged,
            "accounts_refused_early": len(outcome.refused_early),
            "usd": round(outcome.usd, 4), "units_before_first_flag": outcome.units_before_first_flag}


def _judge(thieves: Sequence[Thief], runs: Mapping[bool, ContestResult],
           assessors: Mapping[Asset, Assessor]) -> list[dict[str, Any]]:
    rows = []
    for thief in thieves:
        assessor = assessors[thief.asset]
        baseline = assessor.baseline()
        undefended = _side(assessor, runs[False].campaigns[thief.name])
        defended = _side(assessor, runs[True].campaigns[thief.name])
        target = QUALITY_SHARE * undefended["quality"]
        sides = {"undefended": runs[False].campaigns[thief.name].answered,
                 "defended": runs[True].campaigns[thief.name].answered}
        rows.append({
            "attack": thief.name, "strategy": thief.strategy, "asset": thief.asset,
            "budget": {"accounts": thief.budget.accounts, "days": thief.budget.days, "usd": thief.budget.usd},
            "baseline": round(baseline, 4), "undefended": undefended, "defended": defended,
            "theft_reduction": _rounded(theft_reduction(baseline, defended["quality"], undefended["quality"])),
            "needed_for_95": {side: _needed_at(accounts_needed(assessor, answered, target))
                              for side, answered in sides.items()},
            "trajectory": {side: trajectory(assessor, answered) for side, answered in sides.items()},
        })
    return rows


def _needed_at(found: tuple[int, int] | None) -> dict[str, int] | None:
    return None if found is None else {"units": found[0], "accounts": found[1]}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# -- what honest customers suffered -------------------------------------------------------


def weighted_share(met: Sequence[tuple[bool, float]]) -> dict[str, Any]:
    """Weighted share of clients that met a friction, with a Wilson interval on the Kish
    effective sample size (``met``: (whether it did, the client's weight))."""
    if not met:
        return {"share": None, "interval": None, "sampled": 0, "represents": 0}
    weights = np.array([w for _, w in met])
    hits = np.array([hit for hit, _ in met], dtype=float)
    share = float((weights * hits).sum() / weights.sum())
    effective = float(weights.sum() ** 2 / (weights**2).sum())
    low, high = wilson(round(share * effective), max(round(effective), 1))
    return {"share": round(share, 5), "interval": [round(low, 5), round(high, 5)], "sampled": len(met),
            "represents": round(float(weights.sum()))}


def _honest(customers: Sequence[Any], profiles: Sequence[ClientProfile], weights: Mapping[str, float],
            runs: Mapping[bool, ContestResult]) -> dict[str, Any]:
    out: dict[str, Any] = {"population": len(customers), "sampled": len(profiles),
                           "heavy_bulk_247": sum(GROUP_OF[c.segment] in ("heavy", "bulk", "24/7") for c in customers)}
    for defended, run in runs.items():
        by_group: dict[str, list[tuple[bool, float]]] = defaultdict(list)
        by_kind: dict[str, list[tuple[bool, float]]] = defaultdict(list)
        by_segment: dict[str, list[tuple[bool, float]]] = defaultdict(list)
        for profile in profiles:
            met = run.honest.get(profile.name, set())
            weight = weights[profile.segment]
            felt = bool(met - {"tightened"})
            by_group[GROUP_OF[profile.segment]].append((felt, weight))
            by_group["all"].append((felt, weight))
            by_segment[profile.segment].append((felt, weight))
            for friction in (*FRICTIONS, "flagged"):
                hit = profile.name in run.honest_flagged if friction == "flagged" else friction in met
                by_kind[friction].append((hit, weight))
        out["defended" if defended else "undefended"] = {
            "any_friction": {group: weighted_share(by_group[group]) for group in (*GROUPS, "all")},
            "by_kind": {kind: weighted_share(rows) for kind, rows in by_kind.items()},
            "by_segment": {segment: weighted_share(rows) for segment, rows in sorted(by_segment.items())},
            "why": _why(profiles, run),
        }
    return out


def _why(profiles: Sequence[ClientProfile], run: ContestResult) -> dict[str, dict[str, int]]:
    """Per segment, how many replayed honest clients reached each worst level with each
    leading reason (``"block: volume_vs_tier"``): what a defence must stop tripping on."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for profile in profiles:
        if profile.name in run.reasons:
            level, codes = run.reasons[profile.name]
            out[profile.segment][f"{level}: {codes[0] if codes else 'entity'}"] += 1
    return {segment: dict(counts) for segment, counts in sorted(out.items())}


# -- tables ------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def markdown_tables(kind: Kind, attacks: Sequence[Mapping[str, Any]], honest: Mapping[str, Any]) -> str:
    """The two tables docs/EVALUATION.md reports: theft per attack, friction per group."""
    lines = [(f"**Theft ({kind})** — quality: classifier clone fidelity, embedding student cosine, "
              "chat task coverage (proxy); undefended → defended."), "",
             ("| attack | asset | accounts (budget) | units bought | quality (no-query baseline) | accounts used "
              "| USD | theft reduction | accounts needed for 95% | accounts flagged | accounts refused in 2 days |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in attacks:
        u, d = row["undefended"], row["defended"]
        lines.append(
            f"| {row['attack']} | {row['asset']} | {row['budget']['accounts']:,} | {u['units']:,} → {d['units']:,} "
            f"| {u['quality']:.3f} → {d['quality']:.3f} ({row['baseline']:.3f}) "
            f"| {u['accounts_used']:,} → {d['accounts_used']:,} | {u['usd']:.2f} → {d['usd']:.2f} "
            f"| {_pct(row['theft_reduction'])} | {_needed(row['needed_for_95']['undefended'])} → "
            f"{_needed(row['needed_for_95']['defended'])} "
            f"| {d['accounts_flagged']:,} of {d['accounts_used']:,} "
            f"| {d['accounts_refused_early']:,} of {d['accounts_used']:,} |")
    lines += ["", (f"**Honest friction ({kind})** — share of honest clients that ever met a refusal, a degraded "
                   "answer or a block over the week (probation caps apply to defended runs only; their 429s are "
                   "refusals); weighted sample, 95% Wilson interval."),
              "", "| group | clients represented (replayed) | undefended | defended |", "|---|---:|---:|---:|"]
    for group in (*GROUPS, "all"):
        u = honest["undefended"]["any_friction"][group]
        d = honest["defended"]["any_friction"][group]
        if u["share"] is None:
            continue
        lines.append(f"| {group} | {u['represents']:,} ({u['sampled']:,}) | {_interval(u)} | {_interval(d)} |")
    kinds = honest["defended"]["by_kind"]
    lines += ["", f"Honest clients that met a probation cap (defended): {_interval(kinds['probation'])}.",
              "", ("Honest clients that met one after their first week (put back on probation by detection): "
                   f"{_interval(kinds['probation_after_week'])}.")]
    lines += ["", "By segment, defended, with the detector's leading reason at each client's worst level:", "",
              "| segment | replayed | undefended | defended | worst level: leading reason (clients) |",
              "|---|---:|---:|---:|---|"]
    defended = honest["defended"]
    for segment, share in defended["by_segment"].items():
        why = sorted(defended["why"].get(segment, {}).items(), key=lambda kv: -kv[1])
        lines.append(f"| {segment} | {share['sampled']:,} | {_interval(honest['undefended']['by_segment'][segment])} "
                     f"| {_interval(share)} | {', '.join(f'{k} ({n})' for k, n in why) or '–'} |")
    return "\n".join(lines)


def _needed(found: Mapping[str, int] | None) -> str:
    return "never" if found is None else f"{found['accounts']:,}"


def _interval(share: Mapping[str, Any]) -> str:
    low, high = share["interval"]
    return f"{share['share']:.2%} [{low:.2%}, {high:.2%}]"

