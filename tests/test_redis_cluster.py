"""Every Redis-backed feature on a real three-master Redis Cluster (the ``cluster`` fixture).

Limits, actions, revocations and telemetry run through ``redis+cluster://`` exactly as
through one Redis; the multi-key scripts and reads keep to one slot per key or account.
"""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

import pytest
from redis import Redis as SyncRedis
from redis.asyncio.cluster import RedisCluster
from redis.cluster import RedisCluster as SyncCluster

from modelfence.config import parse_config
from modelfence.detect.feeds import (
    GROUP,
    STREAM_PREFIX,
    RedisStreamFeed,
    RedisStreamSink,
    partition_of,
)
from modelfence.errors import ConfigError, LimitBackendError
from modelfence.limits import AdmissionRequest, GuardedBackend, Quota
from modelfence.limits.base import Allowance
from modelfence.limits.redis import RedisBackend
from modelfence.policy.dp import RedisAccountant
from modelfence.redisconn import REDIS_ERRORS, connect
from modelfence.testing.processes import http_json

from .conftest import GatewayFactory
from .services import LocalCluster, redis_cluster
from .test_detect_streams import benign_chat

pytestmark = pytest.mark.redis

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


def masters_of(cluster: LocalCluster, keys: list[str]) -> set[str]:
    """The masters whose slots hold ``keys`` (by the slot map, whether the keys exist)."""
    client = SyncCluster(host="127.0.0.1", port=cluster.ports[0], socket_timeout=5)
    try:
        return {client.get_node_from_key(key).name for key in keys}
    finally:
        client.close()


def flush(cluster: LocalCluster) -> None:
    for port in cluster.ports:
        node = SyncRedis(port=port, socket_timeout=5)
        node.flushall()
        node.close()


def chat(gateway: Any, key: str) -> int:
    status, _ = http_json("POST", gateway.url + "/v1/chat/completions", CHAT, token=key)
    return status


# redis-py's cluster client loses track of some connections when it rebuilds its slot map
# (a killed master, a map dropped after a node error): it marks them for a reconnect that
# never comes, and the garbage collector closes them later with a ResourceWarning. These
# tests kill masters and drop maps on purpose, so those warnings are expected here; they are
# collected at the end of this module, not in whichever test the collector happens to run.
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(autouse=True, scope="module")
def _collect_dropped_connections() -> Iterator[None]:
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_cluster_config_names_the_key_and_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match=r"limits\.backend.*redis\+cluster://HOST:PORT"):
        parse_config({"limits": {"backend": "redis-cluster://10.0.0.1:7000"}})
    with pytest.raises(ConfigError, match=r"limits\.backend.*database 0 only"):
        parse_config({"limits": {"backend": "redis+cluster://10.0.0.1:7000/2"}})
    with pytest.raises(ConfigError, match=r"per_ip_prefix\.requests_per_minute"):
        parse_config({"limits": {"backend": "redis+cluster://10.0.0.1:7000",
                                 "per_ip_prefix": {"requests_per_minute": 60}}})
    with pytest.raises(ConfigError, match=r"detection\.redis_url"):
        parse_config({"detection": {"redis_url": "http://10.0.0.1:7000"}})
    with pytest.raises(ConfigError, match=r"limits\.backend.*'b:99999'.*1\.\.65535"):
        parse_config({"limits": {"backend": "redis+cluster://a:7000,b:99999"}})
    with pytest.raises(ConfigError, match=r"detection\.redis_url.*1\.\.65535"):
        parse_config({"detection": {"redis_url": "redis://10.0.0.1:99999/0"}})
    config = parse_config({"limits": {"backend": "redis+cluster://a:7000,b:7001"}})
    assert config.limits.backend == "redis+cluster://a:7000,b:7001"


