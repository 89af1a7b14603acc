"""Shared detection state: what each client's current action is, for every replica.

The detector (and the admin API, for overrides) *publish*; gateways *read* a snapshot of
the non-normal clients every ``state_poll_seconds`` into an in-process
:class:`~modelfence.detect.cache.ActionCache`. Two stores, one interface:

- :class:`SqlState` — the ``client_risk`` table of the state database. Always written,
  since the admin API reads it; on one machine (SQLite in WAL mode) it is also what the
  gateway reads.
- :class:`RedisState` — one Redis hash of non-normal clients, for many replicas that
  should not all poll the database.

In shadow mode gateways read :class:`PinnedState` instead: operator pins only.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from modelfence.detect.actions import Action, Level
from modelfence.store import transaction
from modelfence.store.schema import (
    accounts,
    client_risk,
    detection_audit,
    detection_link_cuts,
    detection_overrides,
)

ACTIONS_KEY = "modelfence:detect:actions"


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """One client's published state (a ``client_risk`` row)."""

    client: str
    tier: str
    entity: str | None
    risk: float
    level: Level
    quota_share: float
    reasons: list[dict[str, Any]]  # [{"code", "text", "score"}], strongest first
    queries: int
    shadow: bool
    updated_at: datetime
    links: list[dict[str, Any]] | None = None  # [{"other", "kinds", "weight", "joins", "cut"}]

    @property
    def action(self) -> Action:
        """What gateways apply: nothing in shadow mode."""
        return Action("normal") if self.shadow else Action(self.level, self.quota_share)


class StateReader(Protocol):
    async def actions(self) -> dict[str, Action]:
        """Every client whose action is not normal."""
        ...


def _upsert(conn_dialect: str, rows: list[dict[str, Any]]) -> Any:
    insert = postgresql.insert if conn_dialect == "postgresql" else sqlite.insert
    stmt = insert(client_risk).values(rows)
    return stmt.on_conflict_do_update(
        index_elements=[client_risk.c.client],
        set_={c.name: stmt.excluded[c.name] for c in client_risk.columns if c.name != "client"},
    )


