"""What the traffic of each model and input space looks like: the yardstick of lockstep
linking without a reference (``coactivity.py``).

Two honest keys drawing from the traffic's distribution differ from its mean in unrelated
directions; the keys of one script share the script's bias. :class:`TrafficMoments` keeps
the latest ``WINDOW`` answered queries of each model and input space and says how far a
key's mean query lies from the traffic's, per dimension, in units of the traffic's spread.

Clients choose the numbers in a classifier's rows, so no one client may move the yardstick
for everyone:

- a client has at most ``CLIENT_ROWS`` rows in a window (its newest replace its oldest),
  so a window of 2,048 rows holds 64 clients or more;
- each dimension of a classifier's space is winsorised at the window's ``TAIL`` and
  ``1 - TAIL`` quantiles (the traffic's rows and the key's alike) before means and spreads
  are taken: rows beyond them, 1e30 or 1e3, count as the quantile;
- no dimension's spread counts as less than the median dimension's: one rare value in a
  dimension the traffic hardly uses does not outweigh the rest.

Clients that together send more than ``TAIL`` of a window's rows, far from the rest, still
move it (``docs/DETECTION.md``). Text vectors come from the detector's own embedder, unit
length, and are not winsorised. Rows wider than ``MAX_DIMS`` are kept at a stride. The
window is filled in the order queries came and its yardstick made when a lockstep pass asks
(again once as many rows came in as when it was last made, at most ``REMAKE_ROWS``), so
the result does not depend on how events were batched; a restarted detector starts anew.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from modelfence.detect.features import TEXT, Query

WINDOW = 2_048
MIN_ROWS = 128
REMAKE_ROWS = WINDOW // 2
TAIL = 0.05
CLIENT_ROWS = WINDOW // 64
MAX_DIMS = 512  # a window of 2,048 rows of 512 float32 values holds 4 MiB
# Spaces kept: answered queries only, so these are the configured models' inputs; past
# this many, the one least recently fed makes room.
MAX_SPACES = 16


def space_key(query: Query) -> str:
    """The model and input space of a query: two models taking rows of one width are
    different traffic."""
    return f"{query.event.model}:{query.space}"


@dataclass(slots=True)
class _Yardstick:
    low: np.ndarray | None  # per dimension: the TAIL quantile (None: not winsorised)
    high: np.ndarray | None  # and the 1 - TAIL one
    mean: np.ndarray  # of the winsorised window
    spread: np.ndarray  # its standard deviation, never below the median dimension's


class _Window:
    """The latest ``WINDOW`` rows of one space (at most ``CLIENT_ROWS`` of each client), and
    the yardstick made of them."""

    def __init__(self, width: tuple[int, ...], *, winsorised: bool) -> None:
        self.width = width
        self.winsorised = winsorised
        self.stride = -(-width[0] // MAX_DIMS) if width else 1
        kept = (-(-width[0] // self.stride),) if width else ()
        self.rows = np.zeros((WINDOW, *kept), dtype=np.float32)
        self.filled = 0  # slots in use (the next new slot is ``filled`` until WINDOW)
        self.written = 0  # rows written in all
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
                slot = self.written % WINDOW if self.filled == WINDOW else self.filled
                self.filled = min(self.filled + 1, WINDOW)
                before = self._owners[slot]
                if before:
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
        last made, at most ``REMAKE_ROWS`` (making it takes ~10 ms for 384 dimensions; made
        for every pass, it would cost more than the queries' own detection)."""
        if self.filled < MIN_ROWS:
            return None
        if self._yardstick is None or self.written - self._made_at >= min(REMAKE_ROWS, self._made_at):
            window = self.rows[: self.filled]
            low, high = np.quantile(window, [TAIL, 1.0 - TAIL], axis=0) if self.winsorised else (None, None)
            held = np.clip(window, low, high) if self.winsorised else window
            spread = held.std(axis=0, dtype=np.float64)
            mean = held.mean(axis=0, dtype=np.float64)
            floor = float(np.median(spread)) + 1e-12
            self._yardstick = _Yardstick(low, high, mean, np.maximum(spread, floor))
            self._made_at = self.written
        return self._yardstick


class TrafficMoments:
    """The latest answered queries of each model and input space, and what a key's queries
    look like against them (see the module docstring); ``skip`` names input spaces left
    out (a reference's, whose cells lockstep uses instead)."""

    def __init__(self, skip: frozenset[str] = frozenset()) -> None:
        self._skip = skip
        self._spaces: dict[str, _Window] = {}
        self._pending: list[Query] = []

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
        by_space: dict[str, list[Query]] = {}
        for query in self._pending:
            by_space.setdefault(space_key(query), []).append(query)
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
                # The detector's embedder makes text vectors (unit length): only a
                # classifier's rows hold numbers the client chose.
                window = _Window(width, winsorised=not key.endswith(f":{TEXT}"))
            self._spaces[key] = window
            if len(self._spaces) > MAX_SPACES:
                del self._spaces[next(iter(self._spaces))]
            window.add(clients, np.vstack(vectors))

    def deviation(self, key: str, vectors: np.ndarray) -> np.ndarray | None:
        """How the mean of ``vectors`` differs from the traffic's, per dimension, in units
        of its spread (both winsorised alike); None for a space not kept, with fewer than
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
        held = np.clip(vectors, yardstick.low, yardstick.high) if window.winsorised else vectors
        return ((held.mean(axis=0, dtype=np.float64) - yardstick.mean) / yardstick.spread).astype(np.float32)
