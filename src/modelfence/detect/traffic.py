"""What the traffic of each model and input space looks like: the yardstick of lockstep
linking without a reference (``coactivity.py``).

Two honest keys drawing from the traffic's distribution differ from it in unrelated
directions; the keys of one script share the script's bias. :class:`TrafficWindows` keeps
the latest answered queries of each model and input space (``WINDOW``, at most
``CLIENT_ROWS`` of each client: its newest replace its oldest) and says how far a key's
queries lie from them, per dimension, in units of their spread.

Clients choose the numbers in a classifier's rows, so there the yardstick is, per
dimension, the mean of the window's middle half (between its quartiles) and its
interquartile range, and a key's place the mean of its own rows' middle half: rows of 1e15
count no more than any row beyond a quartile, and clients together move it only a little
until they hold about a quarter of the window (with 32 rows each, 16 clients). Text
vectors come from the detector's own embedder, unit length, and are compared by means and
standard deviations (most of their dimensions are zero in most texts, where quartiles say
nothing); there, several clients sending one text move the yardstick with their share. No
dimension's spread counts as less than the median of the dimensions' spreads that are not
zero: one rare value in a dimension the traffic hardly uses does not outweigh the rest.
Deviations are capped at ``MAX_DEVIATION`` spreads. Rows wider than ``MAX_DIMS`` are kept
at a stride.

The window is filled in the order queries came and its yardstick made when a lockstep pass
asks (again once as many rows came in as when it was last made, at most ``REMAKE_ROWS``),
so the result does not depend on how events were batched; a restarted detector starts
anew.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from modelfence.detect.features import TEXT, Query

WINDOW = 2_048
MIN_ROWS = 128
REMAKE_ROWS = WINDOW // 2
_IQR_TO_SD = 1.349  # a normal distribution's interquartile range per standard deviation
CLIENT_ROWS = WINDOW // 64
MAX_DIMS = 512  # a window of 2,048 rows of 512 float32 values holds 4 MiB
# Spaces kept: answered queries only, so these are the configured models' inputs; past
# this many, a new one takes the place of the least recently fed space that is not yet in
# use (under MIN_ROWS) or has not been fed for STALE_FLUSHES flushes (a retired model's).
MAX_SPACES = 16
STALE_FLUSHES = 64
MAX_DEVIATION = 1e3


def space_key(query: Query) -> str:
    """The model and input space of a query: two models taking rows of one width are
    different traffic."""
    return f"{query.event.model}:{query.space}"


def _middle_mean(ordered: np.ndarray) -> np.ndarray:
    """Per dimension, the mean of the middle half of rows sorted along each dimension (the
    interquartile mean): what rows beyond the quartiles are, 1e15 or a little out, does not
    count; unlike a median, it is the same estimate for a skewed dimension whether taken
    over a key's few rows or the whole window, and nearly as sharp as a mean."""
    quarter = len(ordered) // 4
    return ordered[quarter : len(ordered) - quarter].mean(axis=0, dtype=np.float64)


@dataclass(slots=True)
class _Yardstick:
    centre: np.ndarray  # per dimension: the window's interquartile mean (a classifier's) or mean
    spread: np.ndarray  # its interquartile range as a standard deviation, or its standard
    # deviation; never below the median of those not zero