class SqlState:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def publish(self, records: Sequence[ClientRecord]) -> None:
        if not records:
            return
        async with transaction(self.engine, write=True) as conn:
            await self.publish_in(conn, records)

    @staticmethod
    async def publish_in(conn: AsyncConnection, records: Sequence[ClientRecord]) -> None:
        """:meth:`publish` inside the caller's (write) transaction."""
        if records:
            await conn.execute(_upsert(conn.dialect.name, [asdict(r) for r in records]))

    async def actions(self) -> dict[str, Action]:
        query = select(client_risk).where(
            client_risk.c.level != "normal", client_risk.c.shadow.is_(False)
        )
        async with transaction(self.engine) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return {row["client"]: ClientRecord(**row).action for row in rows}

    async def get(self, client: str) -> ClientRecord | None:
        async with transaction(self.engine) as conn:
            return await self.get_in(conn, client)

    @staticmethod
    async def get_in(conn: AsyncConnection, client: str) -> ClientRecord | None:
        """:meth:`get` inside the caller's transaction."""
        query = select(client_risk).where(client_risk.c.client == client)
        row = (await conn.execute(query)).mappings().first()
        return None if row is None else ClientRecord(**row)

    async def get_many(self, clients: Sequence[str]) -> builtins.list[ClientRecord]:
        out = []
        async with transaction(self.engine) as conn:
            for start in range(0, len(clients), 500):
                chunk = clients[start : start + 500]
                query = select(client_risk).where(client_risk.c.client.in_(chunk))
                out += [ClientRecord(**row) for row in (await conn.execute(query)).mappings().all()]
        return out

    # builtins.list: inside this class, plain ``list`` is the method.
    async def list(self, *, min_risk: float = 0.0, limit: int = 100) -> builtins.list[ClientRecord]:
        query = (
            select(client_risk)
            .where(client_risk.c.risk >= min_risk)
            .order_by(client_risk.c.risk.desc(), client_risk.c.client)
            .limit(limit)
        )
        async with transaction(self.engine) as conn:
            return [ClientRecord(**row) for row in (await conn.execute(query)).mappings().all()]

    async def overrides(self) -> dict[str, str]:
        async with transaction(self.engine) as conn:
            rows = (await conn.execute(select(detection_overrides))).all()
        return {row.client: row.action for row in rows}

    async def cuts(self) -> builtins.list[tuple[str, str]]:
        """Pairs of clients an operator cut apart (never one entity)."""
        async with transaction(self.engine) as conn:
            rows = (await conn.execute(select(detection_link_cuts))).all()
        return [(row.client, row.other) for row in rows]

    async def set_cut(self, a: str, b: str, *, cut: bool, note: str = "") -> None:
        """Cut the link between ``a`` and ``b`` (or restore it); repeating changes nothing."""
        first, second = sorted((a, b))
        table = detection_link_cuts.c
        async with transaction(self.engine, write=True) as conn:
            await conn.execute(
                delete(detection_link_cuts).where(table.client == first, table.other == second)
            )
            if cut:
                await conn.execute(
                    detection_link_cuts.insert().values(
                        client=first, other=second, note=note, at=datetime.now(UTC)
                    )
                )

    async def account_traits(self, since: datetime) -> dict[str, dict[str, str]]:
        """Hashed metadata of the accounts registered or changed at or after ``since``.

        An organisation counts only once the operator verified it: a name anyone can type
        at sign-up must not join a stranger to a customer's keys.
        """
        query = select(accounts.c.account_id, accounts.c.traits, accounts.c.verified).where(
            accounts.c.updated_at >= since
        )
        async with transaction(self.engine) as conn:
            rows = (await conn.execute(query)).all()
        return {
            row.account_id: {
                kind: value
                for kind, value in row.traits.items()
                if kind != "organisation" or row.verified
            }
            for row in rows
        }

    async def decisions(self, client: str, *, limit: int = 20) -> builtins.list[dict[str, Any]]:
        """The client's latest audit rows (``detection_audit``), newest first."""
        query = (
            select(detection_audit)
            .where(detection_audit.c.client == client)
            .order_by(detection_audit.c.id.desc())
            .limit(limit)
        )
        async with transaction(self.engine) as conn:
            return [dict(row) for row in (await conn.execute(query)).mappings().all()]

    async def audit(
        self,
        *,
        client: str,
        entity: str | None,
        previous: str,
        action: str,
        risk: float,
        source: str,
        shadow: bool,
        reasons: builtins.list[dict[str, Any]],
    ) -> None:
        async with transaction(self.engine, write=True) as conn:
            await self.audit_in(
                conn,
                client=client,
                entity=entity,
                previous=previous,
                action=action,
                risk=risk,
                source=source,
                shadow=shadow,
                reasons=reasons,
            )

    @staticmethod
    async def audit_in(
        conn: AsyncConnection,
        *,
        client: str,
        entity: str | None,
        previous: str,
        action: str,
        risk: float,
        source: str,
        shadow: bool,
        reasons: builtins.list[dict[str, Any]],
    ) -> None:
        """:meth:`audit` inside the caller's (write) transaction."""
        await conn.execute(
            detection_audit.insert().values(
                at=datetime.now(UTC),
                client=client,
                entity=entity,
                previous=previous,
                action=action,
                risk=risk,
                source=source,
                shadow=shadow,
                reasons=reasons,
            )
        )


class PinnedState:
    """Shadow mode's reader: only the actions an operator pinned through the admin API.

    Whatever the detector published earlier, before shadow mode was switched on, stays
    unenforced; a pin is the operator's own decision and acts in every mode.
    """

    def __init__(self, state: SqlState) -> None:
        self.state = state

    async def actions(self) -> dict[str, Action]:
        pins = detection_overrides.c
        query = (
            select(client_risk.c.client, client_risk.c.level, client_risk.c.quota_share)
            .join(detection_overrides, pins.client == client_risk.c.client)
            .where(pins.action != "allow", client_risk.c.level != "normal")
        )
        async with transaction(self.state.engine) as conn:
            rows = (await conn.execute(query)).all()
        return {row.client: Action(row.level, row.quota_share) for row in rows}


class RedisState:
    """Non-normal actions in one hash: ``client -> {"level", "quota_share"}``."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    async def publish(self, records: Sequence[ClientRecord]) -> None:
        acting = {r.client: r.action for r in records}
        pipe = self.redis.pipeline(transaction=False)
        for client, action in acting.items():
            if action.level == "normal":
                pipe.hdel(ACTIONS_KEY, client)
            else:
                pipe.hset(ACTIONS_KEY, client, orjson.dumps(asdict(action)))
        await pipe.execute()

    async def actions(self) -> dict[str, Action]:
        raw = await self.redis.hgetall(ACTIONS_KEY)
        return {
            (k.decode() if isinstance(k, bytes) else k): Action(**orjson.loads(v))
            for k, v in raw.items()
        }
