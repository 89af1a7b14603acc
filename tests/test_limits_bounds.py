"""Limits have maxima, and no limit, however large, makes the arithmetic loop.

A rate past 2**53 units once made ``gcra.remaining`` (and its Lua twin) spin for ever:
``units + 1`` no longer changed the float. Config and the admin API now refuse such
limits, and ``remaining`` is computed in closed form in Python and in Lua.
"""

from __future__ import annotations

import math
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from modelfence.config import (
    MAX_CONCURRENT_REQUESTS,
    MAX_REQUESTS_PER_MINUTE,
    MAX_TOKENS_PER_MINUTE,
    MAX_USD_PER_DAY,
    parse_config,
)
from modelfence.errors import ConfigError
from modelfence.identity import SqlKeyStore
from modelfence.limits import AdmissionRequest, MemoryBackend, Quota
from modelfence.limits.gcra import SLACK_SECONDS, Rate, admit, remaining
from modelfence.limits.redis import RedisBackend
from modelfence.store import create_tables
from tests.services import private_redis

from .test_admin_api import AUTH, SECRET, client_for, error_of
from .test_store_database import scratch_engine


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlKeyStore]:
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine:
        await create_tables(engine)
        yield SqlKeyStore(engine, SECRET)


@contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: the old loop never returned."""

    def expire(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"still computing after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def looped_remaining(rate: Rate, tat: float, now: float) -> int:
    """The loop ``remaining`` replaced; the reference on values where it terminates."""
    backlog = max(tat - now, 0.0)
    room = rate.tolerance + SLACK_SECONDS
    if backlog > room:
        return 0
    units = max(math.floor((room - backlog) / rate.interval), 0)
    while units > 0 and backlog + units * rate.interval > room:
        units -= 1
    while backlog + (units + 1) * rate.interval <= room:
        units += 1
    return units


GRID_RATES = [
    Rate(limit, period, burst)
    for limit in (1, 2, 3, 7, 60, 999, 12_345, MAX_REQUESTS_PER_MINUTE, MAX_TOKENS_PER_MINUTE)
    for period in (1.0, 60.0, 3600.0)
    for burst in (None, 1, 5, 2 * limit)
]


@pytest.mark.parametrize("rate", GRID_RATES, ids=str)
def test_closed_form_remaining_equals_the_loop(rate: Rate) -> None:
    for now in (0.0, 100.0, 1.7e9, 1.7e9 + 0.123):
        for step in range(60):
            for nudge in (0.0, 1e-9, -1e-9, 0.5, 1e-6, -1e-6, SLACK_SECONDS, -SLACK_SECONDS):
                tat = now + (step + nudge) * rate.tolerance / 50
                assert remaining(rate, tat, now) == looped_remaining(rate, tat, now)


@pytest.mark.parametrize("limit", [MAX_TOKENS_PER_MINUTE, 2.0**53, 1e24, 1e300])
def test_remaining_returns_for_any_rate(limit: float) -> None:
    rate = Rate(limit)
    now = 1.7e9
    with within(5):
        verdict = admit(rate, tat=now, now=now, cost=1)
        left = remaining(rate, verdict.tat, now)
    assert verdict.allowed
    slack_units = SLACK_SECONDS / rate.interval  # the documented tolerance of the bucket
    assert limit - 1 <= left * (1 + 1e-12) and left <= (limit - 1 + slack_units + 1) * (1 + 1e-12)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("requests_per_minute", 1e24, "at most 10,000,000 requests per minute"),
        ("tokens_per_minute", MAX_TOKENS_PER_MINUTE + 1, "at most 1,000,000,000 tokens"),
        ("concurrent_requests", 0, "greater than 0"),
        ("usd_per_day", float("nan"), "at most 1,000,000,000 dollars"),
        ("requests_per_minute", True, "not bool"),
        ("tokens_per_minute", "100", "not str"),
        ("requests_per_minute", 1.5, "fractional part"),
    ],
)
def test_config_refuses_limits_out_of_range_naming_the_key(
    key: str, value: Any, message: str
) -> None:
    data = {"limits": {"tiers": {"default": {}, "pro": {key: value}}}}
    with pytest.raises(ConfigError) as raised:
        parse_config(data, environ={})
    assert f"limits.tiers.pro.{key}: " in str(raised.value)
    assert message in str(raised.value)


def test_config_takes_limits_at_the_maxima_and_whole_floats() -> None:
    tier = {
        "requests_per_minute": MAX_REQUESTS_PER_MINUTE,
        "tokens_per_minute": float(MAX_TOKENS_PER_MINUTE),
        "concurrent_requests": MAX_CONCURRENT_REQUESTS,
        "usd_per_day": MAX_USD_PER_DAY,
    }
    config = parse_config({"limits": {"tiers": {"default": tier}}}, environ={})
    parsed = config.limits.tiers["default"]
    assert parsed.tokens_per_minute == MAX_TOKENS_PER_MINUTE
    assert isinstance(parsed.tokens_per_minute, int)


@pytest.mark.parametrize(
    "limits",
    [
        {"requests_per_minute": 1e24},
        {"tokens_per_minute": 10**30},
        {"concurrent_requests": MAX_CONCURRENT_REQUESTS + 1},
        {"usd_per_day": 1e300},
        {"requests_per_minute": 2.5},
    ],
)
async def test_admin_refuses_huge_limits_and_changes_nothing(
    store: SqlKeyStore, limits: dict[str, Any]
) -> None:
    record, _ = await store.create("acme", "default")
    async with client_for(store) as client:
        url = f"/admin/v1/keys/{record.key_id}/limits"
        kept = {"requests_per_minute": 120}
        assert (await client.put(url, json=kept, headers=AUTH)).status_code == 200
        response = await client.put(url, json=limits, headers=AUTH)
        assert 400 <= response.status_code < 500
        error = error_of(response)
        assert error["param"] == next(iter(limits))
        after = await client.get(f"/admin/v1/keys/{record.key_id}", headers=AUTH)
    assert after.json()["limits"]["requests_per_minute"] == 120
    assert (await store.get(record.key_id)).overrides.requests_per_minute == 120


async def test_admin_takes_the_maxima(store: SqlKeyStore) -> None:
    record, _ = await store.create("acme", "default")
    top = {
        "requests_per_minute": MAX_REQUESTS_PER_MINUTE,
        "tokens_per_minute": float(MAX_TOKENS_PER_MINUTE),
        "concurrent_requests": MAX_CONCURRENT_REQUESTS,
        "usd_per_day": MAX_USD_PER_DAY,
    }
    async with client_for(store) as client:
        url = f"/admin/v1/keys/{record.key_id}/limits"
        response = await client.put(url, json=top, headers=AUTH)
    assert response.status_code == 200
    assert response.json()["limits"]["tokens_per_minute"] == MAX_TOKENS_PER_MINUTE


AT_THE_MAXIMA = Quota(
    requests_per_minute=MAX_REQUESTS_PER_MINUTE,
    tokens_per_minute=MAX_TOKENS_PER_MINUTE,
    concurrent_requests=MAX_CONCURRENT_REQUESTS,
    usd_per_day=MAX_USD_PER_DAY,
)
# Beyond what config allows (a library caller, or an override stored before the maxima).
BEYOND = Quota(requests_per_minute=1e24, tokens_per_minute=1e24)


@pytest.mark.redis
@pytest.mark.parametrize("quota", [AT_THE_MAXIMA, BEYOND], ids=["maxima", "beyond"])
async def test_admit_script_returns_for_huge_limits(quota: Quota) -> None:
    # A private server: the old script left Redis BUSY and unkillable.
    with private_redis() as (url, _server):
        backend = RedisBackend.from_url(url, timeout_seconds=5.0)
        request = AdmissionRequest(uuid.uuid4().hex, quota, tokens=1000, usd=1.0)
        decision = await backend.admit(request)
        await backend.close()
    assert decision.allowed and decision.requests is not None and decision.tokens is not None
    assert quota.requests_per_minute is not None and quota.tokens_per_minute is not None
    assert decision.requests.remaining == pytest.approx(quota.requests_per_minute, rel=1e-6)
    assert decision.tokens.remaining == pytest.approx(quota.tokens_per_minute, rel=1e-6)


@pytest.mark.parametrize("quota", [AT_THE_MAXIMA, BEYOND], ids=["maxima", "beyond"])
async def test_memory_admit_returns_for_huge_limits(quota: Quota) -> None:
    with within(5):
        decision = await MemoryBackend().admit(AdmissionRequest("k", quota, tokens=1000))
    assert decision.allowed and decision.tokens is not None
    assert quota.tokens_per_minute is not None
    assert decision.tokens.remaining == pytest.approx(quota.tokens_per_minute, rel=1e-6)
