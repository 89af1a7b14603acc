"""Admin routes of accounts: register or update one, and see its trust and keys.

``PUT /admin/v1/accounts/{account}`` takes the account's sign-up and billing metadata
(stored as keyed hashes; fields left out are kept); ``GET`` shows the record, its trust
level with the reason and the allowance that level gets, and the account's keys.
``GET /admin/v1/signups`` shows this replica's sign-up surge watch: the recent sign-ups
against their baseline, and the surges whose unverified accounts are held.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from modelfence.admin.errors import error_responses, invalid_field
from modelfence.admin.names import Name
from modelfence.admin.schemas import AccountFields, Key
from modelfence.config import AllowanceConfig, TrustLevelName
from modelfence.identity.accounts import InvalidMetadata
from modelfence.identity.base import AccountRecord, KeyStore
from modelfence.identity.signups import SignupWatch
from modelfence.identity.trust import TrustPolicy

log = logging.getLogger(__name__)

AccountPath = Annotated[Name, Path(description="the account's id in the operator's systems")]


class Trust(BaseModel):
    level: TrustLevelName
    reason: str
    allowance: AllowanceConfig = Field(description="fields left unset are unlimited")
    widens_at: datetime | None = Field(None, description="when probation ends by age alone")


class Account(BaseModel):
    account: str
    created_at: datetime
    verified: bool
    paid_usd: float
    traits: dict[str, str] = Field(
        description="metadata present, as keyed hashes: equal hashes mean equal values"
    )
    trust: Trust = Field(description="as of now, before any risk detection adds")
    keys: list[Key]


def accounts_router(store: KeyStore, trust: TrustPolicy) -> APIRouter:
    router = APIRouter(
        prefix="/v1/accounts", tags=["accounts"], responses=error_responses(401, 422, 503)
    )

    async def view(record: AccountRecord) -> Account:
        standing = trust.assess(record, "normal", time.time())
        allowance = standing.allowance
        keys = [key for key in await store.list() if key.account == record.account_id]
        return Account(
            account=record.account_id,
            created_at=record.created_at,
            verified=record.verified,
            paid_usd=record.paid_usd,
            traits=dict(record.traits),
            trust=Trust(
                level=standing.level,
                reason=standing.reason,
                allowance=AllowanceConfig()
                if allowance is None
                else AllowanceConfig.model_validate(allowance, from_attributes=True),
                widens_at=standing.widens_at,
            ),
            keys=[Key.from_record(key) for key in keys],
        )

    @router.put("/{account}")
    async def put_account(account: AccountPath, body: AccountFields) -> Account:
        """Register the account or update its metadata; fields left out are kept."""
        try:
            record = await store.put_account(account, body.to_metadata())
        except InvalidMetadata as exc:
            raise invalid_field((exc.field,), exc.reason) from exc
        log.info("admin: account %r registered or updated (%s)", account,
                 ", ".join(sorted(body.model_dump(exclude_none=True))) or "no fields")
        return await view(record)

    @router.get("/{account}", responses=error_responses(404))
    async def get_account(account: AccountPath) -> Account:
        return await view(await store.get_account(account))

    return router


class SignupWindow(BaseModel):
    hours: float
    signups: int
    expected: float | None = Field(description="what the baseline predicts; null until it has a day of history")


class SignupSurge(BaseModel):
    start: datetime
    end: datetime
    accounts: int = Field(description="sign-ups between start and end, honest newcomers included")
    expected: float
    window_hours: float = Field(description="the window whose test found it")


class Signups(BaseModel):
    enabled: bool
    windows: list[SignupWindow]
    surges: list[SignupSurge] = Field(
        description="unverified, unpaid accounts created inside one are held (accounts.surge.allowance)"
    )


def signups_router(watch: SignupWatch, *, enabled: bool) -> APIRouter:
    router = APIRouter(prefix="/v1/signups", tags=["accounts"], responses=error_responses(401, 503))

    @router.get("")
    async def get_signups() -> Signups:
        """Sign-ups against their baseline, and the surges this replica found."""
        now = time.time()
        return Signups(
            enabled=enabled,
            windows=[SignupWindow(hours=h, signups=n, expected=e) for h, n, e in watch.windows(now)],
            surges=[
                SignupSurge(start=datetime.fromtimestamp(s.start, UTC), end=datetime.fromtimestamp(s.end, UTC),
                            accounts=s.accounts, expected=round(s.expected, 2), window_hours=s.window_hours)
                for s in watch.surges
            ],
        )

    return router
