"""A Redis that stalls (SIGSTOP) instead of dying: nothing hangs, no lease is left behind.

A stall is the nasty case: commands sent during it time out on the client yet may still
run once Redis resumes, in whatever order it reads its connections. Each test stalls its
own private ``redis-server``.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from redis.asyncio import Redis

from modelfence.errors import LimitBackendError
from modelfence.limits import AdmissionRequest, DeferredReleases, GuardedBackend, Quota
from modelfence.limits.guard import FallbackMode
from modelfence.limits.redis import RedisBackend
from modelfence.policy.dp import RedisAccountant
from tests.services import private_redis

TIMEOUT = 0.25  # the limits' Redis timeout, as configured by default
# Room for more than the eight held leases, so the admission lost in the stall could run.
QUOTA = Quota(concurrent_requests=16, tokens_per_minute=100_000, usd_per_day=100.0)


@contextmanager
def stalled(server: subprocess.Popen[bytes]) -> Iterator[None]:
    server.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.send_signal(signal.SIGCONT)


async def wait_until(condition: object, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)


@pytest.mark.redis
async def test_leases_held_through_a_stall_are_all_released_after_it() -> None:
    events: Counter[str] = Counter()
    key = uuid.uuid4().hex
    claim = AdmissionRequest(key, QUOTA, tokens=100, usd=0.1)
    with private_redis() as (url, server):
        primary = RedisBackend.from_url(url, timeout_seconds=TIMEOUT)
        guarded = GuardedBackend(
            primary,
            mode="degraded",
            share=0.5,
            on_fallback=lambda mode: None,
            on_release=lambda event: events.update([event]),
            probe_interval_seconds=0,
        )
        held = await asyncio.gather(*(guarded.admit(claim) for _ in range(8)))
        assert all(d.allowed and d.source == "backend" and d.lease for d in held)

        with stalled(server):
            started = time.monotonic()
            # The requests end during the stall: each settle fails after one timeout.
            await asyncio.gather(
                *(guarded.settle(d.lease, 50, 0.05) for d in held if d.lease is not None)
            )
            # An admission during the stall falls back within the timeout...
            during = await guarded.admit(claim)
            assert time.monotonic() - started < 8 * TIMEOUT
            assert during.allowed and during.source == "degraded"
            await asyncio.sleep(3 - (time.monotonic() - started))
        # ...and the lease Redis may still grant it once resumed is undone as well.

        await wait_until(lambda: events["released"] == 9, seconds=10)
        redis = Redis.from_url(url, decode_responses=True)
        leases = await redis.zcard(primary.key("k", key, "leases"))
        spent = await redis.hget(primary.key("k", key, "usd"), "spent")
        await redis.aclose()
        await guarded.close()

    assert leases == 0
    assert spent == str(8 * 50_000)  # real usage of the eight; nothing of the lost admission
    assert events["settle_failed"] == 8 and events["admit_failed"] == 1
    assert events["released"] == 9 and events["dropped"] == 0
    assert events["retried"] >= 9
    assert guarded.settle_errors == 8 and len(guarded.releases) == 0


@pytest.mark.redis
@pytest.mark.parametrize(
    "mode, allowed, source",
    [("open", True, "fail_open"), ("closed", False, "fail_closed"), ("degraded", True, "degraded")],
)
async def test_a_stalled_redis_costs_one_timeout_then_the_configured_mode(
    mode: FallbackMode, allowed: bool, source: str
) -> None:
    with private_redis() as (url, server):
        guarded = GuardedBackend(
            RedisBackend.from_url(url, timeout_seconds=TIMEOUT),
            mode=mode,
            share=0.5,
            on_fallback=lambda mode: None,
            on_release=lambda event: None,
        )
        await guarded.ping()  # connected before the stall
        with stalled(server):
            started = time.monotonic()
            decision = await guarded.admit(AdmissionRequest(uuid.uuid4().hex, QUOTA))
            elapsed = time.monotonic() - started
        await guarded.close()
    assert (decision.allowed, decision.source) == (allowed, source)
    assert elapsed < 4 * TIMEOUT


@pytest.mark.redis
async def test_dp_accountant_gives_up_on_a_stalled_redis() -> None:
    with private_redis() as (url, server):
        accountant = RedisAccountant.from_url(
            url, budget=1.0, window_seconds=60, timeout_seconds=TIMEOUT
        )
        assert await accountant.spend("acme", 0.1)
        with stalled(server):
            started = time.monotonic()
            with pytest.raises(LimitBackendError):
                await accountant.spend("acme", 0.1)
            elapsed = time.monotonic() - started
        await accountant.close()
    assert elapsed < 4 * TIMEOUT


@pytest.mark.redis
@pytest.mark.parametrize("order", ["abandon_first", "admit_first"])
async def test_an_abandoned_admission_takes_nothing_whichever_runs_first(order: str) -> None:
    with private_redis() as (url, _server):
        backend = RedisBackend.from_url(url, timeout_seconds=5.0)
        key = uuid.uuid4().hex
        lost = AdmissionRequest(key, QUOTA, tokens=100, usd=0.1, lease_id=uuid.uuid4().hex)
        if order == "abandon_first":
            await backend.abandon(lost)
            late = await backend.admit(lost)  # the call that was queued behind the stall
            assert not late.allowed
        else:
            assert (await backend.admit(lost)).allowed
            await backend.abandon(lost)
        await backend.abandon(lost)  # a retry of the undoing changes nothing
        redis = Redis.from_url(url, decode_responses=True)
        leases = await redis.zcard(backend.key("k", key, "leases"))
        spent = await redis.hget(backend.key("k", key, "usd"), "spent")
        tokens_tat = await redis.get(backend.key("k", key, "tokens"))
        await redis.aclose()
        await backend.close()
    assert leases == 0 and spent in (None, "0") and tokens_tat is None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_release_that_keeps_failing_is_given_up_and_counted() -> None:
    events: Counter[str] = Counter()
    clock = Clock()
    releases = DeferredReleases(
        on_event=lambda event: events.update([event]),
        give_up_after_seconds=10,
        first_backoff_seconds=0.001,
        max_backoff_seconds=0.001,
        clock=clock,
    )

    async def down() -> None:
        raise LimitBackendError("Redis limit script failed: Timeout reading from socket")

    releases.defer(down, "settle_failed", "settle of a lease of key k")
    await wait_until(lambda: events["retried"] >= 3, seconds=5)
    assert events["dropped"] == 0 and len(releases) == 1
    clock.now = 11
    await wait_until(lambda: events["dropped"] == 1, seconds=5)
    assert len(releases) == 0 and events["released"] == 0
    await releases.close()


async def test_a_full_queue_drops_the_oldest_and_shutdown_counts_the_rest() -> None:
    events: Counter[str] = Counter()
    releases = DeferredReleases(
        on_event=lambda event: events.update([event]), max_pending=2, first_backoff_seconds=60
    )

    async def down() -> None:
        raise LimitBackendError("Redis limit script failed: Connection refused")

    for _ in range(4):
        releases.defer(down, "admit_failed", "undoing of a lost admission of key k")
    assert events["admit_failed"] == 4 and len(releases) == 2
    await releases.close()
    assert events["dropped"] == 4
