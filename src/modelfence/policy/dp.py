"""Per-client differential-privacy budgets, shared by every replica and kept across restarts.

Each noised answer (see ``DPConfig``) spends ``epsilon_per_response`` from the client's
budget for the current time window; once a spend would exceed the budget the client gets
labels / text only until the window rolls over. Two accountants implement
:class:`BudgetAccountant`, chosen by where the deployment keeps shared state:

- :class:`SqlAccountant` — one row per client in the state database (SQLite or
  PostgreSQL), updated by a single conditional upsert, so concurrent replicas never
  overspend;
- :class:`RedisAccountant` — one hash per client, updated by ``lua/dp_spend.lua`` with the
  window taken from Redis ``TIME``.

    accountant = build_accountant(config.limits.backend, engine, config.policy.dp)
    if await accountant.spend("acme", 0.5): ...   # noise it
    else: ...                                     # budget spent: labels / text only
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from importlib.resources import files
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

from sqlalchemy import Column, Float, Integer, String, Table, case, literal
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.errors import LimitBackendError
from modelfence.policy.config import DPConfig
from modelfence.redisurl import is_redis_url
from modelfence.store import metadata, transaction

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

dp_budgets = Table(
    "dp_budgets",
    metadata,
    Column("client", String(200), primary_key=True),
    Column("window", Integer, nullable=False),  # floor(unix time / window_seconds)
    Column("spent", Float, nullable=False),
)


class BudgetAccountant(Protocol):
    async def spend(self, client: str, epsilon: float) -> bool:
        """Spend ``epsilon`` if the client's budget allows; False (nothing spent) if not."""
        ...

    async def close(self) -> None: ...


class SqlAccountant:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        budget: float,
        window_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._budget = budget
        self._window = window_seconds
        self._clock = clock
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    async def spend(self, client: str, epsilon: float) -> bool:
        if epsilon > self._budget:
            return False
        window = math.floor(self._clock() / self._window)
        table = dp_budgets.c
        same_window = table.window == window
        upsert = self._insert(dp_budgets).values(client=client, window=window, spent=epsilon)
        upsert = upsert.on_conflict_do_update(
            index_elements=[table.client],
            set_={
                # A new window starts from zero; the same window adds up.
                "spent": case((same_window, table.spent + epsilon), else_=literal(epsilon)),
                "window": window,
            },
            where=~same_window | (table.spent + epsilon <= self._budget),
        )
        async with transaction(self._engine, write=True) as conn:
            result = await conn.execute(upsert)
        return result.rowcount == 1

    async def close(self) -> None:
        """The engine belongs to the app; nothing to close here."""


def _script() -> str:
    return (files("modelfence.policy") / "lua" / "dp_spend.lua").read_text(encoding="utf-8")


class RedisAccountant:
    """``client`` must decode responses; :meth:`from_url` makes one."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        budget: float,
        window_seconds: float,
        namespace: str = "mf",
    ) -> None:
        self._client = client
        self._args = (budget, window_seconds)
        self._prefix = f"{quote(namespace, safe='')}:{{dp:"
        self._spend = client.register_script(_script())

    @classmethod
    def from_url(
        cls, url: str, *, budget: float, window_seconds: float, timeout_seconds: float = 0.25
    ) -> RedisAccountant:
        """A client that gives up after ``timeout_seconds`` (connect and each reply).

        A spend is on the request path: a stalled Redis costs it one timeout, then the
        caller's fallback, never a hang.
        """
        from modelfence.redisconn import connect

        client = connect(url, timeout_seconds=timeout_seconds, decode_responses=True)
        return cls(client, budget=budget, window_seconds=window_seconds)

    async def spend(self, client: str, epsilon: float) -> bool:
        from modelfence.redisconn import REDIS_ERRORS

        key = f"{self._prefix}{quote(client, safe='')}}}:budget"
        try:
            spent = await self._spend(keys=[key], args=[epsilon, *self._args])
        except REDIS_ERRORS as exc:
            raise LimitBackendError(f"Redis DP budget spend failed: {exc}") from exc
        return bool(spent)

    async def close(self) -> None:
        await self._client.aclose()


def build_accountant(
    backend: str, engine: AsyncEngine, dp: DPConfig, *, redis_timeout_seconds: float = 0.25
) -> BudgetAccountant:
    """Redis when the limits live there (shared by replicas already), else the state database."""
    if is_redis_url(backend):
        return RedisAccountant.from_url(
            backend,
            budget=dp.budget,
            window_seconds=dp.window_seconds,
            timeout_seconds=redis_timeout_seconds,
        )
    return SqlAccountant(engine, budget=dp.budget, window_seconds=dp.window_seconds)
