"""Output transforms: logprobs, probability rows, the rewriters, and the hardening stage."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pytest

from modelfence.gateway.context import SCOPE_KEY, RequestContext
from modelfence.gateway.hardening import OutputHardening
from modelfence.gateway.rewrite import JsonRewriter, SSERewriter
from modelfence.identity.base import ApiKeyRecord
from modelfence.operations import Operation
from modelfence.policy import (
    LogprobHardening,
    NormalRisk,
    PolicyConfig,
    RiskLevel,
    RiskOverrides,
    RowHardening,
    harden_oip,
    harden_row,
    harden_rows,
    level_for_action,
)
from modelfence.policy.llm_hardening import quantise, quantised
from modelfence.policy.noise import laplace
from modelfence.policy.probs_hardening import ood_aware, reverse_sigmoid, top_k
from modelfence.policy.request_policy import OMIT, narrowed_request, upstream_payload
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


@pytest.mark.parametrize("quantum", [0.5, 0.1, 0.05, 1 / 3, 2.0])
def test_quantised_arrays_round_like_python(quantum: float) -> None:
    values = -np.random.default_rng(5).exponential(3.0, 5000)
    expected = [round(round(v / quantum) * quantum, 10) + 0.0 for v in values.tolist()]
    assert quantised(values, quantum).tolist() == expected


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
        h = LogprobHardening(noise_scale=1.0, rng=np.random.default_rng(seed))
        return h.apply(chat_payload())  # type: ignore[no-any-return]

    assert run(1) == run(1)
    position = run(2)["choices"][0]["logprobs"]["content"][0]
    values = [alt["logprob"] for alt in position["top_logprobs"]]
    assert values == sorted(values, reverse=True) and max(values) <= 0.0
    chosen = next(a for a in position["top_logprobs"] if a["token"] == "a")
    assert position["logprob"] == chosen["logprob"]


def test_laplace_has_the_right_spread() -> None:
    draws = laplace(np.random.default_rng(7), 2.0, 20_000)
    assert abs(draws.mean()) < 0.1
    assert np.abs(draws).mean() == pytest.approx(2.0, rel=0.05)


def test_legacy_completions_logprobs() -> None:
    payload = {"choices": [{"logprobs": {"tokens": ["x", "y"], "token_logprobs": [-0.3, -1.2],
                                          "top_logprobs": [{"x": -0.3, "z": -1.6},
                                                           {"y": -1.2, "w": -0.6}]}}]}
    out = LogprobHardening(quantum=0.5, top_k=1).apply(payload)["choices"][0]["logprobs"]
    assert out["token_logprobs"] == [-0.5, -1.0]
    assert out["top_logprobs"] == [{"x": -0.5}, {"w": -0.5}]


ROW = [0.05, 0.6, 0.2, 0.1, 0.05]
CHAT_ROUTE = Operation.CHAT


def test_labels_only_top_k_and_rounding() -> None:
    assert harden_row(ROW, RowHardening(mode="labels_only")) == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert top_k(np.array([ROW]), 2).tolist() == [[0.0, 0.6, 0.2, 0.0, 0.0]]
    assert top_k(np.array([[0.3, 0.4, 0.3]]), 2).tolist() == [[0.3, 0.4, 0.0]]  # ties: first
    assert harden_row([1 / 3, 2 / 3], RowHardening(decimals=2)) == [0.33, 0.67]


def test_reverse_sigmoid_perturbs_but_keeps_the_label() -> None:
    (out,) = reverse_sigmoid(np.array([ROW]), beta=0.3, gamma=0.4)
    assert out.sum() == pytest.approx(1.0)
    assert out.argmax() == 1
    assert np.abs(out - ROW).max() > 0.02
    strong = reverse_sigmoid(np.array([[0.9, 0.1], [0.2, 0.8]]), beta=1.9, gamma=5.0)
    assert strong.argmax(axis=1).tolist() == [0, 1]  # swapped back where the perturbation flips it


def test_ood_aware_leaves_confident_rows_exact() -> None:
    rows = np.array([[0.95, 0.03, 0.02, 0.0, 0.0], ROW])
    confident, out = ood_aware(rows, threshold=0.9, sharpness=40)
    assert confident.tolist() == rows[0].tolist()
    assert out.sum() == pytest.approx(1.0)
    assert out.argmax() != 1  # misinformation dominates far from the threshold


def test_harden_oip_rows_and_allowed_outputs() -> None:
    payload = {"outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [0.7, 0.3, 0.4, 0.6]},
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 1]},
    ]}
    out = harden_oip(payload, RowHardening(mode="labels_only"), allowed=("probabilities",))
    assert out["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [2, 2],
                               "data": [1.0, 0.0, 0.0, 1.0]}]


def test_rows_are_hardened_together_as_one_by_one() -> None:
    rows = np.array([ROW, [0.3, 0.3, 0.2, 0.1, 0.1], [0.96, 0.01, 0.01, 0.01, 0.01]])
    before = rows.copy()
    for h in (RowHardening(mode="labels_only"), RowHardening(mode="reverse_sigmoid"),
              RowHardening(mode="ood_aware", decimals=3), RowHardening(top_k=2)):
        together = harden_rows(rows, h).tolist()
        assert together == [harden_row(row, h) for row in rows.tolist()]
    assert (rows == before).all()  # a new array; the input is not changed


def test_probability_noise_is_seeded_and_keeps_rows_distributions() -> None:
    def run(seed: int) -> np.ndarray:
        return harden_rows(np.array([ROW, ROW]), RowHardening(noise_scale=0.1,
                                                             rng=np.random.default_rng(seed)))

    assert (run(3) == run(3)).all()
    out = run(4)
    assert out.sum(axis=1) == pytest.approx([1.0, 1.0]) and (out >= 0).all()
    assert out[0].tolist() != out[1].tolist()  # every value gets its own draw


def test_harden_oip_nested_data_and_misfit_tensors() -> None:
    payload = {"outputs": [
        {"name": "nested", "datatype": "FP64", "shape": [2, 2], "data": [[0.7, 0.3], [0.4, 0.6]]},
        {"name": "misfit", "datatype": "FP32", "shape": [1, 2], "data": [0.1, 0.2, 0.7]},
    ]}
    out = harden_oip(payload, RowHardening(mode="labels_only"))
    assert out["outputs"] == [  # what cannot be hardened is not released
        {"name": "nested", "datatype": "FP64", "shape": [2, 2], "data": [1.0, 0.0, 0.0, 1.0]}]


def test_noise_gives_a_chosen_token_without_alternative_its_own_value() -> None:
    payload = {"choices": [{"logprobs": {"content": [
        {"token": "a", "logprob": -0.37, "top_logprobs": []},
        {"token": "b", "logprob": -0.2, "top_logprobs": [{"token": "b", "logprob": -0.2},
                                                          {"token": "c", "logprob": -3.0}]},
    ]}}]}
    h = LogprobHardening(noise_scale=0.5, quantum=0.1, top_k=1, rng=np.random.default_rng(1))
    first, second = h.apply(payload)["choices"][0]["logprobs"]["content"]
    assert first["logprob"] != -0.37 and first["logprob"] == quantise(first["logprob"], 0.1)
    assert len(second["top_logprobs"]) == 1
    if second["top_logprobs"][0]["token"] == "b":
        assert second["logprob"] == second["top_logprobs"][0]["logprob"]


def test_legacy_noise_keeps_chosen_and_alternatives_consistent() -> None:
    payload = {"choices": [{"logprobs": {"tokens": ["x", "y"], "token_logprobs": [-0.3, -1.2],
                                          "top_logprobs": [{"x": -0.3, "z": -1.6}, {}]}}]}
    h = LogprobHardening(noise_scale=1.0, rng=np.random.default_rng(2))
    out = h.apply(payload)["choices"][0]["logprobs"]
    assert out["token_logprobs"][0] == out["top_logprobs"][0]["x"]
    assert out["token_logprobs"][1] not in (-1.2, None) and out["top_logprobs"][1] == {}
    assert all(v <= 0 for v in [*out["token_logprobs"], *out["top_logprobs"][0].values()])


@pytest.mark.parametrize(("route", "body", "text_only", "top_k", "expected"), [
    (CHAT_ROUTE, {"logprobs": True, "top_logprobs": 5}, False, 1, {"top_logprobs": 1}),
    (CHAT_ROUTE, {"logprobs": True, "top_logprobs": 1}, False, 1, {}),
    (CHAT_ROUTE, {"logprobs": True, "top_logprobs": 5}, False, None, {}),
    (CHAT_ROUTE, {"logprobs": True, "top_logprobs": 5, "n": 2}, True, 1,
     {"logprobs": OMIT, "top_logprobs": OMIT}),
    (Operation.COMPLETIONS, {"logprobs": 5}, False, 2, {"logprobs": 2}),
    (Operation.COMPLETIONS, {"logprobs": 5}, True, None, {"logprobs": OMIT}),
    (CHAT_ROUTE, {"n": 1}, True, None, {}),
], ids=["chat-top-k", "chat-within", "no-cap", "chat-text-only", "legacy-top-k",
        "legacy-text-only", "nothing-to-strip"])
def test_narrowed_request(route: Operation, body: dict[str, Any], text_only: bool,
                          top_k: int | None, expected: dict[str, Any]) -> None:
    assert narrowed_request(route, body, text_only=text_only, top_k=top_k) == expected


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
                           accountant=accountant or Accountant(True), rng=np.random.default_rng(0))


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


async def test_an_answer_hardened_only_for_its_reasoning_spends_no_dp_budget() -> None:
    policy = PolicyConfig.model_validate(
        {"tiers": {"default": {"hardening": {"elevated": {"dp_noise": True, "reasoning": "shorten"}}}}}
    )
    risk = RiskOverrides(NormalRisk())
    risk.set("acme", RiskLevel.ELEVATED)
    accountant = Accountant(True)
    _, body = await call(stage(risk, policy, accountant), {})  # no logprobs asked
    assert accountant.spent == 0 and body == UPSTREAM_BODY  # no reasoning: as it came
    await call(stage(risk, policy, accountant), {"logprobs": True})
    assert accountant.spent == 1


async def test_classifier_answers_ignore_a_profile_that_only_cuts_reasoning() -> None:
    answer = orjson.dumps({"outputs": [
        {"name": "probs", "datatype": "FP32", "shape": [1, 3], "data": [[0.1, 0.2, 0.7]]},
        {"name": "bad", "datatype": "FP32", "shape": [1, 3], "data": [1.0]}]})

    async def oip_upstream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer, "more_body": False})

    policy = PolicyConfig.model_validate({"tiers": {"default": {
        "request": {"oip_outputs": ["probs", "bad"]},
        "hardening": {"elevated": {"reasoning": "shorten"}}}}})
    risk = RiskOverrides(NormalRisk())
    risk.set("acme", RiskLevel.ELEVATED)
    hardening = OutputHardening(oip_upstream, policy=policy, risk=risk, accountant=Accountant(True))
    key = ApiKeyRecord("k1", "acme", "default", "mf-", datetime.now(UTC))
    ctx = RequestContext(route=Operation.OIP_INFER.route, started=0.0, request_id="r", key=key,
                         body={"inputs": []}, path_model="m")
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await hardening({"type": "http", SCOPE_KEY: ctx}, None, send)  # type: ignore[arg-type]
    assert orjson.loads(b"".join(m.get("body", b"") for m in sent)) == orjson.loads(answer)


async def test_the_upstream_is_asked_for_no_more_than_the_client_gets() -> None:
    asked: list[dict[str, Any]] = []

    async def recording_upstream(scope: Any, receive: Any, send: Any) -> None:
        ctx = scope[SCOPE_KEY]
        asked.append(upstream_payload(ctx.body, ctx.upstream_overrides))
        await upstream(scope, receive, send)

    risk = RiskOverrides(NormalRisk())
    hardening = OutputHardening(recording_upstream, policy=PolicyConfig(), risk=risk,
                                accountant=Accountant(True), rng=np.random.default_rng(0))
    request = {"logprobs": True, "top_logprobs": 3}
    for level in (RiskLevel.ELEVATED, RiskLevel.HIGH):
        risk.set("acme", level)
        await call(hardening, request)
    assert asked == [{"logprobs": True, "top_logprobs": 1}, {}]
    assert request == {"logprobs": True, "top_logprobs": 3}  # what detection sees is unchanged

    noised = PolicyConfig.model_validate({"tiers": {"default": {"hardening": {
        "elevated": {"dp_noise": True, "top_logprobs": 1}}}}})
    risk.set("acme", RiskLevel.ELEVATED)
    hardening = OutputHardening(recording_upstream, policy=noised, risk=risk,
                                accountant=Accountant(True), rng=np.random.default_rng(0))
    _, body = await call(hardening, request)
    assert asked[-1] == request  # not narrowed: noise re-sorts all alternatives before the cut
    assert len(orjson.loads(body)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 1
