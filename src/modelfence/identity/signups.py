"""Sign-up surges: many new accounts at once are held before they are answered.

A hydra buys its identities in bulk. A thousand accounts that each send a request or two
look like a thousand newcomers, and none of them alone is unusual. What an honest business
does not show is its sign-ups jumping several-fold within hours. The watch keeps the
sign-up times of the last ``baseline_days`` and, whenever an account arrives, compares the
sign-ups in each of the last ``windows`` (hours) with what the baseline rate predicts:

- a one-sided Poisson test at ``p_value`` (per test; see docs/DETECTION.md for how many
  tests a week makes), and
- an effect-size floor: at least the window's ratio times the expected count and
  ``min_excess`` more accounts, since real sign-up streams are burstier than Poisson
  (hours of the day, launches) and a huge population makes any small rise significant.

A window that passes is a surge. Its start is the change point inside the window (the
start that makes the later sign-ups least likely under the baseline), so one surge does
not take a day of honest newcomers with it. Hours inside surges are left out of the
baseline: a long attack does not teach the watch its own rate. An unverified, unpaid
account created inside a surge is *held* (``identity/trust.py``): on probation with the
surge allowance, by default nothing until it verifies, pays or ages out of probation. Its
keys, and a thief's, cost an identity that is real.

Every replica keeps its own watch, fed by its key registry's account polls, so replicas
find the same surges without sharing state (their ends may differ by minutes: a replica
that read a week at start tests it every five minutes, one that saw it live at each
sign-up). All times are seconds since the epoch.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from modelfence.config import SurgeConfig
from modelfence.tails import poisson_sf

log = logging.getLogger(__name__)

HOUR = 3_600.0
_EXCLUDED_SECONDS = 86_400.0
_ONE_BY_ONE = 256  # sign-ups per batch tested each at its own time
_MAX_SURGES = 10_000  # the newest kept (a surge is one record; there are few)
_SAME_SECONDS = 1e-3


@dataclass(frozen=True, slots=True)
class Surge:
    """Sign-ups from ``start`` to ``end`` came faster than the baseline allows."""

    start: float
    end: float
    accounts: int  # sign-ups inside [start, end] when it was last extended
    expected: float  # what the baseline predicts for that stretch
    window_hours: float  # the window whose test found it first


def _llr(counts: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Poisson log-likelihood ratio of ``counts`` against the ``expected`` rate (one-sided)."""
    out: np.ndarray = counts * np.log(counts / expected) - (counts - expected)
    return out


def _account_hash(account_id: str) -> int:
    """Eight bytes of the id: a week of sign-ups at a large provider stays small in memory."""
    return int.from_bytes(hashlib.blake2b(account_id.encode(), digest_size=8).digest(), "big")


