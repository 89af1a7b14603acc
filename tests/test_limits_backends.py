"""One suite for every limit backend (memory, Redis), then what is particular to each.

Each test uses fresh key ids and sources, so runs never see each other's state, and asks
nothing of the clock but that a test takes well under a second.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from modelfence.config import LimitsConfig, PerSourceLimit, TierConfig
from modelfence.identity.base import LimitOverrides
from modelfence.limits import (
    AdmissionRequest,
    Decision,
    GuardedBackend,
    LimitBackend,
    MemoryBackend,
    Quota,
    build_backend,
    quota_for,
)
from modelfence.limits.base import AccountUsage, Allowance
from modelfence.limits.dimensions import DAY_SECONDS, LEASE_RETRY_SECONDS, until_next_day, utc_day
from modelfence.limits.redis import RedisBackend
from modelfence.testing.processes import free_port
from tests.services import ensure_redis


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("redis", id="redis", marks=pytest.mark.redis),
    ]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[LimitBackend]:
    if request.param == "memory":
        yield MemoryBackend()
        return
    shared = RedisBackend.from_url(ensure_redis(), timeout_seconds=5.0)
    yield shared
    await shared.close()


def new_id() -> str:
    return uuid.uuid4().hex


def ask(quota: Quota, key_id: str | None = None, **claim: Any) -> AdmissionRequest:
    return AdmissionRequest(key_id or new_id(), quota, **claim)


async def admit_all(backend: LimitBackend, requests: list[AdmissionRequest]) -> list[Decision]:
    return [await backend.admit(request) for request in requests]


async def test_requests_are_denied_past_the_limit(backend: LimitBackend) -> None:
    request = ask(Quota(requests_per_minute=3))
    decisions = await admit_all(backend, [request] * 4)
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.requests and d.requests.remaining for d in decisions] == [2, 1, 0, 0]
    denied = decisions[-1]
    assert denied.denied_by == "requests" and denied.source == "backend"
    assert denied.retry_after == pytest.approx(20.0, abs=0.5)  # one request per 20 s
    assert denied.requests is not None and denied.requests.limit == 3
    assert denied.requests.reset_seconds == pytest.approx(60.0, abs=0.5)
    assert denied.lease is None


async def test_decision_carries_header_state(backend: LimitBackend) -> None:
    decision = await backend.admit(
        ask(Quota(requests_per_minute=10, tokens_per_minute=1000), tokens=250)
    )
    assert decision.allowed and decision.lease is not None
    assert decision.requests is not None and decision.tokens is not None
    assert (decision.requests.limit, decision.requests.remaining) == (10, 9)
    assert decision.requests.reset_seconds == pytest.approx(6.0, abs=0.5)
    assert (decision.tokens.limit, decision.tokens.remaining) == (1000, 750)
    assert decision.tokens.reset_seconds == pytest.approx(15.0, abs=0.5)


async def test_unlimited_quota_admits_without_header_state(backend: LimitBackend) -> None:
    decision = await backend.admit(ask(Quota(), tokens=10**9, usd=10.0**6))
    assert decision.allowed and decision.lease is not None
    assert decision.requests is None and decision.tokens is None


async def test_settle_refunds_unused_tokens(backend: LimitBackend) -> None:
    request = ask(Quota(tokens_per_minute=1000), tokens=600)
    first, second = await admit_all(backend, [request] * 2)
    assert first.allowed and first.lease is not None
    assert second.denied_by == "tokens"
    await backend.settle(first.lease, tokens_used=100, usd_used=0.0)
    third = await backend.admit(request)
    assert third.allowed and third.tokens is not None
    assert third.tokens.remaining in (300, 301)  # a few ms of refill may round up


async def test_settle_charges_tokens_used_beyond_the_reservation(backend: LimitBackend) -> None:
    request = ask(Quota(tokens_per_minute=1000), tokens=100)
    first = await backend.admit(request)
    assert first.lease is not None
    await backend.settle(first.lease, tokens_used=900, usd_used=0.0)
    later = await backend.admit(ask(Quota(tokens_per_minute=1000), request.key_id, tokens=200))
    assert later.denied_by == "tokens"
    assert later.retry_after == pytest.approx(6.0, abs=0.5)  # 100 tokens short at 1000/min


async def test_concurrency_lease_is_released_once(backend: LimitBackend) -> None:
    request = ask(Quota(concurrent_requests=2))
    first, second, third = await admit_all(backend, [request] * 3)
    assert first.allowed and second.allowed and first.lease is not None
    assert third.denied_by == "concurrency" and third.retry_after == LEASE_RETRY_SECONDS
    await backend.settle(first.lease, 0, 0.0)
    await backend.settle(first.lease, 0, 0.0)  # a second settle must not free a second slot
    fourth, fifth = await admit_all(backend, [request] * 2)
    assert fourth.allowed
    assert fifth.denied_by == "concurrency"


async def test_usd_budget_holds_for_the_day(backend: LimitBackend) -> None:
    key_id, quota = new_id(), Quota(usd_per_day=1.0)
    first = await backend.admit(ask(quota, key_id, usd=0.6))
    second = await backend.admit(ask(quota, key_id, usd=0.6))
    assert first.allowed and first.lease is not None
    assert second.denied_by == "usd"
    assert 0 < second.retry_after <= DAY_SECONDS  # until the next UTC midnight
    await backend.settle(first.lease, 0, usd_used=0.1)
    fits, over = await admit_all(
        backend, [ask(quota, key_id, usd=0.9), ask(quota, key_id, usd=0.01)]
    )
    assert fits.allowed  # 0.1 + 0.9 is exactly the budget: micro-dollars do not drift
    assert over.denied_by == "usd"


async def test_usd_sums_without_float_drift(backend: LimitBackend) -> None:
    key_id, quota = new_id(), Quota(usd_per_day=0.3)
    decisions = await admit_all(backend, [ask(quota, key_id, usd=0.1), ask(quota, key_id, usd=0.2)])
    assert all(d.allowed for d in decisions)  # although 0.1 + 0.2 > 0.3 in floats


@pytest.mark.parametrize(
    "dimension, quota",
    [
        ("ip_prefix", Quota(ip_prefix_requests_per_minute=2)),
        ("fingerprint", Quota(fingerprint_requests_per_minute=2)),
    ],
)
async def test_source_limits_span_keys(backend: LimitBackend, dimension: str, quota: Quota) -> None:
    crowd, other = f"203.0.113.0/24 {new_id()}", f"198.51.100.0/24 {new_id()}"
    decisions = await admit_all(backend, [ask(quota, **{dimension: crowd}) for _ in range(3)])
    assert [d.allowed for d in decisions] == [True, True, False]  # three keys, one source
    assert decisions[-1].denied_by == dimension
    assert (await backend.admit(ask(quota, **{dimension: other}))).allowed


async def test_nothing_is_consumed_when_one_dimension_denies(backend: LimitBackend) -> None:
    quota = Quota(
        requests_per_minute=10,
        tokens_per_minute=100,
        concurrent_requests=2,
        usd_per_day=1.0,
        ip_prefix_requests_per_minute=2,
        fingerprint_requests_per_minute=2,
    )
    key_id, ip, fp = new_id(), new_id(), new_id()

    def claim(tokens: int) -> AdmissionRequest:
        return ask(quota, key_id, tokens=tokens, usd=0.5, ip_prefix=ip, fingerprint=fp)

    first, denied, third = await admit_all(backend, [claim(80), claim(50), claim(10)])
    assert first.allowed
    assert denied.denied_by == "tokens"
    assert denied.requests is not None and denied.requests.remaining == 9
    assert denied.tokens is not None and denied.tokens.remaining == 20
    # Had the denied claim taken a request, a lease, dollars or a source slot, this fails.
    assert third.allowed
    assert third.requests is not None and third.requests.remaining == 8


async def test_request_larger_than_the_bucket_never_fits(backend: LimitBackend) -> None:
    request = ask(Quota(requests_per_minute=5, tokens_per_minute=1000), tokens=1001)
    decision = await backend.admit(request)
    assert decision.denied_by == "tokens" and decision.retry_after == math.inf
    after = await backend.admit(ask(request.quota, request.key_id, tokens=1000))
    assert after.allowed and after.requests is not None and after.requests.remaining == 4


async def test_usd_claim_above_the_daily_budget_never_fits(backend: LimitBackend) -> None:
    decision = await backend.admit(ask(Quota(usd_per_day=1.0), usd=1.5))
    assert decision.denied_by == "usd" and decision.retry_after == math.inf


async def test_reported_denial_is_the_one_that_clears_last(backend: LimitBackend) -> None:
    request = ask(Quota(requests_per_minute=1, concurrent_requests=1))
    first, second = await admit_all(backend, [request] * 2)
    assert first.allowed
    assert second.denied_by == "requests"  # 60 s to clear, the lease would clear sooner
    assert second.retry_after == pytest.approx(60.0, abs=0.5)


async def test_concurrent_admissions_admit_exactly_the_limit(backend: LimitBackend) -> None:
    request = ask(Quota(requests_per_minute=50))
    decisions = await asyncio.gather(*(backend.admit(request) for _ in range(200)))
    assert sum(d.allowed for d in decisions) == 50


# --- account allowances -------------------------------------------------------------------


def on_account(
    allowance: Allowance, account: str, key_id: str | None = None, **claim: Any
) -> AdmissionRequest:
    return ask(Quota(allowance=allowance), key_id, account=account, **claim)


async def test_rows_allowance_denies_past_the_day(backend: LimitBackend) -> None:
    account, allowance = new_id(), Allowance(rows_per_day=10)
    first, second, third = await admit_all(
        backend, [on_account(allowance, account, rows=4, tokens=7)] * 3
    )
    assert first.allowed and first.lease is not None
    assert first.account == AccountUsage(4, 4, 7, 7)  # no 30-day limit: only today is read
    assert (first.lease.account, first.lease.rows_reserved) == (account, 4)
    assert first.lease.day == utc_day(time.time())
    assert second.account == AccountUsage(8, 8, 14, 14)
    assert third.denied_by == "account_rows" and third.lease is None
    assert third.retry_after == pytest.approx(until_next_day(time.time()), abs=5)
    assert third.account == AccountUsage(8, 8, 14, 14)  # as found: nothing charged
    assert (await backend.admit(on_account(allowance, account, rows=2))).allowed


async def test_allowance_is_shared_by_the_keys_of_an_account(backend: LimitBackend) -> None:
    account, allowance = new_id(), Allowance(rows_per_day=10, tokens_per_day=1000)
    first = await backend.admit(on_account(allowance, account, rows=6))
    denied = await backend.admit(on_account(allowance, account, rows=6))  # another key id
    fits = await backend.admit(on_account(allowance, account, rows=4))
    other = await backend.admit(on_account(allowance, new_id(), rows=6))  # another account
    assert first.allowed and fits.allowed and other.allowed
    assert denied.denied_by == "account_rows"
    assert fits.account is not None and fits.account.rows_today == 10


@pytest.mark.parametrize(
    "allowance, claim, dimension",
    [
        (Allowance(rows_per_day=10), {"rows": 11}, "account_rows"),
        (Allowance(rows_per_30_days=10), {"rows": 11}, "account_rows"),
        (Allowance(tokens_per_day=100), {"tokens": 101}, "account_tokens"),
        (Allowance(tokens_per_30_days=100), {"tokens": 101}, "account_tokens"),
    ],
)
async def test_claim_above_the_allowance_never_fits(
    backend: LimitBackend, allowance: Allowance, claim: dict[str, Any], dimension: str
) -> None:
    decision = await backend.admit(on_account(allowance, new_id(), **claim))
    assert decision.denied_by == dimension and decision.retry_after == math.inf
    assert decision.account == AccountUsage(0, 0, 0, 0)


async def test_token_allowance_is_settled_to_real_usage(backend: LimitBackend) -> None:
    account, allowance = new_id(), Allowance(tokens_per_day=1000, tokens_per_30_days=5000)
    first = await backend.admit(on_account(allowance, account, tokens=600))
    denied = await backend.admit(on_account(allowance, account, tokens=600))
    assert first.lease is not None and denied.denied_by == "account_tokens"
    await backend.settle(first.lease, tokens_used=100, usd_used=0.0)
    fits = await backend.admit(on_account(allowance, account, tokens=600))
    assert fits.allowed and fits.lease is not None
    assert fits.account == AccountUsage(2, 2, 700, 700)  # rows stay charged on settle
    await backend.settle(fits.lease, tokens_used=900, usd_used=0.0)  # more than reserved
    await backend.settle(fits.lease, tokens_used=0, usd_used=0.0)  # settled already: ignored
    over = await backend.admit(on_account(allowance, account, tokens=1))
    assert over.denied_by == "account_tokens" and over.account == AccountUsage(2, 2, 1000, 1000)


async def test_abandon_refunds_the_allowance(backend: LimitBackend) -> None:
    account, allowance = new_id(), Allowance(rows_per_day=10, tokens_per_day=1000)
    claim = on_account(allowance, account, rows=8, tokens=900, lease_id=new_id())
    taken = await backend.admit(claim)
    assert taken.allowed and taken.account == AccountUsage(8, 8, 900, 900)
    await backend.abandon(claim)
    await backend.abandon(claim)  # undone already: refunds nothing more
    after = await backend.admit(on_account(allowance, account, rows=10, tokens=1000))
    assert after.allowed and after.account == AccountUsage(10, 10, 1000, 1000)


@pytest.mark.parametrize(
    "quota, account",
    [
        (Quota(allowance=Allowance(rows_per_day=1)), None),  # no account named
        (Quota(), "acme"),  # no allowance
        (Quota(allowance=Allowance()), "acme"),  # an allowance that limits nothing
    ],
)
async def test_without_an_allowance_nothing_changes(
    backend: LimitBackend, quota: Quota, account: str | None
) -> None:
    decisions = await admit_all(backend, [ask(quota, account=account, rows=5)] * 3)
    assert all(d.allowed and d.account is None for d in decisions)
    leases = [d.lease for d in decisions]
    assert all(lease and lease.account is None and lease.rows_reserved == 0 for lease in leases)


async def test_denial_by_another_dimension_charges_no_allowance(backend: LimitBackend) -> None:
    account, allowance = new_id(), Allowance(rows_per_day=10, rows_per_30_days=100)
    quota = Quota(requests_per_minute=1, allowance=allowance)
    key_id = new_id()
    first, denied = await admit_all(backend, [ask(quota, key_id, account=account, rows=5)] * 2)
    assert first.allowed and denied.denied_by == "requests"
    assert denied.account == AccountUsage(5, 5, 0, 0)
    # Had the denied claim taken its rows, this one would not fit.
    fits = await backend.admit(ask(quota, account=account, rows=5))
    assert fits.allowed and fits.account == AccountUsage(10, 10, 0, 0)
    # Nor does a denial by the allowance take a request from the other dimensions.
    fresh, rated = new_id(), Quota(requests_per_minute=2, allowance=allowance)
    over = await backend.admit(ask(rated, fresh, account=account))
    assert over.denied_by == "account_rows"
    assert over.requests is not None and over.requests.remaining == 2
    assert (await backend.admit(ask(Quota(requests_per_minute=2), fresh))).allowed


# --- memory only: the clock is injected -------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_memory_refills_with_the_clock() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    request = ask(Quota(requests_per_minute=60))
    decisions = await admit_all(backend, [request] * 61)
    assert decisions[-1].denied_by == "requests"
    assert decisions[-1].retry_after == pytest.approx(1.0)
    clock.now += 1.0
    assert (await backend.admit(request)).allowed


async def test_memory_expired_lease_frees_its_slot_and_settles_to_nothing() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock, lease_ttl_seconds=10)
    request = ask(Quota(concurrent_requests=1, tokens_per_minute=1000), tokens=500)
    crashed = await backend.admit(request)
    assert crashed.lease is not None
    clock.now += 11  # the request holding it never settled
    assert (await backend.admit(request)).allowed  # 30 s + 30 s - 11 s of token backlog
    await backend.settle(crashed.lease, tokens_used=0, usd_used=0.0)  # too late: no refund
    denied = await backend.admit(request)
    assert denied.tokens is not None and denied.tokens.remaining == 183  # (60 - 49) s of tokens


async def test_memory_forgets_idle_state() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock, sweep_interval_seconds=60)
    quota = Quota(10, 1000, 2, 1.0, 10, 10)
    for _ in range(100):
        await backend.admit(ask(quota, tokens=5, usd=0.1, ip_prefix=new_id(), fingerprint=new_id()))
    assert len(backend) == 100 * 6
    clock.now += DAY_SECONDS  # every bucket full, every lease expired, a new UTC day
    await backend.admit(ask(Quota()))
    assert len(backend) == 1  # only the lease just taken


async def test_memory_allowance_spans_thirty_days() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock, lease_ttl_seconds=60)
    account, allowance = new_id(), Allowance(rows_per_day=5, rows_per_30_days=10)
    first_day = utc_day(clock.now)
    assert (await backend.admit(on_account(allowance, account, rows=5))).allowed
    clock.now += 3 * DAY_SECONDS
    assert (await backend.admit(on_account(allowance, account, rows=1))).allowed
    clock.now += 7 * DAY_SECONDS
    today = await backend.admit(on_account(allowance, account, rows=3))
    assert today.account == AccountUsage(3, 9, 0, 0)
    denied = await backend.admit(on_account(allowance, account, rows=2))
    # Over the day's 5 until midnight, over the 30 days' 10 until the first day leaves.
    assert denied.denied_by == "account_rows"
    assert denied.retry_after == (first_day + 30) * DAY_SECONDS - clock.now
    assert denied.account == AccountUsage(3, 9, 0, 0)
    clock.now += denied.retry_after - 1
    assert (await backend.admit(on_account(allowance, account, rows=2))).denied_by == "account_rows"
    clock.now += 1
    assert (await backend.admit(on_account(allowance, account, rows=2))).account == AccountUsage(
        2, 6, 0, 0
    )


async def test_memory_forgets_accounts_after_the_window() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock, lease_ttl_seconds=40 * DAY_SECONDS)
    allowance = Allowance(tokens_per_30_days=10**6)
    leases = []
    for _ in range(10):
        decision = await backend.admit(on_account(allowance, new_id(), new_id(), tokens=5))
        leases.append(decision.lease)
    assert len(backend) == 10 * 2  # a lease and an account each
    clock.now += 29 * DAY_SECONDS
    await backend.admit(ask(Quota()))
    assert len(backend) == 10 * 2 + 1  # the first day is still in the window
    clock.now += DAY_SECONDS
    await backend.admit(ask(Quota()))
    assert len(backend) == 10 + 2  # the accounts are gone; leases live 40 days
    for lease in leases:
        assert lease is not None
        await backend.settle(lease, tokens_used=500, usd_used=0.0)  # its day has left
    assert len(backend) == 2


# --- Redis only ---------------------------------------------------------------------------


def test_redis_key_parts_are_escaped() -> None:
    backend = RedisBackend(Redis())  # builds names only; never connects
    assert backend.key("k", "a}b{c", "tokens") == "mf:{k:a%7Db%7Bc}:tokens"
    assert backend.key("k", "a:b", "x") != backend.key("k", "a", "b:x")
    assert backend.key("ip", "10.0.0.0/8", "ip_prefix") == "mf:{ip:10.0.0.0%2F8}:ip_prefix"


@pytest.mark.redis
async def test_redis_every_key_expires() -> None:
    client = Redis.from_url(ensure_redis(), decode_responses=True)
    backend = RedisBackend(client)
    key_id, ip, fp = new_id(), new_id(), new_id()
    quota = Quota(10, 1000, 2, 1.0, 10, 10)
    claim = ask(quota, key_id, tokens=500, usd=0.1, ip_prefix=ip, fingerprint=fp)
    decision = await backend.admit(claim)
    assert decision.allowed
    keys = [
        *(backend.key("k", key_id, name) for name in ("requests", "tokens", "leases", "usd")),
        backend.key("ip", ip, "ip_prefix"),
        backend.key("fp", fp, "fingerprint"),
    ]
    ttls = [await client.pttl(key) for key in keys]
    await client.aclose()
    assert all(0 < ttl <= 2 * DAY_SECONDS * 1000 for ttl in ttls), dict(
        zip(keys, ttls, strict=True)
    )


@pytest.mark.redis
async def test_redis_allowance_is_shared_by_replicas() -> None:
    replicas = [RedisBackend.from_url(ensure_redis(), timeout_seconds=5.0) for _ in range(2)]
    account, allowance = new_id(), Allowance(rows_per_day=10)
    decisions = [
        await replica.admit(on_account(allowance, account, rows=4))
        for replica in replicas + replicas
    ]
    for replica in replicas:
        await replica.close()
    assert [d.allowed for d in decisions] == [True, True, False, False]
    assert decisions[1].account == AccountUsage(8, 8, 0, 0)
    assert decisions[-1].denied_by == "account_rows"


@pytest.mark.redis
async def test_redis_allowance_counts_earlier_days() -> None:
    client = Redis.from_url(ensure_redis(), decode_responses=True)
    backend = RedisBackend(client)
    account = new_id()
    seconds, micros = await client.time()
    today = utc_day(seconds + micros / 1e6)
    await client.hset(backend.key("a", account, "allowance"), f"r:{today - 5}", 8)
    allowance = Allowance(rows_per_day=100, rows_per_30_days=10)
    denied = await backend.admit(on_account(allowance, account, rows=3))
    fits = await backend.admit(on_account(allowance, account, rows=2))
    seconds, micros = await client.time()
    await client.aclose()
    assert denied.denied_by == "account_rows" and denied.account == AccountUsage(0, 8, 0, 0)
    assert denied.retry_after == pytest.approx(
        (today - 5 + 30) * DAY_SECONDS - (seconds + micros / 1e6), abs=5
    )
    assert fits.allowed and fits.account == AccountUsage(2, 10, 0, 0)


@pytest.mark.redis
async def test_redis_account_key_expires_and_drops_old_days() -> None:
    client = Redis.from_url(ensure_redis(), decode_responses=True)
    backend = RedisBackend(client)
    account = new_id()
    key = backend.key("a", account, "allowance")
    assert key == f"mf:{{a:{account}}}:allowance"
    seconds, _ = await client.time()
    today = utc_day(seconds)
    old = [f"{kind}:{day}" for day in range(today - 100, today - 60) for kind in "rt"]
    recent = [f"r:{day}" for day in range(today - 29, today)]
    await client.hset(key, items=[part for field in old + recent for part in (field, 1)])
    decision = await backend.admit(on_account(Allowance(rows_per_30_days=100), account, rows=1))
    fields, ttl = await client.hkeys(key), await client.ttl(key)
    await client.aclose()
    assert decision.account == AccountUsage(1, 30, 0, 0)
    assert sorted(fields) == sorted([*recent, f"r:{today}", f"t:{today}"])
    assert 30 * DAY_SECONDS < ttl <= 31 * DAY_SECONDS


async def test_degraded_mode_scales_the_allowance_and_releases_locally() -> None:
    guarded = GuardedBackend(
        RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0"),  # nothing listens
        mode="degraded",
        share=0.5,
        on_fallback=lambda mode: None,
        on_release=lambda event: None,
    )
    account, allowance = new_id(), Allowance(rows_per_day=10)  # 5 on this replica
    claim = on_account(allowance, account, rows=3, lease_id=new_id())
    taken = await guarded.admit(claim)
    assert taken.source == "degraded" and taken.lease is not None
    assert taken.lease.account == account
    assert (await guarded.admit(on_account(allowance, account, rows=3))).denied_by == (
        "account_rows"
    )
    await guarded.abandon(claim)  # the primary's part is retried in the background
    refilled = await guarded.admit(on_account(allowance, account, rows=5))
    assert refilled.allowed and refilled.account == AccountUsage(5, 5, 0, 0)
    assert refilled.lease is not None
    await guarded.settle(refilled.lease, tokens_used=0, usd_used=0.0)  # rows stay charged
    assert (await guarded.admit(on_account(allowance, account))).denied_by == "account_rows"
    await guarded.close()


# --- configuration ------------------------------------------------------------------------


def test_quota_for_applies_overrides_and_source_limits() -> None:
    tier = TierConfig.model_validate(
        {"requests_per_minute": 60, "tokens_per_minute": 1000, "concurrent_requests": 4}
    )
    quota = quota_for(
        tier,
        LimitOverrides(tokens_per_minute=5000, usd_per_day=2.5),
        per_ip_prefix=PerSourceLimit.model_validate({"requests_per_minute": 600}),
        per_fingerprint=PerSourceLimit.model_validate({}),
    )
    assert quota == Quota(60, 5000, 4, 2.5, 600, None)
    assert quota_for(tier) == Quota(60, 1000, 4, tier.usd_per_day)


async def test_build_backend_picks_by_name() -> None:
    memory = build_backend(
        LimitsConfig.model_validate({}), on_fallback=print, on_release=print
    )
    assert isinstance(memory, MemoryBackend)
    shared = build_backend(
        LimitsConfig.model_validate({"backend": "redis://127.0.0.1:6379/0"}),
        on_fallback=print,
        on_release=print,
    )
    assert isinstance(shared, GuardedBackend)  # Redis never goes unguarded
    await shared.close()


async def test_a_backend_that_settles_at_once_never_waits(backend: LimitBackend) -> None:
    """Admission awaits such a settle directly, unshielded: it must finish in one step, or
    a client gone mid-request could leave its lease held."""
    assert backend.settles_at_once is isinstance(backend, MemoryBackend)  # Redis: a round trip
    decision = await backend.admit(ask(Quota(concurrent_requests=1)))
    assert decision.lease is not None
    settling = backend.settle(decision.lease, 0, 0.0)
    if not backend.settles_at_once:
        await settling
        return
    with pytest.raises(StopIteration):
        settling.send(None)  # type: ignore[attr-defined]
    assert (await backend.admit(ask(Quota(concurrent_requests=1), decision.lease.key_id))).allowed
