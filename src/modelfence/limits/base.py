"""What the admission layer asks of a limit backend, and what it gets back.

Three separate things: the *definition* of a request's limits (:class:`Quota`), the
*algorithm* (GCRA for rates, a daily budget for dollars, leases for concurrency; see
``gcra.py``) and the *storage* that runs it (``memory.py`` in-process, ``redis.py`` shared
through one Lua script call). Every backend implements :class:`LimitBackend`.
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
from dataclasses import dataclass
from typing import Literal, Protocol

Dimension = Literal[
    "requests",
    "tokens",
    "concurrency",
    "usd",
    "ip_prefix",
    "fingerprint",
    "account_rows",
    "account_tokens",
    "backend",
]
DecisionSource = Literal["backend", "fail_open", "fail_closed", "degraded"]


ALLOWANCE_WINDOW_DAYS = 30  # the long window of an account allowance, in UTC days


@dataclass(frozen=True, slots=True)
class Allowance:
    """An account's budget over UTC days, shared by all its keys; ``None`` = unlimited.

    Rows are inputs (classifier rows, embedding texts, prompts), reserved in full at
    admission, so one large batch cannot be answered before it is counted. Tokens are
    reserved as for the per-minute rate and settled to real usage. The long window is
    rolling (the last :data:`ALLOWANCE_WINDOW_DAYS` days, today included): no calendar
    reset lets a thief spend two months' budget across one midnight.
    """

    rows_per_day: int | None = None
    rows_per_30_days: int | None = None
    tokens_per_day: int | None = None
    tokens_per_30_days: int | None = None

    @property
    def limited(self) -> bool:
        return any(
            value is not None
            for value in (
                self.rows_per_day,
                self.rows_per_30_days,
                self.tokens_per_day,
                self.tokens_per_30_days,
            )
        )

    def scaled(self, share: float) -> Allowance:
        """The share one replica may spend alone (degraded mode): at least one unit of a
        limit that allows any (a limit of 0 stays 0)."""

        def part(value: int | None) -> int | None:
            return value if not value else max(math.floor(value * share), 1)

        return Allowance(
            rows_per_day=part(self.rows_per_day),
            rows_per_30_days=part(self.rows_per_30_days),
            tokens_per_day=part(self.tokens_per_day),
            tokens_per_30_days=part(self.tokens_per_30_days),
        )


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits that apply to one request, resolved from its tier and per-key overrides.

    ``None`` means unlimited in that dimension. Rates are per minute, dollars per UTC day.
    """

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    concurrent_requests: int | None = None
    usd_per_day: float | None = None
    ip_prefix_requests_per_minute: float | None = None
    fingerprint_requests_per_minute: float | None = None
    allowance: Allowance | None = None  # the account's, when the request names one

    def scaled(self, share: float) -> Quota:
        """The share of this quota one replica may spend on its own (degraded mode)."""

        def part(value: float | None) -> float | None:
            return None if value is None else max(value * share, 1.0)

        concurrency = self.concurrent_requests
        return Quota(
            requests_per_minute=part(self.requests_per_minute),
            tokens_per_minute=part(self.tokens_per_minute),
            concurrent_requests=None if concurrency is None else max(int(concurrency * share), 1),
            usd_per_day=None if self.usd_per_day is None else self.usd_per_day * share,
            ip_prefix_requests_per_minute=part(self.ip_prefix_requests_per_minute),
            fingerprint_requests_per_minute=part(self.fingerprint_requests_per_minute),
            allowance=None if self.allowance is None else self.allowance.scaled(share),
        )


class _LeaseIds:
    """Lease ids unique across replicas and restarts: a random prefix per process (drawn
    again in a forked child) and a counter. Ids name leases, they guard nothing, so they
    need no fresh randomness per request (a system call each, on the hot path)."""

    def __init__(self) -> None:
        self._reseed()
        if hasattr(os, "register_at_fork"):  # not on Windows, where nothing forks
            os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


new_lease_id = _LeaseIds()


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """One request's claim: who, from where, and how much it reserves before running.

    ``lease_id``, when the caller sets it (fresh for every call), names the lease before
    the backend is asked, so an admission whose answer was lost (a timeout after the store
    ran it) can still be undone by that id (:meth:`LimitBackend.abandon`). Left ``None``,
    the backend picks one. ``account`` and ``rows`` charge ``quota.allowance`` (checked only
    when both the account and the allowance are set). ``key_account`` is the key's own
    account, charged or not: a cluster keeps the key's counters in its slot, so what is
    charged (an operator's probation of a key without one) never moves them.
    """

    key_id: str
    quota: Quota
    tokens: int = 0
    usd: float = 0.0
    ip_prefix: str | None = None
    fingerprint: str | None = None
    lease_id: str | None = None
    account: str | None = None
    rows: int = 1
    key_account: str | None = None


@dataclass(frozen=True, slots=True)
class DimensionState:
    """State of one rate dimension after the decision, for the ``x-ratelimit-*`` headers."""

    limit: int
    remaining: int
    reset_seconds: float


@dataclass(frozen=True, slots=True)
class AccountUsage:
    """An account's allowance use after the decision (after charging if allowed)."""

    rows_today: int
    rows_30_days: int
    tokens_today: int
    tokens_30_days: int


@dataclass(frozen=True, slots=True)
class Lease:
    """What :meth:`LimitBackend.settle` needs to adjust reservations and free concurrency."""

    key_id: str
    lease_id: str
    tokens_reserved: int
    usd_reserved: float
    quota: Quota
    day: int  # UTC day number the dollars (and the account's rows, tokens) were charged to
    account: str | None = None  # set when the account's allowance was charged
    rows_reserved: int = 0
    key_account: str | None = None  # the key's account, charged or not (a cluster's slot)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    source: DecisionSource = "backend"
    denied_by: Dimension | None = None
    retry_after: float = 0.0
    requests: DimensionState | None = None
    tokens: DimensionState | None = None
    lease: Lease | None = None
    account: AccountUsage | None = None  # when an allowance was checked


class LimitBackend(Protocol):
    """Storage + algorithm for admission. All methods are safe under concurrency."""

    settles_at_once: bool
    """True when :meth:`settle` never waits (state in this process): no cancellation can
    cut it short, so a caller may await it directly instead of shielding it in a task."""

    async def admit(self, request: AdmissionRequest) -> Decision:
        """Decide every dimension atomically; reserve tokens, dollars and a lease if allowed."""
        ...

    async def settle(self, lease: Lease, tokens_used: int, usd_used: float) -> None:
        """Replace the reservation with real usage and release the concurrency lease."""
        ...

    async def abandon(self, request: AdmissionRequest) -> None:
        """Undo an :meth:`admit` whose outcome is unknown (it failed after it may have run).

        ``request`` is the one given to that call, with its ``lease_id`` set.
        Frees the lease and refunds the reservation if the admission took effect, and
        makes sure it cannot take effect later; does nothing if it never did.
        """
        ...

    async def ping(self) -> None:
        """Raise :class:`~modelfence.errors.LimitBackendError` if the backend is unreachable."""
        ...

    async def close(self) -> None: ...
