"""Failed credential checks, counted per client address, so guessing is slow and costs nothing.

Every unknown API key costs a database lookup, and every admin token guess is a try at the
most valuable secret of the deployment. Past ``per_minute`` failures an address is refused
(429 with ``Retry-After``) before anything is looked up, and may try once more every
``60 / per_minute`` seconds. Per replica, in memory, bounded in size.

    guard = AuthFailures(FailureLimiter(30), surface="admin", source=fingerprinter.source,
                         on_event=metrics.auth_failure)
    if (refusal := guard.check(scope)) is not None:
        raise refusal                        # 429 with Retry-After, nothing looked up
    source = guard.charge(scope)
    if credential_is_good: guard.forgive(source)
    else: guard.failed(source, "unknown API key")
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from modelfence.errors import RateLimited
from modelfence.throttled_log import ThrottledLog
from modelfence.types import Scope

log = logging.getLogger(__name__)
LOG_INTERVAL_SECONDS = 1.0  # at most one failure line a second per surface, with a count


class FailureLimiter:
    """A GCRA per source: ``per_minute`` failures at once, then one per ``60/per_minute`` s.

    At most ``max_sources`` sources are remembered; when full, the one that failed least
    recently is forgotten (a source whose allowance has fully recovered holds nothing).
    ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        max_sources: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute < 1 or max_sources < 1:
            raise ValueError("per_minute and max_sources must be at least 1")
        self._interval = 60.0 / per_minute
        self._tolerance = 60.0 - self._interval
        self._max_sources = max_sources
        self._clock = clock
        self._tat: OrderedDict[str, float] = OrderedDict()  # theoretical arrival time

    def retry_after(self, source: str) -> float | None:
        """Seconds until ``source`` may try again, or None when it may try now."""
        tat = self._tat.get(source)
        if tat is None:
            return None
        wait = tat - self._tolerance - self._clock()
        return wait if wait > 0 else None

    def record(self, source: str) -> None:
        """Count one failure of ``source``."""
        now = self._clock()
        tat = max(self._tat.pop(source, now), now) + self._interval
        self._tat[source] = tat
        if len(self._tat) > self._max_sources:
            self._tat.popitem(last=False)

    def forgive(self, source: str) -> None:
        """Take back one failure recorded in advance (the credential turned out good)."""
        tat = self._tat.get(source)
        if tat is None:
            return
        tat -= self._interval
        if tat <= self._clock():
            del self._tat[source]
        else:
            self._tat[source] = tat

    def __len__(self) -> int:
        return len(self._tat)


class AuthFailures:
    """One credential surface (``api`` or ``admin``): refusals, counting and logging.

    ``source(scope)`` names the client address failures are counted by; ``on_event(surface,
    outcome)`` counts ``rejected`` (a wrong credential) and ``refused`` (too many of them).
    """

    def __init__(
        self,
        limiter: FailureLimiter,
        *,
        surface: str,
        source: Callable[[Scope], str],
        on_event: Callable[[str, str], None],
    ) -> None:
        self._limiter = limiter
        self._surface = surface
        self._source = source
        self._on_event = on_event
        self._log = ThrottledLog(log, interval=LOG_INTERVAL_SECONDS)
        self._refusing_log = ThrottledLog(log, interval=LOG_INTERVAL_SECONDS)

    def check(self, scope: Scope) -> RateLimited | None:
        """The 429 for a source that failed too often (counted), or None."""
        wait = self._limiter.retry_after(self._source(scope))
        if wait is None:
            return None
        self._on_event(self._surface, "refused")
        seconds = max(1, math.ceil(wait))
        return RateLimited(
            f"Too many failed authentications from this address; retry after {seconds} s.",
            code="too_many_auth_failures",
            headers=[(b"retry-after", str(seconds).encode())],
        )

    def charge(self, scope: Scope) -> str:
        """Record a failure before the check, returning the source to pass to the outcome.

        Charged up front so that many concurrent guesses from one source, all waiting on
        their lookups, cannot get past the allowance together; a good credential is
        forgiven by :meth:`forgive`.
        """
        source = self._source(scope)
        self._limiter.record(source)
        return source

    def forgive(self, source: str) -> None:
        """Take back a charge: the credential was good, or could not be checked."""
        self._limiter.forgive(source)

    def failed(self, source: str, reason: str) -> None:
        """Count and log one wrong credential presented by ``source`` (already charged)."""
        self._on_event(self._surface, "rejected")
        # Throttled: guesses spread over many addresses must not flood the log (the metric
        # counts every one).
        self._log.warning("%s authentication failed from %s: %s", self._surface, source, reason)
        if self._limiter.retry_after(source) is not None:
            self._refusing_log.warning(
                "%s authentication: refusing %s for a while after repeated failures",
                self._surface, source,
            )
