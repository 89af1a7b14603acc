"""End to end: a real gateway, its detector child process, an extracting and a normal client."""

from __future__ import annotations

import random
import time
from typing import Any

from modelfence.testing.processes import http_json

from .conftest import GatewayFactory

DETECTION = {
    "detection": {"embedder": "hashing", "evaluate_every": 5, "state_poll_seconds": 0.2},
    "telemetry": {"batch_size": 50},
}


def chat(gateway_url: str, key: str, body: dict[str, Any]) -> tuple[int, Any]:
    return http_json(
        "POST", gateway_url + "/v1/chat/completions", {"model": "fake-chat", **body}, token=key
    )


def test_an_extracting_client_is_flagged_then_blocked_while_a_normal_one_passes(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(**DETECTION)
    thief = gateway.create_key("thief")
    user = gateway.create_key("user")
    rng = random.Random(7)
    words = [
        "oven",
        "museum",
        "python",
        "flight",
        "garlic",
        "visa",
        "loop",
        "bread",
        "ticket",
        "class",
    ]

    def normal_request() -> int:
        turns = [
            {"role": "user", "content": f"how do I {' '.join(rng.sample(words, 4))}"},
            {"role": "assistant", "content": "like this"},
            {"role": "user", "content": f"and {rng.choice(words)}?"},
        ]
        status, _ = chat(gateway.url, user, {"messages": turns, "temperature": 0.8})
        return status

    # Every test client shares 127.0.0.1 and one user agent, so detection links them into one
    # entity; an established honest key keeps its own record (see ESTABLISHED_QUERIES).
    assert all(normal_request() == 200 for _ in range(25))
    harvest = {
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 5,
        "max_tokens": 5,
        "fake_chunks": 5,
    }
    statuses: list[int] = []
    blocked_body: Any = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        prompt = f"Explain step by step: {' '.join(rng.sample(words, 5))}"
        status, body = chat(
            gateway.url, thief, {"messages": [{"role": "user", "content": prompt}], **harvest}
        )
        statuses.append(status)
        if status == 403:
            blocked_body = body
            break
        if len(statuses) % 5 == 0:
            assert normal_request() == 200
        if len(statuses) > 200:
            time.sleep(0.1)  # the detector child may still be starting
    assert blocked_body is not None, f"never blocked after {len(statuses)} requests"
    assert blocked_body["error"]["code"] == "client_blocked"
    assert statuses.count(200) >= 20
    assert all(normal_request() == 200 for _ in range(5))

    record = http_json("GET", gateway.url + "/admin/v1/clients/thief", token=gateway.admin_token)[1]
    assert record["record"]["level"] == "block"
    assert any(r["code"] == "llm_harvesting" for r in record["record"]["reasons"])
    assert record["usage_24h"]["requests"] > 0  # telemetry reached the store
    assert record["audit"][0]["action"] == "block" and record["audit"][0]["source"] == "detector"
    alerts = http_json("GET", gateway.url + "/admin/v1/alerts", token=gateway.admin_token)[1][
        "data"
    ]
    assert {a["client"] for a in alerts} == {"thief"}
    user_record = http_json(
        "GET", gateway.url + "/admin/v1/clients/user", token=gateway.admin_token
    )[1]
    assert user_record["record"] is None or user_record["record"]["level"] == "normal"

    metrics = http_json("GET", gateway.url + "/metrics")[1]
    assert 'modelfence_detection_enforced_total{action="block"}' in metrics
    assert 'modelfence_telemetry_events_total{fate="emitted"}' in metrics
