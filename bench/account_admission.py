"""What account allowances add to admission: the limit backend call and the trust lookup.

Side by side in one run, alternating request by request so both see the same machine:
one admission with the tier's limits only (requests, tokens, concurrency, dollars), and
the same with the account's allowance on top (rows and tokens, today and the last 30
days: the heavier case, 60 counters read in the script). Each admission is settled, as the
gateway settles every request. Backends: Redis (one ``EVALSHA`` each way, on the local
server) and in-process memory. Also the per-request trust lookup (``TrustPolicy.standing``
on a cached account). p50/p99 in µs; the target is ≤ 100 µs p50 added with Redis.

    python bench/account_admission.py                      # 5,000 admissions each way
    python bench/account_admission.py --redis redis://127.0.0.1:6379/0 --runs 20000
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np

from modelfence.config import AccountsConfig
from modelfence.identity.base import AccountRecord, ApiKeyRecord
from modelfence.identity.signups import SignupWatch
from modelfence.identity.trust import TrustPolicy
from modelfence.limits import AdmissionRequest, LimitBackend, MemoryBackend, Quota
from modelfence.limits.base import Allowance
from modelfence.limits.redis import RedisBackend

TIER = Quota(
    requests_per_minute=10_000_000,
    tokens_per_minute=1_000_000_000,
    concurrent_requests=1000,
    usd_per_day=1_000_000,
)
ALLOWANCE = Allowance(
    rows_per_day=10**12, rows_per_30_days=10**12, tokens_per_day=10**12, tokens_per_30_days=10**12
)


def micros(samples: list[float]) -> str:
    values = np.asarray(samples) * 1e6
    return f"p50 {np.percentile(values, 50):7.1f} µs   p99 {np.percentile(values, 99):7.1f} µs"


async def paired(backend: LimitBackend, runs: int) -> tuple[list[float], list[float]]:
    """(without, with) allowance: admission plus settle, alternated, after a warm-up."""
    key, account = uuid.uuid4().hex, uuid.uuid4().hex
    plain = AdmissionRequest(key, TIER, tokens=500, usd=0.001, rows=8)
    charged = AdmissionRequest(
        key, replace(TIER, allowance=ALLOWANCE), tokens=500, usd=0.001, account=account, rows=8
    )
    timings: tuple[list[float], list[float]] = ([], [])

    async def once(request: AdmissionRequest, out: list[float] | None) -> None:
        started = time.perf_counter()
        decision = await backend.admit(request)
        assert decision.allowed and decision.lease is not None, decision
        await backend.settle(decision.lease, 400, 0.0008)
        if out is not None:
            out.append(time.perf_counter() - started)

    for i in range(200):  # warm-up: connections, the server's script cache
        await once(plain if i % 2 else charged, None)
    for _ in range(runs):
        await once(plain, timings[0])
        await once(charged, timings[1])
    return timings


def trust_lookup(runs: int, *, surges: bool = False, cached: bool = True) -> list[float]:
    """``TrustPolicy.standing`` per request; with ``surges``, beside a sign-up watch that found
    a surge (a week of 500 sign-ups a day and a crowd of 1,000); ``cached=False`` assesses
    the account afresh each time (what a cache miss costs, once a minute per account)."""
    created = datetime.now(UTC) - timedelta(days=2)
    record = AccountRecord("acct", created_at=created)
    config = AccountsConfig.model_validate({})
    watch = None
    if surges:
        watch = SignupWatch(config.surge, known_since=created.timestamp() - 8 * 86_400)
        rng = np.random.default_rng(0)
        week = np.sort(created.timestamp() - 8 * 86_400 + rng.uniform(0, 8 * 86_400, size=4_000))
        crowd = created.timestamp() - 86_400 + rng.uniform(0, 1_800, size=1_000)
        watch.observe_many([(f"a{i}", float(at)) for i, at in enumerate([*week, *crowd])])
        assert watch.surges, "the bench's crowd should be a surge"
    policy = TrustPolicy(config, _Accounts(record), surges=watch)
    key = ApiKeyRecord("key_1", "svc", "default", "mf_x", created, account="acct")
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        if cached:
            policy.standing(key, "normal")
        else:
            policy.assess(record, "normal", time.time())
        samples.append(time.perf_counter() - started)
    return samples


class _Accounts:
    def __init__(self, record: AccountRecord) -> None:
        self.record = record

    def account(self, account_id: str) -> AccountRecord | None:
        return self.record


async def main(redis_url: str, runs: int) -> None:
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    backends: list[tuple[str, Callable[[], Awaitable[LimitBackend]]]] = [
        ("memory", _memory),
        ("redis", lambda: _redis(redis_url)),
    ]
    for name, make in backends:
        backend = await make()
        try:
            without, with_ = await paired(backend, runs)
        finally:
            await backend.close()
        added = np.percentile(with_, 50) - np.percentile(without, 50)
        print(f"{name:6} tier limits only      {micros(without)}")
        print(f"{name:6} + account allowance   {micros(with_)}   added p50 {added * 1e6:6.1f} µs")
    print(f"trust lookup (cached account)  {micros(trust_lookup(runs))}")
    print(f"  with a sign-up surge watch     {micros(trust_lookup(runs, surges=True))}")
    print(f"  uncached, with the watch       {micros(trust_lookup(runs, surges=True, cached=False))}")


async def _memory() -> LimitBackend:
    return MemoryBackend()


async def _redis(url: str) -> LimitBackend:
    return RedisBackend.from_url(url, timeout_seconds=5.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--runs", type=int, default=5000)
    args = parser.parse_args()
    asyncio.run(main(args.redis, args.runs))
