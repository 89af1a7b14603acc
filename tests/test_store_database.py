"""The state database: URLs, SQLite settings, schema creation, error translation.

``store_url`` (a fixture) and ``scratch_engine`` are shared with the identity tests.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.errors import ConfigError, StoreError
from modelfence.store import async_url, create_tables, open_engine, rejects_values, transaction
from modelfence.store.database import SQLITE_BUSY_TIMEOUT_MS
from modelfence.store.schema import api_keys, metadata
from modelfence.testing.processes import free_port


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend in turn: a new SQLite file, then the PostgreSQL test database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@asynccontextmanager
async def scratch_engine(url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on an empty database; on PostgreSQL, in a private schema.

    The schema is dropped afterwards, so runs sharing the ``test`` database never see each
    other's rows and no table outside it is touched. SQLite URLs should name a new file.
    """
    engine = open_engine(url)
    if engine.dialect.name == "sqlite":
        try:
            yield engine
        finally:
            await engine.dispose()
        return
    schema = f"mf_test_{secrets.token_hex(6)}"
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield engine.execution_options(schema_translate_map={None: schema})
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await engine.dispose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///modelfence.db", "sqlite+aiosqlite:///modelfence.db"),
        ("sqlite:////var/lib/mf.db", "sqlite+aiosqlite:////var/lib/mf.db"),
        ("postgresql://mf@db:5432/mf", "postgresql+asyncpg://mf@db:5432/mf"),
        ("postgres://mf@db/mf", "postgresql+asyncpg://mf@db/mf"),
    ],
)
def test_store_urls_map_to_async_drivers(url: str, expected: str) -> None:
    assert async_url(url) == expected


@pytest.mark.parametrize("url", ["mysql://db/mf", "modelfence.db", "sqlite+pysqlite:///x.db"])
def test_unknown_store_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="sqlite:///PATH or postgresql://"):
        async_url(url)


async def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    async with (
        scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine,
        transaction(engine) as conn,
    ):
        assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == SQLITE_BUSY_TIMEOUT_MS


async def test_a_new_sqlite_file_locked_by_another_process_is_waited_for(tmp_path: Path) -> None:
    # Processes starting together on a new file: one writes while another switches the
    # file to WAL, which SQLite refuses at once ("database is locked") whatever the busy
    # timeout. The engine must wait for the writer as it does for writes.
    path = tmp_path / "state.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a writer, in the middle of its transaction
    holder.execute("CREATE TABLE other_process (id INTEGER)")
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, holder.commit)
    try:
        async with scratch_engine(f"sqlite:///{path}") as engine:
            await create_tables(engine)
            async with transaction(engine) as conn:
                assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
                tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
        assert {"other_process", api_keys.name} <= set(tables)
    finally:
        holder.close()


async def test_sqlite_ddl_is_transactional(tmp_path: Path) -> None:
    # The sqlite3 driver would autocommit CREATE TABLE; our BEGIN makes it roll back.
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine:
        with pytest.raises(RuntimeError):
            async with transaction(engine, write=True) as conn:
                await conn.execute(text("CREATE TABLE doomed (id INTEGER)"))
                raise RuntimeError("abort")
        async with transaction(engine) as conn:
            tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
        assert "doomed" not in tables


async def test_create_tables_is_idempotent_and_safe_to_race(store_url: str) -> None:
    async with scratch_engine(store_url) as engine:
        # Three connections racing, as several processes starting at once would.
        await asyncio.gather(*(create_tables(engine) for _ in range(3)))
        await create_tables(engine)
        async with transaction(engine) as conn:
            assert (await conn.execute(select(func.count()).select_from(api_keys))).scalar() == 0
        # The unique index on key_hash exists: a second row with the same hash is refused.
        now = datetime.now(UTC)
        row = {
            "client": "c",
            "tier": "default",
            "prefix": "mf_x",
            "key_hash": "0" * 64,
            "created_at": now,
            "updated_at": now,
            "overrides": {},
        }
        async with transaction(engine, write=True) as conn:
            await conn.execute(api_keys.insert().values(key_id="key_1", **row))
        with pytest.raises(StoreError, match="(?i)unique"):
            async with transaction(engine, write=True) as conn:
                await conn.execute(api_keys.insert().values(key_id="key_2", **row))


async def test_create_tables_adds_indexes_missing_from_existing_tables(store_url: str) -> None:
    """A database made before an index was declared gains it at start-up, on both databases
    (here: every index dropped, as if each had been added after the first release)."""

    def indexes(sync: Any) -> dict[str, set[str]]:
        inspector, schema = inspect(sync), sync.schema_for_object(metadata.sorted_tables[0])
        return {
            name: {index["name"] for index in inspector.get_indexes(name, schema=schema)}
            for name in metadata.tables
        }

    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        async with transaction(engine) as conn:
            declared = await conn.run_sync(indexes)
        assert "ix_client_risk_entity" in declared["client_risk"]
        async with transaction(engine, write=True) as conn:
            for table in metadata.tables.values():
                for index in table.indexes:
                    await conn.run_sync(index.drop)
        async with transaction(engine) as conn:
            assert not any((await conn.run_sync(indexes)).values())
        await create_tables(engine)
        async with transaction(engine) as conn:
            assert await conn.run_sync(indexes) == declared


async def test_unusable_sqlite_file_raises_store_error(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'state.db'}")
    try:
        with pytest.raises(StoreError, match="state database failed") as caught:
            await create_tables(engine)
        assert isinstance(caught.value.__cause__, SQLAlchemyError)
    finally:
        await engine.dispose()


async def test_unreachable_postgres_raises_store_error() -> None:
    engine = open_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    try:
        with pytest.raises(StoreError, match="state database failed") as caught:
            await create_tables(engine)
    finally:
        await engine.dispose()
    assert not rejects_values(caught.value)  # worth a retry, unlike a bad value


async def test_errors_caused_by_values_are_told_apart(store_url: str) -> None:
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        row = {
            "key_id": "k1", "client": "c", "tier": "t", "prefix": "p", "key_hash": "h",
            "created_at": datetime.now(UTC), "updated_at": datetime.now(UTC), "overrides": {},
        }
        async with transaction(engine, write=True) as conn:
            await conn.execute(api_keys.insert(), row)
        with pytest.raises(StoreError) as duplicate:
            async with transaction(engine, write=True) as conn:
                await conn.execute(api_keys.insert(), row)
        with pytest.raises(StoreError) as naive:
            async with transaction(engine, write=True) as conn:
                await conn.execute(api_keys.insert(), row | {"key_id": "k2", "created_at": datetime.now()})
    assert rejects_values(duplicate.value) and rejects_values(naive.value)
