"""Request and response bodies of the admin API; they are what its OpenAPI describes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field

from modelfence.identity.base import ApiKeyRecord, LimitOverrides

_PositiveRate = Annotated[float, Field(gt=0, allow_inf_nan=False)]


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


class CreateKey(_Body):
    client: str = Field(min_length=1, max_length=200, description="who the key belongs to")
    tier: str = Field("default", min_length=1, description="a tier name from the config")


class Limits(_Body):
    """Per-key limits replacing the tier's; a field left out (null) keeps the tier's value."""

    requests_per_minute: _PositiveRate | None = None
    tokens_per_minute: _PositiveRate | None = None
    concurrent_requests: Annotated[int, Field(gt=0)] | None = None
    usd_per_day: _PositiveRate | None = None

    @classmethod
    def from_overrides(cls, overrides: LimitOverrides) -> Limits:
        return cls(
            requests_per_minute=overrides.requests_per_minute,
            tokens_per_minute=overrides.tokens_per_minute,
            concurrent_requests=overrides.concurrent_requests,
            usd_per_day=overrides.usd_per_day,
        )

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
                **extra,
            }
        )


class CreatedKey(Key):
    """A new key: ``CreatedKey.from_record(record, api_key=secret)``."""

    api_key: str = Field(description="the secret key: shown in this response only, store it now")


class KeyList(BaseModel):
    data: list[Key]
