"""Redis paused (SIGSTOP) or killed while streams hold concurrency leases.

A private ``redis-server`` is the gateway's limit backend, so pausing or killing it touches
nobody else. Streams admitted before the fault end while Redis cannot be reached, so their
leases cannot be released then; a request arriving during a pause sends an admission that
Redis runs only once it wakes, after the gateway gave up on it. Once Redis is back, no
lease may be left behind: the lease set empties and the key gets its full concurrency again.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from concurrent.futures import Future
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
import redis

from modelfence.testing.processes import GatewayProcess, http_json

from .conftest import GatewayFactory
from .services import (
    background_loop,
    metric_sum,
    private_redis,
    scrape_metrics,
    wait_for_port,
)

pytestmark = [pytest.mark.redis]

CONCURRENCY = 4
STREAM = {"model": "fake-chat", "messages": [{"role": "user", "content": "hello"}],
          "max_tokens": 10, "stream": True, "fake_chunks": 10}
RELEASE_BOUND_SECONDS = 10.0  # how long after Redis returns stale leases may still stand


def lease_key(key_id: str) -> str:
    """The lease ZSET of one API key (limits/redis.py, namespace ``mf``)."""
    return f"mf:{{k:{quote(key_id, safe='')}}}:leases"


async def stream(url: str, key: str, chunk_delay: float) -> tuple[int, bytes]:
    """One streamed chat completion: (status, whole body)."""
    body = {**STREAM, "fake_chunk_delay": chunk_delay}
    async with aiohttp.ClientSession() as session, session.post(
        url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"},
        timeout=aiohttp.ClientTimeout(total=30),
    ) as response:
        return response.status, await response.read()


def start_streams(gateway: GatewayProcess, key: str, count: int, chunk_delay: float,
                  loop: asyncio.AbstractEventLoop) -> Future[list[Any]]:
    """``count`` concurrent streams on ``loop`` (another thread); each (status, body) or
    the exception that cut it off."""
    async def all_of() -> list[Any]:
        return await asyncio.gather(
            *(stream(gateway.url, key, chunk_delay) for _ in range(count)), return_exceptions=True
        )

    return asyncio.run_coroutine_threadsafe(all_of(), loop)


def completed(results: list[Any]) -> list[bool]:
    """Which streams were answered 200 and ran to ``data: [DONE]``."""
    return [isinstance(r, tuple) and r[0] == 200 and r[1].rstrip().endswith(b"data: [DONE]")
            for r in results]


def gateway_on(start_gateway: GatewayFactory, url: str) -> tuple[GatewayProcess, str, str]:
    gateway = start_gateway(limits={
        "backend": url, "on_backend_error": "degraded", "degraded_share": 0.5,
        "redis_timeout_seconds": 0.2,
        "tiers": {"default": {"requests_per_minute": 6000, "tokens_per_minute": 10_000_000,
                              "concurrent_requests": CONCURRENCY}},
    }, detection={"enabled": False})
    status, created = http_json("POST", gateway.url + "/admin/v1/keys",
                                {"client": "streamer", "tier": "default"},
                                token=gateway.admin_token)
    assert status == 201, created
    return gateway, str(created["api_key"]), str(created["key_id"])


def leases_after_recovery(client: redis.Redis, key_id: str) -> int:
    """Leases still held ``RELEASE_BOUND_SECONDS`` after Redis came back (0 as soon as free)."""
    deadline = time.monotonic() + RELEASE_BOUND_SECONDS
    while True:
        held = int(client.zcard(lease_key(key_id)))
        if held == 0 or time.monotonic() > deadline:
            return held
        time.sleep(0.2)


def burst(gateway: GatewayProcess, key: str, count: int, chunk_delay: float) -> list[int]:
    """The sorted statuses of ``count`` concurrent streams."""
    async def all_of() -> list[tuple[int, bytes]]:
        return await asyncio.gather(*(stream(gateway.url, key, chunk_delay) for _ in range(count)))

    return sorted(status for status, _ in asyncio.run(all_of()))


def test_no_lease_is_left_behind_after_redis_is_paused_mid_stream(
    start_gateway: GatewayFactory,
) -> None:
    with private_redis() as (url, server), background_loop() as loop:
        gateway, key, key_id = gateway_on(start_gateway, url)
        client = redis.Redis.from_url(url, socket_timeout=5)
        streams = start_streams(gateway, key, CONCURRENCY, 0.15, loop)  # ~1.5 s each
        time.sleep(0.5)
        assert client.zcard(lease_key(key_id)) == CONCURRENCY  # all admitted through Redis
        server.send_signal(signal.SIGSTOP)
        try:
            # Its admission reaches Redis but is answered only after the pause (an orphan).
            late = start_streams(gateway, key, 1, 0.0, loop)
            finished = streams.result(timeout=20)
            late_status = late.result(timeout=20)
            time.sleep(0.5)
        finally:
            server.send_signal(signal.SIGCONT)
        assert completed(finished) == [True] * CONCURRENCY, finished
        assert late_status[0][0] in (200, 429), late_status  # decided by the degraded share
        held = leases_after_recovery(client, key_id)
        statuses = burst(gateway, key, CONCURRENCY, 0.2)
        samples = scrape_metrics(gateway.url)
        client.close()
    assert held == 0, f"{held} leases still held {RELEASE_BOUND_SECONDS:g}s after Redis woke"
    assert statuses == [200] * CONCURRENCY, statuses
    assert metric_sum(samples, "modelfence_settle_errors_total") >= 1  # the failed releases


def test_no_lease_is_left_behind_after_redis_is_killed_mid_stream(
    start_gateway: GatewayFactory,
) -> None:
    with private_redis() as (url, server), background_loop() as loop:
        gateway, key, key_id = gateway_on(start_gateway, url)
        streams = start_streams(gateway, key, CONCURRENCY, 0.15, loop)
        time.sleep(0.5)
        server.kill()
        server.wait(timeout=10)
        finished = streams.result(timeout=20)
        # degraded: this replica alone admits half the concurrency while Redis is gone
        during = burst(gateway, key, CONCURRENCY, 0.2)
        restarted = subprocess.Popen(server.args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            port = urlsplit(url).port
            assert port is not None
            wait_for_port("127.0.0.1", port, timeout=10)
            time.sleep(1.2)  # past the guard's probe interval: Redis decides again
            client = redis.Redis.from_url(url, socket_timeout=5)
            after = burst(gateway, key, CONCURRENCY, 0.2)
            held = leases_after_recovery(client, key_id)
            client.close()
        finally:
            restarted.kill()
            restarted.wait(timeout=10)
    assert completed(finished) == [True] * CONCURRENCY, finished
    assert during == [200] * (CONCURRENCY // 2) + [429] * (CONCURRENCY // 2), during
    assert after == [200] * CONCURRENCY, after
    assert held == 0