async def test_keys_and_accounts_spread_over_the_masters_and_allowances_stay_in_one_slot(
    cluster: LocalCluster,
) -> None:
    backend = RedisBackend.from_url(cluster.url, timeout_seconds=2, namespace="spread")
    allowance = Allowance(rows_per_day=3)
    try:
        for i in range(24):
            decision = await backend.admit(
                AdmissionRequest(f"key_{i}", Quota(requests_per_minute=100, concurrent_requests=5))
            )
            assert decision.allowed and decision.lease is not None
            await backend.settle(decision.lease, 0, 0.0)
        # two keys of one account share its allowance; without one slot this is CROSSSLOT
        quota = Quota(requests_per_minute=100, allowance=allowance)
        outcomes = []
        for i in range(4):
            request = AdmissionRequest(
                f"acct_key_{i % 2}", quota, account="acme", rows=1, key_account="acme"
            )
            outcomes.append((await backend.admit(request)).allowed)
        assert outcomes == [True, True, True, False]
        names = [backend.key("k", f"key_{i}", "requests") for i in range(24)]
    finally:
        await backend.close()
    assert len(masters_of(cluster, names)) >= 2, "every key landed on one master"


async def test_the_telemetry_stream_reaches_a_detector_feed_across_slots(
    cluster: LocalCluster,
) -> None:
    flush(cluster)  # no streams or groups left by another test's gateways
    client = connect(cluster.url, timeout_seconds=5)
    clients = [f"user-{i}" for i in range(12)]
    events = [e for i, c in enumerate(clients) for e in benign_chat(c, 5, seed=i)]
    try:
        await RedisStreamSink(client, 8).write(events)
        feed = RedisStreamFeed(client, range(8), consumer="worker-0")
        assert len(feed.groups) > 1, "the partitions' streams should span several slots"
        seen: list[Any] = []
        started = time.monotonic()
        while len(seen) < len(events) and time.monotonic() - started < 10:
            batch = await feed.read(max_events=16, timeout=0.2)
            assert batch is not None and len(batch) <= 16
            seen += batch
            await feed.ack()
        assert sorted(e.request_id for e in seen) == sorted(e.request_id for e in events)
        idle_at = time.monotonic()
        assert await feed.read(max_events=16, timeout=0.3) == []
        assert time.monotonic() - idle_at < 2, "an idle read must end after its timeout"
    finally:
        await client.aclose()


async def test_a_dead_master_fails_like_a_dead_redis_and_is_counted() -> None:
    fallbacks: list[str] = []
    # without full coverage the live masters keep answering once the dead one is marked
    # failed (2 s), so what is asserted does not race the node timeout
    with redis_cluster(full_coverage=False) as doomed:
        backend = RedisBackend.from_url(doomed.url, timeout_seconds=0.5, namespace="dead")
        guarded = GuardedBackend(backend, mode="closed", share=0.25,
                                 on_fallback=fallbacks.append, on_release=lambda _: None)
        keys = [f"key_{i}" for i in range(12)]
        try:
            for key_id in keys:
                assert (await backend.admit(AdmissionRequest(key_id, Quota()))).allowed
            doomed.procs[0].kill()
            doomed.procs[0].wait(timeout=10)
            failures = []
            for key_id in keys:
                try:
                    await backend.admit(AdmissionRequest(key_id, Quota()))
                except LimitBackendError as exc:
                    failures.append(exc.__cause__)
            # the redis-py errors the cluster client really raises, translated where they enter
            assert failures, "no key lived on the killed master"
            assert len(failures) < len(keys), "the two live masters must keep answering"
            denied = [await guarded.admit(AdmissionRequest(k, Quota())) for k in keys]
        finally:
            await guarded.close()  # the backend's too, and the guard's retry task
    assert any(not d.allowed and d.source != "backend" for d in denied)
    assert fallbacks.count("closed") >= 1, fallbacks


