"""Shared detection state: what each client's current action is, for every replica.

The detector (and the admin API, for overrides) *publish*; gateways *read* a snapshot of
the non-normal clients every ``state_poll_seconds`` into an in-process
:class:`~modelfence.detect.cache.ActionCache`. Two stores, one interface:

- :class:`SqlState` — the ``client_risk`` table of the state database. Always written,
  since the admin API reads it; on one machine (SQLite in WAL mode) it is also what the
  gateway reads.
- :class:`RedisState` — one Redis hash of non-normal clients, for many replicas that
  should not all poll the database.

In shadow mode gateways read :class:`PinnedState` instead: operator pins only. A record
with ``shadow`` set (shadow mode, or the client's ``shadow`` pin) is published for operators
and applies no level; one with ``probation`` set holds the client to the probation
allowance, in every mode.
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from sqlalchemy import and_, delete, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from modelfence.detect.actions import LEVELS, Action, Level, shadowed
from modelfence.store import transaction
from modelfence.store.schema import (
    accounts,
    client_risk,
    client_risk_history,
    detection_audit,
    detection_link_cuts,
    detection_overrides,
)

ACTIONS_KEY = "modelfence:detect:actions"
# First key of the (int, int) advisory locks a client's pin takes on PostgreSQL ("mfpn");
# the single-bigint locks (the schema lock) live in another key space.
_PIN_LOCK_SPACE = 0x6D66_706E


def _lock_key(client: str) -> int:
    """The client's second advisory-lock key: a signed 32-bit hash of its name."""
    return int.from_bytes(hashlib.blake2b(client.encode(), digest_size=4).digest(), signed=True)


async def lock_pins(conn: AsyncConnection, clients: Sequence[str]) -> None:
    """Hold the pins of ``clients`` until the (write) transaction ends: on PostgreSQL their
    advisory locks, taken in one order so two holders never wait on each other; SQLite's
    write lock already holds every pin."""
    if conn.dialect.name != "postgresql":
        return
    for key in sorted({_lock_key(client) for client in clients}):
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(:space, :key)"),
            {"space": _PIN_LOCK_SPACE, "key": key},
        )


