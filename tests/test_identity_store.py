"""One suite for SqlKeyStore, run against SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.errors import KeyNotFound
from modelfence.identity import LimitOverrides, ServerSecret, SqlKeyStore, new_api_key
from modelfence.identity.keys import KEY_LENGTH, KEY_PREFIX
from modelfence.store import create_tables, transaction
from modelfence.store.schema import api_keys

from .test_store_database import scratch_engine, store_url  # noqa: F401  (store_url: fixture)

SECRET = ServerSecret(b"test-secret-0123456789abcdef")


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:  # noqa: F811
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        yield engine


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(engine: AsyncEngine, clock: FakeClock) -> SqlKeyStore:
    return SqlKeyStore(engine, SECRET, clock=clock)


async def test_create_returns_the_record_and_the_key(store: SqlKeyStore, clock: FakeClock) -> None:
    record, api_key = await store.create("acme", "pro")
    assert api_key.startswith(KEY_PREFIX) and len(api_key) == KEY_LENGTH
    assert record.key_id.startswith("key_") and len(record.key_id) == 16
    assert (record.client, record.tier, record.created_at) == ("acme", "pro", clock.now)
    assert api_key.startswith(record.prefix) and len(record.prefix) == 10
    assert record.active and record.overrides == LimitOverrides()
    assert await store.get(record.key_id) == record


async def test_keys_are_unique(store: SqlKeyStore) -> None:
    created = [await store.create("acme", "default") for _ in range(5)]
    assert len({record.key_id for record, _ in created}) == 5
    assert len({api_key for _, api_key in created}) == 5


async def test_list_is_oldest_first(store: SqlKeyStore, clock: FakeClock) -> None:
    first, _ = await store.create("b-client", "default")
    clock.advance(1)
    second, _ = await store.create("a-client", "pro")
    assert await store.list() == [first, second]


async def test_unknown_key_id_raises_key_not_found(store: SqlKeyStore) -> None:
    for call in (store.get, store.revoke):
        with pytest.raises(KeyNotFound, match="key_000000000000"):
            await call("key_000000000000")
    with pytest.raises(KeyNotFound):
        await store.set_overrides("key_000000000000", LimitOverrides(requests_per_minute=5))


async def test_revoking_twice_keeps_the_first_time(store: SqlKeyStore, clock: FakeClock) -> None:
    record, _ = await store.create("acme", "default")
    revoked_at = clock.advance(10)
    revoked = await store.revoke(record.key_id)
    assert not revoked.active and revoked.revoked_at == revoked_at
    clock.advance(10)
    assert (await store.revoke(record.key_id)).revoked_at == revoked_at
    assert (await store.get(record.key_id)).revoked_at == revoked_at


async def test_overrides_replace_the_previous_ones(store: SqlKeyStore) -> None:
    record, _ = await store.create("acme", "default")
    first = LimitOverrides(requests_per_minute=5, concurrent_requests=2)
    assert (await store.set_overrides(record.key_id, first)).overrides == first
    second = LimitOverrides(usd_per_day=2.5)
    assert (await store.set_overrides(record.key_id, second)).overrides == second
    assert (await store.get(record.key_id)).overrides == second


async def test_find_by_secret(store: SqlKeyStore) -> None:
    record, api_key = await store.create("acme", "default")
    await store.create("other", "default")
    assert await store.find_by_secret(api_key) == record
    assert await store.find_by_secret(new_api_key()) is None
    revoked = await store.revoke(record.key_id)
    assert await store.find_by_secret(api_key) == revoked  # revoked keys are found, inactive


async def test_a_different_server_secret_finds_nothing(engine: AsyncEngine) -> None:
    _, api_key = await SqlKeyStore(engine, SECRET).create("acme", "default")
    other = SqlKeyStore(engine, ServerSecret(b"another-secret-0123456789"))
    assert await other.find_by_secret(api_key) is None


async def test_changed_since_sees_creations_revocations_and_overrides(
    store: SqlKeyStore, clock: FakeClock
) -> None:
    old, _ = await store.create("old", "default")
    start = clock.advance(5)
    new, _ = await store.create("new", "default")
    clock.advance(1)
    await store.revoke(old.key_id)
    clock.advance(1)
    await store.set_overrides(new.key_id, LimitOverrides(tokens_per_minute=100))

    changed = await store.changed_since(start)  # oldest change first
    assert [(r.key_id, r.active, r.overrides.tokens_per_minute) for r in changed] == [
        (old.key_id, False, None),
        (new.key_id, True, 100),
    ]
    assert await store.changed_since(clock.advance(0.001)) == []


async def test_only_the_keyed_hash_is_stored(store: SqlKeyStore, engine: AsyncEngine) -> None:
    record, api_key = await store.create("acme", "default")
    async with transaction(engine) as conn:
        rows = (await conn.execute(select(api_keys))).mappings().all()
    assert len(rows) == 1
    assert rows[0]["key_hash"] == SECRET.hash_api_key(api_key) != api_key
    secret_part = api_key[len(record.prefix) :]
    assert not any(secret_part in str(value) for value in rows[0].values())


async def test_overrides_stored_by_earlier_versions_are_read_within_bounds(
    store: SqlKeyStore, engine: AsyncEngine
) -> None:
    """A row written before limits were bounded (1e24, 0.5, text) must neither hang the
    limiter nor make reading the key fail: it is clamped into range, text is ignored."""
    record, api_key = await store.create("legacy", "default")
    stored = {"requests_per_minute": 1e24, "tokens_per_minute": 0.5,
              "concurrent_requests": "8", "usd_per_day": 2.5}
    async with transaction(engine, write=True) as conn:
        await conn.execute(
            api_keys.update().where(api_keys.c.key_id == record.key_id).values(overrides=stored)
        )
    expected = LimitOverrides(requests_per_minute=10_000_000, tokens_per_minute=1,
                              concurrent_requests=None, usd_per_day=2.5)
    assert (await store.get(record.key_id)).overrides == expected
    assert [r.overrides for r in await store.list() if r.key_id == record.key_id] == [expected]
    found = await store.find_by_secret(api_key)
    assert found is not None and found.overrides == expected
