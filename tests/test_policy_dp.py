"""DP budget accounting: shared by replicas, kept across restarts, on every backend."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.policy import BudgetAccountant, RedisAccountant, SqlAccountant
from modelfence.policy.config import DPConfig
from modelfence.policy.dp import build_accountant
from modelfence.store import create_tables, open_engine

from .test_store_database import scratch_engine

BUDGET = 2.0
WINDOW = 3600.0
Replicas = Callable[[], BudgetAccountant]


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
        pytest.param("redis", id="redis", marks=pytest.mark.redis),
    ]
)
async def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Replicas]:
    """A factory of accountants that share state, as replicas or restarted processes do."""
    async with AsyncExitStack() as stack:
        if request.param == "redis":
            url = request.getfixturevalue("redis_url")

            def redis_replica() -> BudgetAccountant:
                accountant = RedisAccountant.from_url(url, budget=BUDGET, window_seconds=WINDOW)
                stack.push_async_callback(accountant.close)
                return accountant

            yield redis_replica
            return
        url = (f"sqlite:///{tmp_path / 'state.db'}" if request.param == "sqlite"
               else request.getfixturevalue("postgres_url"))
        engine = await stack.enter_async_context(scratch_engine(url))
        await create_tables(engine)
        schemas = engine.get_execution_options().get("schema_translate_map")

        def sql_replica() -> BudgetAccountant:
            # A fresh engine (connection pool) per replica, as another process would have.
            own: AsyncEngine = open_engine(url)
            if schemas:
                own = own.execution_options(schema_translate_map=schemas)
            stack.push_async_callback(own.dispose)
            return SqlAccountant(own, budget=BUDGET, window_seconds=WINDOW)

        yield sql_replica


async def test_budget_is_shared_by_replicas_and_survives_restarts(replicas: Replicas) -> None:
    client = f"client-{uuid.uuid4().hex}"
    first, second = replicas(), replicas()
    assert await first.spend(client, 0.5)
    assert await second.spend(client, 1.0)
    assert not await first.spend(client, 1.0)  # 2.5 > 2.0: refused, nothing spent
    restarted = replicas()
    assert await restarted.spend(client, 0.5)  # exactly the budget
    assert not await second.spend(client, 0.1)
    assert await first.spend(f"other-{client}", 2.0)  # budgets are per client


async def test_concurrent_spends_never_overspend(replicas: Replicas) -> None:
    client = f"client-{uuid.uuid4().hex}"
    accountants = [replicas() for _ in range(3)]
    results = await asyncio.gather(*(accountants[i % 3].spend(client, 0.25) for i in range(12)))
    assert sum(results) == 8  # 8 * 0.25 == BUDGET


async def test_a_new_window_starts_from_zero(tmp_path: Path) -> None:
    now = [7200.0]
    engine = open_engine(f"sqlite:///{tmp_path / 'state.db'}")
    await create_tables(engine)
    accountant = SqlAccountant(engine, budget=1.0, window_seconds=3600, clock=lambda: now[0])
    try:
        assert await accountant.spend("acme", 1.0)
        assert not await accountant.spend("acme", 0.5)
        now[0] += 3600
        assert await accountant.spend("acme", 0.5)
        assert not await accountant.spend("acme", 2.0)  # more than a whole budget
    finally:
        await engine.dispose()


def test_the_limits_backend_chooses_the_accountant(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'state.db'}")
    assert isinstance(build_accountant("memory", engine, DPConfig()), SqlAccountant)
    redis = build_accountant("redis://127.0.0.1:6379/0", engine, DPConfig())
    assert isinstance(redis, RedisAccountant)
