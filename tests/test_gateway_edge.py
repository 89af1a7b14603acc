"""Hostile and careless input at the request edge, through a real ``modelfence serve``.

Each test here is a bypass a probe found: a value an upstream coerces that the policy or
the token count misread, a model name that broke telemetry, a client path or query string
that reached the upstream, a narrowing lost on streams, a readiness answer that pulled
every replica or showed internal addresses.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import orjson
import pytest

from modelfence.testing.processes import GatewayProcess, ServiceProcess, free_port, http_json

from .conftest import ADMIN_TOKEN, GatewayFactory, base_config

GATEWAY_DETECTION = False  # nothing here reads detection (conftest.module_config)

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def post(gateway: GatewayProcess, path: str, key: str, body: Any) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("POST", path, body=orjson.dumps(body),
                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, orjson.loads(data) if data else None
    finally:
        conn.close()


def upstream_stats(upstream: ServiceProcess) -> dict[str, Any]:
    stats: dict[str, Any] = http_json("GET", upstream.url + "/_stats")[1]
    return stats


def assert_refused(status: int, payload: Any, param: str) -> None:
    assert status == 400, payload
    assert payload["error"]["param"] == param
    assert payload["error"]["type"] == "invalid_request_error"
    assert isinstance(payload["error"]["message"], str) and payload["error"]["code"]


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: ServiceProcess
) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("edge")
    config = base_config(fake_upstream.url, workdir)
    config["upstreams"] = [
        {"name": "fake", "url": fake_upstream.url, "kind": "openai", "models": ["fake-*"]},
        {"name": "fake-oip", "url": fake_upstream.url, "kind": "oip", "models": ["digits-*"]},
    ]
    with GatewayProcess(config, workdir) as proc:
        yield proc


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"logprobs": True, "top_logprobs": "20"}, "top_logprobs"),
        (CHAT, {"logprobs": True, "top_logprobs": 20.0}, "top_logprobs"),
        (CHAT, {"max_tokens": "5000"}, "max_tokens"),
        (CHAT, {"n": "64"}, "n"),
        (CHAT, {"logprobs": "yes"}, "logprobs"),
        (CHAT, {"logit_bias": {"1": "100"}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "best_of": "20"}, "best_of"),
        ("/v1/completions", {"prompt": [1, "two"]}, "prompt"),
        ("/v1/embeddings", {"input": {"text": "x"}}, "input"),
    ],
    ids=["top-logprobs-string", "top-logprobs-float", "max-tokens-string", "n-string",
         "logprobs-string", "bias-string", "best-of-string", "mixed-prompt", "input-object"],
)
def test_strings_and_floats_never_slip_past_policy(
    gateway: GatewayProcess, fake_upstream: ServiceProcess,
    path: str, body: dict[str, Any], param: str,
) -> None:
    """``"top_logprobs": "20"`` came back with 20 alternatives on a tier capped at 5."""
    key = gateway.create_key("coercer")
    before = upstream_stats(fake_upstream)["requests"]
    status, _, payload = post(gateway, path, key,
                              {"model": "fake-chat", "messages": MESSAGES, **body})
    assert_refused(status, payload, param)
    assert upstream_stats(fake_upstream)["requests"] == before


@pytest.mark.parametrize("shape", [[64.0, 64], ["64", 64]], ids=["float", "string"])
def test_oip_shape_must_be_integers(
    gateway: GatewayProcess, shape: list[Any]
) -> None:
    """A float or string batch dimension was counted as one row: a 64x token bypass."""
    key = gateway.create_key("batcher")
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape,
                        "data": [0.0] * 4096}]}
    status, _, payload = post(gateway, "/v2/models/digits-fake/infer", key, body)
    assert_refused(status, payload, "inputs")
    body["inputs"][0]["shape"] = [64, 64]
    status, headers, _ = post(gateway, "/v2/models/digits-fake/infer", key, body)
    assert status == 200
    assert 10_000_000 - int(headers["x-ratelimit-remaining-tokens"]) > 32  # 64 rows, not 1


def test_best_of_and_prompt_arrays_are_reserved(gateway: GatewayProcess) -> None:
    """Each prompt of an array gets best_of completions: all of them count before admission."""
    key = gateway.create_key("arrays", tier="tiny")  # 1000 tokens per minute
    for extra in ({"prompt": ["a"] * 8, "max_tokens": 200}, {"prompt": "a", "max_tokens": 200,
                                                              "best_of": 8, "n": 1}):
        status, _, payload = post(gateway, "/v1/completions", key, {"model": "fake-chat", **extra})
        assert status == 429 and payload["error"]["code"] == "request_too_large", payload


@pytest.mark.parametrize(
    "model", ["fake-" + "x" * 300, "fake-\x00nul", "fake-\nline", "fake-\\x"],
    ids=["long", "nul", "newline", "backslash"],
)
def test_model_names_are_checked_at_the_edge(
    gateway: GatewayProcess, fake_upstream: ServiceProcess, model: str
) -> None:
    """Matched by a pattern, such a name reached the upstream, the metrics and the events."""
    key = gateway.create_key("namer")
    before = upstream_stats(fake_upstream)["requests"]
    status, _, payload = post(gateway, CHAT, key, {"model": model, "messages": MESSAGES})
    assert_refused(status, payload, "model")
    assert upstream_stats(fake_upstream)["requests"] == before


def test_client_query_and_path_never_reach_the_upstream(
    gateway: GatewayProcess, fake_upstream: ServiceProcess
) -> None:
    key = gateway.create_key("smuggler")
    body = {"model": "fake-chat", "messages": MESSAGES}
    assert post(gateway, CHAT + "?api_key=stolen&x=1", key, body)[0] == 200
    assert upstream_stats(fake_upstream)["last_path"] == CHAT

    tensors = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [0, 0]}]}
    status, _, _ = post(gateway, "/v2/models/digits-a%3Fx=1%23/infer?api_key=stolen", key, tensors)
    assert status == 200
    forwarded = upstream_stats(fake_upstream)["last_path"]
    assert "?" not in forwarded and unquote(forwarded) == "/v2/models/digits-a?x=1#/infer"

    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("GET", "/v2/models/digits-a?verbose=1",
                     headers={"authorization": f"Bearer {key}"})
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    assert upstream_stats(fake_upstream)["last_path"] == "/v2/models/digits-a"


def test_narrowing_applies_to_streams_and_the_client_body_is_kept(
    gateway: GatewayProcess, fake_upstream: ServiceProcess
) -> None:
    """Elevated risk asks the upstream for 1 alternative; streams used to ask for all 3."""
    key = gateway.create_key("elevated")
    status, _ = http_json("PUT", f"{gateway.url}/admin/v1/risk/elevated", {"level": "elevated"},
                          token=ADMIN_TOKEN)
    assert status == 200
    for stream in (False, True):
        body = {"model": "fake-chat", "messages": MESSAGES, "logprobs": True, "top_logprobs": 3,
                "stream": stream}
        assert post_raw_status(gateway, key, body) == 200
        sent = upstream_stats(fake_upstream)["last_body"]
        assert sent["top_logprobs"] == 1 and sent["logprobs"] is True, (stream, sent)


def post_raw_status(gateway: GatewayProcess, key: str, body: Any) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("POST", CHAT, body=orjson.dumps(body),
                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def readyz(gateway: GatewayProcess) -> tuple[int, Any, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        data = response.read()
        return response.status, orjson.loads(data), data
    finally:
        conn.close()


def test_readiness_follows_the_configured_fail_mode(
    start_gateway: GatewayFactory, fake_upstream: ServiceProcess
) -> None:
    """A limit backend down in open/degraded mode keeps the replica in the load balancer;
    in closed mode it does not. The body never shows a host, port or exception."""
    dead_port = free_port()
    dead_redis = f"redis://127.0.0.1:{dead_port}/0"
    for mode, expected in (("degraded", 200), ("open", 200), ("closed", 503)):
        gateway = start_gateway(name=f"gw-{mode}", limits={
            "backend": dead_redis, "on_backend_error": mode,
            "redis_timeout_seconds": 0.2})
        status, ready, data = readyz(gateway)
        assert status == expected, (mode, ready)
        assert ready["checks"]["limits"] == "down" and ready["checks"]["store"] == "ok"
        assert ready["status"] == ("degraded" if expected == 200 else "not ready")
        assert str(dead_port).encode() not in data and b"127.0.0.1" not in data
        gateway.stop()


def test_readiness_with_one_upstream_down_is_degraded_all_down_unready(
    start_gateway: GatewayFactory, fake_upstream: ServiceProcess
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = start_gateway(name="one-down", upstreams=[
        {"name": "fake", "url": fake_upstream.url, "kind": "openai", "models": ["fake-*"]},
        {"name": "gone", "url": dead, "kind": "oip", "models": ["digits-*"]},
    ])
    status, ready, data = readyz(gateway)
    assert status == 200 and ready["status"] == "degraded"
    assert ready["checks"]["upstream:fake"] == "ok" and ready["checks"]["upstream:gone"] == "down"
    assert set(ready["checks"].values()) == {"ok", "down"}
    assert dead.encode() not in data
    gateway.stop()
    gateway = start_gateway(name="all-down", upstreams=[
        {"name": "gone", "url": dead, "kind": "openai", "models": ["*"]},
    ])
    status, ready, _ = readyz(gateway)
    assert status == 503 and ready["status"] == "not ready"
