"""Trust per account: probation for newcomers, wider allowances with age, payment, verification.

A thief's identities are cheap only while a new account can buy as much as an old one.
Here a new, unverified, unpaid account is on probation, with a small daily allowance (see
``accounts.allowances`` in the config) that widens when the account ages past
``probation_days``, pays, or is verified; risk found by detection takes trust away again.
An operator can also put one client on probation (its pin), whatever its account's trust.
An unvouched account created during a sign-up surge (``signups.py``) is held: on probation
with the surge allowance, by default nothing, until it verifies, pays or ages out.
The level is computed on the request path from the cached account record: a dictionary
lookup and some date arithmetic, cached per account for a minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from modelfence.config import AccountsConfig, AllowanceConfig, TrustLevelName
from modelfence.detect.actions import rank
from modelfence.identity.base import AccountRecord, ApiKeyRecord
from modelfence.limits.base import Allowance

_CACHE_SECONDS = 60.0
_CACHE_MAX = 100_000


class AccountLookup(Protocol):
    def account(self, account_id: str) -> AccountRecord | None:
        """The cached record of the account, if this replica knows it (never blocks)."""
        ...


class Surges(Protocol):
    """Sign-up surges (``signups.SignupWatch``): whether an account's sign-up time fell in one."""

    generation: int  # changes whenever the answer of ``held`` may have changed

    def held(self, created_at: float) -> object | None: ...


@dataclass(frozen=True, slots=True)
class Standing:
    """An account's trust level now, why, and the allowance that goes with it."""

    level: TrustLevelName
    reason: str
    allowance: Allowance | None  # None: unlimited
    widens_at: datetime | None = None  # when probation ends by age alone, if it will
    by_operator: bool = False  # an operator's probation pin, not the account's record


def _allowance(config: AllowanceConfig) -> Allowance | None:
    allowance = Allowance(**config.model_dump())
    return allowance if allowance.limited else None


class TrustPolicy:
    """Computes :class:`Standing` from an account record, the config and the risk level.

    ``clock`` returns seconds since the epoch (tests pass a fake one).
    """

    def __init__(
        self,
        config: AccountsConfig,
        accounts: AccountLookup,
        *,
        surges: Surges | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._accounts = accounts
        self._surges = surges
        self._clock = clock
        self._allowances = {
            level: _allowance(config.allowance(level))
            for level in ("probation", "standard", "trusted")
        }
        self._held = _allowance(config.surge.allowance)
        self._cache: dict[tuple[str, str], tuple[AccountRecord, float, int, Standing]] = {}
        self._pinned = Standing(
            "probation", "put on probation by an operator", self._allowances["probation"],
            by_operator=True,
        )

    def standing(
        self, key: ApiKeyRecord, risk_level: str = "normal", *, probation: bool = False
    ) -> Standing:
        """The key's account's standing; keys without an account are ``standard``.

        ``probation``: an operator put the key's client on probation, which wins over the
        account's record (and applies to keys without an account).
        """
        if probation:
            return self._pinned
        if key.account is None:
            # No account, nothing to charge an allowance to: the tier's limits alone apply.
            return Standing("standard", "key without an account", None)
        record = self._accounts.account(key.account)
        if record is None:  # not yet read by this replica: judged as a bare new account
            record = AccountRecord(key.account, created_at=key.created_at)
        now = self._clock()
        generation = 0 if self._surges is None else self._surges.generation
        cached = self._cache.get((key.account, risk_level))
        if cached is not None and cached[0] is record and cached[1] > now and cached[2] == generation:
            return cached[3]
        standing = self.assess(record, risk_level, now)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[(key.account, risk_level)] = (record, now + _CACHE_SECONDS, generation, standing)
        return standing

    def assess(self, record: AccountRecord, risk_level: str, now: float) -> Standing:
        config = self._config
        days = (now - record.created_at.timestamp()) / 86_400
        risk = rank(risk_level)
        if risk >= rank(config.demote_at):
            # Said to the client in a 429: "under review", not what detection found.
            return self._standing("probation", "account under review")
        unvouched = not record.verified and record.paid_usd < config.probation_paid_usd
        if unvouched and days < config.probation_days:
            widens = (record.created_at + timedelta(days=config.probation_days)).astimezone(UTC)
            if self._surges is not None and self._surges.held(record.created_at.timestamp()):
                reason = "signed up during a surge of new accounts, held until verified or paid"
                return Standing("probation", reason, self._held, widens)
            reason = (
                f"new account ({days:.1f} of {config.probation_days:g} days), unverified, unpaid"
            )
            return self._standing("probation", reason, widens)
        vouched = record.verified or record.paid_usd >= config.trusted_paid_usd
        if vouched and days >= config.trusted_days and risk == 0:
            return self._standing("trusted", "verified or paid, with history")
        if risk > 0:
            return self._standing("standard", "account under review")
        return self._standing("standard", "established account")

    def _standing(
        self, level: TrustLevelName, reason: str, widens_at: datetime | None = None
    ) -> Standing:
        return Standing(level, reason, self._allowances[level], widens_at)
