"""Accounts: metadata stored as keyed hashes, upgrades in place, the registry's cache, trust."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.config import AccountsConfig, AllowanceConfig
from modelfence.errors import AccountNotFound
from modelfence.identity import KeyRegistry, ServerSecret, SqlKeyStore
from modelfence.identity.accounts import InvalidMetadata
from modelfence.identity.base import AccountMetadata, AccountRecord, ApiKeyRecord
from modelfence.identity.trust import TrustPolicy
from modelfence.limits.base import Allowance
from modelfence.store import create_tables, transaction
from modelfence.store.schema import accounts

from .test_identity_store import engine  # noqa: F401  (fixture, on SQLite and PostgreSQL)
from .test_store_database import scratch_engine, store_url  # noqa: F401  (store_url: fixture)

SECRET = ServerSecret(b"test-secret-0123456789abcdef")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(engine: AsyncEngine) -> SqlKeyStore:  # noqa: F811
    return SqlKeyStore(engine, SECRET)


async def test_metadata_is_stored_only_as_keyed_hashes(
    store: SqlKeyStore, engine: AsyncEngine  # noqa: F811
) -> None:
    plain = AccountMetadata(
        organisation="Acme  Ltd",
        payment="card_fp_4242",
        signup_address="203.0.113.77",
        email_domain="Ops@Acme.example",
        created_at=T0,
        verified=True,
        paid_usd=12.5,
    )
    record = await store.put_account("acct-1", plain)
    assert (record.created_at, record.verified, record.paid_usd) == (T0, True, 12.5)
    assert sorted(record.traits) == ["email_domain", "organisation", "payment", "signup_network"]
    async with transaction(engine) as conn:
        dump = str((await conn.execute(select(accounts))).all())
    for secret_text in ("Acme", "acme", "4242", "203.0.113", "example"):
        assert secret_text not in dump
    # The same organisation, card, network and domain, spelt differently, hash alike.
    other = await store.put_account(
        "acct-2",
        AccountMetadata(
            organisation="acme ltd",
            payment=" card_fp_4242 ",
            signup_address="203.0.113.5",
            email_domain="acme.example",
        ),
    )
    assert other.traits == record.traits
    third = await store.put_account("acct-3", AccountMetadata(signup_address="203.0.114.5"))
    assert third.traits["signup_network"] != record.traits["signup_network"]


async def test_an_update_keeps_what_it_does_not_name(store: SqlKeyStore) -> None:
    first = await store.put_account("acct", AccountMetadata(payment="card-a", created_at=T0))
    second = await store.put_account("acct", AccountMetadata(verified=True, paid_usd=30.0))
    assert second.created_at == T0 and second.verified and second.paid_usd == 30.0
    assert second.traits == first.traits
    assert await store.get_account("acct") == second


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        (AccountMetadata(signup_address="not-an-address"), "signup_address"),
        (AccountMetadata(email_domain="@"), "email_domain"),
        (AccountMetadata(payment="   "), "payment"),
        (AccountMetadata(organisation="x" * 513), "organisation"),
        (AccountMetadata(paid_usd=float("nan")), "paid_usd"),
        (AccountMetadata(paid_usd=-1.0), "paid_usd"),
        (AccountMetadata(created_at=datetime(2030, 1, 1)), "created_at"),  # naive
    ],
)
async def test_bad_metadata_is_refused_naming_the_field_and_stores_nothing(
    store: SqlKeyStore, metadata: AccountMetadata, field: str
) -> None:
    with pytest.raises(InvalidMetadata) as caught:
        await store.put_account("acct", metadata)
    assert caught.value.field == field
    with pytest.raises(AccountNotFound):
        await store.get_account("acct")


async def test_a_key_created_in_a_new_account_registers_it_bare(store: SqlKeyStore) -> None:
    record, _ = await store.create("svc", "default", "fresh-acct")
    assert record.account == "fresh-acct" and (await store.get(record.key_id)).account == "fresh-acct"
    account = await store.get_account("fresh-acct")
    assert account.created_at == record.created_at and not account.verified and not account.traits


async def test_accounts_changed_since(store: SqlKeyStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    await store.put_account("a", AccountMetadata())
    assert [a.account_id for a in await store.accounts_changed_since(before)] == ["a"]
    assert await store.accounts_changed_since(datetime.now(UTC) + timedelta(seconds=5)) == []


async def test_a_database_made_before_accounts_is_upgraded_in_place(tmp_path: Path) -> None:
    async with scratch_engine(f"sqlite:///{tmp_path / 'old.db'}") as db:
        async with transaction(db, write=True) as conn:  # the first release's table
            await conn.execute(text(
                "CREATE TABLE api_keys (key_id VARCHAR(32) PRIMARY KEY, client VARCHAR(200) "
                "NOT NULL, tier VARCHAR(64) NOT NULL, prefix VARCHAR(16) NOT NULL, key_hash "
                "VARCHAR(64) NOT NULL, created_at DATETIME NOT NULL, updated_at DATETIME NOT "
                "NULL, revoked_at DATETIME, overrides JSON NOT NULL)"
            ))
            await conn.execute(text(
                "INSERT INTO api_keys VALUES ('key_old', 'legacy', 'default', 'mf_abc', "
                "'h', '2029-01-01 00:00:00', '2029-01-01 00:00:00', NULL, '{}')"
            ))
        await create_tables(db)
        await create_tables(db)  # a second start finds nothing to do
        store = SqlKeyStore(db, SECRET)
        old = await store.get("key_old")
        assert old.client == "legacy" and old.account is None
        new, _ = await store.create("svc", "default", "acct")
        assert {k.client: k.account for k in await store.list()} == {"legacy": None, "svc": "acct"}
        assert new.account == "acct"


async def test_the_registry_caches_accounts_and_sees_updates(tmp_path: Path) -> None:
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as db:
        await create_tables(db)
        store = SqlKeyStore(db, SECRET)
        await store.put_account("acct", AccountMetadata(created_at=T0))
        _, api_key = await store.create("svc", "default", "acct")
        registry = KeyRegistry(store, SECRET)
        assert registry.account("acct") is None  # nothing read before the key is used
        await registry.authenticate(api_key)
        cached = registry.account("acct")
        assert cached is not None and not cached.verified
        await store.put_account("acct", AccountMetadata(verified=True))
        await registry.refresh()
        refreshed = registry.account("acct")
        assert refreshed is not None and refreshed.verified


class Accounts:
    def __init__(self, *records: AccountRecord) -> None:
        self.records = {record.account_id: record for record in records}

    def account(self, account_id: str) -> AccountRecord | None:
        return self.records.get(account_id)


def key(account: str | None, created_at: datetime = T0) -> ApiKeyRecord:
    return ApiKeyRecord("key_1", "svc", "default", "mf_x", created_at, account=account)


CONFIG = AccountsConfig(
    allowances={
        "probation": AllowanceConfig(rows_per_day=300, rows_per_30_days=3000),
        "standard": AllowanceConfig(rows_per_day=100_000),
        "trusted": AllowanceConfig(),
    }
)


def policy(*records: AccountRecord, days: float) -> TrustPolicy:
    now = (T0 + timedelta(days=days)).timestamp()
    return TrustPolicy(CONFIG, Accounts(*records), clock=lambda: now)


def test_a_new_unverified_unpaid_account_is_on_probation_until_it_ages() -> None:
    record = AccountRecord("acct", created_at=T0)
    young = policy(record, days=2).standing(key("acct"))
    assert young.level == "probation" and "new account" in young.reason
    assert young.allowance == Allowance(rows_per_day=300, rows_per_30_days=3000)
    assert young.widens_at == T0 + timedelta(days=7)
    grown = policy(record, days=8).standing(key("acct"))
    assert grown.level == "standard" and grown.allowance == Allowance(rows_per_day=100_000)


@pytest.mark.parametrize(
    "record",
    [
        AccountRecord("acct", created_at=T0, verified=True),
        AccountRecord("acct", created_at=T0, paid_usd=20.0),
    ],
    ids=["verified", "paid"],
)
def test_verification_or_payment_ends_probation_early(record: AccountRecord) -> None:
    assert policy(record, days=1).standing(key("acct")).level == "standard"


def test_trust_grows_with_history_and_falls_with_risk() -> None:
    old = AccountRecord("acct", created_at=T0, verified=True)
    trust = policy(old, days=100)
    assert trust.standing(key("acct")).level == "trusted"
    assert trust.standing(key("acct")).allowance is None  # trusted: unlimited here
    assert trust.standing(key("acct"), "alert").level == "standard"
    assert trust.standing(key("acct"), "tighten").level == "standard"  # timing, volume: no more
    demoted = trust.standing(key("acct"), "degrade")
    assert demoted.level == "probation" and demoted.widens_at is None
    assert demoted.reason == "account under review"  # a 429 says no more than that


def test_keys_without_an_account_and_unknown_accounts() -> None:
    trust = policy(days=30)
    assert trust.standing(key(None)).level == "standard"
    # An account this replica has not read yet is judged from its key's age.
    assert trust.standing(key("unread", created_at=T0 + timedelta(days=29))).level == "probation"


async def test_sign_up_times_in_the_future_and_mapped_addresses(store: SqlKeyStore) -> None:
    with pytest.raises(InvalidMetadata) as caught:
        await store.put_account("acct", AccountMetadata(created_at=datetime(9999, 12, 30, tzinfo=UTC)))
    assert caught.value.field == "created_at"
    mapped = await store.put_account("m", AccountMetadata(signup_address="::ffff:203.0.113.5"))
    plain = await store.put_account("p", AccountMetadata(signup_address="203.0.113.77"))
    other = await store.put_account("o", AccountMetadata(signup_address="::ffff:8.8.8.8"))
    assert mapped.traits == plain.traits != other.traits


def test_an_allowance_given_for_one_level_keeps_the_others_defaults() -> None:
    config = AccountsConfig.model_validate({"allowances": {"standard": {"rows_per_day": 5}}})
    assert config.allowance("probation").rows_per_day == 300
    assert config.allowance("standard").rows_per_day == 5
