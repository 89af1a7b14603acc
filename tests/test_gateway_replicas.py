"""Several gateway processes sharing Redis limits and one PostgreSQL store, and Redis faults."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

import aiohttp
import pytest

from modelfence.testing.processes import GatewayProcess, http_json

from .conftest import GatewayFactory
from .services import private_redis

GATEWAY_DETECTION = False  # nothing here reads detection (conftest.module_config)

pytestmark = [pytest.mark.redis]

MESSAGES = [{"role": "user", "content": "What is the answer?"}]


async def _fire(urls: list[str], key: str, count: int, body: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """``count`` concurrent chat requests spread round-robin over ``urls``."""
    headers = {"authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> tuple[int, dict[str, Any]]:
            async with session.post(
                urls[i % len(urls)] + "/v1/chat/completions", json=body, headers=headers
            ) as response:
                return response.status, await response.json()

        return await asyncio.gather(*(one(i) for i in range(count)))


def _replicas(start_gateway: GatewayFactory, redis_url: str, postgres_url: str, tier: dict[str, Any]) -> list[GatewayProcess]:
    shared = {
        "store": postgres_url,
        # closed, with a generous timeout: this checks Redis atomicity, not the fallbacks
        "limits": {"backend": redis_url, "on_backend_error": "closed",
                   "redis_timeout_seconds": 5, "tiers": {"shared": tier}},
    }
    return [start_gateway(name=f"replica{i}", **shared) for i in range(3)]


def _burst(
    start_gateway: GatewayFactory, redis_url: str, postgres_url: str, tier: dict[str, Any],
    count: int, max_tokens: int,
) -> tuple[list[tuple[int, dict[str, Any]]], float]:
    """One key, ``count`` concurrent requests spread over three replicas; (results, seconds)."""
    replicas = _replicas(start_gateway, redis_url, postgres_url,
                         {"requests_per_minute": 100_000, "tokens_per_minute": 10_000_000,
                          "concurrent_requests": 1000, **tier})
    key = replicas[0].create_key(f"hydra-{uuid.uuid4().hex[:8]}", tier="shared")
    started = time.monotonic()
    results = asyncio.run(_fire([r.url for r in replicas], key, count,
                                {"model": "fake-chat", "messages": MESSAGES, "max_tokens": max_tokens}))
    return results, time.monotonic() - started


def test_three_replicas_never_over_admit_requests(
    start_gateway: GatewayFactory, redis_url: str, postgres_url: str
) -> None:
    results, elapsed = _burst(start_gateway, redis_url, postgres_url,
                              {"requests_per_minute": 60}, count=180, max_tokens=5)
    admitted = sum(1 for status, _ in results if status == 200)
    refused = [body for status, body in results if status == 429]
    # bucket of 60 plus what refills at 1 request/s while the burst runs
    assert 60 <= admitted <= 60 + math.ceil(elapsed) + 1, (admitted, elapsed)
    assert admitted + len(refused) == 180
    assert all(b["error"]["code"] == "rate_limit_exceeded" for b in refused)


def test_three_replicas_overshoot_tokens_by_at_most_one_reservation(
    start_gateway: GatewayFactory, redis_url: str, postgres_url: str
) -> None:
    results, elapsed = _burst(start_gateway, redis_url, postgres_url,
                              {"tokens_per_minute": 1000}, count=150, max_tokens=10)
    used = sum(body["usage"]["total_tokens"] for status, body in results if status == 200)
    reservation = 9 + 10  # prompt estimate + max_tokens
    assert used > 0
    assert used <= 1000 + 1000 / 60 * elapsed + reservation, (used, elapsed)


def test_revocation_reaches_every_replica_within_two_seconds(
    start_gateway: GatewayFactory, redis_url: str, postgres_url: str
) -> None:
    replicas = _replicas(start_gateway, redis_url, postgres_url,
                         {"requests_per_minute": 6000, "tokens_per_minute": 10_000_000})
    status, created = http_json("POST", replicas[0].url + "/admin/v1/keys",
                                {"client": "leaver", "tier": "shared"}, token=replicas[0].admin_token)
    assert status == 201
    body = {"model": "fake-chat", "messages": MESSAGES}
    for replica in replicas:  # every replica has the key cached
        assert asyncio.run(_fire([replica.url], created["api_key"], 1, body))[0][0] == 200
    replicas[1].revoke_key(created["key_id"])
    revoked_at = time.monotonic()
    pending = {r.url for r in replicas}
    while pending:
        for url in list(pending):
            if asyncio.run(_fire([url], created["api_key"], 1, body))[0][0] == 401:
                pending.discard(url)
        assert time.monotonic() - revoked_at < 2.0, f"still accepted by {pending}"
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["open", "closed", "degraded"])
def test_redis_outage_follows_on_backend_error(start_gateway: GatewayFactory, mode: str) -> None:
    with private_redis() as (url, server):
        gateway = start_gateway(limits={
            "backend": url, "on_backend_error": mode, "degraded_share": 0.25,
            "redis_timeout_seconds": 0.2,
            "tiers": {"default": {"requests_per_minute": 8, "tokens_per_minute": 1_000_000,
                                  "concurrent_requests": 8}},
        })
        key = gateway.create_key("steady")
        body = {"model": "fake-chat", "messages": MESSAGES, "max_tokens": 5}
        assert asyncio.run(_fire([gateway.url], key, 1, body))[0][0] == 200
        server.kill()
        server.wait(timeout=10)
        statuses = [asyncio.run(_fire([gateway.url], key, 1, body))[0] for _ in range(4)]
    codes = [status for status, _ in statuses]
    if mode == "open":
        assert codes == [200, 200, 200, 200]
    elif mode == "closed":
        assert codes == [503] * 4
        assert statuses[0][1]["error"]["code"] == "limit_backend_unavailable"
    else:  # a local share: 8/min * 0.25 = 2 requests, then 429
        assert codes == [200, 200, 429, 429]
    status, metrics = http_json("GET", gateway.url + "/metrics")
    assert f'modelfence_limit_backend_failures_total{{mode="{mode}"}} 4.0' in metrics
