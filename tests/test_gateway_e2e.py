"""The gateway as a client sees it: the real ``openai`` client against ``modelfence serve``.

The upstream is the fast fake server (it counts what reaches it), so these tests check the
gateway's own behaviour: auth, routing, limits and their headers, errors, streaming.
"""

from __future__ import annotations

import http.client
import threading
import time
from typing import Any

import openai
import orjson
import pytest

from modelfence.testing.processes import GatewayProcess, ServiceProcess, http_json

from .conftest import ADMIN_TOKEN, GatewayFactory

GATEWAY_DETECTION = False  # nothing here reads detection (conftest.module_config)

MESSAGES = [{"role": "user", "content": "What is the answer?"}]


def client(gateway: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=10)


def upstream_requests(upstream: ServiceProcess) -> int:
    return int(http_json("GET", upstream.url + "/_stats")[1]["requests"])


def raw(gateway: GatewayProcess, method: str, path: str, body: bytes = b"",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, (
            orjson.loads(data) if data and response.getheader("content-type", "").startswith("application/json") else data
        )
    finally:
        conn.close()


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> GatewayProcess:
    return start_gateway()


def test_chat_plain_with_rate_limit_headers(gateway: GatewayProcess) -> None:
    key = gateway.create_key("acme")
    response = client(gateway, key).chat.completions.with_raw_response.create(
        model="fake-chat", messages=MESSAGES, max_tokens=20
    )
    completion = response.parse()
    assert completion.choices[0].message.content.startswith("The answer")
    assert completion.usage is not None and completion.usage.total_tokens == 16
    headers = response.headers
    assert headers["x-ratelimit-limit-requests"] == "6000"
    assert int(headers["x-ratelimit-remaining-requests"]) == 5999
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-ratelimit-remaining-tokens" in headers
    assert headers["x-request-id"].startswith("req_")


def test_chat_streaming_without_usage_requested(gateway: GatewayProcess, fake_upstream: ServiceProcess) -> None:
    key = gateway.create_key("acme")
    stream = client(gateway, key).chat.completions.create(
        model="fake-chat", messages=MESSAGES, stream=True, extra_body={"fake_chunks": 4}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The answer is forty"
    assert all(c.choices for c in chunks), "the usage chunk the client did not ask for leaked"
    assert all(c.usage is None for c in chunks)


def test_chat_streaming_with_usage_requested(gateway: GatewayProcess) -> None:
    key = gateway.create_key("acme")
    chunks = list(client(gateway, key).chat.completions.create(
        model="fake-chat", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}, extra_body={"fake_chunks": 3},
    ))
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_stream_headers_disable_proxy_buffering(gateway: GatewayProcess) -> None:
    key = gateway.create_key("acme")
    body = orjson.dumps({"model": "fake-chat", "messages": MESSAGES, "stream": True})
    status, headers, data = raw(gateway, "POST", "/v1/chat/completions", body,
                                {"authorization": f"Bearer {key}", "content-type": "application/json"})
    assert status == 200
    assert headers["x-accel-buffering"] == "no"
    assert headers["content-type"].startswith("text/event-stream")
    assert data.endswith(b"data: [DONE]\n\n")


def test_completions_and_embeddings(gateway: GatewayProcess) -> None:
    api = client(gateway, gateway.create_key("acme"))
    assert api.completions.create(model="fake-chat", prompt="Q:", max_tokens=5).choices[0].text
    vectors = api.embeddings.create(model="fake-embed", input=["a", "b"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 8


def test_models_are_filtered_by_tier(gateway: GatewayProcess) -> None:
    everything = {m.id for m in client(gateway, gateway.create_key("a")).models.list()}
    assert {"fake-chat", "fake-embed", "digits-fake"} <= everything
    limited = client(gateway, gateway.create_key("b", tier="chat-only"))
    assert {m.id for m in limited.models.list()} == {"fake-chat"}
    with pytest.raises(openai.NotFoundError) as info:
        limited.embeddings.create(model="fake-embed", input="x")
    assert info.value.code == "model_not_found"


def test_oip_infer_and_metadata(gateway: GatewayProcess) -> None:
    key = gateway.create_key("acme")
    auth = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    body = orjson.dumps({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                     "data": [0.0] * 128}]})
    status, headers, payload = raw(gateway, "POST", "/v2/models/digits-fake/infer", body, auth)
    assert status == 200 and payload["outputs"][0]["shape"] == [2, 10]
    assert "x-ratelimit-remaining-requests" in headers
    status, _, meta = raw(gateway, "GET", "/v2/models/digits-fake", headers=auth)
    assert status == 200 and meta["name"] == "digits-fake"
    assert raw(gateway, "GET", "/v2/health/ready")[0] == 200


def test_bad_and_missing_keys_get_401(gateway: GatewayProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client(gateway, "mf_not-a-real-key").chat.completions.create(model="fake-chat", messages=MESSAGES)
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    status, _, payload = raw(gateway, "POST", "/v1/chat/completions", b"{}")
    assert status == 401 and payload["error"]["code"] == "missing_api_key"


def test_revoked_key_is_refused_within_two_seconds(gateway: GatewayProcess) -> None:
    status, created = http_json("POST", gateway.url + "/admin/v1/keys", {"client": "gone"}, token=ADMIN_TOKEN)
    assert status == 201
    api = client(gateway, created["api_key"])
    api.chat.completions.create(model="fake-chat", messages=MESSAGES)
    gateway.revoke_key(created["key_id"])
    deadline = time.monotonic() + 2.0
    while True:
        try:
            api.chat.completions.create(model="fake-chat", messages=MESSAGES)
        except openai.AuthenticationError as exc:
            assert exc.body["code"] == "revoked_api_key"  # type: ignore[index]
            break
        assert time.monotonic() < deadline, "revocation not effective within 2 s"
        time.sleep(0.1)


def test_429_carries_retry_after_and_ratelimit_headers(gateway: GatewayProcess) -> None:
    api = client(gateway, gateway.create_key("small", tier="tiny"))
    for _ in range(2):
        api.chat.completions.create(model="fake-chat", messages=MESSAGES, max_tokens=10)
    with pytest.raises(openai.RateLimitError) as info:
        api.chat.completions.create(model="fake-chat", messages=MESSAGES, max_tokens=10)
    error = info.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    headers = error.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert "requests per minute" in error.message


def test_request_larger_than_token_limit_is_refused_upfront(gateway: GatewayProcess) -> None:
    api = client(gateway, gateway.create_key("small", tier="tiny"))
    with pytest.raises(openai.RateLimitError) as info:
        api.chat.completions.create(model="fake-chat", messages=MESSAGES, max_tokens=5000)
    assert info.value.code == "request_too_large"


def test_concurrency_lease_is_held_for_the_request_and_released(gateway: GatewayProcess) -> None:
    key = gateway.create_key("one-at-a-time", tier="tiny")
    api = client(gateway, key)
    slow = threading.Thread(
        target=lambda: api.chat.completions.create(
            model="fake-chat", messages=MESSAGES, max_tokens=10, extra_body={"fake_delay": 1.0}
        )
    )
    slow.start()
    time.sleep(0.4)
    with pytest.raises(openai.RateLimitError) as info:
        api.chat.completions.create(model="fake-chat", messages=MESSAGES, max_tokens=10)
    assert "concurrent" in info.value.message
    slow.join()


def test_stream_cut_by_the_client_releases_its_lease(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(limits={"tiers": {"tiny": {"requests_per_minute": 100}}})
    key = gateway.create_key("quitter", tier="tiny")
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=orjson.dumps(
        {"model": "fake-chat", "messages": MESSAGES, "stream": True, "max_tokens": 10,
         "fake_chunks": 200, "fake_chunk_delay": 0.05}),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.read1(64)  # the stream is flowing ...
    conn.sock.close()  # ... and the client walks away
    conn.close()
    deadline = time.monotonic() + 3
    api = client(gateway, key)
    while True:
        try:
            api.chat.completions.create(model="fake-chat", messages=MESSAGES, max_tokens=10)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the lease of the abandoned stream was not released"
            time.sleep(0.1)


def test_tokens_are_settled_to_real_usage(gateway: GatewayProcess) -> None:
    api = client(gateway, gateway.create_key("settle"))
    first = api.chat.completions.with_raw_response.create(model="fake-chat", messages=MESSAGES, max_tokens=5000)
    # the reservation (prompt estimate + 5000) was taken before the call ...
    assert int(first.headers["x-ratelimit-remaining-tokens"]) <= 10_000_000 - 5000
    second = api.chat.completions.with_raw_response.create(model="fake-chat", messages=MESSAGES, max_tokens=1)
    # ... and replaced by the real usage (16 tokens) afterwards
    used_before_second = 10_000_000 - int(second.headers["x-ratelimit-remaining-tokens"]) - 1
    assert used_before_second < 100


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"{not json", {}, 400, "invalid_request"),
        (b'{"model": "fake-chat", "messages": "hi"}', {}, 400, "invalid_parameter"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', {}, 404, "model_not_found"),
        (b"x" * 70_000, {}, 413, "payload_too_large"),
        (b"{}", {"x-big": "y" * 9000}, 431, "headers_too_large"),
    ],
    ids=["malformed-json", "wrong-type", "unknown-model", "huge-body", "huge-headers"],
)
def test_bad_input_is_refused_and_never_forwarded(
    gateway: GatewayProcess, fake_upstream: ServiceProcess,
    body: bytes, headers: dict[str, str], status: int, code: str,
) -> None:
    key = gateway.create_key("fuzzy")
    before = upstream_requests(fake_upstream)
    got, _, payload = raw(gateway, "POST", "/v1/chat/completions", body,
                          {"authorization": f"Bearer {key}", "content-type": "application/json", **headers})
    assert got == status
    assert payload["error"]["code"] == code
    assert upstream_requests(fake_upstream) == before


def test_unknown_routes_and_methods(gateway: GatewayProcess) -> None:
    assert raw(gateway, "GET", "/v1/nothing-here")[0] == 404
    assert raw(gateway, "GET", "/v1/chat/completions")[0] == 405
    assert raw(gateway, "POST", "/v2/models/x/explain")[0] == 404


def test_upstream_failures_become_clean_502_and_504(gateway: GatewayProcess) -> None:
    api = client(gateway, gateway.create_key("unlucky"))
    with pytest.raises(openai.InternalServerError) as failed:
        api.chat.completions.create(model="fake-chat", messages=MESSAGES, extra_body={"fake_status": 500})
    assert failed.value.status_code == 502 and failed.value.code == "upstream_error"
    with pytest.raises(openai.APIStatusError) as slow:
        api.chat.completions.create(model="fake-chat", messages=MESSAGES, extra_body={"fake_delay": 3})
    assert slow.value.status_code == 504 and slow.value.code == "upstream_timeout"


def test_unreachable_upstream_is_a_502(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(upstreams=[{"name": "gone", "url": "http://127.0.0.1:9", "models": ["*"]}])
    with pytest.raises(openai.InternalServerError) as info:
        client(gateway, gateway.create_key("x")).chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == 502
    status, _, ready = raw(gateway, "GET", "/readyz")
    assert status == 503 and ready["checks"]["upstream:gone"] != "ok"


def test_health_readiness_and_metrics(gateway: GatewayProcess) -> None:
    key = gateway.create_key("metered")
    client(gateway, key).chat.completions.create(model="fake-chat", messages=MESSAGES)
    assert raw(gateway, "GET", "/healthz")[0] == 200
    status, _, ready = raw(gateway, "GET", "/readyz")
    assert status == 200 and set(ready["checks"]) >= {"store", "limits", "upstream:fake"}
    status, _, text = raw(gateway, "GET", "/metrics")
    metrics = text.decode()
    assert 'modelfence_requests_total{model="fake-chat",outcome="ok",route="/v1/chat/completions",tier="default"}' in metrics
    assert "modelfence_request_duration_seconds_bucket" in metrics
    assert 'modelfence_limit_decisions_total{decision="allowed"' in metrics
    assert key not in metrics and "metered" not in metrics
