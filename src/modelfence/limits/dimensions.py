"""How an :class:`AdmissionRequest` becomes checks; shared by every storage.

The storages differ in where state lives and how atomicity is had (one event-loop step,
one Lua call); what is checked, against which subject, and how outcomes turn into a
:class:`Decision` is decided here once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from modelfence.limits.base import (
    AdmissionRequest,
    Decision,
    Dimension,
    DimensionState,
    Lease,
    new_lease_id,
)
from modelfence.limits.gcra import Rate

PERIOD_SECONDS = 60.0  # quotas are per minute
DAY_SECONDS = 86_400  # dollar budgets are per UTC day
LEASE_RETRY_SECONDS = 1.0  # a concurrency slot frees when a request ends: no better guess
MICROS_PER_USD = 1_000_000

Scope = Literal["k", "ip", "fp"]  # API key, client IP prefix, client fingerprint
RateDimension = Literal["requests", "tokens", "ip_prefix", "fingerprint"]


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
        RateCheck(dimension, scope, subject, Rate(limit, PERIOD_SECONDS), cost)
        for dimension, scope, subject, limit, cost in wanted
        if subject is not None and limit is not None
    ]


def settle_check(lease: Lease, tokens_used: int) -> RateCheck | None:
    """The tokens bucket a settle adjusts, ``cost`` being the units to charge (< 0: refund)."""
    limit = lease.quota.tokens_per_minute
    if limit is None:
        return None
    units = tokens_used - lease.tokens_reserved
    return RateCheck("tokens", "k", lease.key_id, Rate(limit, PERIOD_SECONDS), units)


def lease_id_of(request: AdmissionRequest) -> str:
    return new_lease_id() if request.lease_id is None else request.lease_id


def abandoned_lease(request: AdmissionRequest, day: int) -> Lease:
    """The lease ``request`` made if its admission took effect on UTC ``day``."""
    if request.lease_id is None:
        raise ValueError("only an admission whose lease_id the caller chose can be abandoned")
    return Lease(request.key_id, request.lease_id, request.tokens, request.usd, request.quota, day)


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
) -> Decision:
    """The :class:`Decision` for these checks; ``lease`` is the one made if all passed.

    ``outcomes`` holds ``(remaining, reset_seconds)`` per check: after consuming if
    allowed, as found if not. When several dimensions deny, the one that takes longest to
    clear is reported, since the request needs all of them.
    """
    states = {
        check.dimension: DimensionState(math.floor(check.rate.capacity), remaining, reset)
        for check, (remaining, reset) in zip(checks, outcomes, strict=True)
    }
    requests, tokens = states.get("requests"), states.get("tokens")
    if not denials:
        return Decision(True, lease=lease, requests=requests, tokens=tokens)
    denied_by, retry_after = max(denials, key=lambda denial: denial[1])
    return Decision(
        False, denied_by=denied_by, retry_after=retry_after, requests=requests, tokens=tokens
    )
