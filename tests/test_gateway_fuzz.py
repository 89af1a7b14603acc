"""Fuzzing the inference routes through a real ``modelfence serve`` on the fake upstream.

Bodies are drawn well-formed and hostile (wrong types, huge numbers, odd strings, nested
junk, bytes that are not JSON) for OpenAI chat, completions, embeddings and OIP infer.
Whatever arrives, the gateway answers below 500, every 4xx is OpenAI error JSON, and no
answer carries more log-probability alternatives than the tier's cap.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfence.testing.processes import GatewayProcess, ServiceProcess

from .conftest import PROFILE, base_config

GATEWAY_DETECTION = False  # nothing here reads detection (conftest.module_config)

EXAMPLES = 150 if PROFILE == "ci" else 600
MAX_TOP_LOGPROBS = 5  # the default tier's request policy cap

# JSON numbers orjson writes: 64-bit integers, finite floats.
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
odd_text = st.text(max_size=300) | st.sampled_from(
    ["", "\x00", "a\nb", "../..", "..", "\\", "%2F", "?x=1#", "fake-" + "x" * 250, "20", "1e9"]
)
scalars = st.none() | st.booleans() | ints | floats | odd_text
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=12,
)


def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a valid value, sometimes junk of any type."""
    return st.one_of(valid, valid, junk)


models = maybe(st.sampled_from(["fake-chat", "fake-embed", "fake-other", "nope"])) | odd_text
token_ids = st.lists(st.integers(min_value=0, max_value=50_000), min_size=1, max_size=8)
prompts = maybe(
    st.text(max_size=100) | st.lists(st.text(max_size=20), min_size=1, max_size=4) | token_ids
    | st.lists(token_ids, min_size=1, max_size=3)
)
content = maybe(st.text(max_size=100) | st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}), max_size=3
))
messages = maybe(st.lists(
    st.fixed_dictionaries({"role": maybe(st.sampled_from(["user", "system", "assistant"])),
                           "content": content}),
    min_size=1, max_size=3,
))
small = st.integers(min_value=0, max_value=40)
options = {
    "max_tokens": maybe(st.integers(min_value=1, max_value=64)),
    "max_completion_tokens": maybe(st.integers(min_value=1, max_value=64)),
    "n": maybe(st.integers(min_value=1, max_value=4)),
    "best_of": maybe(st.integers(min_value=1, max_value=4)),
    "logprobs": maybe(st.booleans() | small),
    "top_logprobs": maybe(small),
    "temperature": maybe(st.floats(min_value=0, max_value=2)),
    "stream": maybe(st.booleans()),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logit_bias": maybe(st.dictionaries(st.text(max_size=6), st.integers(-100, 100), max_size=3)),
    "echo": maybe(st.booleans()),
    "extra": junk,
}
chat = st.fixed_dictionaries({"model": models, "messages": messages}, optional=options)
completions = st.fixed_dictionaries({"model": models, "prompt": prompts}, optional=options)
embeddings = st.fixed_dictionaries({"model": models, "input": prompts},
                                   optional={"dimensions": maybe(small), "extra": junk})


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, Any]:
    shape = draw(st.lists(st.integers(min_value=0, max_value=4), max_size=3))
    size = 1
    for d in shape:
        size *= d
    data = draw(st.lists(floats, min_size=size, max_size=size) | junk)
    return draw(st.fixed_dictionaries({
        "name": maybe(st.just("input")),
        "datatype": maybe(st.sampled_from(["FP32", "INT64", "BYTES"])),
        "shape": maybe(st.just(shape)),
        "data": st.just(data),
    }))


oip = st.fixed_dictionaries(
    {"inputs": maybe(st.lists(tensors(), min_size=1, max_size=2))},
    optional={"outputs": maybe(st.lists(st.fixed_dictionaries({"name": st.text(max_size=12)}),
                                        max_size=2)),
              "parameters": junk},
)
oip_names = st.sampled_from(["digits-fake", "digits-other", "nope"]) | odd_text.filter(bool)

requests = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), chat | junk),
    st.tuples(st.just("/v1/completions"), completions | junk),
    st.tuples(st.just("/v1/embeddings"), embeddings | junk),
    st.tuples(oip_names.map(lambda n: f"/v2/models/{quote(n, safe='')}/infer"), oip | junk),
)
not_json = st.binary(max_size=200).filter(lambda b: not b.strip().startswith((b"{", b"[")))


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: ServiceProcess
) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("fuzz")
    config = base_config(fake_upstream.url, workdir)
    config["upstreams"][1]["models"] = ["digits-*"]
    with GatewayProcess(config, workdir) as proc:
        yield proc


@pytest.fixture(scope="module")
def key(gateway: GatewayProcess) -> str:
    return gateway.create_key("fuzzer")


def send(gateway: GatewayProcess, key: str, path: str, body: bytes) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        conn.request("POST", path, body=body,
                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("content-type", "")
    finally:
        conn.close()


def alternatives(payload: Any) -> list[int]:
    """How many alternatives each token of an OpenAI answer (or stream event) carries."""
    counts = []
    for choice in payload.get("choices") or [] if isinstance(payload, dict) else []:
        logprobs = choice.get("logprobs") or {}
        for token in logprobs.get("content") or []:
            counts.append(len(token.get("top_logprobs") or []))
    return counts


def check(status: int, data: bytes, content_type: str, sent: Any) -> None:
    assert status < 500, (status, data[:500], sent)
    if status == 200 and content_type.startswith("text/event-stream"):
        events = [line[6:] for line in data.split(b"\n") if line.startswith(b"data: {")]
        counts = [n for event in events for n in alternatives(orjson.loads(event))]
        assert all(n <= MAX_TOP_LOGPROBS for n in counts), (counts, sent)
    elif status == 200:
        counts = alternatives(orjson.loads(data))
        assert all(n <= MAX_TOP_LOGPROBS for n in counts), (counts, sent)
    if status >= 400:
        assert content_type.startswith("application/json"), (status, data[:200])
        error = orjson.loads(data)["error"]
        assert isinstance(error["message"], str) and error["message"], error
        assert isinstance(error["type"], str) and isinstance(error["code"], str), error
        assert error["param"] is None or isinstance(error["param"], str), error


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests)
def test_inference_routes_never_answer_5xx(
    gateway: GatewayProcess, key: str, request: tuple[str, Any]
) -> None:
    path, body = request
    status, data, content_type = send(gateway, key, path, orjson.dumps(body))
    check(status, data, content_type, request)


@settings(max_examples=max(EXAMPLES // 5, 20), deadline=None, database=None)
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/embeddings",
                             "/v2/models/digits-fake/infer"]), body=not_json)
def test_bodies_that_are_not_json_are_a_clean_400(
    gateway: GatewayProcess, key: str, path: str, body: bytes
) -> None:
    status, data, content_type = send(gateway, key, path, body)
    check(status, data, content_type, body)
    assert status == 400