def test_limits_actions_and_revocations_reach_every_gateway_through_the_cluster(
    start_gateway: GatewayFactory, cluster: LocalCluster
) -> None:
    shared = {
        "limits": {"backend": cluster.url, "on_backend_error": "closed",
                   "redis_timeout_seconds": 2},
        "detection": {"feed": "redis", "redis_url": cluster.url, "embedder": "hashing",
                      "state_poll_seconds": 0.2},
    }
    first = start_gateway(name="first", **shared)
    second = start_gateway(name="second", **shared)
    tiny = first.create_key("tiny-client", "tiny")  # 2 requests a minute, shared
    assert [chat(first, tiny), chat(second, tiny), chat(second, tiny)] == [200, 200, 429]

    blocked, revoked = first.create_key("blocked"), first.create_key("revoked")
    assert chat(second, blocked) == 200 and chat(second, revoked) == 200
    status, body = http_json("POST", first.url + "/admin/v1/clients/blocked/action",
                             {"action": "block"}, token=first.admin_token)
    assert status == 200, body
    status, listed = http_json("GET", first.url + "/admin/v1/keys", token=first.admin_token)
    assert status == 200, listed
    key_id = next(k["key_id"] for k in listed["data"] if k["client"] == "revoked")
    first.revoke_key(key_id)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        outcome = (chat(second, blocked), chat(second, revoked))
        if outcome[0] != 200 and outcome[1] == 401:
            break
        time.sleep(0.2)
    assert outcome[0] in (403, 429) and outcome[1] == 401, outcome


async def test_an_accounts_key_keeps_its_counters_when_its_allowance_switches_on(
    cluster: LocalCluster,
) -> None:
    """Probation ending, a demotion or an operator's pin turns the account's allowance on or
    off; the key's dollars, buckets and leases must stay where they are."""
    backend = RedisBackend.from_url(cluster.url, timeout_seconds=2, namespace="switch")
    plain = Quota(usd_per_day=1.0, concurrent_requests=1)
    charged = Quota(usd_per_day=1.0, concurrent_requests=1, allowance=Allowance(rows_per_day=50))
    try:
        acme: dict[str, Any] = {"account": "acme", "key_account": "acme"}
        spent = await backend.admit(AdmissionRequest("K", plain, usd=1.0, **acme))
        assert spent.allowed and spent.lease is not None
        held = await backend.admit(AdmissionRequest("K", charged, rows=1, **acme))
        assert not held.allowed and held.denied_by == "concurrency", "a fresh lease count"
        await backend.settle(spent.lease, 0, 1.0)  # a lease taken without allowance
        again = await backend.admit(AdmissionRequest("K", charged, usd=1.0, rows=1, **acme))
        assert not again.allowed and again.denied_by == "usd", "fresh dollars"
        cheap = await backend.admit(AdmissionRequest("K", charged, rows=1, **acme))
        assert cheap.allowed and cheap.lease is not None and cheap.lease.account == "acme"
        await backend.settle(cheap.lease, 0, 0.0)  # with allowance: frees the same lease slot
        after = await backend.admit(AdmissionRequest("K", plain, **acme))
        assert after.allowed, "the lease taken with the allowance was not freed"
    finally:
        await backend.close()


async def test_settling_and_abandoning_account_leases_on_a_cluster(cluster: LocalCluster) -> None:
    backend = RedisBackend.from_url(cluster.url, timeout_seconds=2, namespace="leases")
    quota = Quota(concurrent_requests=1, allowance=Allowance(rows_per_day=3))
    try:
        # hostile names keep one slot; the last, a key's own allowance (an operator's
        # probation of a key without an account), lives in the key's slot
        for account, home in (("acme", "acme"), ("a{b}c", "a{b}c"), ("\x1fclient:bob", None)):
            request = AdmissionRequest("key-1", quota, account=account, rows=2, lease_id="L1",
                                       key_account=home)
            decision = await backend.admit(request)
            assert decision.allowed and decision.account is not None
            assert decision.account.rows_today == 2
            await backend.abandon(request)  # rows back, the lease freed
            unused = replace(request, rows=3, lease_id="L2")
            decision = await backend.admit(unused)
            assert decision.allowed and decision.lease is not None, "rows or lease not returned"
            await backend.settle(decision.lease, 0, 0.0)
            late = replace(request, rows=1, lease_id="L3")
            await backend.abandon(late)  # before its admission: that admission never runs
            assert not (await backend.admit(late)).allowed
    finally:
        await backend.close()


