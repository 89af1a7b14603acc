"""Request parsing: what the gateway relies on is checked, with the parameter named."""

from __future__ import annotations

from typing import Any

import pytest

from modelfence.errors import BadRequest
from modelfence.gateway.apis import OIPApi, OpenAIApi

CHAT = "/v1/chat/completions"
api = OpenAIApi(default_max_tokens=256)


def test_chat_reservation_uses_max_tokens_times_n() -> None:
    parsed = api.parse(
        CHAT, None,
        {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50, "n": 3},
    )
    assert parsed.max_output_tokens == 150
    assert 100 <= parsed.prompt_tokens <= 110


def test_default_max_tokens_when_absent() -> None:
    parsed = api.parse(CHAT, None, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert parsed.max_output_tokens == 256


def test_stream_usage_wish_is_recorded() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    assert api.parse(CHAT, None, body).wants_usage_chunk
    body["stream_options"] = {}
    assert not api.parse(CHAT, None, body).wants_usage_chunk


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        (CHAT, [], None),
        (CHAT, {"messages": [{"role": "user", "content": "x"}]}, "model"),
        (CHAT, {"model": 3, "messages": [{"role": "user", "content": "x"}]}, "model"),
        (CHAT, {"model": "m", "messages": []}, "messages"),
        (CHAT, {"model": "m", "messages": ["hi"]}, "messages"),
        (CHAT, {"model": "m", "messages": [{"content": "x"}], "max_tokens": "10"}, "max_tokens"),
        (CHAT, {"model": "m", "messages": [{"content": "x"}], "max_tokens": 0}, "max_tokens"),
        (CHAT, {"model": "m", "messages": [{"content": "x"}], "n": True}, "n"),
        (CHAT, {"model": "m", "messages": [{"content": "x"}], "stream": "yes"}, "stream"),
        (CHAT, {"model": "m", "messages": [{"content": "x"}], "stream_options": 1}, "stream_options"),
        ("/v1/completions", {"model": "m"}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": 5}, "prompt"),
        ("/v1/embeddings", {"model": "m", "input": {"a": 1}}, "input"),
    ],
)
def test_bad_openai_requests_name_the_parameter(route: str, body: Any, param: str | None) -> None:
    with pytest.raises(BadRequest) as info:
        api.parse(route, None, body)
    assert info.value.param == param


def test_oip_model_comes_from_the_path() -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}
    assert OIPApi().parse("/v2/models/{name}/infer", "digits", body).model == "digits"


def test_a_classifier_batch_costs_one_token_per_input() -> None:
    """Token limits and per-token prices bound and bill images, not requests."""
    batch = {"inputs": [{"name": "input", "shape": [64, 64], "datatype": "FP32", "data": [0] * 4096}]}
    assert OIPApi().parse("/v2/models/{name}/infer", "digits", batch).prompt_tokens == 64
    odd = {"inputs": [{"name": "input", "shape": [], "datatype": "FP32", "data": [0]}]}
    assert OIPApi().parse("/v2/models/{name}/infer", "digits", odd).prompt_tokens == 1


@pytest.mark.parametrize(
    "body", [{}, {"inputs": []}, {"inputs": [1]}, {"inputs": [{"name": "x"}]}, {"inputs": [{"shape": [1]}]}]
)
def test_bad_oip_requests(body: Any) -> None:
    with pytest.raises(BadRequest):
        OIPApi().parse("/v2/models/{name}/infer", "digits", body)
