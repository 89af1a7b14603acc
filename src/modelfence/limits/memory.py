"""In-process limits for a single replica, and the guard's local fallback.

Each admission is decided in one synchronous step (no ``await`` inside), so concurrent
requests on the event loop can never interleave between check and consume. State that
equals "full bucket / nothing held" is dropped by a periodic sweep, so memory is bounded by
the subjects seen in the last minute (rates) or lease TTL (concurrency) or day (dollars).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from modelfence.config import LimitsConfig
from modelfence.limits import gcra
from modelfence.limits.base import AdmissionRequest, Decision, Dimension, Lease
from modelfence.limits.dimensions import (
    LEASE_RETRY_SECONDS,
    RateCheck,
    Scope,
    abandoned_lease,
    decide,
    lease_id_of,
    micro_usd,
    rate_checks,
    settle_check,
    until_next_day,
    utc_day,
)

Slot = tuple[Scope, str, str]  # (scope, subject, dimension): one GCRA bucket


def _slot(check: RateCheck) -> Slot:
    return (check.scope, check.subject, check.dimension)


class MemoryBackend:
    """:class:`~modelfence.limits.base.LimitBackend` keeping state in this process."""

    def __init__(
        self,
        *,
        lease_ttl_seconds: float = 900.0,
        clock: Callable[[], float] = time.time,
        sweep_interval_seconds: float = 60.0,
    ) -> None:
        self._lease_ttl = lease_ttl_seconds
        self._clock = clock
        self._sweep_interval = sweep_interval_seconds
        self._next_sweep = clock() + sweep_interval_seconds
        self._tats: dict[Slot, float] = {}
        self._leases: dict[str, dict[str, float]] = {}  # key id -> lease id -> expiry
        self._usd: dict[str, tuple[int, int]] = {}  # key id -> (UTC day, micro-dollars spent)

    @classmethod
    def from_config(cls, config: LimitsConfig) -> MemoryBackend:
        return cls(lease_ttl_seconds=config.lease_ttl_seconds)

    def __len__(self) -> int:
        """State entries held (buckets, keys with leases, dollar counters)."""
        return len(self._tats) + len(self._leases) + len(self._usd)

    def holds(self, lease: Lease) -> bool:
        """Whether ``lease`` was made here and is neither settled nor swept."""
        return lease.lease_id in self._leases.get(lease.key_id, {})

    async def admit(self, request: AdmissionRequest) -> Decision:
        now = self._clock()
        self._sweep(now)
        quota, key_id = request.quota, request.key_id
        checks = rate_checks(request)
        found = [self._tats.get(_slot(check), now) for check in checks]
        verdicts = [
            gcra.admit(check.rate, tat, now, check.cost)
            for check, tat in zip(checks, found, strict=True)
        ]
        denials: list[tuple[Dimension, float]] = [
            (check.dimension, verdict.retry_after)
            for check, verdict in zip(checks, verdicts, strict=True)
            if not verdict.allowed
        ]
        held = {lid: exp for lid, exp in self._leases.get(key_id, {}).items() if exp > now}
        if quota.concurrent_requests is not None and len(held) >= quota.concurrent_requests:
            denials.append(("concurrency", LEASE_RETRY_SECONDS))
        day = utc_day(now)
        spent = self._spent(key_id, day)
        usd_cost = micro_usd(request.usd)
        if quota.usd_per_day is not None:
            budget = micro_usd(quota.usd_per_day)
            if usd_cost > budget:
                denials.append(("usd", math.inf))
            elif spent + usd_cost > budget:
                denials.append(("usd", until_next_day(now)))

        if denials:
            outcomes = [
                (gcra.remaining(check.rate, tat, now), gcra.reset_seconds(tat, now))
                for check, tat in zip(checks, found, strict=True)
            ]
            return decide(checks, outcomes, denials)

        for check, verdict in zip(checks, verdicts, strict=True):
            self._tats[_slot(check)] = verdict.tat
        lease = Lease(key_id, lease_id_of(request), request.tokens, request.usd, quota, day)
        held[lease.lease_id] = now + self._lease_ttl
        self._leases[key_id] = held
        if quota.usd_per_day is not None:
            self._usd[key_id] = (day, spent + usd_cost)
        outcomes = [(verdict.remaining, verdict.reset_seconds) for verdict in verdicts]
        return decide(checks, outcomes, [], lease)

    async def settle(self, lease: Lease, tokens_used: int, usd_used: float) -> None:
        """Apply real usage and free the slot; a settled or expired lease is ignored."""
        now = self._clock()
        held = self._leases.get(lease.key_id, {})
        expiry = held.pop(lease.lease_id, None)
        if not held:
            self._leases.pop(lease.key_id, None)
        if expiry is None or expiry <= now:
            return
        check = settle_check(lease, tokens_used)
        if check is not None:
            slot = _slot(check)
            self._tats[slot] = gcra.adjust(check.rate, self._tats.get(slot, now), now, check.cost)
        if lease.quota.usd_per_day is not None and lease.key_id in self._usd:
            day, spent = self._usd[lease.key_id]
            if day == lease.day:  # after midnight the reservation belongs to a closed day
                delta = micro_usd(usd_used) - micro_usd(lease.usd_reserved)
                self._usd[lease.key_id] = (day, max(spent + delta, 0))

    async def abandon(self, request: AdmissionRequest) -> None:
        """Settle the lease to no usage if it was made; an admission here never half-fails."""
        now = self._clock()
        await self.settle(abandoned_lease(request, utc_day(now)), 0, 0.0)

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release."""

    def _spent(self, key_id: str, day: int) -> int:
        stored_day, spent = self._usd.get(key_id, (day, 0))
        return spent if stored_day == day else 0

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_interval
        today = utc_day(now)
        self._tats = {slot: tat for slot, tat in self._tats.items() if tat > now}
        self._leases = {
            key_id: live
            for key_id, held in self._leases.items()
            if (live := {lid: exp for lid, exp in held.items() if exp > now})
        }
        self._usd = {key_id: used for key_id, used in self._usd.items() if used[0] == today}
