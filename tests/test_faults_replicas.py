"""A replica killed mid-stream while another shares its Redis limits.

The survivor keeps serving; the dead replica's concurrency leases stand until
``limits.lease_ttl_seconds`` (the documented bound: a crashed replica's slots come back
after at most one lease TTL), and meanwhile nobody is admitted beyond the key's limit.
"""

from __future__ import annotations

import signal
import time

import pytest
import redis

from modelfence.testing.processes import http_json

from .conftest import GatewayFactory
from .services import background_loop, private_redis
from .test_faults_redis import burst, completed, lease_key, start_streams

pytestmark = [pytest.mark.redis]

CONCURRENCY = 4
LEASE_TTL = 8.0


def test_survivor_serves_and_a_dead_replicas_leases_expire_without_over_admission(
    start_gateway: GatewayFactory,
) -> None:
    with private_redis() as (url, _server), background_loop() as loop:
        shared = {
            "limits": {"backend": url, "on_backend_error": "closed", "redis_timeout_seconds": 2,
                       "lease_ttl_seconds": LEASE_TTL,
                       "tiers": {"default": {"requests_per_minute": 6000,
                                             "tokens_per_minute": 10_000_000,
                                             "concurrent_requests": CONCURRENCY}}},
            "detection": {"enabled": False},
        }
        doomed = start_gateway(name="doomed", **shared)
        survivor = start_gateway(name="survivor", **shared)
        status, created = http_json("POST", survivor.url + "/admin/v1/keys",
                                    {"client": "shared", "tier": "default"},
                                    token=survivor.admin_token)
        assert status == 201, created
        key, key_id = str(created["api_key"]), str(created["key_id"])
        leases = redis.Redis.from_url(url, socket_timeout=5)

        # two streams on each replica, ~1.5 s each (the upstream timeout is 2 s)
        on_doomed = start_streams(doomed, key, 2, 0.15, loop)
        on_survivor = start_streams(survivor, key, 2, 0.15, loop)
        time.sleep(0.7)
        assert leases.zcard(lease_key(key_id)) == CONCURRENCY
        assert doomed.proc is not None
        doomed.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        doomed.proc.wait(timeout=10)

        while_full = burst(survivor, key, CONCURRENCY, 0.0)  # every slot is held
        kept = on_survivor.result(timeout=20)
        cut = on_doomed.result(timeout=20)
        # the survivor's slots are free again, the dead replica's are not (yet)
        orphans_stand = burst(survivor, key, CONCURRENCY, 0.2) \
            if time.monotonic() - killed_at < LEASE_TTL - 2 else None
        deadline = killed_at + LEASE_TTL + 2
        while leases.zcard(lease_key(key_id)) and time.monotonic() < deadline:
            time.sleep(0.2)
        held = int(leases.zcard(lease_key(key_id)))
        after_ttl = burst(survivor, key, CONCURRENCY, 0.2)
        leases.close()

    assert while_full == [429] * CONCURRENCY, while_full
    assert completed(kept) == [True, True], kept
    assert completed(cut) == [False, False], "the killed replica's streams cannot have completed"
    if orphans_stand is not None:
        assert orphans_stand == [200, 200, 429, 429], orphans_stand
    assert held == 0, f"leases of the dead replica outlived lease_ttl_seconds={LEASE_TTL:g}"
    assert after_ttl == [200] * CONCURRENCY, after_ttl
