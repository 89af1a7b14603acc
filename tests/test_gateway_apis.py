"""Request parsing: what the gateway relies on is checked, with the parameter named."""

from __future__ import annotations

from typing import Any

import pytest

from modelfence.errors import BadRequest
from modelfence.gateway.apis import OIPApi, OpenAIApi
from modelfence.operations import Operation

CHAT = Operation.CHAT
COMPLETIONS = Operation.COMPLETIONS
EMBEDDINGS = Operation.EMBEDDINGS
OIP = Operation.OIP_INFER
api = OpenAIApi(default_max_tokens=256)
MSG = [{"role": "user", "content": "x"}]


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
        (COMPLETIONS, {"model": "m"}, "prompt"),
        (COMPLETIONS, {"model": "m", "prompt": 5}, "prompt"),
        (EMBEDDINGS, {"model": "m", "input": {"a": 1}}, "input"),
    ],
)
def test_bad_openai_requests_name_the_parameter(route: Operation, body: Any, param: str | None) -> None:
    with pytest.raises(BadRequest) as info:
        api.parse(route, None, body)
    assert info.value.param == param


def test_oip_model_comes_from_the_path() -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}
    assert OIPApi().parse(OIP, "digits", body).model == "digits"


def test_a_classifier_batch_costs_one_token_per_input() -> None:
    """Token limits and per-token prices bound and bill images, not requests."""
    batch = {"inputs": [{"name": "input", "shape": [64, 64], "datatype": "FP32", "data": [0] * 4096}]}
    assert OIPApi().parse(OIP, "digits", batch).prompt_tokens == 64
    odd = {"inputs": [{"name": "input", "shape": [], "datatype": "FP32", "data": [0]}]}
    assert OIPApi().parse(OIP, "digits", odd).prompt_tokens == 1


@pytest.mark.parametrize(
    "body", [{}, {"inputs": []}, {"inputs": [1]}, {"inputs": [{"name": "x"}]}, {"inputs": [{"shape": [1]}]}]
)
def test_bad_oip_requests(body: Any) -> None:
    with pytest.raises(BadRequest):
        OIPApi().parse(OIP, "digits", body)