async def test_the_dp_budget_is_spent_on_a_cluster(cluster: LocalCluster) -> None:
    accountant = RedisAccountant.from_url(cluster.url, budget=1.0, window_seconds=60,
                                          timeout_seconds=2)
    try:
        assert [await accountant.spend("cli{x}", 0.4) for _ in range(3)] == [True, True, False]
        assert await accountant.spend("other", 0.4), "budgets are per client"
    finally:
        await accountant.close()


async def test_requests_beyond_the_pool_wait_for_a_connection(cluster: LocalCluster) -> None:
    backend = RedisBackend.from_url(cluster.url, timeout_seconds=2, namespace="pool",
                                    max_connections=2)
    try:
        decisions = await asyncio.gather(
            *(backend.admit(AdmissionRequest(f"k{i % 5}", Quota())) for i in range(200))
        )
    finally:
        await backend.close()
    assert all(d.allowed for d in decisions)


async def test_an_idle_worker_with_many_slots_stays_within_a_small_pool(
    cluster: LocalCluster,
) -> None:
    flush(cluster)
    client = connect(cluster.url, timeout_seconds=5, max_connections=4)
    try:
        feed = RedisStreamFeed(client, range(256), consumer="many")
        assert len(feed.groups) > 100
        for _ in range(2):
            assert await feed.read(max_events=500, timeout=0.3) == []
    finally:
        await client.aclose()


async def test_a_failing_slot_costs_only_its_own_events_and_its_group_comes_back(
    cluster: LocalCluster,
) -> None:
    flush(cluster)
    client = connect(cluster.url, timeout_seconds=5)
    events = [e for i in range(12) for e in benign_chat(f"user-{i}", 5, seed=i)]
    try:
        feed = RedisStreamFeed(client, range(8), consumer="w0")
        assert await feed.read(10, 0.05) == []  # creates the groups
        await RedisStreamSink(client, 8).write(events)
        lost = f"{STREAM_PREFIX}7"
        await client.xgroup_destroy(lost, GROUP)  # as after a fail-over that lost it
        first = await feed.read(500, 0.2)
        assert first and len(first) == len(events) - await client.xlen(lost)
        await feed.ack()
        seen = list(first)
        for _ in range(3):
            seen += await feed.read(500, 0.2) or []
            await feed.ack()
        assert sorted(e.request_id for e in seen) == sorted(e.request_id for e in events)
    finally:
        await client.aclose()


async def test_a_consumer_rereads_what_was_delivered_to_it_but_never_acknowledged(
    cluster: LocalCluster,
) -> None:
    flush(cluster)
    client = connect(cluster.url, timeout_seconds=5)
    events = benign_chat("user-0", 5, seed=1)
    try:
        assert await RedisStreamFeed(client, range(8), consumer="w0").read(10, 0.05) == []
        await RedisStreamSink(client, 8).write(events)
        # delivered to w0 by a read whose reply never arrived
        delivered = await client.xreadgroup(
            GROUP, "w0", {f"{STREAM_PREFIX}{partition_of('user-0', 8)}": ">"}
        )
        assert sum(len(entries) for _, entries in cast(Any, delivered)) == len(events)
        restarted = RedisStreamFeed(client, range(8), consumer="w0")
        replayed = await restarted.read(500, 0.2)
        assert sorted(e.request_id for e in replayed or []) == sorted(
            e.request_id for e in events
        )
        await restarted.ack()
        assert await restarted.read(500, 0.2) == []
    finally:
        await client.aclose()