class _Window:
    """The latest ``WINDOW`` rows of one space (at most ``CLIENT_ROWS`` of each client), and
    the yardstick made of them."""

    def __init__(self, width: tuple[int, ...], *, robust: bool) -> None:
        self.width = width
        self.robust = robust  # middle means and IQRs (a classifier's rows), else means and SDs
        self.fed_at = 0  # the flush that last fed it
        self.stride = -(-width[0] // MAX_DIMS) if width else 1
        kept = (-(-width[0] // self.stride),) if width else ()
        self.rows = np.zeros((WINDOW, *kept), dtype=np.float32)
        self.filled = 0  # slots in use
        self.written = 0  # rows written in all
        self._next = 0  # the slot a client below its share takes next: the ring's oldest
        self._owners: list[str] = [""] * WINDOW  # the client of each slot
        self._slots: dict[str, deque[int]] = {}  # client -> its slots, oldest first
        self._yardstick: _Yardstick | None = None
        self._made_at = 0  # ``written`` when the yardstick was made

    def narrowed(self, rows: np.ndarray) -> np.ndarray:
        return rows[:, :: self.stride] if self.stride > 1 else rows

    def add(self, clients: list[str], rows: np.ndarray) -> None:
        rows = self.narrowed(rows)
        for client, row in zip(clients, rows, strict=True):
            mine = self._slots.setdefault(client, deque())
            if len(mine) >= CLIENT_ROWS:
                slot = mine.popleft()
            else:
                slot, self._next = self._next, (self._next + 1) % WINDOW
                self.filled = min(self.filled + 1, WINDOW)
                before = self._owners[slot]
                if before == client:
                    mine.remove(slot)
                elif before:
                    theirs = self._slots[before]
                    theirs.remove(slot)
                    if not theirs:
                        del self._slots[before]
                self._owners[slot] = client
            mine.append(slot)
            self.rows[slot] = row
            self.written += 1

    def yardstick(self) -> _Yardstick | None:
        """The yardstick of the window, made again once as many rows came in as when it was
        last made, at most ``REMAKE_ROWS`` (sorting 2,048 rows of 384 values takes tens of
        milliseconds: made for every pass, it would cost more than the queries' own
        detection)."""
        if self.filled < MIN_ROWS:
            return None
        if self._yardstick is None or self.written - self._made_at >= min(REMAKE_ROWS, self._made_at):
            window = self.rows[: self.filled]
            if self.robust:
                ordered = np.sort(window, axis=0)
                centre = _middle_mean(ordered)
                quarter = len(ordered) // 4
                spread = (ordered[-quarter - 1] - ordered[quarter]).astype(np.float64) / _IQR_TO_SD
            else:
                centre, spread = window.mean(axis=0, dtype=np.float64), window.std(axis=0, dtype=np.float64)
            # Binary, one-hot and count features leave most spreads 0: the floor is the
            # median of those that are not.
            varied = spread[spread > 0]
            floor = float(np.median(varied)) if varied.size else 1.0
            self._yardstick = _Yardstick(centre, np.maximum(spread.astype(np.float64), floor))
            self._made_at = self.written
        return self._yardstick


class TrafficWindows:
    """The latest answered queries of each model and input space, and what a key's queries
    look like against them (see the module docstring); ``skip`` names input spaces left
    out (a reference's, whose cells lockstep uses instead)."""

    def __init__(self, skip: frozenset[str] = frozenset()) -> None:
        self._skip = skip
        self._spaces: dict[str, _Window] = {}
        self._pending: list[Query] = []
        self._flushes = 0

    def add(self, query: Query) -> None:
        """Take in one query: an answered one with a vector, in a space not skipped."""
        if query.vector is None or query.space is None or query.space in self._skip:
            return
        if query.event.status >= 400:
            return
        self._pending.append(query)
        if len(self._pending) >= WINDOW:
            self.flush()

    def flush(self) -> None:
        """Write the queries taken in since the last flush, in the order they came."""
        self._flushes += 1
        by_space: dict[str, list[Query]] = {}
        for query in self._pending:
            key = space_key(query)
            by_space[key] = by_space.pop(key, [])  # re-inserted: the last fed comes last
            by_space[key].append(query)
        self._pending = []
        for key, queries in by_space.items():
            width = np.shape(queries[-1].vector)
            clients, vectors = [], []
            for query in queries:
                if query.vector is not None and query.vector.shape == width:
                    clients.append(query.event.client)
                    vectors.append(query.vector)
            window = self._spaces.pop(key, None)  # re-inserted: the dict's order is recency
            if window is None or window.width != width:
                if not self._make_room():
                    continue
                # The detector's embedder makes text vectors (unit length): only a
                # classifier's rows hold numbers the client chose.
                window = _Window(width, robust=not key.endswith(f":{TEXT}"))
            window.fed_at = self._flushes
            self._spaces[key] = window
            window.add(clients, np.vstack(vectors))

    def _make_room(self) -> bool:
        """Room for a new space: below ``MAX_SPACES``, or in place of the least recently fed
        space not yet in use or not fed for ``STALE_FLUSHES`` flushes; never of one in use."""
        if len(self._spaces) < MAX_SPACES:
            return True
        stale = self._flushes - STALE_FLUSHES
        gone = next((k for k, w in self._spaces.items() if w.filled < MIN_ROWS or w.fed_at <= stale), None)
        if gone is None:
            return False
        del self._spaces[gone]
        return True

    def deviation(self, key: str, vectors: np.ndarray) -> np.ndarray | None:
        """How ``vectors`` differ from the traffic, per dimension, in units of its spread
        (middle means, or means for text); None for a space not kept, with fewer than
        ``MIN_ROWS`` queries in, or of another width."""
        if self._pending:
            self.flush()
        window = self._spaces.get(key)
        if window is None or window.width != vectors.shape[1:]:
            return None
        yardstick = window.yardstick()
        if yardstick is None:
            return None
        vectors = window.narrowed(vectors)
        mine = _middle_mean(np.sort(vectors, axis=0)) if window.robust else vectors.mean(axis=0, dtype=np.float64)
        deviation = np.clip((mine - yardstick.centre) / yardstick.spread, -MAX_DEVIATION, MAX_DEVIATION)
        return deviation.astype(np.float32)
