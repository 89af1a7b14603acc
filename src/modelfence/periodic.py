"""Background loops that outlive their errors: the one helper behind every poll loop.

A loop that ends on its first unexpected exception fails silently: detection stops
updating, revocations stop reaching a replica, and nothing says so. :class:`Periodic`
runs one step every ``interval`` seconds; any ``Exception`` the step raises (a Redis,
SQL or network error alike) is counted through ``on_error``, logged, and followed by an
exponential backoff capped at ``max_backoff``; the next success resets it::

    poller = Periodic("detection-state", cache.refresh, interval=1.0, on_error=count)
    poller.start()
    ...
    await poller.stop()

A step raises :class:`Done` to end the loop (a feed that closed). Cancellation is never
caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("modelfence.periodic")

Step = Callable[[], Awaitable[object]]
OnError = Callable[[str, Exception], None]
Sleep = Callable[[float], Awaitable[object]]


class Done(Exception):
    """Raised by a step to end its loop normally."""


class Periodic:
    """``step`` every ``interval`` seconds in a background task that survives errors.

    ``name`` labels the metric and the logs (keep it a fixed string: it is a Prometheus
    label). After ``n`` failures in a row the wait is
    ``min(max_backoff, max(interval, min_backoff) * 2 ** (n - 1))``.
    """

    def __init__(
        self,
        name: str,
        step: Step,
        *,
        interval: float,
        on_error: OnError | None = None,
        min_backoff: float = 0.5,
        max_backoff: float = 10.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if interval < 0 or min_backoff <= 0 or max_backoff < min_backoff:
            raise ValueError("need interval >= 0 and 0 < min_backoff <= max_backoff")
        self.name = name
        self.step = step
        self.interval = interval
        self.on_error = on_error
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.errors = 0  # in total
        self.failures = 0  # in a row
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None

    def backoff(self) -> float:
        """Seconds to wait after the current run of failures."""
        base = max(self.interval, self.min_backoff)
        return min(self.max_backoff, base * 2.0 ** min(self.failures - 1, 30))

    async def once(self) -> bool:
        """Run the step once; False when it failed (counted and logged). Raises :class:`Done`."""
        try:
            await self.step()
        except Done:
            raise
        except Exception as exc:
            self.errors += 1
            self.failures += 1
            if self.on_error is not None:
                self.on_error(self.name, exc)
            log.warning(
                "%s failed (%d in a row), retrying in %.1f s: %s: %s",
                self.name, self.failures, self.backoff(), type(exc).__name__, exc,
                exc_info=self.failures == 1,
            )
            return False
        if self.failures:
            log.warning("%s recovered after %d failures", self.name, self.failures)
            self.failures = 0
        return True

    async def run(self, *, first_delay: float | None = None) -> None:
        """Loop until the step raises :class:`Done` or the task is cancelled."""
        delay = self.interval if first_delay is None else first_delay
        while True:
            if delay > 0:
                await self._sleep(delay)
            else:
                await asyncio.sleep(0)  # let other tasks run between back-to-back steps
            try:
                ok = await self.once()
            except Done:
                return
            delay = self.interval if ok else self.backoff()

    def start(self, *, first_delay: float | None = None) -> None:
        """Run the loop in a background task (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(first_delay=first_delay), name=self.name)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