async def test_a_dead_master_costs_the_stream_only_its_own_events() -> None:
    """The client's default node dies: reads of the live masters' slots go on, and a batch
    written in part is retried without duplicating what the live masters took."""
    with redis_cluster(full_coverage=False) as doomed:
        client = cast(RedisCluster, connect(doomed.url, timeout_seconds=1))
        try:
            feed = RedisStreamFeed(client, range(8), consumer="w0")
            assert await feed.read(10, 0.05) == []
            default = client.get_default_node()
            alive = {s for s in feed.streams if client.get_node_from_key(s) != default}
            assert alive and len(alive) < len(feed.streams), "pick another seed layout"
            events = [e for i in range(12) for e in benign_chat(f"user-{i}", 5, seed=i)]
            kept = [e for e in events if f"{STREAM_PREFIX}{partition_of(e.client, 8)}" in alive]
            dead = doomed.ports.index(default.port)
            doomed.procs[dead].kill()
            doomed.procs[dead].wait(timeout=10)
            sink = RedisStreamSink(client, 8)
            for _ in range(3):  # as the telemetry lane retries the same batch
                with pytest.raises(REDIS_ERRORS):
                    await sink.write(events)
            seen: set[str] = set()
            for _ in range(6):
                seen |= {e.request_id for e in await feed.read(500, 0.2) or []}
                try:
                    await feed.ack()
                except REDIS_ERRORS:
                    # as the detector's loop does: the unacknowledged entries are read again
                    # (at least once), never lost
                    continue
            assert seen == {e.request_id for e in kept}
            live = SyncCluster(host="127.0.0.1", port=doomed.ports[dead - 1], socket_timeout=5)
            assert sum(live.xlen(s) for s in alive) == len(kept), "a retry duplicated events"
            live.close()
        finally:
            await client.aclose()


async def test_a_probation_pin_on_a_key_without_an_account_leaves_its_counters_in_place(
    cluster: LocalCluster,
) -> None:
    """An operator's probation charges such a key an allowance of its client's own; its
    dollars, buckets and leases stay in the key's slot, pin or no pin."""
    backend = RedisBackend.from_url(cluster.url, timeout_seconds=2, namespace="pinned")
    plain = Quota(usd_per_day=1.0, concurrent_requests=1)
    pinned = Quota(usd_per_day=1.0, concurrent_requests=1, allowance=Allowance(rows_per_day=2))
    own = {"account": "\x1fclient:loner", "key_account": None}
    try:
        spent = await backend.admit(AdmissionRequest("L", plain, usd=1.0))
        assert spent.allowed and spent.lease is not None
        held = await backend.admit(AdmissionRequest("L", pinned, rows=1, **own))
        assert not held.allowed and held.denied_by == "concurrency", "moved to a fresh lease count"
        await backend.settle(spent.lease, 0, 1.0)
        again = await backend.admit(AdmissionRequest("L", pinned, usd=1.0, rows=1, **own))
        assert not again.allowed and again.denied_by == "usd", "moved to fresh dollars"
        for rows_left in (True, True, False):  # the pin's allowance, two rows a day
            decision = await backend.admit(AdmissionRequest("L", pinned, rows=1, **own))
            assert decision.allowed is rows_left
            if decision.lease is not None:
                await backend.settle(decision.lease, 0, 0.0)
        stored = keys_of(cluster, "pinned")
        assert {backend.key("k", "L", "usd"), backend.key("k", "L", "allowance")} <= stored
        assert not [key for key in stored if "{a:" in key], stored
    finally:
        await backend.close()


def keys_of(cluster: LocalCluster, namespace: str) -> set[str]:
    """Every key under ``namespace``, on whichever master holds it."""
    found: set[str] = set()
    for port in cluster.ports:
        node = SyncRedis(port=port, socket_timeout=5)
        found |= {key.decode() for key in node.scan_iter(match=f"{namespace}:*")}
        node.close()
    return found
