"""Request and response bodies of the admin API; they are what its OpenAPI describes."""

from __future__ import annotations

from datetime import datetime
from typing import Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from modelfence.admin.names import Name
from modelfence.config import ConcurrentRequests, RequestsPerMinute, TokensPerMinute, UsdPerDay
from modelfence.identity.accounts import MAX_PAID_USD, MAX_TRAIT_LENGTH
from modelfence.identity.base import AccountMetadata, ApiKeyRecord, LimitOverrides


class _Body(BaseModel):
    # Strict: "5" or true is not a number, and a misspelt field is an error, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI-style error body, as the gateway answers too."""

    error: ErrorDetail


class AccountFields(_Body):
    """What the operator's sign-up and billing systems know of an account.

    The four traits are stored only as keyed hashes (accounts sharing one are linked by
    detection); a field left out keeps its stored value.
    """

    organisation: str | None = Field(
        None, min_length=1, max_length=MAX_TRAIT_LENGTH, description="verified organisation"
    )
    payment: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_TRAIT_LENGTH,
        description="the payment instrument's fingerprint from the payment processor",
    )
    signup_address: str | None = Field(
        None, min_length=2, max_length=64, description="IP address the account signed up from"
    )
    email_domain: str | None = Field(
        None, min_length=1, max_length=MAX_TRAIT_LENGTH, description="or a whole address"
    )
    created_at: AwareDatetime | None = Field(
        None, strict=False, description="sign-up time (default: when first registered here)"
    )
    verified: bool | None = Field(None, description="the organisation has been verified")
    paid_usd: float | None = Field(None, ge=0, le=MAX_PAID_USD, description="paid to date")

    @field_validator("created_at", mode="before")
    @classmethod
    def _iso_text(cls, value: object) -> object:
        # Non-strict only to parse ISO 8601 text; a number is not a time here.
        if value is not None and not isinstance(value, str):
            raise ValueError("must be an ISO 8601 time with a time zone, e.g. 2026-01-31T12:00:00Z")
        return value

    def to_metadata(self) -> AccountMetadata:
        return AccountMetadata(**self.model_dump())


class CreateKey(_Body):
    client: Name = Field(description="who the key belongs to")
    tier: str = Field("default", min_length=1, description="a tier name from the config")
    account: Name | None = Field(
        None, description="the account (organisation) the key belongs to; registered if new"
    )
    metadata: AccountFields | None = Field(
        None, description="the account's sign-up and billing metadata (needs `account`)"
    )


class Limits(_Body):
    """Per-key limits replacing the tier's; a field left out (null) keeps the tier's value."""

    requests_per_minute: RequestsPerMinute | None = None
    tokens_per_minute: TokensPerMinute | None = None
    concurrent_requests: ConcurrentRequests | None = None
    usd_per_day: UsdPerDay | None = None

    @classmethod
    def from_overrides(cls, overrides: LimitOverrides) -> Limits:
        # Whole floats stored by earlier versions (60.0) are read as the integers they are.
        return cls.model_validate({name: getattr(overrides, name) for name in cls.model_fields})

    def to_overrides(self) -> LimitOverrides:
        return LimitOverrides(**self.model_dump())


class Key(BaseModel):
    """An API key as listed: never the secret key, nor its hash."""

    key_id: str
    client: str
    tier: str
    prefix: str = Field(description="the first characters of the secret key, to recognise it")
    created_at: datetime
    revoked_at: datetime | None
    active: bool
    limits: Limits
    account: str | None = None

    @classmethod
    def from_record(cls, record: ApiKeyRecord, **extra: object) -> Self:
        return cls.model_validate(
            {
                "key_id": record.key_id,
                "client": record.client,
                "tier": record.tier,
                "prefix": record.prefix,
                "created_at": record.created_at,
                "revoked_at": record.revoked_at,
                "active": record.active,
                "limits": Limits.from_overrides(record.overrides),
                "account": record.account,
                **extra,
            }
        )


class CreatedKey(Key):
    """A new key: ``CreatedKey.from_record(record, api_key=secret)``."""

    api_key: str = Field(description="the secret key: shown in this response only, store it now")


class KeyList(BaseModel):
    data: list[Key]
