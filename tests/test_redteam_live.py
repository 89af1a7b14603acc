"""The red-team harness end to end through a real gateway in front of the real demo models.

``MODELFENCE_TEST_PROFILE=ci`` runs a trimmed selection of the ``ci`` suite (under three
minutes with the model load); the full profile runs every scenario of it (four to eight).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelfence.identity.secret import load_server_secret
from modelfence.redteam import (
    BenignPopulation,
    LiveGateway,
    VirtualClock,
    load_prompts,
    run_plan,
    run_redteam,
)
from modelfence.redteam.attacks import llm, logits
from modelfence.redteam.detection import NOT_AVAILABLE
from modelfence.redteam.replay import event_for
from modelfence.redteam.stack import MAX_LOGPROBS, own_stack
from modelfence.redteam.populations.week import HonestWeek
from modelfence.redteam.prompts import load_evaluation_documents, load_evaluation_prompts
from modelfence.redteam.thieves import Budget, HydraThief, Knowledge, PacedThief
from modelfence.redteam.traffic import ClientProfile, PlannedRequest, make_profile
from modelfence.telemetry.sinks import event_row
from modelfence.testing.processes import ServiceProcess, free_port, modelfence_command

from .conftest import PROFILE

pytestmark = [pytest.mark.models, pytest.mark.slow]

CI_SELECTION = "knockoff-random-probs,harvest-broad,embedding-theft,low-and-slow"
# Request-side fields: what the client sent and who it looked like (not the outcome).
COMPARED = ("client", "tier", "route", "model", "ip_prefix", "fingerprint", "prompt_hash", "prompt_len")
COMPARED_DETAIL = ("client_library", "user_agent", "temperature", "top_p", "max_tokens", "n", "logprobs",
                   "top_logprobs", "logit_bias_size", "stream", "turns", "input_count")


@pytest.fixture(scope="module")
def wide_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The demo upstream as the harness starts it: many logprobs allowed, like vLLM."""
    port = free_port()
    with ServiceProcess(
        modelfence_command("demo-upstream", "--port", str(port), "--max-logprobs", str(MAX_LOGPROBS)),
        port=port, ready_path="/healthz?ready=all", ready_timeout=600,
        log_file=tmp_path_factory.mktemp("redteam-upstream") / "demo-upstream.log",
    ) as proc:
        yield proc


def test_ci_suite_through_the_gateway(tmp_path: Path, wide_upstream: ServiceProcess) -> None:
    selection = CI_SELECTION if PROFILE == "ci" else None
    report = run_redteam("ci", scenario=selection, output=tmp_path, upstream_url=wide_upstream.url)
    results = json.loads((tmp_path / "results.json").read_text())
    by_name = {s["name"]: s for s in results["scenarios"]}
    assert set(by_name) == set(results["meta"]["scenarios"])
    attacks = [s for s in by_name.values() if s["defender"] is not None]
    for scenario in attacks:  # an undefended gateway answers every attack query
        assert scenario["curve"], scenario["name"]
        assert scenario["defender"]["answered"] == scenario["defender"]["requests"] > 0, scenario["name"]
        assert scenario["curve"][-1]["cost_usd"] > 0, scenario["name"]
        assert scenario["details"]["detection"] == NOT_AVAILABLE
    knockoff = by_name["knockoff-random-probs"]["curve"]
    assert [p["queries"] for p in knockoff] == [100, 300]  # cumulative: one thief, two checkpoints
    assert knockoff[-1]["quality"]["fidelity"] > 0.8
    assert by_name["embedding-theft"]["curve"][-1]["quality"]["cosine"] > 0.2
    assert by_name["harvest-broad"]["curve"][-1]["quality"]["completion_tokens"] > 0
    if "carlini" in by_name:
        assert by_name["carlini"]["curve"][-1]["quality"]["recovered_rank"] == logits.HIDDEN_TARGET
    if "benign" in by_name:
        assert by_name["benign"]["benign"]["throttled_share"] == 0.0
    assert (tmp_path / "knockoff-random-probs.png").stat().st_size > 1000
    assert "knockoff-random-probs" in report.read_text()