class SignupWatch:
    """Finds sign-up surges in the accounts it is shown (see the module docstring).

    ``known_since``: from when the watch is shown every sign-up (the registry's first poll
    reaches ``history_seconds`` back); a baseline needs ``min_history_hours`` of it.
    ``on_surge`` is called with each new or extended surge (a metrics and log hook).
    """

    def __init__(
        self,
        config: SurgeConfig,
        *,
        known_since: float | None = None,
        on_surge: Callable[[Surge], None] | None = None,
    ) -> None:
        self._config = config
        self._windows = sorted((hours * HOUR, ratio) for hours, ratio in config.windows.items())
        self._history = config.baseline_days * 86_400.0
        self.known_since = known_since
        self._on_surge = on_surge
        self._seen: dict[int, float] = {}  # account hash -> created_at
        self._times: list[float] = []  # sign-up times, sorted
        self._surges: list[Surge] = []  # sorted by start, disjoint
        self._kept_since = -math.inf  # sign-ups before this were forgotten
        self.generation = 0  # changes whenever a surge starts or grows (trust caches read it)
        self.tests = 0

    @property
    def history_seconds(self) -> float:
        """How far back the watch wants to be shown sign-ups."""
        return self._history + self._windows[-1][0]

    @property
    def surges(self) -> tuple[Surge, ...]:
        return tuple(self._surges)

    def windows(self, now: float) -> list[tuple[float, int, float | None]]:
        """(hours, sign-ups, expected) of each window ending ``now``, as operators see them;
        expected is None while there is no baseline."""
        rate = self._baseline(now - self._windows[-1][0])
        return [(seconds / HOUR, self._count(now - seconds, now), None if rate is None else rate * seconds)
                for seconds, _ in self._windows]

    def held(self, created_at: float) -> Surge | None:
        """The surge an account created at ``created_at`` signed up in, if any."""
        if not self._config.enabled:
            return None
        starts = [s.start for s in self._surges]
        i = bisect.bisect_right(starts, created_at) - 1
        if i >= 0 and created_at <= self._surges[i].end:
            return self._surges[i]
        return None

    def observe(self, account_id: str, created_at: float) -> Surge | None:
        """Note one account's sign-up (again is a no-op; a new time moves it) and test for
        a surge at it."""
        if not self._add(account_id, created_at):
            return None
        return self._test(created_at)

    def observe_many(self, signups: Iterable[tuple[str, float]]) -> None:
        """Note many sign-ups at once (a replica's first poll reads a week of them): each is
        tested at its own time while there are few, else the stretch they cover is tested
        every third of the shortest window, so a week of a large provider's sign-ups costs
        a few thousand tests, not one per account."""
        ordered = sorted(signups, key=lambda signup: signup[1])  # appended, never inserted
        if not ordered:
            return
        # Accounts updated lately but created long ago (a payment, a bulk import) are no
        # sign-ups a test reads: left out before a grid could reach back to them.
        newest = max(ordered[-1][1], self._times[-1] if self._times else -math.inf)
        oldest = newest - self.history_seconds
        if ordered[0][1] < oldest and (self.known_since is None or self.known_since < oldest):
            self.known_since = oldest  # what was left out is not known any more
        added = [at for account, at in ordered if at >= oldest and self._add(account, at, forget=False)]
        if len(added) <= _ONE_BY_ONE:
            tested = added
        else:
            step = self._windows[0][0] / 3
            tested = [*np.arange(added[0] + step, added[-1], step).tolist(), added[-1]]
        for at in tested:  # before forgetting: the earliest tests read the oldest sign-ups
            self._test(at)
        if self._times:
            self._forget(self._times[-1])

    def _add(self, account_id: str, created_at: float, *, forget: bool = True) -> bool:
        """Keep one sign-up; False when the watch is off, has it already or it is too old."""
        if not self._config.enabled or not math.isfinite(created_at):
            return False
        key = _account_hash(account_id)
        known = self._seen.get(key)
        if known is not None and abs(known - created_at) < _SAME_SECONDS:
            return False  # seen again (a timestamp's round trip through a datetime moves it by a µs)
        if known is not None:  # its sign-up time was corrected (a backfill): move it
            del self._seen[key]
            del self._times[bisect.bisect_left(self._times, known)]
        newest = self._times[-1] if self._times else created_at
        if created_at < max(newest, created_at) - self.history_seconds:
            return False  # older than anything a test still reads
        self._seen[key] = created_at
        bisect.insort(self._times, created_at)
        if forget:
            self._forget(max(newest, created_at))
        return True

    def _forget(self, now: float) -> None:
        horizon = now - self.history_seconds
        cut = bisect.bisect_left(self._times, horizon)
        if cut > 1_024 or (cut and cut * 4 > len(self._times)):  # amortised: drop in bulk
            del self._times[:cut]
            self._seen = {k: t for k, t in self._seen.items() if t >= horizon}
            self._kept_since = max(self._kept_since, horizon)
        # Surges are kept past the sign-ups they were found in, for as long as their
        # accounts may still be on probation; only their number is bounded.
        if len(self._surges) > _MAX_SURGES:
            self._surges = self._surges[-_MAX_SURGES:]

    def _count(self, start: float, end: float) -> int:
        return bisect.bisect_right(self._times, end) - bisect.bisect_left(self._times, start)

    def _baseline(self, before: float) -> float | None:
        """Sign-ups per second over the ``baseline_days`` before ``before``, surge hours
        left out; None while the watch has seen less than ``min_history_hours`` of it."""
        # Only what the watch still holds: a late sign-up dated days back (a backfill) is
        # tested against the part of its baseline that was not forgotten yet.
        start = max(before - self._history, self._kept_since)
        if self.known_since is not None:
            start = max(start, self.known_since)
        elif self._times:
            start = max(start, self._times[0])
        span, count = before - start, self._count(start, before)
        for surge in self._surges:
            # Only a surge's first day is left out: a rise that lasts is the new normal
            # within a baseline's length, not a surge for ever (and a false surge cannot
            # starve the baseline of the very hours that would end it).
            a, b = max(surge.start, start), min(surge.end, surge.start + _EXCLUDED_SECONDS, before)
            if b > a:
                span -= b - a
                count -= self._count(a, b)
        if span < self._config.min_history_hours * HOUR:
            return None
        # At least one sign-up over the history: an empty one must not make any newcomer
        # a surge of infinite odds (min_excess still asks for a real crowd).
        return max(count, 1) / span

    def _test(self, now: float) -> Surge | None:
        longest = self._windows[-1][0]
        rate = self._baseline(now - longest)
        if rate is None:
            return None
        for seconds, ratio in self._windows:
            self.tests += 1
            count = self._count(now - seconds, now)
            expected = rate * seconds
            floor = max(ratio * expected, expected + self._config.min_excess)
            if count < floor or poisson_sf(count - 1, expected) > self._config.p_value:
                continue
            start, end = self._segment(now - seconds, now, rate, ratio)
            return self._note(start, end, rate, seconds / HOUR)
        return None

    def _segment(self, start: float, end: float, rate: float, ratio: float) -> tuple[float, float]:
        """The stretch of ``[start, end]`` whose sign-ups are least likely under ``rate``.

        Its start is the sign-up from which on the Poisson log-likelihood ratio is largest,
        among those from which on there are still ``min_excess`` sign-ups at the window's
        ratio (a surge is a crowd, never the last few accounts alone); its end, the sign-up up to
        which it is largest from that start (sign-ups at the baseline rate only lower it,
        so a surge ends where the crowd stopped, not when the window forgets it), or now
        while the cool-down window (the second shortest, one hour by default) still clears
        its floor: a crowd thinning out is still a crowd, and the newcomers of that last
        hour are the price of not letting its tail through."""
        times = np.asarray(self._times[bisect.bisect_left(self._times, start) : bisect.bisect_right(self._times, end)])
        floor = self._config.min_excess
        counts = np.arange(len(times), 0, -1, dtype=np.float64)  # sign-ups from each candidate on
        expected = np.maximum(rate * (end - times), 1e-12)
        llr = _llr(counts, expected)
        llr[counts < np.maximum(ratio * expected, floor)] = -np.inf
        first = int(np.argmax(llr))
        cool, cool_ratio = self._windows[min(1, len(self._windows) - 1)]
        expected_now = rate * cool
        if self._count(end - cool, end) >= max(cool_ratio * expected_now, expected_now + floor):
            return float(times[first]), end  # the crowd is still coming: it ends here for now
        counts = np.arange(1, len(times) - first + 1, dtype=np.float64)  # sign-ups up to each candidate
        llr = _llr(counts, np.maximum(rate * (times[first:] - times[first]), 1e-12))
        llr[counts < floor] = -np.inf
        return float(times[first]), float(times[first + int(np.argmax(llr))])

    def _note(self, start: float, end: float, rate: float, window_hours: float) -> Surge:
        """Record the surge ``[start, end]``, merged with those it overlaps; trust caches and
        ``on_surge`` hear of it only when it is new or reaches further."""
        keep, overlapped = [], []
        for surge in self._surges:
            (keep if surge.end < start or surge.start > end else overlapped).append(surge)
        if len(overlapped) == 1 and overlapped[0].start <= start and end <= overlapped[0].end:
            return overlapped[0]  # found again, nothing new: the common case after a crowd
        for surge in overlapped:
            start, end = min(surge.start, start), max(surge.end, end)
        first = overlapped[0].window_hours if overlapped else window_hours
        merged = Surge(start, end, self._count(start, end), rate * (end - start), first)
        if not overlapped:
            log.warning("sign-up surge: %d accounts in %.1f h where %.1f were expected; unverified "
                        "accounts created from %s on are held", merged.accounts, (end - start) / HOUR,
                        merged.expected, datetime.fromtimestamp(start, UTC).isoformat(timespec="seconds"))
        self._surges = sorted([*keep, merged], key=lambda s: s.start)
        self.generation += 1
        if self._on_surge is not None:
            self._on_surge(merged)
        return merged
