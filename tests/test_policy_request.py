"""Request rules, one at a time, and the config errors of the ``policy:`` section."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from modelfence.config import parse_config
from modelfence.errors import BadRequest, ConfigError
from modelfence.gateway.apis import ParsedRequest
from modelfence.gateway.context import SCOPE_KEY, RequestContext
from modelfence.gateway.proxy import upstream_body
from modelfence.gateway.request_policy import RequestPolicy
from modelfence.identity.base import ApiKeyRecord
from modelfence.operations import Operation
from modelfence.policy import PolicyConfig, RequestRules, apply_rules
from modelfence.policy.request_policy import OMIT, upstream_payload, wants_logprobs

CHAT = Operation.CHAT
COMPLETIONS = Operation.COMPLETIONS
OIP_INFER = Operation.OIP_INFER


def rejected(rules: RequestRules, route: Operation, body: dict[str, Any]) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        apply_rules(rules, route, body)
    assert caught.value.status == 400 and caught.value.code == "policy_violation"
    return caught.value


def test_defaults_let_ordinary_requests_through_unchanged() -> None:
    rules = PolicyConfig().for_tier("default").request
    for body in (
        {"messages": [], "max_tokens": 4000, "n": 4},
        {"logprobs": True, "top_logprobs": 5},
        {"logit_bias": {"50256": -100}},
    ):
        assert apply_rules(rules, CHAT, body) == {}


@pytest.mark.parametrize(
    ("route", "body"),
    [
        (CHAT, {"logprobs": True, "logit_bias": {"1": 5}}),
        (CHAT, {"top_logprobs": 2, "logit_bias": {"1": 5}}),
        (COMPLETIONS, {"logprobs": 0, "logit_bias": {"1": 5}}),
    ],
    ids=["chat-logprobs", "chat-top-logprobs", "completions-logprobs"],
)
def test_logit_bias_with_logprobs_is_forbidden_by_default(route: Operation, body: dict[str, Any]) -> None:
    error = rejected(RequestRules(), route, body)
    assert error.param == "logit_bias" and "'logprobs'" in error.message


def test_strip_logprobs_neutralises_the_combination() -> None:
    rules = RequestRules(logit_bias_with_logprobs="strip_logprobs")
    body = {"model": "m", "logprobs": True, "top_logprobs": 3, "logit_bias": {"1": 5}}
    overrides = apply_rules(rules, CHAT, body)
    assert overrides == {"logprobs": OMIT, "top_logprobs": OMIT}
    assert upstream_payload(body, overrides) == {"model": "m", "logit_bias": {"1": 5}}
    assert body["top_logprobs"] == 3  # the client's body is never changed
    assert apply_rules(RequestRules(logit_bias_with_logprobs="allow"), CHAT, body) == {}


def test_empty_bias_or_no_logprobs_is_not_the_combination() -> None:
    assert apply_rules(RequestRules(), CHAT, {"logprobs": True, "logit_bias": {}}) == {}
    assert apply_rules(RequestRules(), CHAT, {"logprobs": False, "logit_bias": {"1": 2}}) == {}


def test_top_logprobs_cap_names_parameter_and_limit() -> None:
    error = rejected(RequestRules(), CHAT, {"logprobs": True, "top_logprobs": 6})
    assert error.param == "top_logprobs" and "6" in error.message and "5" in error.message
    error = rejected(RequestRules(), COMPLETIONS, {"logprobs": 6})
    assert error.param == "logprobs"


@pytest.mark.parametrize(
    ("rules", "body", "param"),
    [
        (RequestRules(max_n=2), {"n": 3}, "n"),
        (RequestRules(max_n=2), {"best_of": 3}, "best_of"),
        (RequestRules(max_tokens=100), {"max_tokens": 101}, "max_tokens"),
        (RequestRules(max_tokens=100), {"max_completion_tokens": 101}, "max_completion_tokens"),
        (RequestRules(allow_echo=False), {"echo": True}, "echo"),
        (RequestRules(max_logit_bias_entries=2), {"logit_bias": {"1": 1, "2": 1, "3": 1}},
         "logit_bias"),
        (RequestRules(max_logit_bias_magnitude=10), {"logit_bias": {"7": -10.5}}, "logit_bias"),
    ],
    ids=["n", "best_of", "max_tokens", "max_completion_tokens", "echo", "bias-entries",
         "bias-magnitude"],
)
def test_caps(rules: RequestRules, body: dict[str, Any], param: str) -> None:
    assert rejected(rules, COMPLETIONS, body).param == param


def test_oip_outputs_restricts_the_tensors_a_request_may_name() -> None:
    rules = RequestRules(oip_outputs=("label",))
    assert apply_rules(rules, OIP_INFER, {"outputs": [{"name": "label"}]}) == {}
    error = rejected(rules, OIP_INFER, {"outputs": [{"name": "probabilities"}]})
    assert error.param == "outputs" and "['label']" in error.message


def test_wants_logprobs() -> None:
    assert wants_logprobs(CHAT, {"logprobs": True})
    assert not wants_logprobs(CHAT, {"logprobs": False})
    assert wants_logprobs(COMPLETIONS, {"logprobs": 0})
    assert not wants_logprobs(Operation.EMBEDDINGS, {"logprobs": True})


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"tiers": {"gold": {}}}, "policy.tiers.gold: no such tier in limits.tiers (default)"),
        ({"tiers": {"default": {"request": {"logit_bias_with_logprobs": "drop"}}}},
         ("policy.tiers.default.request.logit_bias_with_logprobs: not allowed; allowed values: "
          "'forbid', 'strip_logprobs' or 'allow'")),
        ({"tiers": {"default": {"hardening": {"high": {"probabilities": "blur"}}}}},
         ("policy.tiers.default.hardening.high.probabilities: not allowed; allowed values: "
          "'exact', 'labels_only', 'reverse_sigmoid' or 'ood_aware'")),
        ({"tiers": {"default": {"hardening": {"extreme": {}}}}},
         "'normal', 'elevated' or 'high'"),
        ({"dp": {"budget": 0}}, "policy.dp.budget: Input should be greater than 0"),
        ({"tiers": {"default": {"request": {"max_top_logprob": 3}}}},
         "policy.tiers.default.request.max_top_logprob: unknown key"),
    ],
    ids=["unknown-tier", "bad-combination-mode", "bad-probability-mode", "bad-level",
         "bad-budget", "misspelt-key"],
)
def test_config_errors_name_the_key_and_allowed_values(policy: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"policy": policy}, environ={})
    assert message in str(caught.value)


def test_tier_policy_keeps_default_levels_when_one_is_tuned() -> None:
    config = parse_config(
        {"policy": {"tiers": {"default": {"hardening": {"high": {"prob_top_k": 1}}}}}}, environ={}
    )
    tier = config.policy.for_tier("anything")
    assert tier.hardening["high"].prob_top_k == 1
    assert tier.hardening["normal"].is_identity
    assert tier.hardening["elevated"].top_logprobs == 1


async def test_the_policy_stage_keeps_the_client_body_and_the_proxy_merges_once() -> None:
    """The stage used to overwrite ctx.body, so detection never saw the logprobs asked for."""
    policy = PolicyConfig.model_validate(
        {"tiers": {"default": {"request": {"logit_bias_with_logprobs": "strip_logprobs"}}}}
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
            "top_logprobs": 3, "logit_bias": {"1": 5}, "stream": True}
    raw = orjson.dumps(body)
    key = ApiKeyRecord("k1", "acme", "default", "mf-", datetime.now(UTC))
    ctx = RequestContext(route=CHAT.route, started=0.0, request_id="r", key=key, body=body,
                         raw_body=raw, parsed=ParsedRequest(CHAT, "m", stream=True))
    seen: list[bytes] = []

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        seen.append(upstream_body(scope[SCOPE_KEY]))

    await RequestPolicy(endpoint, policy=policy)({SCOPE_KEY: ctx}, None, None)  # type: ignore[arg-type]
    assert ctx.body is body and ctx.raw_body == raw and body["top_logprobs"] == 3
    sent = orjson.loads(seen[0])
    assert "logprobs" not in sent and "top_logprobs" not in sent
    assert sent["stream_options"] == {"include_usage": True} and sent["logit_bias"] == {"1": 5}


def test_max_inputs_caps_rows_texts_and_prompts_per_request() -> None:
    rules = RequestRules(max_inputs=4)
    for operation, param, unit in ((OIP_INFER, "inputs", "rows"), (Operation.EMBEDDINGS, "input", "texts"),
                                   (COMPLETIONS, "prompt", "prompts")):
        with pytest.raises(BadRequest) as caught:
            apply_rules(rules, operation, {}, inputs=5)
        assert caught.value.code == "policy_violation" and caught.value.param == param
        assert f"carries 5 {unit}" in caught.value.message
        assert apply_rules(rules, operation, {}, inputs=4) == {}
    assert apply_rules(rules, CHAT, {"messages": []}, inputs=1) == {}
    assert apply_rules(RequestRules(), OIP_INFER, {}, inputs=10**6) == {}  # no cap unless configured

