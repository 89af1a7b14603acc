"""What the account page reads: an account as registered, its trust, keys, clients and kin.

The record and its standing come from the identity layer through ``app.py``
(:class:`AccountSource`: the key store's ``get_account`` and the trust policy's
``assess``, exactly what ``GET /admin/v1/accounts/{account}`` answers with); the rest is
read from the state database here, like the client page. Keys are read without their
hashes; traits are keyed hashes already, shown shortened.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.console.data import Hour, timeline_hours, timeline_query
from modelfence.errors import AccountNotFound
from modelfence.identity.base import TRAITS, AccountRecord
from modelfence.identity.trust import Standing
from modelfence.store import transaction
from modelfence.store.schema import (
    account_traits,
    accounts,
    api_keys,
    client_risk,
    request_events,
)

MAX_ROWS = 500  # keys, clients and related accounts shown per account page
SHORT_HASH = 8  # hex digits of a trait's keyed hash shown: enough to compare by eye


@dataclass(frozen=True, slots=True)
class AccountSource:
    """The identity layer's part, wired in ``app.py``.

    ``read`` raises :class:`~modelfence.errors.AccountNotFound` for an unknown account;
    ``standing`` is the trust policy's assessment now (as the admin API reports it).
    """

    read: Callable[[str], Awaitable[AccountRecord]]
    standing: Callable[[AccountRecord], Standing]


@dataclass(frozen=True, slots=True)
class Trait:
    name: str
    short_hash: str | None  # None: the account has no such trait


@dataclass(frozen=True, slots=True)
class AccountKey:
    """A key of the account: its public id and prefix, never the key or its hash."""

    key_id: str
    prefix: str
    client: str
    tier: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class AccountClient:
    client: str
    risk: float | None  # None: not scored by the detector yet
    level: str | None


@dataclass(frozen=True, slots=True)
class Kin:
    """Another account sharing at least one trait with this one: the linking evidence."""

    account: str
    shared: tuple[str, ...]  # trait names with equal keyed hashes
    verified: bool


@dataclass(frozen=True, slots=True)
class AccountView:
    record: AccountRecord
    standing: Standing
    traits: list[Trait]
    keys: list[AccountKey]
    key_count: int
    clients: list[AccountClient]
    kin: list[Kin]
    timeline: list[Hour]  # the last 24 hours, oldest first, across the account's keys

    max_rows: int = MAX_ROWS  # keys, clients and related accounts listed at most


class AccountData:
    """Reads for ``/console/account``; ``source`` is what ``app.py`` hands the console."""

    def __init__(self, engine: AsyncEngine, source: AccountSource) -> None:
        self.engine = engine
        self.source = source

    async def account(self, account_id: str) -> AccountView | None:
        """The account's page, or None when no account has that id."""
        try:
            record = await self.source.read(account_id)
        except AccountNotFound:
            return None
        now = datetime.now(UTC)
        owned = select(api_keys.c.key_id).where(api_keys.c.account == account_id)
        users = select(api_keys.c.client).where(api_keys.c.account == account_id)
        async with transaction(self.engine) as conn:
            key_count = (
                await conn.execute(
                    select(func.count()).select_from(api_keys).where(
                        api_keys.c.account == account_id
                    )
                )
            ).scalar_one()
            keys = (
                await conn.execute(
                    select(
                        api_keys.c.key_id, api_keys.c.prefix, api_keys.c.client, api_keys.c.tier,
                        api_keys.c.created_at, api_keys.c.revoked_at,
                    )
                    .where(api_keys.c.account == account_id)
                    .order_by(api_keys.c.created_at, api_keys.c.key_id)
                    .limit(MAX_ROWS)
                )
            ).all()
            clients = (await conn.execute(_clients(account_id))).all()
            kin = (await conn.execute(_kin(record))).all() if _traits(record) else []
            # Both conditions: the (client, ts) index finds the rows, the key id keeps a
            # client that also holds another account's keys from counting those.
            recent = (
                await conn.execute(
                    timeline_query(
                        request_events.c.client.in_(users) & request_events.c.key_id.in_(owned),
                        now - timedelta(hours=24),
                    )
                )
            ).all()
        return AccountView(
            record=record,
            standing=self.source.standing(record),
            traits=[
                Trait(name, _short(record.traits[name]) if name in record.traits else None)
                for name in TRAITS
            ],
            keys=[AccountKey(*key) for key in keys],
            key_count=int(key_count),
            clients=[AccountClient(*row) for row in clients],
            kin=[
                Kin(
                    row.account_id,
                    tuple(n for n in TRAITS if n in record.traits
                          and row.traits.get(n) == record.traits[n]),
                    row.verified,
                )
                for row in kin
            ],
            timeline=timeline_hours(recent, now),
        )


def _traits(record: AccountRecord) -> bool:
    return any(name in TRAITS for name in record.traits)


def _short(keyed_hash: str) -> str:
    return keyed_hash[:SHORT_HASH]


def _clients(account_id: str) -> Select[Any]:
    """The clients holding the account's keys, riskiest first (unscored ones last)."""
    users = select(api_keys.c.client).where(api_keys.c.account == account_id).distinct().subquery()
    return (
        select(users.c.client, client_risk.c.risk, client_risk.c.level)
        .select_from(users.outerjoin(client_risk, client_risk.c.client == users.c.client))
        .order_by(func.coalesce(client_risk.c.risk, -1.0).desc(), users.c.client)
        .limit(MAX_ROWS)
    )


def _kin(record: AccountRecord) -> Select[Any]:
    """Other accounts with a trait whose keyed hash equals one of ``record``'s, the first
    ``MAX_ROWS`` by id: found through ``account_traits``' primary key (trait, hash,
    account), so the cost follows the accounts sharing a trait, not all accounts."""
    t = account_traits.c
    shares = [
        (t.trait == name) & (t.hash == value)
        for name, value in record.traits.items()
        if name in TRAITS
    ]
    kin = (
        select(t.account_id)
        .where(or_(*shares), t.account_id != record.account_id)
        .distinct()
        .order_by(t.account_id)
        .limit(MAX_ROWS)
    )
    return (
        select(accounts.c.account_id, accounts.c.traits, accounts.c.verified)
        .where(accounts.c.account_id.in_(kin))
        .order_by(accounts.c.account_id)
    )
