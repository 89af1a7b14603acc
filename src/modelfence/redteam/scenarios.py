"""The named scenarios: each drives the gateway, then measures attacker, defender and
(for the benign population) the honest side.

A scenario is an async function ``(Context) -> ScenarioResult`` registered in
``SCENARIOS``; ``run_suite`` runs a selection of them against one gateway.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from modelfence.redteam import detection
from modelfence.redteam.attacks import classifier, distribution, embeddings, llm, logits
from modelfence.redteam.context import Context, ScenarioResult, finish, point, sent_by
from modelfence.redteam.evaluation import Kind, evaluate
from modelfence.redteam.metrics import benign_outcome, dollar_cost
from modelfence.redteam.replay import LimitsBaseline, replay
from modelfence.redteam.runner import run_plan
from modelfence.redteam.stack import BASELINE_TIER
from modelfence.redteam.timing import VirtualClock

ScenarioFn = Callable[[Context], Awaitable[ScenarioResult]]


# -- benign population --------------------------------------------------------------------


async def benign(ctx: Context) -> ScenarioResult:
    started = time.perf_counter()
    plans, profiles = ctx.suite.population.generate(ctx.corpus, ctx.rng("benign"), ctx.suite.horizon)
    await ctx.gateway.register(profiles)
    sent = await run_plan(ctx.gateway, plans, VirtualClock(ctx.suite.compression))
    names = [p.name for p in profiles]
    found = await detection.flags(ctx.gateway, names)
    result = ScenarioResult("benign", "honest population: real prompts, human timing, heavy honest users",
                            "throttled_share")
    result.benign = benign_outcome(sent, names, None if found is None else set(found))
    result.details = {"clients": len(profiles), "requests": len(sent),
                      "cost_usd": round(dollar_cost(sent, ctx.prices), 4),
                      "prompt_sources": ctx.corpus.sources, "virtual_hours": ctx.suite.horizon / 3600}
    if found is None:
        result.details["detection"] = detection.NOT_AVAILABLE
    result.seconds = round(time.perf_counter() - started, 1)
    return result


# -- classifier extraction ----------------------------------------------------------------


async def _victim_labels(ctx: Context, data: classifier.DigitsData) -> np.ndarray:
    oracle = classifier.DigitsOracle(ctx.gateway.blocking_send, await ctx.evaluator(), batch=512)
    answers = await asyncio.to_thread(oracle, data.test)
    labels: np.ndarray = answers.argmax(axis=1)
    return labels


def _steal(method: str, oracle: classifier.DigitsOracle, data: classifier.DigitsData, budget: int, ctx: Context) -> object:
    if method == "jbda":
        return classifier.run_jbda(oracle, data, budget, ctx.seed, ctx.suite.thief_epochs)
    return classifier.run_art(method, oracle, data, budget, ctx.seed, ctx.suite.thief_epochs)


def _classifier_scenario(method: str, labels_only: bool, description: str) -> ScenarioFn:
    async def scenario(ctx: Context) -> ScenarioResult:
        name = f"{method}-{'labels' if labels_only else 'probs'}"
        started, since = time.perf_counter(), len(ctx.gateway.exchanges)
        data = classifier.DigitsData.split(ctx.seed)
        victim = await _victim_labels(ctx, data)
        (client,) = await ctx.attackers(name)
        result = ScenarioResult(name, description, "fidelity")
        budgets = (ctx.suite.adaptive_budget,) if method == "knockoff-adaptive" else ctx.suite.classifier_budgets
        # One thief, one memory of answers: each checkpoint extends the last one's purchases.
        oracle = classifier.DigitsOracle(ctx.gateway.blocking_send, client, labels_only=labels_only)
        for budget in budgets:
            try:
                thief = await asyncio.to_thread(_steal, method, oracle, data, budget, ctx)
            except classifier.GatewayRefused as refused:
                result.details["stopped"] = f"gateway answered {refused.exchange.status} at budget {budget}"
                break
            result.curve.append(point(oracle.rows_queried, sent_by(ctx.gateway, [client], since),
                                      classifier.clone_quality(thief, data, victim), ctx.prices))
        return await finish(ctx, result, [client], since, started)

    return scenario


# -- distribution tricks (on KnockoffNets random, probabilities) ----------------------------


async def _spread_knockoff(ctx: Context, name: str, send_for: Callable[[list[str]], distribution.Send], keys: int, description: str) -> ScenarioResult:
    started, since = time.perf_counter(), len(ctx.gateway.exchanges)
    data = classifier.DigitsData.split(ctx.seed)
    victim = await _victim_labels(ctx, data)
    identities = await ctx.attackers(name, keys)
    budget = ctx.suite.classifier_budgets[-1]
    oracle = classifier.DigitsOracle(send_for(identities), identities[0], batch=16)
    result = ScenarioResult(name, description, "fidelity")
    try:
        thief = await asyncio.to_thread(classifier.run_art, "knockoff-random", oracle, data, budget, ctx.seed, ctx.suite.thief_epochs)
        result.curve.append(point(oracle.rows_queried, sent_by(ctx.gateway, identities, since),
                                  classifier.clone_quality(thief, data, victim), ctx.prices))
    except classifier.GatewayRefused as refused:
        result.details["stopped"] = f"gateway answered {refused.exchange.status}"
    sent = sent_by(ctx.gateway, identities, since)
    result.details["identities_used"] = len({e.client for e in sent})
    result.details["cover_requests"] = sum(e.request.purpose == "cover" for e in sent)
    result.details["rotations"] = sum(ctx.gateway.rotations.get(i, 0) for i in identities)
    return await finish(ctx, result, identities, since, started)


async def sybil(ctx: Context) -> ScenarioResult:
    return await _spread_knockoff(
        ctx, "sybil", lambda ids: distribution.sybil(ctx.gateway, ids), ctx.suite.sybil_keys,
        f"KnockoffNets over {ctx.suite.sybil_keys} keys, distinct /24s and client libraries, round-robin")


async def low_and_slow(ctx: Context) -> ScenarioResult:
    cover = classifier.DigitsData.split(ctx.seed).pool.reshape(-1, 64)
    return await _spread_knockoff(
        ctx, "low-and-slow",
        lambda ids: distribution.low_and_slow(ctx.gateway, ids[0], cover, ctx.rng("cover")), 1,
        "KnockoffNets hidden in 80% in-distribution cover queries")


async def key_rotation(ctx: Context) -> ScenarioResult:
    return await _spread_knockoff(
        ctx, "key-rotation", lambda ids: distribution.rotating(ctx.gateway, ids[0]), 1,
        "KnockoffNets that replaces its account after every refusal")


# -- LLM harvesting, logit leakage, embedding theft -----------------------------------------


def _harvest(style: str) -> ScenarioFn:
    async def scenario(ctx: Context) -> ScenarioResult:
        name = f"harvest-{style}"
        started, since = time.perf_counter(), len(ctx.gateway.exchanges)
        (client,) = await ctx.attackers(name)
        plans = llm.harvest_plan(style, client, ctx.corpus, ctx.rng(name), count=ctx.suite.harvest_prompts,
                                 max_tokens=ctx.suite.harvest_max_tokens, rate=0.5)
        sent = await run_plan(ctx.gateway, plans, VirtualClock(ctx.suite.compression))
        got = llm.harvest_yield(sent)
        result = ScenarioResult(name, f"distillation harvesting ({style})", "completion_tokens")
        result.curve.append(point(int(got["answered_prompts"]), sent, {k: float(v) for k, v in got.items()}, ctx.prices))
        return await finish(ctx, result, [client], since, started)

    return scenario


async def carlini(ctx: Context) -> ScenarioResult:
    """The wide probe, with a checkpoint per quarter of its rows, then a small sample of
    the OpenAI-faithful bias probe to show its stitching works and price it in requests."""
    started, since = time.perf_counter(), len(ctx.gateway.exchanges)
    (client,) = await ctx.attackers("carlini")
    suite, prompts = ctx.suite, ctx.corpus.all()
    wide = logits.LogitProbe(prompts[: suite.carlini_prompts], "wide", suite.carlini_columns, suite.carlini_positions)
    sent = await run_plan(ctx.gateway, wide.plans(client, 1.0, ctx.rng("carlini")), VirtualClock(suite.compression))
    result = ScenarioResult("carlini", "logit_bias + top_logprobs probe for the hidden size (SVD)", "recovered_rank")
    for quarter in range(1, 5):
        upto = sent[: len(sent) * quarter // 4]
        got = logits.probe_rank(wide, upto)
        result.curve.append(point(len(upto), upto, got, ctx.prices))
    bias = logits.LogitProbe(prompts[-suite.carlini_bias_prompts :], "bias", suite.carlini_bias_columns,
                             suite.carlini_positions)
    sample = await run_plan(ctx.gateway, bias.plans(client, 1.0, ctx.rng("carlini-bias")), VirtualClock(suite.compression))
    rows = int(result.curve[-1].quality["rows"]) if result.curve else 0
    result.details = {
        "hidden_size": logits.HIDDEN_TARGET,
        "bias_sample": {"requests": len(sample), **logits.probe_rank(bias, sample)},
        "bias_requests_needed": logits.bias_requests_needed(max(rows, logits.HIDDEN_TARGET + 1), positions=suite.carlini_positions),
        "bias_generated_tokens_needed": max(rows, logits.HIDDEN_TARGET + 1) * math.ceil((logits.HIDDEN_TARGET + 1) / logits.PER_BATCH),
    }
    return await finish(ctx, result, [client], since, started)


async def embedding_theft(ctx: Context) -> ScenarioResult:
    started, since = time.perf_counter(), len(ctx.gateway.exchanges)
    (client,) = await ctx.attackers("embedding-theft")
    texts = list(ctx.corpus.all())
    order = ctx.rng("embedding-theft").permutation(len(texts))
    held_out = [texts[int(i)] for i in order[:200]]
    pool = [texts[int(i)] for i in order[200:]]
    most = min(ctx.suite.embedding_texts[-1], len(pool))
    sent = await run_plan(ctx.gateway, embeddings.theft_plan(pool[:most], client, 2.0, ctx.rng("emb")),
                          VirtualClock(ctx.suite.compression))
    got_texts, vectors = embeddings.harvested_pairs(sent)
    truth_plan = embeddings.theft_plan(held_out, await ctx.evaluator(), 1e6, ctx.rng("emb-eval"))
    _, truth = embeddings.harvested_pairs([await ctx.gateway.send(p) for p in truth_plan])
    result = ScenarioResult("embedding-theft", "hashed n-gram ridge student trained on /v1/embeddings", "cosine")
    for count in ctx.suite.embedding_texts:
        n = min(count, len(got_texts))
        if n < 16:
            break
        student = await asyncio.to_thread(embeddings.train_student, got_texts[:n], vectors[:n])
        paid = sent[: -(-n // embeddings.BATCH)]
        result.curve.append(point(n, paid, {"cosine": embeddings.student_agreement(student, held_out, truth)}, ctx.prices))
    result.details["held_out_texts"] = len(held_out)
    return await finish(ctx, result, [client], since, started)


# -- replay at scale ------------------------------------------------------------------------


async def replay_scale(ctx: Context) -> ScenarioResult:
    """A large honest population through replay, against the limits-only baseline."""
    started = time.perf_counter()
    population = ctx.suite.population
    scale = ctx.suite.replay_clients / max(population.chat_users, 1)
    big = type(population)(
        chat_users=ctx.suite.replay_clients, embedding_users=int(population.embedding_users * scale),
        classifier_users=int(population.classifier_users * scale), batch_summarisers=0, image_streams=0,
        max_tokens=256,
    )
    plans, profiles = await asyncio.to_thread(big.generate, ctx.corpus, ctx.rng("replay"), 86_400.0)
    baseline = LimitsBaseline(requests_per_minute=float(BASELINE_TIER["requests_per_minute"]))
    await asyncio.to_thread(replay, plans, profiles, baseline)
    result = ScenarioResult("replay-scale", "a day of a large honest population, replayed into the limits baseline", "denied_share")
    denied = {c for c, n in baseline.denied.items() if n}
    result.details = {"clients": len(profiles), "events": len(plans),
                      "clients_denied_by_limits": len(denied),
                      "denied_share": len(denied) / len(profiles)}
    result.seconds = round(time.perf_counter() - started, 1)
    return result


async def replay_detection(ctx: Context) -> ScenarioResult:
    """Detection rates by replay: an honest population with many attackers of each
    replayable kind, scored by the detector calibrated on another honest population."""
    from modelfence.detect.embedding import load_embedder
    from modelfence.redteam.replay_detection import detection_at_scale

    started = time.perf_counter()
    suite = ctx.suite
    details = await asyncio.to_thread(
        detection_at_scale, ctx.corpus, ctx.rng, clients=suite.replay_clients,
        calibration_clients=suite.calibration_clients, attackers=suite.replay_attackers,
        sybils=max(1, suite.replay_attackers // 10), embedder=load_embedder(),
    )
    result = ScenarioResult("replay-detection", "detection at population scale: honest clients flagged, "
                            "attackers caught, queries before the first flag", "flagged_share")
    result.details = details
    result.seconds = round(time.perf_counter() - started, 1)
    return result


def _contest(kind: Kind, description: str) -> ScenarioFn:
    async def scenario(ctx: Context) -> ScenarioResult:
        started = time.perf_counter()
        details = await asyncio.to_thread(evaluate, kind, ctx.suite.v2, seed=ctx.seed, rng=ctx.rng)
        result = ScenarioResult(kind, description, "theft_reduction")
        result.details = details
        result.seconds = round(time.perf_counter() - started, 1)
        return result

    return scenario


SCENARIOS: dict[str, ScenarioFn] = {
    "benign": benign,
    "knockoff-random-probs": _classifier_scenario("knockoff-random", False, "ART KnockoffNets, random sampling, probabilities"),
    "knockoff-random-labels": _classifier_scenario("knockoff-random", True, "ART KnockoffNets, random sampling, labels only"),
    "knockoff-adaptive-labels": _classifier_scenario("knockoff-adaptive", True, "ART KnockoffNets, adaptive (reward='div'), labels only"),
    "copycat-probs": _classifier_scenario("copycat", False, "ART CopycatCNN, probabilities"),
    "copycat-labels": _classifier_scenario("copycat", True, "ART CopycatCNN, labels only"),
    "jbda-labels": _classifier_scenario("jbda", True, "Papernot JBDA synthetic augmentation, labels only"),
    "harvest-broad": _harvest("broad"),
    "harvest-template": _harvest("template"),
    "harvest-cot": _harvest("cot"),
    "carlini": carlini,
    "embedding-theft": embedding_theft,
    "sybil": sybil,
    "low-and-slow": low_and_slow,
    "key-rotation": key_rotation,
    "replay-scale": replay_scale,
    "replay-detection": replay_detection,
    "adaptive": _contest("adaptive", "a week of honest customers (v2) with the adaptive thief library, "
                         "undefended and defended: what each thief got, what honest customers met"),
    "hydra": _contest("hydra", "a week of honest customers (v2) with hydra campaigns of 100 to 10,000 "
                      "accounts at ~26 requests a day each, undefended and defended"),
    "paced-hydra": _contest("paced-hydra", "a week of honest customers (v2) with hydras of 1,000 accounts "
                            "that sign up at a pace a sign-up surge watch lets through, one asset at a time"),
}
# Scenarios that model the gateway instead of calling one: a run of only these starts no stack.
REPLAY_ONLY = frozenset({"replay-scale", "replay-detection", "adaptive", "hydra", "paced-hydra"})
# The v2 yardstick (a week of customers, both sides): run when named, not by default.
OPT_IN = frozenset({"adaptive", "hydra", "paced-hydra"})


async def run_suite(ctx: Context, names: Sequence[str], on_done: Callable[[ScenarioResult], None] | None = None) -> list[ScenarioResult]:
    results = []
    for name in names:
        result = await SCENARIOS[name](ctx)
        results.append(result)
        if on_done:
            on_done(result)
    return results
