"""How an :class:`AdmissionRequest` becomes checks; shared by every storage.

The storages differ in where state lives and how atomicity is had (one event-loop step,
one Lua call); what is checked, against which subject, and how outcomes turn into a
:class:`Decision` is decided here once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Literal

from modelfence.limits.base import (
    ALLOWANCE_WINDOW_DAYS,
    AccountUsage,
    AdmissionRequest,
    Decision,
    Dimension,
    DimensionState,
    Lease,
    new_lease_id,
)
from modelfence.limits.gcra import Rate

PERIOD_SECONDS = 60.0  # quotas are per minute
DAY_SECONDS = 86_400  # dollar budgets and account allowances count UTC days
LEASE_RETRY_SECONDS = 1.0  # a concurrency slot frees when a request ends: no better guess
MICROS_PER_USD = 1_000_000

Scope = Literal["k", "ip", "fp"]  # API key, client IP prefix, client fingerprint
RateDimension = Literal["requests", "tokens", "ip_prefix", "fingerprint"]
AllowanceDimension = Literal["account_rows", "account_tokens"]


@dataclass(frozen=True, slots=True)
class RateCheck:
    """One GCRA bucket, ``dimension`` of ``subject`` in ``scope``, and the units to charge."""

    dimension: RateDimension
    scope: Scope
    subject: str
    rate: Rate
    cost: int


def rate_checks(request: AdmissionRequest) -> list[RateCheck]:
    """The rate buckets this request must fit into; unlimited dimensions are left out."""
    quota = request.quota
    wanted: list[tuple[RateDimension, Scope, str | None, float | None, int]] = [
        ("requests", "k", request.key_id, quota.requests_per_minute, 1),
        ("tokens", "k", request.key_id, quota.tokens_per_minute, request.tokens),
        ("ip_prefix", "ip", request.ip_prefix, quota.ip_prefix_requests_per_minute, 1),
        ("fingerprint", "fp", request.fingerprint, quota.fingerprint_requests_per_minute, 1),
    ]
    return [
        RateCheck(dimension, scope, subject, per_minute(limit), cost)
        for dimension, scope, subject, limit, cost in wanted
        if subject is not None and limit is not None
    ]


@lru_cache(maxsize=4096)  # a few tiers' limits, and their shares under detection
def per_minute(limit: float) -> Rate:
    """The rate of ``limit`` units a minute, made once (rates are frozen)."""
    return Rate(limit, PERIOD_SECONDS)


@dataclass(frozen=True, slots=True)
class AllowanceCheck:
    """One window of an account allowance, the last ``days`` UTC days with today, and the
    units the request charges to it."""

    dimension: AllowanceDimension
    days: int
    limit: int
    cost: int


def allowance_checks(request: AdmissionRequest) -> list[AllowanceCheck]:
    """The allowance windows this request must fit into; none unless it names an account
    whose allowance limits something (then rows and tokens are charged, limited or not)."""
    allowance = request.quota.allowance
    if request.account is None or allowance is None:
        return []
    wanted: list[tuple[AllowanceDimension, int, int | None, int]] = [
        ("account_rows", 1, allowance.rows_per_day, request.rows),
        ("account_rows", ALLOWANCE_WINDOW_DAYS, allowance.rows_per_30_days, request.rows),
        ("account_tokens", 1, allowance.tokens_per_day, request.tokens),
        ("account_tokens", ALLOWANCE_WINDOW_DAYS, allowance.tokens_per_30_days, request.tokens),
    ]
    return [
        AllowanceCheck(dimension, days, limit, cost)
        for dimension, days, limit, cost in wanted
        if limit is not None
    ]


def allowance_span(checks: Sequence[AllowanceCheck]) -> int:
    """Days of counters to read: the longest window (only today when no window is long)."""
    return max((check.days for check in checks), default=1)


def window_start(today: int) -> int:
    """The oldest UTC day still inside an allowance's long window."""
    return today - ALLOWANCE_WINDOW_DAYS + 1


