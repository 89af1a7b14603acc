"""KeyRegistry: the cache in front of the key store, and how replicas stay in step."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.errors import KeyLookupDeferred, StoreError
from modelfence.identity import (
    ApiKeyRecord,
    KeyRegistry,
    LimitOverrides,
    ServerSecret,
    SqlKeyStore,
    new_api_key,
)
from modelfence.identity.base import AccountRecord
from modelfence.store import create_tables, open_engine

from .test_store_database import scratch_engine

SECRET = ServerSecret(b"test-secret-0123456789abcdef")


class SpyStore(SqlKeyStore):
    """Counts the calls the registry makes; ``down`` makes them fail like a dead database."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, SECRET)
        self.calls: Counter[str] = Counter()
        self.down = False

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if self.down:
            raise StoreError("state database failed: connection refused")

    async def find_by_secret(self, secret: str) -> ApiKeyRecord | None:
        self._call("find_by_secret")
        await asyncio.sleep(0)  # let concurrent callers pile up, as real I/O would
        return await super().find_by_secret(secret)

    async def changed_since(self, since: datetime) -> list[ApiKeyRecord]:
        self._call("changed_since")
        return await super().changed_since(since)

    async def key_hashes(self, since: datetime | None = None) -> list[str]:
        self._call("key_hashes")
        return await super().key_hashes(since)

    async def accounts_changed_since(self, since: datetime) -> list[AccountRecord]:
        self._call("accounts_changed_since")
        return await super().accounts_changed_since(since)


class FakeClock:
    """Starts at the real time, as the store stamps changes with the real clock."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine:
        await create_tables(engine)
        yield engine


@pytest.fixture
def store(engine: AsyncEngine) -> SpyStore:
    return SpyStore(engine)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(store: SpyStore, clock: FakeClock) -> KeyRegistry:
    return KeyRegistry(store, SECRET, clock=clock)


async def eventually(condition: Callable[[], Awaitable[bool]], within: float = 2.0) -> None:
    """Check ``condition`` every 10 ms until it holds; fail after ``within`` seconds."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < within, f"not true within {within} s"
        await asyncio.sleep(0.01)


def revoked_in(registry: KeyRegistry, api_key: str) -> Callable[[], Awaitable[bool]]:
    async def revoked() -> bool:
        record = await registry.authenticate(api_key)
        return record is not None and not record.active

    return revoked


async def test_known_keys_are_served_from_memory(store: SpyStore, registry: KeyRegistry) -> None:
    record, api_key = await store.create("acme", "default")
    assert await registry.authenticate(api_key) == record
    for _ in range(100):
        assert await registry.authenticate(api_key) == record
    assert store.calls["find_by_secret"] == 1


async def test_malformed_keys_never_reach_the_store(store: SpyStore, registry: KeyRegistry) -> None:
    for junk in ("", "sk-123", "mf_short", "x" * 10_000):
        assert await registry.authenticate(junk) is None
    assert store.calls["find_by_secret"] == 0


async def test_unknown_keys_are_remembered_for_minutes(
    store: SpyStore, registry: KeyRegistry, clock: FakeClock
) -> None:
    unknown = new_api_key()
    for _ in range(50):
        assert await registry.authenticate(unknown) is None
    assert store.calls["find_by_secret"] == 1
    clock.now += 299
    assert await registry.authenticate(unknown) is None
    assert store.calls["find_by_secret"] == 1
    clock.now += 1.01
    assert await registry.authenticate(unknown) is None
    assert store.calls["find_by_secret"] == 2


async def test_the_unknown_key_memory_is_bounded(store: SpyStore, clock: FakeClock) -> None:
    registry = KeyRegistry(store, SECRET, clock=clock, negative_max_size=2)
    first, second, third = new_api_key(), new_api_key(), new_api_key()
    for api_key in (first, second, third, third, second):
        await registry.authenticate(api_key)
    assert store.calls["find_by_secret"] == 3
    await registry.authenticate(first)  # pushed out by the third
    assert store.calls["find_by_secret"] == 4


async def test_concurrent_misses_share_one_lookup(store: SpyStore, registry: KeyRegistry) -> None:
    record, api_key = await store.create("acme", "default")
    unknown = new_api_key()
    results = await asyncio.gather(
        *(registry.authenticate(key) for key in [api_key] * 20 + [unknown] * 20)
    )
    assert results == [record] * 20 + [None] * 20
    assert store.calls["find_by_secret"] == 2


async def test_one_caller_giving_up_does_not_fail_the_others(
    store: SpyStore, registry: KeyRegistry
) -> None:
    record, api_key = await store.create("acme", "default")
    impatient = asyncio.create_task(registry.authenticate(api_key))
    patient = asyncio.create_task(registry.authenticate(api_key))
    await asyncio.sleep(0)
    impatient.cancel()
    assert await patient == record


async def test_refresh_applies_overrides_and_revocations_without_lookups(
    store: SpyStore, registry: KeyRegistry
) -> None:
    record, api_key = await store.create("acme", "default")
    await registry.authenticate(api_key)
    overrides = LimitOverrides(requests_per_minute=3)
    await store.set_overrides(record.key_id, overrides)
    await store.revoke(record.key_id)
    await registry.refresh()
    cached = await registry.authenticate(api_key)
    assert cached is not None and cached.overrides == overrides and not cached.active
    assert store.calls["find_by_secret"] == 1


