"""What the traffic of each model and input space looks like: the yardstick of lockstep
linking without a reference (``coactivity.py``).

Two honest keys drawing from the traffic's distribution differ from its mean in unrelated
directions; the keys of one script share the script's bias. :class:`TrafficMoments` keeps
the latest ``WINDOW`` answered queries of each model and input space and says how far a
key's mean query lies from the traffic's, per dimension, in units of the traffic's spread.

Clients choose the numbers in a classifier's rows, so no one client may move the yardstick
for everyone with a few extreme ones: each dimension of such a space is winsorised at the
window's ``TAIL`` and ``1 - TAIL`` quantiles (the traffic's and the key's rows alike)
before means and spreads are taken, so rows beyond them, 1e30 or 1e3, count as the
quantile. Text vectors come from the detector's embedder, unit length, and are taken as
they are (winsorising their many sparse dimensions would erase what tells keys apart). A client that
sends most of a space's queries still moves it, as the traffic it is. The window is the
latest queries in the order they came, its yardstick made again every ``REMAKE_ROWS``
queries (and for the first time once ``MIN_ROWS`` are in), so the result does not depend
on how events were batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelfence.detect.features import TEXT, Query

WINDOW = 2_048
MIN_ROWS = 128
REMAKE_ROWS = WINDOW // 2
TAIL = 0.05
# Spaces kept: answered queries only, so these are the configured models' inputs; past
# this many, the space with the fewest queries in makes room. A 384-d space holds 3 MiB.
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
    spread: np.ndarray  # its standard deviation, never below a thousandth of the typical one


class _Window:
    """The latest ``WINDOW`` rows of one space, a ring, and the yardstick made of them."""

    def __init__(self, width: tuple[int, ...], *, winsorised: bool) -> None:
        self.width = width
        self.winsorised = winsorised
        self.rows = np.zeros((WINDOW, *width), dtype=np.float32)
        self.filled = 0  # rows written in all (the next is written at filled % WINDOW)
        self._yardstick: _Yardstick | None = None
        self._made_at = 0  # ``filled`` when the yardstick was made

    def add(self, rows: np.ndarray) -> None:
        rows = rows[-WINDOW:]
        self.rows[(self.filled + np.arange(len(rows))) % WINDOW] = rows
        self.filled += len(rows)

    def yardstick(self) -> _Yardstick | None:
        """The yardstick of the window, made again once ``REMAKE_ROWS`` more came in (making
        it takes ~10 ms for 384 dimensions; made for every pass, it would cost more than
        the queries' own detection)."""
        if self.filled < MIN_ROWS:
            return None
        if self._yardstick is None or self.filled - self._made_at >= REMAKE_ROWS:
            window = self.rows[: min(self.filled, WINDOW)]
            low, high = np.quantile(window, [TAIL, 1.0 - TAIL], axis=0) if self.winsorised else (None, None)
            held = np.clip(window, low, high) if self.winsorised else window
            spread = held.std(axis=0, dtype=np.float64)
            # A dimension the traffic never varies in gets a spread of a thousandth of the
            # typical one, not 0 (a rounding difference would weigh like a thousand).
            floor = 1e-3 * float(np.median(spread)) + 1e-12
            mean = held.mean(axis=0, dtype=np.float64)
            self._yardstick = _Yardstick(low, high, mean, np.maximum(spread, floor))
            self._made_at = self.filled
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
        by_space: dict[str, list[np.ndarray]] = {}
        for query in self._pending:
            assert query.vector is not None
            by_space.setdefault(space_key(query), []).append(query.vector)
        self._pending = []
        for key, vectors in by_space.items():
            width = vectors[-1].shape
            window = self._spaces.get(key)
            if window is None or window.width != width:
                # The detector's embedder makes text vectors (unit length): only a
                # classifier's rows hold numbers the client chose.
                text = key.endswith(f":{TEXT}")
                window = self._spaces[key] = _Window(width, winsorised=not text)
                self._make_room(keep=key)
            window.add(np.vstack([v for v in vectors if v.shape == width]))

    def _make_room(self, keep: str) -> None:
        if len(self._spaces) > MAX_SPACES:
            fewest = min((k for k in self._spaces if k != keep), key=lambda k: self._spaces[k].filled)
            del self._spaces[fewest]

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
        held = np.clip(vectors, yardstick.low, yardstick.high) if window.winsorised else vectors
        return ((held.mean(axis=0, dtype=np.float64) - yardstick.mean) / yardstick.spread).astype(np.float32)
