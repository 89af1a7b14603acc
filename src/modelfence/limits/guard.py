"""What admission does when the shared backend fails: the configured choice, never silence.

``open`` admits, ``closed`` refuses (the gateway answers 503), ``degraded`` decides with a
local :class:`MemoryBackend` on ``quota.scaled(share)``, so N replicas together admit about
``N * share`` of each limit. Every such decision calls ``on_fallback(mode)`` (the gateway
counts it in Prometheus) and logs a warning, at most one line per ``log_interval_seconds``.

After a failure the primary is left alone for ``probe_interval_seconds``, so an unreachable
Redis costs one timeout per interval rather than one per request; the next admission after
that tries it again, and once it answers every admission goes back to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from modelfence.errors import LimitBackendError
from modelfence.limits.base import AdmissionRequest, Decision, Lease, LimitBackend
from modelfence.limits.memory import MemoryBackend

FallbackMode = Literal["open", "closed", "degraded"]

logger = logging.getLogger(__name__)


class _ThrottledLog:
    """Warnings at most once per ``interval`` seconds, each saying how many were held back."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self._interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._held_back = 0

    def warning(self, message: str, *args: object) -> None:
        now = self._clock()
        if now < self._next:
            self._held_back += 1
            return
        if self._held_back:
            message += " (%d similar warnings held back)"
            args += (self._held_back,)
        logger.warning(message, *args)
        self._held_back = 0
        self._next = now + self._interval


class GuardedBackend:
    """:class:`~modelfence.limits.base.LimitBackend` that survives its primary failing.

    >>> backend = GuardedBackend(
    ...     RedisBackend.from_url("redis://127.0.0.1:6379/0"),
    ...     mode="degraded",
    ...     share=0.25,
    ...     on_fallback=lambda mode: fallbacks.labels(mode).inc(),
    ... )
    """

    def __init__(
        self,
        primary: LimitBackend,
        *,
        mode: FallbackMode,
        share: float,
        on_fallback: Callable[[str], None],
        local: MemoryBackend | None = None,
        clock: Callable[[], float] = time.monotonic,
        probe_interval_seconds: float = 1.0,
        log_interval_seconds: float = 5.0,
    ) -> None:
        self._primary = primary
        self._mode: FallbackMode = mode
        self._share = share
        self._on_fallback = on_fallback
        self._local = MemoryBackend() if local is None else local
        self._clock = clock
        self._probe_interval = probe_interval_seconds
        self._primary_after = float("-inf")  # primary skipped until this clock reading
        self._last_error = ""
        self._fallback_log = _ThrottledLog(log_interval_seconds, clock)
        self._settle_log = _ThrottledLog(log_interval_seconds, clock)
        self.settle_errors = 0  # settles the primary failed; their leases expire by TTL

    async def admit(self, request: AdmissionRequest) -> Decision:
        now = self._clock()
        if now >= self._primary_after:
            try:
                return await self._primary.admit(request)
            except LimitBackendError as exc:
                self._primary_after = now + self._probe_interval
                self._last_error = str(exc)
        return await self._fall_back(request)

    async def settle(self, lease: Lease, tokens_used: int, usd_used: float) -> None:
        """Settle where the lease was made; a primary failure is counted, never raised."""
        if self._local.holds(lease):
            await self._local.settle(lease, tokens_used, usd_used)
            return
        try:
            await self._primary.settle(lease, tokens_used, usd_used)
        except LimitBackendError as exc:
            self.settle_errors += 1
            self._settle_log.warning("could not settle a lease of key %s: %s", lease.key_id, exc)

    async def ping(self) -> None:
        await self._primary.ping()

    async def close(self) -> None:
        await self._primary.close()
        await self._local.close()

    async def _fall_back(self, request: AdmissionRequest) -> Decision:
        self._on_fallback(self._mode)
        self._fallback_log.warning(
            "limit backend unavailable (%s); deciding %s, e.g. for key %s",
            self._last_error,
            self._mode,
            request.key_id,
        )
        if self._mode == "open":
            return Decision(True, source="fail_open")
        if self._mode == "closed":
            return Decision(
                False, source="fail_closed", denied_by="backend", retry_after=self._probe_interval
            )
        local = replace(request, quota=request.quota.scaled(self._share))
        return replace(await self._local.admit(local), source="degraded")
