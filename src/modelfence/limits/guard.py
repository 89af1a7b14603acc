"""What admission does when the shared backend fails: the configured choice, never silence.

``open`` admits, ``closed`` refuses (the gateway answers 503), ``degraded`` decides with a
local :class:`MemoryBackend` on ``quota.scaled(share)``, so N replicas together admit about
``N * share`` of each limit. Every such decision calls ``on_fallback(mode)`` (the gateway
counts it in Prometheus) and logs a warning, at most one line per ``log_interval_seconds``.

After a failure the primary is left alone for ``probe_interval_seconds``, so an unreachable
Redis costs one timeout per interval rather than one per request; the next admission after
that tries it again, and once it answers every admission goes back to it.

Nothing the primary failed to release is forgotten: a failed settle, and a failed admission
(which may have run before its answer was lost), are retried in the background by
:class:`DeferredReleases` until the lease is freed and the reservation refunded, each step
reported to ``on_release``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from modelfence.errors import LimitBackendError
from modelfence.limits.base import AdmissionRequest, Decision, Lease, LimitBackend, new_lease_id
from modelfence.limits.memory import MemoryBackend
from modelfence.limits.releases import DeferredReleases, ReleaseEvent
from modelfence.throttled_log import ThrottledLog

FallbackMode = Literal["open", "closed", "degraded"]

logger = logging.getLogger(__name__)


class GuardedBackend:
    """:class:`~modelfence.limits.base.LimitBackend` that survives its primary failing.

    >>> backend = GuardedBackend(
    ...     RedisBackend.from_url("redis://127.0.0.1:6379/0"),
    ...     mode="degraded",
    ...     share=0.25,
    ...     on_fallback=lambda mode: fallbacks.labels(mode).inc(),
    ...     on_release=lambda event: releases.labels(event).inc(),
    ... )
    """

    settles_at_once = False  # a round trip: settles are shielded in a task

    def __init__(
        self,
        primary: LimitBackend,
        *,
        mode: FallbackMode,
        share: float,
        on_fallback: Callable[[str], None],
        on_release: Callable[[ReleaseEvent], None],
        local: MemoryBackend | None = None,
        releases: DeferredReleases | None = None,
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
        self._fallback_log = ThrottledLog(logger, log_interval_seconds, clock)
        self._settle_log = ThrottledLog(logger, log_interval_seconds, clock)
        self.releases = DeferredReleases(on_event=on_release) if releases is None else releases
        self.settle_errors = 0  # settles the primary failed at once; retried in the background

    async def admit(self, request: AdmissionRequest) -> Decision:
        now = self._clock()
        if now >= self._primary_after:
            # The lease id is fixed before asking, so a lost answer can still be undone.
            claim = request if request.lease_id else replace(request, lease_id=new_lease_id())
            try:
                return await self._primary.admit(claim)
            except LimitBackendError as exc:
                self._primary_after = now + self._probe_interval
                self._last_error = str(exc)
                self.releases.defer(
                    lambda: self._primary.abandon(claim),
                    "admit_failed",
                    f"undoing of a lost admission of key {claim.key_id}",
                )
        return await self._fall_back(request)

    async def settle(self, lease: Lease, tokens_used: int, usd_used: float) -> None:
        """Settle where the lease was made; a primary failure is retried later, never raised."""
        if self._local.holds(lease):
            await self._local.settle(lease, tokens_used, usd_used)
            return
        try:
            await self._primary.settle(lease, tokens_used, usd_used)
        except LimitBackendError as exc:
            self.settle_errors += 1
            self._settle_log.warning(
                "could not settle a lease of key %s (retrying in the background): %s",
                lease.key_id,
                exc,
            )
            self.releases.defer(
                lambda: self._primary.settle(lease, tokens_used, usd_used),
                "settle_failed",
                f"settle of a lease of key {lease.key_id}",
            )

    async def abandon(self, request: AdmissionRequest) -> None:
        """Undo it wherever it was admitted; a primary failure is retried later, never raised."""
        await self._local.abandon(request)
        try:
            await self._primary.abandon(request)
        except LimitBackendError:
            self.releases.defer(
                lambda: self._primary.abandon(request),
                "admit_failed",
                f"undoing of an admission of key {request.key_id}",
            )

    async def ping(self) -> None:
        await self._primary.ping()

    async def close(self) -> None:
        await self.releases.close()
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
