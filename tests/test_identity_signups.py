"""Sign-up surges: found in a burst of new accounts, never in a steady honest stream, and
the accounts created in one held (on probation with nothing) until they verify or pay."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.config import AccountsConfig, AllowanceConfig, Config, SurgeConfig
from modelfence.errors import StoreError
from modelfence.identity import KeyRegistry, SqlKeyStore
from modelfence.identity.base import AccountMetadata, AccountRecord
from modelfence.identity.signups import SignupWatch, Surge
from modelfence.identity.trust import TrustPolicy
from modelfence.limits.base import Allowance
from modelfence.store import create_tables

from .test_identity_accounts import SECRET, Accounts, key
from .test_identity_registry import SpyStore
from .test_identity_store import engine  # noqa: F401  (fixture, on SQLite and PostgreSQL)
from .test_store_database import (
    scratch_engine,
    store_url,  # noqa: F401  (fixture)
)

DAY = 86_400.0
T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC


def honest_stream(rng: np.random.Generator, per_day: float, days: float, start: float = T0) -> list[float]:
    """A steady business: Poisson sign-ups at ``per_day``."""
    return sorted((start + rng.uniform(0, days * DAY, size=rng.poisson(per_day * days))).tolist())


def watch_of(times: list[float], config: SurgeConfig | None = None, *, since: float = T0) -> SignupWatch:
    watch = SignupWatch(config or SurgeConfig(), known_since=since)
    for i, at in enumerate(times):
        watch.observe(f"acct-{i}", at)
    return watch


@pytest.mark.parametrize("seed", range(3))
def test_a_steady_honest_stream_is_never_a_surge(seed: int) -> None:
    rng = np.random.default_rng(seed)
    watch = watch_of(honest_stream(rng, 500, 14))
    assert watch.surges == () and watch.tests > 10_000


def test_a_burst_of_accounts_is_a_surge_that_ends_where_the_burst_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(7)
    honest = honest_stream(rng, 500, 14)
    burst_start = T0 + 10 * DAY
    burst = sorted((burst_start + rng.uniform(0, 4_800, size=1_000)).tolist())
    times = sorted(honest + burst)
    seen: list[Surge] = []
    watch = SignupWatch(SurgeConfig(), known_since=T0, on_surge=seen.append)
    with caplog.at_level(logging.WARNING, "modelfence.identity.signups"):
        found = [watch.observe(f"acct-{i}", at) for i, at in enumerate(times)]
    [surge] = watch.surges
    assert surge.window_hours == 0.25 and seen and seen[-1] == surge
    # Open while the last hour still clears its floor: the crowd's last minutes, then its end.
    assert burst_start - 600 <= surge.start <= burst[0] + 60 and burst[-1] <= surge.end < burst[-1] + 3_600
    assert all(watch.held(at) for at in burst)
    held_honest = [at for at in honest if watch.held(at)]
    assert len(held_honest) < 60  # only the newcomers of those two hours
    assert not watch.held(burst_start - 3_600) and not watch.held(burst[-1] + 3_600)
    # Found within the first ~50 of the thousand: the rest are held before they send.
    first = next(i for i, s in enumerate(found) if s is not None)
    assert sum(burst_start <= at <= times[first] for at in burst) < 60
    assert ["sign-up surge" in r.message for r in caplog.records].count(True) == 1  # logged once


def test_a_week_read_at_once_finds_the_surge_one_by_one_would() -> None:
    rng = np.random.default_rng(9)
    burst = (T0 + 9 * DAY + rng.uniform(0, 2_400, size=400)).tolist()
    times = honest_stream(rng, 2_000, 12) + burst
    shuffled = [(f"acct-{i}", times[i]) for i in rng.permutation(len(times))]  # as a store returns them
    at_once = SignupWatch(SurgeConfig(), known_since=T0)
    at_once.observe_many(shuffled)
    one_by_one = watch_of(sorted(times))
    assert len(at_once.surges) == len(one_by_one.surges) == 1
    assert at_once.tests < one_by_one.tests / 4  # tested every five minutes, not per account
    [found], [expected] = at_once.surges, one_by_one.surges
    assert abs(found.start - expected.start) < 60 and abs(found.end - expected.end) < 600


def test_no_surge_before_the_watch_has_a_baseline() -> None:
    rng = np.random.default_rng(3)
    burst = sorted((T0 + 3_600 + rng.uniform(0, 3_600, size=500)).tolist())
    assert watch_of(burst).surges == ()  # an hour of history is not a baseline
    young = SurgeConfig(min_history_hours=0.5, baseline_days=1, windows={1: 3})
    assert watch_of(burst, young).surges  # a deployment that asks for less


def test_an_account_seen_twice_counts_once_and_old_ones_not_at_all() -> None:
    rng = np.random.default_rng(5)
    watch = watch_of(honest_stream(rng, 240, 3))
    for _ in range(200):  # the registry sees an account again whenever it changes
        watch.observe("acct-0", T0 + 3 * DAY)
    assert watch.surges == ()
    for i in range(200):  # a backfill of customers from last year is no surge today
        watch.observe(f"old-{i}", T0 - 300 * DAY)
    assert watch.surges == ()
    now = T0 + 3 * DAY
    for i in range(15):  # registered as new, before the billing system's sign-up times arrive
        watch.observe(f"backfilled-{i}", now)
    for i in range(15):  # corrected: they signed up over the last days, not now
        watch.observe(f"backfilled-{i}", now - DAY - 3_000 * i)
    for i in range(10):  # ten real newcomers now: 10, not 25, in the last minutes
        watch.observe(f"new-{i}", now + i)
    assert watch.surges == ()


def test_a_lasting_rise_becomes_the_baseline_instead_of_a_surge_for_ever() -> None:
    rng = np.random.default_rng(11)
    before = honest_stream(rng, 200, 8)
    after = honest_stream(rng, 800, 12, start=T0 + 8 * DAY)  # the business grew fourfold
    watch = watch_of(sorted(before + after))
    assert watch.surges  # the step itself is one
    assert not any(watch.held(at) for at in after if at > T0 + 16 * DAY)


def test_disabled_finds_and_holds_nothing() -> None:
    rng = np.random.default_rng(1)
    burst = sorted((T0 + 5 * DAY + rng.uniform(0, 3_600, size=800)).tolist())
    watch = watch_of(sorted(honest_stream(rng, 500, 7) + burst), SurgeConfig(enabled=False))
    assert watch.surges == () and not watch.held(burst[0])


@pytest.mark.parametrize(
    ("surge", "words"),
    [
        ({"windows": {48: 2}, "baseline_days": 1}, "longer than baseline_days"),
        ({"windows": {}}, "at least one window"),
        ({"windows": {"soon": 2}}, "surge.windows"),
        ({"windows": {1: 0.5}}, "surge.windows"),
        ({"min_excess": 2.5}, "surge.min_excess"),
        ({"p_value": 0}, "surge.p_value"),
        ({"allowance": {"rows_per_day": -1}}, "surge.allowance.rows_per_day"),
    ],
)
def test_bad_surge_config_names_the_key(surge: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Config.model_validate({"accounts": {"surge": surge}})
    assert words in str(caught.value).replace("\n", " ")


# -- trust ---------------------------------------------------------------------------------


def surged_watch() -> tuple[SignupWatch, float]:
    """A watch that found one surge; returns it and a time inside it."""
    rng = np.random.default_rng(2)
    burst = sorted((T0 + 4 * DAY + rng.uniform(0, 3_600, size=600)).tolist())
    watch = watch_of(sorted(honest_stream(rng, 300, 6) + burst))
    assert watch.surges
    return watch, burst[300]


CONFIG = AccountsConfig(allowances={"probation": AllowanceConfig(rows_per_day=300)})


def test_an_unvouched_account_created_in_a_surge_is_held_with_nothing() -> None:
    watch, inside = surged_watch()
    created = datetime.fromtimestamp(inside, UTC)
    now = inside + 3_600
    record = AccountRecord("hydra-1", created_at=created)
    held = TrustPolicy(CONFIG, Accounts(record), surges=watch, clock=lambda: now).standing(key("hydra-1"))
    assert held.level == "probation" and "surge" in held.reason
    assert held.allowance == Allowance(rows_per_day=0, tokens_per_day=0)
    assert held.widens_at == created + timedelta(days=7)
    earlier = AccountRecord("honest", created_at=created - timedelta(days=2))
    plain = TrustPolicy(CONFIG, Accounts(earlier), surges=watch, clock=lambda: now).standing(key("honest"))
    assert plain.level == "probation" and plain.allowance == Allowance(rows_per_day=300)


@pytest.mark.parametrize("vouched", [{"verified": True}, {"paid_usd": 20.0}], ids=["verified", "paid"])
def test_verification_or_payment_releases_a_held_account(vouched: dict[str, object]) -> None:
    watch, inside = surged_watch()
    record = AccountRecord("newcomer", created_at=datetime.fromtimestamp(inside, UTC), **vouched)  # type: ignore[arg-type]
    policy = TrustPolicy(CONFIG, Accounts(record), surges=watch, clock=lambda: inside + 60)
    assert policy.standing(key("newcomer")).level == "standard"


def test_a_surge_found_later_reaches_a_cached_standing_at_once() -> None:
    rng = np.random.default_rng(4)
    watch = watch_of(honest_stream(rng, 300, 6))
    first = T0 + 6 * DAY + 10
    record = AccountRecord("early", created_at=datetime.fromtimestamp(first, UTC))
    policy = TrustPolicy(CONFIG, Accounts(record), surges=watch, clock=lambda: first + 3_000)
    assert policy.standing(key("early")).allowance == Allowance(rows_per_day=300)  # cached now
    watch.observe("early", first)
    for i, at in enumerate(sorted((first + rng.uniform(0, 2_400, size=400)).tolist())):
        watch.observe(f"hydra-{i}", at)
    assert watch.held(first)
    assert policy.standing(key("early")).allowance == Allowance(rows_per_day=0, tokens_per_day=0)


# -- the registry feeds the watch from the store --------------------------------------------


async def test_the_registry_shows_every_polled_sign_up_to_the_watch(engine: AsyncEngine) -> None:  # noqa: F811
    store = SqlKeyStore(engine, SECRET)
    now = datetime.now(UTC)
    for hour in range(48):  # two days of history, registered before the replica starts
        for i in range(2):
            created = now - timedelta(hours=48 - hour, minutes=20 * i)
            await store.put_account(f"past-{hour}-{i}", AccountMetadata(created_at=created))
    watch = SignupWatch(SurgeConfig(min_history_hours=12, windows={1: 3}))
    registry = KeyRegistry(store, SECRET, signups=watch)
    await registry.refresh()  # the first poll reaches back as far as the baseline reads
    assert watch.known_since is not None and watch.known_since <= (now - timedelta(days=7)).timestamp()
    assert watch.surges == ()
    burst = [  # forty accounts at once, registered by another replica or the CLI
        await store.put_account(f"burst-{i}", AccountMetadata()) for i in range(40)
    ]
    await registry.refresh()
    assert all(watch.held(record.created_at.timestamp()) for record in burst)
    assert not watch.held((now - timedelta(hours=20)).timestamp())


async def test_a_failed_first_poll_reads_the_week_again(tmp_path: Path) -> None:
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as db:
        await create_tables(db)
        store = SpyStore(db)
        now = datetime.now(UTC)
        for hour in range(48):
            await store.put_account(f"past-{hour}", AccountMetadata(created_at=now - timedelta(hours=48 - hour)))
        watch = SignupWatch(SurgeConfig(min_history_hours=12, windows={1: 3}))
        registry = KeyRegistry(store, SECRET, signups=watch)
        store.down = True  # the database blinks as the replica starts
        with pytest.raises(StoreError):
            await registry.refresh()
        assert watch.known_since is None  # so the next poll reaches back a week again
        store.down = False
        await registry.refresh()
        [(_, _, expected)] = watch.windows(now.timestamp())
        assert expected is not None and 0.2 < expected < 0.4  # 48 sign-ups in the week it read


def test_an_old_account_updated_today_costs_no_test_of_its_years() -> None:
    watch = SignupWatch(SurgeConfig(), known_since=T0)
    rng = np.random.default_rng(8)
    batch = [(f"acct-{i}", at) for i, at in enumerate(honest_stream(rng, 100, 8))]
    batch.append(("founder", T0 - 3_000 * DAY))  # paid today, signed up eight years ago
    watch.observe_many(batch)
    assert watch.tests < 20_000 and watch.surges == ()


def test_a_surge_found_again_changes_nothing_the_trust_cache_reads() -> None:
    watch, _ = surged_watch()
    generation = watch.generation
    [surge] = watch.surges
    for i in range(50):  # honest newcomers within the hour after: the 24-hour window still fires
        watch.observe(f"later-{i}", surge.end + 7_200 + 300 * i)  # the baseline's pace
    assert watch.generation - generation <= 1 and len(watch.surges) == 1


def test_a_late_sign_up_dated_days_back_is_not_judged_on_a_forgotten_baseline() -> None:
    rng = np.random.default_rng(12)
    watch = watch_of(honest_stream(rng, 500, 12))  # days before the ninth are forgotten by now
    for i in range(30):  # customers of day 4 registered late (a backfill): 6% more that day
        watch.observe(f"late-{i}", T0 + 4 * DAY + 2_880 * i)
    assert watch.surges == ()