def _stored_events(database: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(database) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM request_events ORDER BY id").fetchall()
    return [{**dict(row), "detail": json.loads(row["detail"])} for row in rows]


def _fields(row: dict[str, Any]) -> dict[str, Any]:
    return {**{k: row[k] for k in COMPARED}, **{k: row["detail"].get(k) for k in COMPARED_DETAIL}}


def test_replay_and_live_record_the_same_event_fields(tmp_path: Path, wide_upstream: ServiceProcess) -> None:
    """The same stream, sent live and replayed: the gateway's stored events and replay's
    events agree on every request-side field (fingerprints and keyed prompt hashes too)."""
    corpus, rng = load_prompts(), np.random.default_rng(11)
    population = BenignPopulation(chat_users=2, embedding_users=1, classifier_users=1, batch_summarisers=0,
                                  image_streams=0, max_tokens=2)
    plans, profiles = population.generate(corpus, rng, 12 * 3600.0)
    thief = make_profile(rng, "thief", "attacker", subnet=77)
    plans += llm.harvest_plan("cot", thief.name, corpus, rng, count=2, max_tokens=2, rate=0.01)
    plans += logits.LogitProbe(corpus.all()[:1], "bias", 19, positions=2).plans(thief.name, 0.01, rng)
    profiles.append(thief)

    _assert_live_matches_replay(tmp_path, wide_upstream, plans, profiles)


def _shortened(plan: PlannedRequest, at: float) -> PlannedRequest:
    """``plan`` at ``at``, generating at most two tokens (the demo LLM runs on a CPU)."""
    body = dict(plan.body)
    if "messages" in body:
        body["max_tokens"] = 2
    return replace(plan, at=at, body=body)


def test_v2_customers_and_thieves_record_the_same_event_fields_live(
    tmp_path: Path, wide_upstream: ServiceProcess,
) -> None:
    """The v2 population's request shapes (tools, system frames, nested image tensors,
    permuted header orders) reach a live gateway as replay models them."""
    week = HonestWeek(counts={"agent": 1, "student": 1, "embed": 1, "bulk-score": 1, "nat": 2}, days=1.0, seed=3)
    honest, profiles = week.generate(load_evaluation_prompts(), load_evaluation_documents(), week.customers())
    firsts: dict[str, list[PlannedRequest]] = {}
    for plan in honest:
        firsts.setdefault(plan.client, [])
        if len(firsts[plan.client]) < 2:
            firsts[plan.client].append(plan)
    thieves = [PacedThief("chat", Knowledge(), Budget(days=1.0), seed=3),
               HydraThief("classifier", accounts=3, seed=3, days=1.0)]
    for thief in thieves:
        profiles += thief.accounts()
        for plan in thief.plans():
            firsts.setdefault(plan.client, [])
            if len(firsts[plan.client]) < 2:
                firsts[plan.client].append(plan)
    plans = [_shortened(plan, 60.0 * i + j) for i, chunk in enumerate(firsts.values()) for j, plan in enumerate(chunk)]
    assert {p.header_order for p in profiles} != {0}  # thieves vary their header order
    pro = {"limits": {"tiers": {"pro": {"requests_per_minute": 600}}}}  # the bulk customer's tier
    _assert_live_matches_replay(tmp_path, wide_upstream, plans, profiles, pro)


def _assert_live_matches_replay(
    tmp_path: Path, upstream: ServiceProcess, plans: list[PlannedRequest], profiles: list[ClientProfile],
    overrides: dict[str, Any] | None = None,
) -> None:
    async def send(url: str, token: str) -> None:
        async with LiveGateway(url, token) as gateway:
            await gateway.register(profiles)
            await run_plan(gateway, plans, VirtualClock(compression=7200.0))

    with own_stack(tmp_path, upstream.url, overrides) as gateway:
        asyncio.run(send(gateway.url, gateway.admin_token))
        secret = load_server_secret(gateway.config["secret"], tmp_path / "unused.secret")
    stored = _stored_events(tmp_path / "redteam.db")
    by_name = {p.name: p for p in profiles}
    key = secret.derive("telemetry-prompt-hash", 32)
    replayed = [event_row(event_for(p, by_name[p.client], ts=p.at, request_id="r", hash_key=key),
                          store_prompt_text=False) for p in plans]
    assert len(stored) == len(plans) > 5
    # The demo model has no tool calling: the upstream answers 400 to a request with tools,
    # which the gateway records like any other; everything else is answered.
    with_tools = {p.client for p in plans if "tools" in p.body}
    assert all(row["status"] == (400 if row["client"] in with_tools else 200) for row in stored)

    def per_client(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            out.setdefault(row["client"], []).append(_fields(row))
        return out

    order = sorted(range(len(plans)), key=lambda i: plans[i].at)  # each client sends in time order
    assert per_client(stored) == per_client([replayed[i] for i in order])
