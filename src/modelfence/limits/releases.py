"""Releases the shared backend could not take at once, retried in the background.

A settle that fails leaves a concurrency lease held until its TTL (minutes) and the
reservation charged; an admission that timed out may have run anyway and left both behind.
Each such release is queued here and retried, off the request path, until it succeeds or
``give_up_after_seconds`` pass. One worker drains the queue in order, so an unreachable
store costs one attempt per backoff step (doubling to ``max_backoff_seconds``), never one
per pending release, and holds at most one connection. A release that fails goes to the
back of the queue, so one that keeps failing does not hold up the others.

Every step is reported to ``on_event`` (the gateway counts them in Prometheus): the
reason a release was queued (``settle_failed``, ``admit_failed``), ``retried`` per
background attempt, ``released`` when one finally succeeds, ``dropped`` when one is given
up (its lease then expires by TTL), pushed out of a full queue, or left at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from modelfence.errors import LimitBackendError
from modelfence.throttled_log import ThrottledLog

DeferReason = Literal["settle_failed", "admit_failed"]
ReleaseEvent = Literal["settle_failed", "admit_failed", "retried", "released", "dropped"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    attempt: Callable[[], Awaitable[None]]
    what: str  # for the log: which key, and settle or abandon
    deadline: float


class DeferredReleases:
    """A bounded queue of release calls and the one task that retries them.

    >>> releases = DeferredReleases(on_event=lambda event: counter.labels(event).inc())
    >>> releases.defer(lambda: backend.settle(lease, 10, 0.0), "settle_failed", "settle of k1")
    """

    def __init__(
        self,
        *,
        on_event: Callable[[ReleaseEvent], None],
        max_pending: int = 10_000,
        give_up_after_seconds: float = 300.0,
        first_backoff_seconds: float = 0.1,
        max_backoff_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        log_interval_seconds: float = 5.0,
    ) -> None:
        self._on_event = on_event
        self._max_pending = max_pending
        self._give_up_after = give_up_after_seconds
        self._first_backoff = first_backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._clock = clock
        self._pending: deque[_Pending] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._log = ThrottledLog(logger, log_interval_seconds, clock)

    def __len__(self) -> int:
        return len(self._pending)

    def defer(self, attempt: Callable[[], Awaitable[None]], reason: DeferReason, what: str) -> None:
        """Queue ``attempt`` (it raises :class:`LimitBackendError` while the store is down)."""
        self._on_event(reason)
        if len(self._pending) >= self._max_pending:
            oldest = self._pending.popleft()
            self._drop(oldest, "the queue of pending releases is full")
        self._pending.append(_Pending(attempt, what, self._clock() + self._give_up_after))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())

    async def close(self) -> None:
        """Stop retrying; what is still pending is dropped (and counted)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._pending:
            logger.warning(
                "shutting down with %d releases pending; their leases are held until their "
                "TTL expires",
                len(self._pending),
            )
        while self._pending:
            self._pending.popleft()
            self._on_event("dropped")

    async def _drain(self) -> None:
        backoff = self._first_backoff
        while self._pending:
            item = self._pending.popleft()
            self._on_event("retried")
            try:
                await item.attempt()
            except LimitBackendError as exc:
                if self._clock() >= item.deadline:
                    self._drop(item, str(exc))
                else:
                    self._pending.append(item)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
            else:
                self._on_event("released")
                backoff = self._first_backoff

    def _drop(self, item: _Pending, reason: str) -> None:
        self._on_event("dropped")
        self._log.warning(
            "gave up the %s (%s); its lease is held until its TTL expires", item.what, reason
        )