@pytest.mark.parametrize(
    ("route", "extra", "param"),
    [
        (CHAT, {"top_logprobs": "20"}, "top_logprobs"),
        (CHAT, {"top_logprobs": 2.0}, "top_logprobs"),
        (CHAT, {"logprobs": "true"}, "logprobs"),
        (CHAT, {"n": "2"}, "n"),
        (CHAT, {"n": 129}, "n"),
        (CHAT, {"best_of": 1.5}, "best_of"),
        (CHAT, {"max_tokens": 10**30}, "max_tokens"),
        (CHAT, {"max_completion_tokens": 1.0}, "max_completion_tokens"),
        (CHAT, {"temperature": "0.5"}, "temperature"),
        (CHAT, {"temperature": -1}, "temperature"),
        (CHAT, {"stream": 1}, "stream"),
        (CHAT, {"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
        (CHAT, {"logit_bias": {"1": "100"}}, "logit_bias"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages"),
        (CHAT, {"messages": [{"role": 1, "content": "x"}]}, "messages"),
        (CHAT, {"model": "m" * 201}, "model"),
        (CHAT, {"model": "m\x00"}, "model"),
        (CHAT, {"model": "a\nb"}, "model"),
        (CHAT, {"model": "..\\x"}, "model"),
        (CHAT, {"model": ".."}, "model"),
        (COMPLETIONS, {"prompt": [1, "a"]}, "prompt"),
        (COMPLETIONS, {"prompt": [1.5]}, "prompt"),
        (COMPLETIONS, {"prompt": [[1], []]}, "prompt"),
        (COMPLETIONS, {"prompt": []}, "prompt"),
        (COMPLETIONS, {"prompt": "x", "logprobs": True}, "logprobs"),
        (COMPLETIONS, {"prompt": "x", "echo": "yes"}, "echo"),
        (EMBEDDINGS, {"input": [True]}, "input"),
        (EMBEDDINGS, {"input": "x", "dimensions": "8"}, "dimensions"),
    ],
)
def test_types_are_checked_strictly_at_the_edge(
    route: Operation, extra: dict[str, Any], param: str
) -> None:
    """An upstream coerces "20" to 20 and 2.0 to 2: whatever the policy caps or the token
    count reads must be exactly the type it expects, or a 400 naming the parameter."""
    body: dict[str, Any] = {"model": "m", "messages": MSG, "prompt": "x", "input": "x", **extra}
    with pytest.raises(BadRequest) as info:
        api.parse(route, None, body)
    assert info.value.param == param and info.value.code == "invalid_parameter"
    assert info.value.status == 400


def test_hf_style_model_names_pass() -> None:
    """vLLM serves Hugging Face names such as "org/model"; they travel in the body only."""
    assert api.parse(CHAT, None, {"model": "Qwen/Qwen2.5-7B", "messages": MSG}).model == (
        "Qwen/Qwen2.5-7B"
    )


def test_reservation_covers_best_of_and_every_prompt_of_an_array() -> None:
    one = {"model": "m", "prompt": "x", "max_tokens": 10}
    assert api.parse(COMPLETIONS, None, one).max_output_tokens == 10
    assert api.parse(COMPLETIONS, None, {**one, "best_of": 4, "n": 2}).max_output_tokens == 40
    assert api.parse(COMPLETIONS, None, {**one, "prompt": ["a", "b", "c"]}).max_output_tokens == 30
    tokens = {**one, "prompt": [[1, 2], [3], [4, 5, 6]], "n": 2}
    parsed = api.parse(COMPLETIONS, None, tokens)
    assert parsed.max_output_tokens == 60 and parsed.prompt_tokens == 6
    assert api.parse(COMPLETIONS, None, {**one, "prompt": [1, 2, 3]}).max_output_tokens == 10


def tensor(shape: list[Any], data: Any, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": data,
                        **extra}]}


@pytest.mark.parametrize(
    "body",
    [
        tensor([64.0, 64], [0] * 4096),
        tensor(["64", 64], [0] * 4096),
        tensor([True, 64], [0] * 64),
        tensor([-1, 64], [0] * 64),
        tensor([2, 64], [0] * 64),  # fewer elements than the shape says
        tensor([1, 64], [0] * 64, datatype="FP33"),
        tensor([1, 64], [0] * 64, datatype=None),
        tensor([1, 64], [0] * 64, datatype=[]),  # unhashable: was a 500
        tensor([1], "abc"),
        {"inputs": [{"name": "", "datatype": "FP32", "shape": [1], "data": [0]}]},
        {**tensor([1], [0]), "outputs": "probabilities"},
        {**tensor([1], [0]), "parameters": []},
    ],
)
def test_oip_tensors_are_checked_strictly(body: Any) -> None:
    """A float or string first dimension counted as one row was a 64x token bypass."""
    with pytest.raises(BadRequest) as info:
        OIPApi().parse(OIP, "digits", body)
    assert info.value.param in ("inputs", "outputs", "parameters")


@pytest.mark.parametrize(("extra", "param"), [
    ({"parameters": {"binary_data_output": True}}, "parameters"),
    ({"parameters": {"binary_data_output": 1}}, "parameters"),
    ({"outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}, "outputs"),
    ({"outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}, "outputs"),
    ({"outputs": [{"name": "p", "parameters": {"shared_memory_region": "r"}}]}, "outputs"),
    ({"outputs": [{"name": "predict_proba", "parameters": {"content_type": "base64"}}]}, "outputs"),
])
def test_output_forms_no_stage_can_read_are_refused(extra: dict[str, Any], param: str) -> None:
    """Binary tensors, class strings or shared memory would take the answer past hardening
    and marks: refused before anything is spent, naming the parameter."""
    with pytest.raises(BadRequest) as info:
        OIPApi().parse(OIP, "digits", {**tensor([1], [0]), **extra})
    assert info.value.param == param and "JSON tensors" in str(info.value)
    with pytest.raises(BadRequest, match="must be an object"):
        OIPApi().parse(OIP, "digits", {**tensor([1], [0]), "outputs": [{"name": "p", "parameters": 1}]})
    allowed = {"parameters": {"binary_data_output": False, "priority": 1},
               "outputs": [{"name": "probabilities", "parameters": {"binary_data": False,
                                                                    "content_type": "np"}}]}
    assert OIPApi().parse(OIP, "digits", {**tensor([1], [0]), **allowed}).model == "digits"


def test_oip_rows_are_the_largest_batch_of_any_input() -> None:
    body = {"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [1], "data": [0]},
        {"name": "b", "datatype": "FP32", "shape": [32, 2], "data": [[0, 0]] * 32},
    ]}
    assert OIPApi().parse(OIP, "digits", body).prompt_tokens == 32


@pytest.mark.parametrize("name", ["", "x" * 201, "a\x00b", "..", "a\\b"])
def test_oip_model_names_in_the_path_are_checked(name: str) -> None:
    with pytest.raises(BadRequest) as info:
        OIPApi().parse(OIP, name, tensor([1], [0]))
    assert info.value.param == "model"