async def test_revocation_on_another_replica_is_seen_within_two_seconds(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    # Another replica (or the CLI): its own engine on the same database.
    other_engine = open_engine(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        elsewhere = SqlKeyStore(other_engine, SECRET)
        registry = KeyRegistry(SqlKeyStore(engine, SECRET), SECRET, poll_interval=0.05)
        record, api_key = await elsewhere.create("acme", "default")
        await registry.start()
        try:
            assert await registry.authenticate(api_key) == record
            await elsewhere.revoke(record.key_id)
            await eventually(revoked_in(registry, api_key), within=2.0)
        finally:
            await registry.stop()
    finally:
        await other_engine.dispose()


async def test_a_store_outage_keeps_cached_keys_working(
    store: SpyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    failures: list[Exception] = []
    registry = KeyRegistry(store, SECRET, poll_interval=0.01, on_refresh_error=failures.append)
    record, api_key = await store.create("acme", "default")
    await registry.authenticate(api_key)

    async def failed_twice() -> bool:
        return registry.refresh_errors >= 2

    await registry.start()
    try:
        store.down = True
        await eventually(failed_twice)
        assert await registry.authenticate(api_key) == record
        with pytest.raises(StoreError):  # a key not cached cannot be checked: 503, not 401
            await registry.authenticate(new_api_key())
        assert len(failures) == registry.refresh_errors
        assert all(isinstance(exc, StoreError) for exc in failures)

        store.down = False  # what changed meanwhile arrives once the store is back
        await store.revoke(record.key_id)
        await eventually(revoked_in(registry, api_key))

        async def recovered() -> bool:  # the step logs recovery after its last await
            return "recovered" in caplog.text

        await eventually(recovered)
        assert "refresh failed" in caplog.text
        assert api_key not in caplog.text
    finally:
        await registry.stop()


async def answer(registry: KeyRegistry, api_key: str) -> ApiKeyRecord | str | None:
    """The record, None (unknown), or "deferred" (not looked up: over the budget)."""
    try:
        return await registry.authenticate(api_key)
    except KeyLookupDeferred:
        return "deferred"


async def test_a_flood_of_made_up_keys_costs_the_store_only_the_lookup_budget(
    store: SpyStore, clock: FakeClock
) -> None:
    refused: list[None] = []
    registry = KeyRegistry(
        store, SECRET, clock=clock, unindexed_lookups_per_second=20,
        on_lookup_refused=lambda: refused.append(None),
    )
    record, api_key = await store.create("acme", "default")
    await registry.refresh()  # builds the key index from every issued key
    flood = [new_api_key() for _ in range(1_000)]
    answers = [await answer(registry, k) for k in flood]
    # 20 lookups (the budget) and the index's rare false positives; the rest refused, counted.
    assert 20 <= store.calls["find_by_secret"] <= 30
    assert answers.count(None) == store.calls["find_by_secret"]
    assert answers.count("deferred") == len(refused) == 1_000 - store.calls["find_by_secret"]
    assert await registry.authenticate(api_key) == record  # an issued key is in the index
    clock.now += 1.0  # the budget refills: 20 more a second
    again = [await answer(registry, new_api_key())]
    clock.now -= 60.0  # a clock stepped back then neither drains it nor refills it
    again += [await answer(registry, new_api_key()) for _ in range(39)]
    assert 20 <= again.count(None) <= 25 and store.calls["find_by_secret"] <= 55


async def test_a_key_created_during_a_flood_works_once_a_poll_indexed_it(
    store: SpyStore, clock: FakeClock
) -> None:
    registry = KeyRegistry(store, SECRET, clock=clock, unindexed_lookups_per_second=5)
    await registry.refresh()
    for _ in range(10):  # the budget is spent on made-up keys
        await answer(registry, new_api_key())
    record, api_key = await store.create("acme", "default")
    assert await answer(registry, api_key) == "deferred"  # retry: until the next poll (0.5 s)
    await registry.refresh()
    assert await registry.authenticate(api_key) == record


async def test_a_store_down_at_start_leaves_unknown_keys_looked_up_as_before(
    store: SpyStore,
) -> None:
    registry = KeyRegistry(store, SECRET, unindexed_lookups_per_second=1)
    store.down = True
    with pytest.raises(StoreError):
        await registry.refresh()
    store.down = False
    for _ in range(5):  # no index yet: no budget applies
        assert await registry.authenticate(new_api_key()) is None
    assert store.calls["find_by_secret"] == 5


async def test_an_index_grown_past_its_size_is_rebuilt_larger_by_the_next_poll(
    store: SpyStore, registry: KeyRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("modelfence.identity.key_index.MIN_CAPACITY", 2)
    await store.create("acme", "default")
    await registry.refresh()
    for _ in range(3):
        await store.create("acme", "default")
    await registry.refresh()  # three more: past the index's size
    keys = [await store.create("acme", "default") for _ in range(2)]
    await registry.refresh()  # rebuilt from every key
    assert store.calls["key_hashes"] == 3
    for record, api_key in keys:
        assert await registry.authenticate(api_key) == record
    assert registry._index is not None and registry._index.capacity == 2 * 6
