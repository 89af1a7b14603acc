"""In-process limits for a single replica, and the guard's local fallback.

Each admission is decided in one synchronous step (no ``await`` inside), so concurrent
requests on the event loop can never interleave between check and consume. State that
equals "full bucket / nothing held" is dropped by a periodic sweep, so memory is bounded by
the subjects seen in the last minute (rates) or lease TTL (concurrency) or day (dollars) or
allowance window (accounts).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from modelfence.config import LimitsConfig
from modelfence.limits import gcra
from modelfence.limits.base import AccountUsage, AdmissionRequest, Decision, Dimension, Lease
from modelfence.limits.dimensions import (
    LEASE_RETRY_SECONDS,
    RateCheck,
    Scope,
    abandoned_lease,
    account_usage,
    allowance_checks,
    allowance_span,
    allowance_wait,
    decide,
    lease_for,
    lease_id_of,
    micro_usd,
    rate_checks,
    settle_check,
    until_next_day,
    utc_day,
    window_start,
)

Slot = tuple[Scope, str, str]  # (scope, subject, dimension): one GCRA bucket
Counters = tuple[int, int]  # an account's (rows, tokens) of one UTC day


def _slot(check: RateCheck) -> Slot:
    return (check.scope, check.subject, check.dimension)


class MemoryBackend:
    """:class:`~modelfence.limits.base.LimitBackend` keeping state in this process."""

    settles_at_once = True

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
        self._accounts: dict[str, dict[int, Counters]] = {}  # account -> UTC day -> counters

    @classmethod
    def from_config(cls, config: LimitsConfig) -> MemoryBackend:
        return cls(lease_ttl_seconds=config.lease_ttl_seconds)

    def __len__(self) -> int:
        """State entries held (buckets, keys with leases, dollar counters, accounts)."""
        return len(self._tats) + len(self._leases) + len(self._usd) + len(self._accounts)

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
        windows = allowance_checks(request)
        account = request.account if windows else None
        rows, tokens = self._account_counters(account, day, allowance_span(windows))
        for window in windows:
            used = rows if window.dimension == "account_rows" else tokens
            wait = allowance_wait(window, used[-window.days :], day, now)
            if wait > 0:
                denials.append((window.dimension, wait))

        if denials:
            outcomes = [
                (gcra.remaining(check.rate, tat, now), gcra.reset_seconds(tat, now))
                for check, tat in zip(checks, found, strict=True)
            ]
            return decide(checks, outcomes, denials, account=self._usage(account, rows, tokens))

        for check, verdict in zip(checks, verdicts, strict=True):
            self._tats[_slot(check)] = verdict.tat
        lease = lease_for(request, lease_id_of(request), day)
        held[lease.lease_id] = now + self._lease_ttl
        self._leases[key_id] = held
        if quota.usd_per_day is not None:
            self._usd[key_id] = (day, spent + usd_cost)
        if account is not None:
            rows[-1] += request.rows
            tokens[-1] += request.tokens
            self._accounts.setdefault(account, {})[day] = (rows[-1], tokens[-1])
        outcomes = [(verdict.remaining, verdict.reset_seconds) for verdict in verdicts]
        return decide(checks, outcomes, [], lease, self._usage(account, rows, tokens))

    async def settle(self, lease: Lease, tokens_used: int, usd_used: float) -> None:
        """Apply real usage and free the slot; a settled or expired lease is ignored."""
        self._release(lease, tokens_used, usd_used, lease.rows_reserved)

    async def abandon(self, request: AdmissionRequest) -> None:
        """Settle the lease to no usage, rows included, if it was made; an admission here
        never half-fails."""
        now = self._clock()
        self._release(abandoned_lease(request, utc_day(now)), 0, 0.0, 0)

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release."""

    def _release(self, lease: Lease, tokens_used: int, usd_used: float, rows_used: int) -> None:
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
        # A day that has left the window counts no more: adjusting it would change nothing.
        if lease.account is not None and lease.day >= window_start(utc_day(now)):
            days = self._accounts.setdefault(lease.account, {})
            rows, tokens = days.get(lease.day, (0, 0))
            days[lease.day] = (
                max(rows + rows_used - lease.rows_reserved, 0),
                max(tokens + tokens_used - lease.tokens_reserved, 0),
            )

    def _account_counters(
        self, account: str | None, today: int, span: int
    ) -> tuple[list[int], list[int]]:
        """Rows and tokens of the ``span`` days up to ``today``, oldest first (none: zeros)."""
        days = {} if account is None else self._accounts.get(account, {})
        counters = [days.get(day, (0, 0)) for day in range(today - span + 1, today + 1)]
        return [rows for rows, _ in counters], [tokens for _, tokens in counters]

    @staticmethod
    def _usage(account: str | None, rows: list[int], tokens: list[int]) -> AccountUsage | None:
        return None if account is None else account_usage(rows, tokens)

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
        oldest = window_start(today)
        self._accounts = {
            account: recent
            for account, days in self._accounts.items()
            if (recent := {day: used for day, used in days.items() if day >= oldest})
        }
