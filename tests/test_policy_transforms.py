"""Output transforms: logprobs, probability rows, the rewriters, and the hardening stage."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from modelfence.gateway.context import SCOPE_KEY, RequestContext
from modelfence.gateway.hardening import OutputHardening
from modelfence.gateway.rewrite import JsonRewriter, SSERewriter
from modelfence.identity.base import ApiKeyRecord
from modelfence.policy import (
    LogprobHardening,
    NormalRisk,
    PolicyConfig,
    RiskLevel,
    RiskOverrides,
    RowHardening,
    harden_oip,
    harden_row,
    level_for_action,
)
from modelfence.policy.llm_hardening import quantise
from modelfence.policy.noise import laplace
from modelfence.policy.probs_hardening import ood_aware, reverse_sigmoid, top_k
from modelfence.types import Message


def chat_payload() -> dict[str, Any]:
    top = [{"token": "a", "logprob": -0.37}, {"token": "b", "logprob": -1.4},
           {"token": "c", "logprob": -2.9}]
    return {"choices": [{"index": 0, "logprobs": {"content": [
        {"token": "a", "logprob": -0.37, "top_logprobs": top}]}}]}


def test_quantise_rounds_to_multiples_without_float_noise() -> None:
    assert quantise(-0.37, 0.5) == -0.5
    assert quantise(-0.24, 0.5) == 0.0 and math.copysign(1, quantise(-0.24, 0.5)) == 1
    assert quantise(-1.234, 0.1) == -1.2


def test_logprob_quantum_and_top_k_keep_chosen_consistent() -> None:
    out = LogprobHardening(quantum=0.5, top_k=2).apply(chat_payload())
    position = out["choices"][0]["logprobs"]["content"][0]
    assert position["logprob"] == -0.5
    assert position["top_logprobs"] == [{"token": "a", "logprob": -0.5},
                                        {"token": "b", "logprob": -1.5}]


def test_text_only_removes_logprobs() -> None:
    out = LogprobHardening(text_only=True).apply(chat_payload())
    assert out["choices"][0]["logprobs"] is None


def test_noise_is_seeded_clipped_and_resorted() -> None:
    def run(seed: int) -> dict[str, Any]:
        h = LogprobHardening(noise_scale=1.0, rng=random.Random(seed))
        return h.apply(chat_payload())  # type: ignore[no-any-return]

    assert run(1) == run(1)
    position = run(2)["choices"][0]["logprobs"]["content"][0]
    values = [alt["logprob"] for alt in position["top_logprobs"]]
    assert values == sorted(values, reverse=True) and max(values) <= 0.0
    chosen = next(a for a in position["top_logprobs"] if a["token"] == "a")
    assert position["logprob"] == chosen["logprob"]


def test_laplace_has_the_right_spread() -> None:
    rng = random.Random(7)
    draws = [laplace(rng, 2.0) for _ in range(20_000)]
    assert abs(sum(draws) / len(draws)) < 0.1
    assert sum(abs(d) for d in draws) / len(draws) == pytest.approx(2.0, rel=0.05)


def test_legacy_completions_logprobs() -> None:
    payload = {"choices": [{"logprobs": {"tokens": ["x", "y"], "token_logprobs": [-0.3, -1.2],
                                          "top_logprobs": [{"x": -0.3, "z": -1.6},
                                                           {"y": -1.2, "w": -0.6}]}}]}
    out = LogprobHardening(quantum=0.5, top_k=1).apply(payload)["choices"][0]["logprobs"]
    assert out["token_logprobs"] == [-0.5, -1.0]
    assert out["top_logprobs"] == [{"x": -0.5}, {"w": -0.5}]


ROW = [0.05, 0.6, 0.2, 0.1, 0.05]


def test_labels_only_top_k_and_rounding() -> None:
    assert harden_row(ROW, RowHardening(mode="labels_only")) == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert top_k(ROW, 2) == [0.0, 0.6, 0.2, 0.0, 0.0]
    assert harden_row([1 / 3, 2 / 3], RowHardening(decimals=2)) == [0.33, 0.67]


def test_reverse_sigmoid_perturbs_but_keeps_the_label() -> None:
    out = reverse_sigmoid(ROW, beta=0.3, gamma=0.4)
    assert sum(out) == pytest.approx(1.0)
    assert out.index(max(out)) == 1
    assert max(abs(a - b) for a, b in zip(out, ROW, strict=True)) > 0.02
    strong = reverse_sigmoid([0.9, 0.1], beta=1.9, gamma=5.0)
    assert strong.index(max(strong)) == 0  # swapped back if the perturbation flips it


def test_ood_aware_leaves_confident_rows_exact() -> None:
    confident = [0.95, 0.03, 0.02]
    assert ood_aware(confident, threshold=0.9, sharpness=40) is confident
    out = ood_aware(ROW, threshold=0.9, sharpness=40)
    assert sum(out) == pytest.approx(1.0)
    assert out.index(max(out)) != 1  # misinformation dominates far from the threshold


def test_harden_oip_rows_and_allowed_outputs() -> None:
    payload = {"outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [0.7, 0.3, 0.4, 0.6]},
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 1]},
    ]}
    out = harden_oip(payload, RowHardening(mode="labels_only"), allowed=("probabilities",))
    assert out["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [2, 2],
                               "data": [1.0, 0.0, 0.0, 1.0]}]


def test_json_rewriter_buffers_until_the_last_chunk() -> None:
    rewriter = JsonRewriter(lambda p: {**p, "x": 2})
    assert rewriter.feed(b'{"x": ', True) == b""
    assert rewriter.feed(b"1}", False) == b'{"x":2}'


def test_sse_rewriter_rewrites_whole_events_across_chunk_boundaries() -> None:
    rewriter = SSERewriter(lambda p: {"n": p["n"] * 10})
    out = rewriter.feed(b'data: {"n": 1}\n\ndata: {"n"', True)
    out += rewriter.feed(b': 2}\n\n: comment\n\ndata: [DONE]\n\n', False)
    assert out == b'data: {"n":10}\n\ndata: {"n":20}\n\n: comment\n\ndata: [DONE]\n\n'


def test_risk_overrides_raise_never_lower() -> None:
    class Detector:
        level = RiskLevel.ELEVATED

        def level_for(self, client: str) -> RiskLevel:
            return self.level

    detector = Detector()
    risk = RiskOverrides(detector)
    risk.set("acme", RiskLevel.NORMAL)
    assert risk.level_for("acme") is RiskLevel.ELEVATED
    risk.set("acme", RiskLevel.HIGH)
    assert risk.level_for("acme") is RiskLevel.HIGH
    risk.clear("acme")
    assert risk.level_for("acme") is RiskLevel.ELEVATED
    assert level_for_action("degrade") is RiskLevel.HIGH
    assert level_for_action("unknown") is RiskLevel.NORMAL


# --- the stage, in-process ---------------------------------------------------------------

UPSTREAM_BODY = orjson.dumps(chat_payload()) + b" "  # the trailing space must survive


class Accountant:
    def __init__(self, allow: bool) -> None:
        self.allow = allow
        self.spent = 0

    async def spend(self, client: str, epsilon: float) -> bool:
        self.spent += self.allow
        return self.allow

    async def close(self) -> None:
        pass


async def upstream(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(UPSTREAM_BODY)).encode())]})
    await send({"type": "http.response.body", "body": UPSTREAM_BODY, "more_body": False})


async def call(stage: OutputHardening, body: dict[str, Any]) -> tuple[list[Message], bytes]:
    key = ApiKeyRecord("k1", "acme", "default", "mf-", datetime.now(UTC))
    ctx = RequestContext(route="/v1/chat/completions", started=0.0, request_id="r", key=key,
                         body=body)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await stage({"type": "http", SCOPE_KEY: ctx}, None, send)  # type: ignore[arg-type]
    return sent, b"".join(m.get("body", b"") for m in sent)


def stage(risk: RiskOverrides, policy: PolicyConfig | None = None,
          accountant: Accountant | None = None) -> OutputHardening:
    return OutputHardening(upstream, policy=policy or PolicyConfig(), risk=risk,
                           accountant=accountant or Accountant(True), rng=random.Random(0))


async def test_normal_risk_is_byte_identical_and_levels_apply_on_the_next_request() -> None:
    risk = RiskOverrides(NormalRisk())
    hardening = stage(risk)
    sent, body = await call(hardening, {"logprobs": True})
    assert body == UPSTREAM_BODY and sent[0]["headers"][1] == (
        b"content-length", str(len(UPSTREAM_BODY)).encode()
    )
    risk.set("acme", RiskLevel.ELEVATED)
    sent, body = await call(hardening, {"logprobs": True})
    position = orjson.loads(body)["choices"][0]["logprobs"]["content"][0]
    assert position["top_logprobs"] == [{"token": "a", "logprob": -0.5}]
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(body)).encode()
    sent, body = await call(hardening, {})  # no logprobs asked: nothing to harden
    assert body == UPSTREAM_BODY
    risk.set("acme", RiskLevel.HIGH)
    _, body = await call(hardening, {"logprobs": True})
    assert orjson.loads(body)["choices"][0]["logprobs"] is None
    risk.clear("acme")
    _, body = await call(hardening, {"logprobs": True})
    assert body == UPSTREAM_BODY


@pytest.mark.parametrize("allow", [True, False], ids=["budget-left", "budget-spent"])
async def test_dp_noise_spends_budget_or_answers_text_only(allow: bool) -> None:
    policy = PolicyConfig.model_validate(
        {"tiers": {"default": {"hardening": {"elevated": {"dp_noise": True}}}}}
    )
    risk = RiskOverrides(NormalRisk())
    risk.set("acme", RiskLevel.ELEVATED)
    accountant = Accountant(allow)
    _, body = await call(stage(risk, policy, accountant), {"logprobs": True})
    logprobs = orjson.loads(body)["choices"][0]["logprobs"]
    if allow:
        assert accountant.spent == 1 and logprobs["content"][0]["logprob"] != -0.37
    else:
        assert logprobs is None
