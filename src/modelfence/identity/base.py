"""Types the identity layer hands to the rest of the gateway."""

from __future__ import annotations

import builtins
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from modelfence.config import (
    MAX_CONCURRENT_REQUESTS,
    MAX_REQUESTS_PER_MINUTE,
    MAX_TOKENS_PER_MINUTE,
    MAX_USD_PER_DAY,
)

log = logging.getLogger(__name__)

# field -> (largest value, whole units?): the bounds config and the admin API enforce.
_BOUNDS = {
    "requests_per_minute": (MAX_REQUESTS_PER_MINUTE, True),
    "tokens_per_minute": (MAX_TOKENS_PER_MINUTE, True),
    "concurrent_requests": (MAX_CONCURRENT_REQUESTS, True),
    "usd_per_day": (MAX_USD_PER_DAY, False),
}


@dataclass(frozen=True, slots=True)
class LimitOverrides:
    """Per-key replacements for tier limits, set through the admin API. ``None`` = keep tier."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    concurrent_requests: int | None = None
    usd_per_day: float | None = None

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any], key_id: str) -> LimitOverrides:
        """Overrides as stored, brought within today's bounds; reading one never fails.

        Earlier versions stored any number (``1e24``, ``0.5``): such a value is clamped
        into range (whole units rounded down, at least 1) and logged, so one old row can
        neither hang the limiter nor break listing every key.
        """
        kept: dict[str, float | int] = {}
        for name, value in stored.items():
            if name not in _BOUNDS or value is None:
                continue
            maximum, whole = _BOUNDS[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                log.warning("key %s: stored %s %r is not a number; the tier's applies",
                            key_id, name, value)
                continue
            clamped = min(float(value), float(maximum))
            clamped = max(1, math.floor(clamped)) if whole else max(clamped, 0.01)
            if clamped != value:
                log.warning("key %s: stored %s %r is out of range; %r applies",
                            key_id, name, value, clamped)
            kept[name] = clamped
        return cls(**kept)


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """An API key as stored: never the secret itself, only its keyed hash lives in the store."""

    key_id: str
    client: str
    tier: str
    prefix: str  # first characters of the key, for people to recognise it in lists
    created_at: datetime
    revoked_at: datetime | None = None
    overrides: LimitOverrides = field(default_factory=LimitOverrides)
    account: str | None = None  # the account (organisation) the key belongs to, if any

    @property
    def active(self) -> bool:
        return self.revoked_at is None


TRAITS = ("organisation", "payment", "signup_network", "email_domain")
"""Account metadata kept as keyed hashes: equal values link accounts, none can be read back."""


@dataclass(frozen=True, slots=True)
class AccountMetadata:
    """What the operator's sign-up and billing systems know of an account, in plain text.

    Given to :meth:`KeyStore.put_account`; a field left ``None`` keeps its stored value.
    The four traits are hashed before they are stored (``signup_address`` as its network
    prefix), so the database never holds them in the clear.
    """

    organisation: str | None = None  # the verified organisation's name, if verified
    payment: str | None = None  # the payment instrument's fingerprint from the processor
    signup_address: str | None = None  # the IP address the account signed up from
    email_domain: str | None = None  # or a whole address: only its domain is kept
    created_at: datetime | None = None  # sign-up time; default: when first registered here
    verified: bool | None = None  # the operator verified the organisation
    paid_usd: float | None = None  # paid spend to date


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """An account as stored: trust inputs in the clear, metadata only as keyed hashes."""

    account_id: str
    created_at: datetime
    verified: bool = False
    paid_usd: float = 0.0
    traits: Mapping[str, str] = field(default_factory=dict)  # TRAITS name -> keyed hash


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Who the request looks like, whatever key it carries; attached for later layers."""

    ip: str
    ip_prefix: str  # e.g. "203.0.113.0/24" or "2001:db8::/64"
    user_agent: str
    client_library: str  # e.g. "openai-python/1.40.0", "curl", "unknown"
    header_order: str  # lower-case header names in arrival order, joined with ","
    digest: str  # short stable hash of (ip_prefix, user_agent, header_order)


class KeyStore(Protocol):
    """Durable key storage (SQLite or PostgreSQL). Secrets never pass through it."""

    async def create(
        self, client: str, tier: str, account: str | None = None
    ) -> tuple[ApiKeyRecord, str]:
        """Create a key; return its record and the secret key, which is shown once.

        ``account`` must exist (:meth:`put_account`) or is registered bare, as of now.
        """
        ...

    async def put_account(self, account_id: str, metadata: AccountMetadata) -> AccountRecord:
        """Register the account or update it; fields of ``metadata`` left None are kept."""
        ...

    async def get_account(self, account_id: str) -> AccountRecord: ...

    async def accounts_changed_since(self, since: datetime) -> builtins.list[AccountRecord]:
        """Accounts registered or updated at or after ``since`` (for replica caches)."""
        ...

    async def list(self) -> builtins.list[ApiKeyRecord]: ...

    async def get(self, key_id: str) -> ApiKeyRecord: ...

    async def revoke(self, key_id: str) -> ApiKeyRecord: ...

    async def set_overrides(self, key_id: str, overrides: LimitOverrides) -> ApiKeyRecord: ...

    async def find_by_secret(self, secret: str) -> ApiKeyRecord | None:
        """The active or revoked record whose keyed hash matches ``secret``, if any."""
        ...

    # builtins.list: inside this class, plain ``list`` is the method above.
    async def changed_since(self, since: datetime) -> builtins.list[ApiKeyRecord]:
        """Records created, revoked or overridden at or after ``since`` (for replica caches)."""
        ...

    async def key_hashes(self, since: datetime | None = None) -> builtins.list[str]:
        """The keyed hashes of the keys changed at or after ``since`` (all keys if None):
        what a replica's key index is built from."""
        ...