def known(cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """The items of ``data`` that dataclass ``cls`` has a field for: a record written by a
    newer release (a rolling upgrade) is read, its new keys ignored, rather than refused."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def field_values(item: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict, shallow: published records, reasons and links are
    never changed once built, and ``asdict``'s deep copy of each of them took seconds when
    a thousand linked keys' records changed at once."""
    return {f.name: getattr(item, f.name) for f in fields(item)}


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """One client's published state (a ``client_risk`` row)."""

    client: str
    tier: str
    entity: str | None
    risk: float
    level: Level
    quota_share: float
    # [{"code", "text", "score"}, and "value", "threshold", "since" when kept], strongest first
    reasons: list[dict[str, Any]]
    queries: int
    shadow: bool
    updated_at: datetime
    links: list[dict[str, Any]] | None = None  # [{"other", "kinds", "weight", "joins", "cut"}]
    probation: bool = False  # an operator put the client on probation

    def __post_init__(self) -> None:
        # Rows written before the column existed read NULL: no probation.
        object.__setattr__(self, "probation", bool(self.probation))

    @property
    def action(self) -> Action:
        """What gateways apply: no level when shadowed; an operator's probation in any case."""
        if self.shadow:
            return Action("normal", probation=self.probation)
        return Action(self.level, self.quota_share, self.probation)


class StateReader(Protocol):
    async def actions(self) -> dict[str, Action]:
        """Every client whose action acts (a level other than normal, or probation)."""
        ...


def _upsert(conn_dialect: str) -> Any:
    """One row's upsert, executed with a list of rows: compiled once for any number of rows
    (a statement with the rows as VALUES is compiled again for each new row count)."""
    insert = postgresql.insert if conn_dialect == "postgresql" else sqlite.insert
    stmt = insert(client_risk)
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

    async def publish_following_pins(
        self, records: Sequence[ClientRecord], *, shadow_mode: bool
    ) -> builtins.list[ClientRecord]:
        """:meth:`publish` for the detector: each record's ``shadow`` and ``probation`` as
        the client's pin stands now, read under the pins' locks in the same transaction, so
        a verdict computed before an operator's pin never undoes it. Returns the records
        as published."""
        if not records:
            return []
        async with transaction(self.engine, write=True) as conn:
            clients = [r.client for r in records]
            await lock_pins(conn, clients)
            pins = await self.overrides_in(conn, clients)
            published = [
                replace(
                    r,
                    shadow=shadowed(pins.get(r.client), shadow_mode),
                    probation=pins.get(r.client) == "probation",
                )
                for r in records
            ]
            await self.publish_in(conn, published)
        return published

    @staticmethod
    async def publish_in(conn: AsyncConnection, records: Sequence[ClientRecord]) -> None:
        """:meth:`publish` inside the caller's (write) transaction; each record is also a
        row of the risk history (``client_risk_history``, pruned by the detector)."""
        if records:
            await conn.execute(_upsert(conn.dialect.name), [field_values(r) for r in records])
            await conn.execute(
                client_risk_history.insert(),
                [{"client": r.client, "at": r.updated_at, "risk": r.risk, "level": r.level}
                 for r in records],
            )

    async def actions(self) -> dict[str, Action]:
        c = client_risk.c
        query = select(client_risk).where(
            or_(and_(c.level != "normal", c.shadow.is_(False)), c.probation.is_(True))
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

    @staticmethod
    async def overrides_in(conn: AsyncConnection, clients: Sequence[str]) -> dict[str, str]:
        """The pins of ``clients`` (those that have one), inside the caller's transaction."""
        table, out = detection_overrides.c, {}
        for start in range(0, len(clients), 500):
            query = select(table.client, table.action).where(
                table.client.in_(clients[start : start + 500])
            )
            out.update({row.client: row.action for row in (await conn.execute(query)).all()})
        return out

    async def cuts(self) -> builtins.list[tuple[str, str]]:
        """Pairs of clients an operator cut apart (never one entity)."""
        async with transaction(self.engine) as conn:
            rows = (await conn.execute(select(detection_link_cuts))).all()
        return [(row.client, row.other) for row in rows]

    async def set_cut(self, a: str, b: str, *, cut: bool, note: str = "") -> None:
        """Cut the link between ``a`` and ``b`` (or restore it); repeating changes nothing."""
        async with transaction(self.engine, write=True) as conn:
            await self.set_cut_in(conn, a, b, cut=cut, note=note)

    @staticmethod
    async def set_cut_in(
        conn: AsyncConnection, a: str, b: str, *, cut: bool, note: str = ""
    ) -> None:
        """:meth:`set_cut` inside the caller's (write) transaction."""
        first, second = sorted((a, b))
        table = detection_link_cuts.c
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
    unenforced; a pin is the operator's own decision and acts in every mode: a pinned level,
    and ``probation`` (the level beside it is the detector's, so not applied).
    """

    def __init__(self, state: SqlState) -> None:
        self.state = state

    async def actions(self) -> dict[str, Action]:
        pins, c = detection_overrides.c, client_risk.c
        query = (
            select(c.client, c.level, c.quota_share, pins.action)
            .join(detection_overrides, pins.client == c.client)
            .where(
                or_(
                    and_(pins.action.in_(LEVELS), c.level != "normal"),
                    and_(pins.action == "probation", c.probation.is_(True)),
                )
            )
        )
        async with transaction(self.state.engine) as conn:
            rows = (await conn.execute(query)).all()
        return {
            row.client: Action("normal", probation=True)
            if row.action == "probation"
            else Action(row.level, row.quota_share)
            for row in rows
        }


class RedisState:
    """Actions that act in one hash: ``client -> {"level", "quota_share"}``, and
    ``"probation": true`` on probation; keys a reader does not know are ignored."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    async def publish(self, records: Sequence[ClientRecord]) -> None:
        acting = {r.client: r.action for r in records}
        pipe = self.redis.pipeline(transaction=False)
        for client, action in acting.items():
            if not action.acts:
                pipe.hdel(ACTIONS_KEY, client)
            else:
                pipe.hset(ACTIONS_KEY, client, orjson.dumps(_shared_value(action)))
        await pipe.execute()

    async def actions(self) -> dict[str, Action]:
        raw = await self.redis.hgetall(ACTIONS_KEY)
        return {
            (k.decode() if isinstance(k, bytes) else k): Action(**known(Action, orjson.loads(v)))
            for k, v in raw.items()
        }


def _shared_value(action: Action) -> dict[str, Any]:
    """The hash's value: ``probation`` only when set, so a replica older than it still reads
    every client that is not on probation."""
    value: dict[str, Any] = {"level": action.level, "quota_share": action.quota_share}
    if action.probation:
        value["probation"] = True
    return value