def allowance_wait(check: AllowanceCheck, used: Sequence[int], today: int, now: float) -> float:
    """Seconds until ``check.cost`` fits its window if nothing more is used (0: fits now).

    ``used`` holds the counter of each day of the window, oldest first, today last. The
    window drops day ``d`` at the start of day ``d + check.days``; ``math.inf`` when the
    request alone is over the limit, so the caller answers "request too large".
    """
    if check.cost > check.limit:
        return math.inf
    excess = sum(used) + check.cost - check.limit
    if excess <= 0:
        return 0.0
    first = today - len(used) + 1
    freed_on = next(
        day for day, freed in zip(range(first, today + 1), accumulate(used)) if freed >= excess
    )
    return (freed_on + check.days) * DAY_SECONDS - now


def account_usage(rows: Sequence[int], tokens: Sequence[int]) -> AccountUsage:
    """Usage from the daily counters read, today last: :func:`allowance_span` days, so
    without a 30-day limit the 30-day figures are today's alone (no more is read)."""
    return AccountUsage(rows[-1], sum(rows), tokens[-1], sum(tokens))


def settle_check(lease: Lease, tokens_used: int) -> RateCheck | None:
    """The tokens bucket a settle adjusts, ``cost`` being the units to charge (< 0: refund)."""
    limit = lease.quota.tokens_per_minute
    if limit is None:
        return None
    units = tokens_used - lease.tokens_reserved
    return RateCheck("tokens", "k", lease.key_id, per_minute(limit), units)


def lease_id_of(request: AdmissionRequest) -> str:
    return new_lease_id() if request.lease_id is None else request.lease_id


def lease_for(request: AdmissionRequest, lease_id: str, day: int) -> Lease:
    """The lease an admission of ``request`` on UTC ``day`` makes."""
    charged = bool(allowance_checks(request))
    return Lease(
        request.key_id,
        lease_id,
        request.tokens,
        request.usd,
        request.quota,
        day,
        account=request.account if charged else None,
        rows_reserved=request.rows if charged else 0,
        key_account=request.key_account,
    )


def abandoned_lease(request: AdmissionRequest, day: int) -> Lease:
    """The lease ``request`` made if its admission took effect on UTC ``day``."""
    if request.lease_id is None:
        raise ValueError("only an admission whose lease_id the caller chose can be abandoned")
    return lease_for(request, request.lease_id, day)


def micro_usd(usd: float) -> int:
    """Dollars as whole micro-dollars, so budgets add up without float drift."""
    return round(usd * MICROS_PER_USD)


def utc_day(now: float) -> int:
    return math.floor(now / DAY_SECONDS)


def until_next_day(now: float) -> float:
    return (utc_day(now) + 1) * DAY_SECONDS - now


def decide(
    checks: list[RateCheck],
    outcomes: Iterable[tuple[int, float]],
    denials: list[tuple[Dimension, float]],
    lease: Lease | None = None,
    account: AccountUsage | None = None,
) -> Decision:
    """The :class:`Decision` for these checks; ``lease`` is the one made if all passed.

    ``outcomes`` holds ``(remaining, reset_seconds)`` per check and ``account`` the
    allowance use, when checked: after consuming if allowed, as found if not. When several
    dimensions deny, the one that takes longest to clear is reported, since the request
    needs all of them.
    """
    states = {
        check.dimension: DimensionState(math.floor(check.rate.capacity), remaining, reset)
        for check, (remaining, reset) in zip(checks, outcomes, strict=True)
    }
    requests, tokens = states.get("requests"), states.get("tokens")
    if not denials:
        return Decision(True, lease=lease, requests=requests, tokens=tokens, account=account)
    denied_by, retry_after = max(denials, key=lambda denial: denial[1])
    return Decision(
        False,
        denied_by=denied_by,
        retry_after=retry_after,
        requests=requests,
        tokens=tokens,
        account=account,
    )
