"""API keys in the state database (SQLite or PostgreSQL): the durable :class:`KeyStore`."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, Select, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from modelfence.errors import AccountNotFound, KeyNotFound
from modelfence.identity.accounts import hashed_traits
from modelfence.identity.base import AccountMetadata, AccountRecord, ApiKeyRecord, LimitOverrides
from modelfence.identity.keys import display_prefix, new_api_key, new_key_id
from modelfence.identity.secret import ServerSecret
from modelfence.store.database import transaction
from modelfence.store.schema import account_traits, accounts, api_keys

_RECORD_COLUMNS = (
    api_keys.c.key_id,
    api_keys.c.client,
    api_keys.c.tier,
    api_keys.c.prefix,
    api_keys.c.created_at,
    api_keys.c.revoked_at,
    api_keys.c.overrides,
    api_keys.c.account,
)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SqlKeyStore:
    """:class:`~modelfence.identity.base.KeyStore` on an engine from ``open_engine``.

    Keys are stored as their keyed hash only. Every change stamps ``updated_at`` with
    ``clock()``, which is what :meth:`changed_since` and the replicas' caches rely on.
    Tier names are not checked here: the admin API and the CLI check them against the
    config. Database failures raise :class:`~modelfence.errors.StoreError`; metadata the
    store refuses raises :class:`~modelfence.identity.accounts.InvalidMetadata`. A
    sign-up address is hashed as its network: ``ipv4_prefix`` / ``ipv6_prefix`` bits.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        secret: ServerSecret,
        *,
        clock: Callable[[], datetime] = _utc_now,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 64,
    ) -> None:
        self._engine = engine
        self._secret = secret
        self._clock = clock
        self._prefixes = {"ipv4_prefix": ipv4_prefix, "ipv6_prefix": ipv6_prefix}

    async def create(
        self, client: str, tier: str, account: str | None = None
    ) -> tuple[ApiKeyRecord, str]:
        api_key = new_api_key()
        now = self._clock()
        record = ApiKeyRecord(
            key_id=new_key_id(),
            client=client,
            tier=tier,
            prefix=display_prefix(api_key),
            created_at=now,
            account=account,
        )
        async with transaction(self._engine, write=True) as conn:
            if account is not None:
                await self._upsert_account(conn, account, AccountMetadata(), {}, now)
            await conn.execute(
                api_keys.insert().values(
                    key_id=record.key_id,
                    client=client,
                    tier=tier,
                    prefix=record.prefix,
                    key_hash=self._secret.hash_api_key(api_key),
                    created_at=now,
                    updated_at=now,
                    overrides={},
                    account=account,
                )
            )
        return record, api_key

    async def put_account(self, account_id: str, metadata: AccountMetadata) -> AccountRecord:
        traits = hashed_traits(metadata, self._secret, **self._prefixes)
        async with transaction(self._engine, write=True) as conn:
            await self._upsert_account(conn, account_id, metadata, traits, self._clock())
            return await _fetch_account(conn, account_id)

    async def get_account(self, account_id: str) -> AccountRecord:
        async with transaction(self._engine) as conn:
            return await _fetch_account(conn, account_id)

    async def accounts_changed_since(self, since: datetime) -> builtins.list[AccountRecord]:
        async with transaction(self._engine) as conn:
            result = await conn.execute(
                select(accounts).where(accounts.c.updated_at >= since).order_by(
                    accounts.c.updated_at
                )
            )
            return [_account(row) for row in result]

    @staticmethod
    async def _upsert_account(
        conn: AsyncConnection,
        account_id: str,
        metadata: AccountMetadata,
        traits: dict[str, str],
        now: datetime,
    ) -> None:
        # Read, then insert or update, inside one write transaction: SQLite's write lock
        # serialises concurrent registrations; on PostgreSQL the row lock (FOR UPDATE)
        # serialises updates, while two first registrations of one account at once can
        # collide on the primary key (one of the two callers gets StoreError, a 503).
        query = select(accounts).where(accounts.c.account_id == account_id)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = (await conn.execute(query)).first()
        changes: dict[str, Any] = {"updated_at": now}
        if metadata.created_at is not None:
            changes["created_at"] = metadata.created_at
        if metadata.verified is not None:
            changes["verified"] = metadata.verified
        if metadata.paid_usd is not None:
            changes["paid_usd"] = metadata.paid_usd
        if row is None:
            await conn.execute(
                accounts.insert().values(
                    account_id=account_id,
                    **{"created_at": now, "verified": False, "paid_usd": 0.0, **changes},
                    traits=traits,
                )
            )
        elif len(changes) > 1 or traits:
            await conn.execute(
                accounts.update()
                .where(accounts.c.account_id == account_id)
                .values(**changes, traits={**row.traits, **traits})
            )
        if traits:  # the lookup of accounts sharing a trait follows the account's traits
            await conn.execute(
                account_traits.delete().where(
                    account_traits.c.account_id == account_id,
                    account_traits.c.trait.in_(list(traits)),
                )
            )
            await conn.execute(
                account_traits.insert(),
                [{"trait": name, "hash": value, "account_id": account_id}
                 for name, value in traits.items()],
            )

    async def list(self) -> builtins.list[ApiKeyRecord]:
        """Every key, oldest first."""
        return await self._select(
            _select_records().order_by(api_keys.c.created_at, api_keys.c.key_id)
        )

    async def get(self, key_id: str) -> ApiKeyRecord:
        async with transaction(self._engine) as conn:
            return await _fetch(conn, key_id)

    async def revoke(self, key_id: str) -> ApiKeyRecord:
        """Revoke the key; revoking it again keeps the first revocation time."""
        now = self._clock()
        async with transaction(self._engine, write=True) as conn:
            await conn.execute(
                api_keys.update()
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now, updated_at=now)
            )
            return await _fetch(conn, key_id)

    async def set_overrides(self, key_id: str, overrides: LimitOverrides) -> ApiKeyRecord:
        """Replace the key's overrides as a whole (fields left ``None`` fall back to the tier)."""
        stored = {name: value for name, value in asdict(overrides).items() if value is not None}
        async with transaction(self._engine, write=True) as conn:
            await conn.execute(
                api_keys.update()
                .where(api_keys.c.key_id == key_id)
                .values(overrides=stored, updated_at=self._clock())
            )
            return await _fetch(conn, key_id)

    async def find_by_secret(self, secret: str) -> ApiKeyRecord | None:
        found = await self._select(
            _select_records().where(api_keys.c.key_hash == self._secret.hash_api_key(secret))
        )
        return found[0] if found else None

    async def changed_since(self, since: datetime) -> builtins.list[ApiKeyRecord]:
        return await self._select(
            _select_records().where(api_keys.c.updated_at >= since).order_by(api_keys.c.updated_at)
        )

    async def key_hashes(self, since: datetime | None = None) -> builtins.list[str]:
        query = select(api_keys.c.key_hash)
        if since is not None:
            query = query.where(api_keys.c.updated_at >= since)
        async with transaction(self._engine) as conn:
            return list((await conn.execute(query)).scalars())

    async def _select(self, query: Select[Any]) -> builtins.list[ApiKeyRecord]:
        async with transaction(self._engine) as conn:
            result = await conn.execute(query)
            return [_record(row) for row in result]


def _select_records() -> Select[Any]:
    return select(*_RECORD_COLUMNS)


async def _fetch(conn: AsyncConnection, key_id: str) -> ApiKeyRecord:
    row = (await conn.execute(_select_records().where(api_keys.c.key_id == key_id))).first()
    if row is None:
        raise KeyNotFound(f"no API key with id {key_id!r}")
    return _record(row)


async def _fetch_account(conn: AsyncConnection, account_id: str) -> AccountRecord:
    query = select(accounts).where(accounts.c.account_id == account_id)
    row = (await conn.execute(query)).first()
    if row is None:
        raise AccountNotFound(f"no account with id {account_id!r}")
    return _account(row)


def _account(row: Row[Any]) -> AccountRecord:
    return AccountRecord(
        account_id=row.account_id,
        created_at=row.created_at,
        verified=row.verified,
        paid_usd=row.paid_usd,
        traits=dict(row.traits),
    )


def _record(row: Row[Any]) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=row.key_id,
        client=row.client,
        tier=row.tier,
        prefix=row.prefix,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        overrides=LimitOverrides.from_stored(row.overrides, row.key_id),
        account=row.account,
    )
