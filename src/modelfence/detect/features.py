"""Per-client state and the read-only views detectors evaluate.

A client's recent queries live in a :class:`ClientState` (the last ``window`` queries and,
per input *space*, their vectors). A query is one prompt, one text of an embeddings
batch or one row of a classifier batch: a request scoring 64 images is 64 queries. A space is ``"text"`` for prompts (embedded) or
``"vec<d>"`` for classifier inputs of dimension d, so one client's chat and classifier
traffic never mix. Detectors see a :class:`View`: the same data as arrays, with the costly
derived features (minimum distances to earlier queries) computed once, on demand.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from modelfence.telemetry.events import RequestEvent

event_ts = operator.attrgetter("event.ts")  # a query's time: the sort key of every view

TEXT = "text"


def space_of(event: RequestEvent) -> str | None:
    """The input space of an event: ``text``, ``vec<d>``, or None when it has no input."""
    if event.input_rows:
        return f"vec{len(event.input_rows[0])}"
    if event.prompt_text or event.input_texts:
        return TEXT
    return None


def query_count(event: RequestEvent) -> int:
    """Queries in one request: rows of a classifier batch, texts of an embeddings batch,
    all of them (the event keeps the vectors of only the first few hundred)."""
    return event.input_count or len(event.input_rows or event.input_texts or ()) or 1


@dataclass(slots=True)
class Query:
    event: RequestEvent
    space: str | None
    vector: np.ndarray | None
    margin: float | None = None  # classifier answers: top-1 minus top-2 probability


@dataclass(slots=True)
class ClientState:
    """What the detector remembers of one client; bounded by ``window``."""

    client: str
    tier: str
    window: int
    queries: deque[Query] = field(init=False)
    total: int = 0
    since_evaluation: int = 0
    first_ts: float = float("inf")
    # Distinct clock hours (ts // 3600) with activity, newest last: two days of them,
    # for "active around the clock", which a window of recent queries cannot show.
    hours: deque[int] = field(init=False)
    # The account was seen past probation (standard or trusted). Sticky: a demotion by
    # detection itself (accounts.demote_at) does not erase the history it had.
    vouched: bool = False
    # (total, count): the engine's count of this window's recent queries, taken when
    # ``total`` was that; a population pass recounts only the clients that sent more since.
    burst: tuple[int, int] = (-1, 0)

    def __post_init__(self) -> None:
        self.queries = deque(maxlen=self.window)
        self.hours = deque(maxlen=48)

    def add(self, query: Query) -> None:
        self.first_ts = min(self.first_ts, query.event.ts)
        hour = int(query.event.ts // 3600)
        if not self.hours or self.hours[-1] != hour:
            self.hours.append(hour)
        if query.event.trust in ("standard", "trusted"):
            self.vouched = True
        self.queries.append(query)
        self.total += 1
        self.since_evaluation += 1


class View:
    """Queries of one client (or one entity), oldest first, as detectors read them."""

    def __init__(self, queries: Iterable[Query], *, state: ClientState | None = None) -> None:
        self.queries = sorted(queries, key=event_ts)
        self.state = state  # the client's own record; None for an entity's pooled view
        # Requests, once each (the rows of one batch share their event), for detectors
        # of request habits: timing, parameters.
        self.events: list[RequestEvent] = []
        for q in self.queries:
            if not self.events or q.event is not self.events[-1]:
                self.events.append(q.event)
        self._min_distances: dict[str, np.ndarray] = {}

    @cached_property
    def vectors(self) -> dict[str, np.ndarray]:
        by_space: dict[str, list[np.ndarray]] = {}
        for q in self.queries:
            if q.space is not None and q.vector is not None:
                by_space.setdefault(q.space, []).append(q.vector)
        return {space: np.vstack(rows).astype(np.float32) for space, rows in by_space.items()}

    def min_distances(self, space: str) -> np.ndarray:
        """For each query after the first: L2 distance to its nearest earlier query."""
        cached = self._min_distances.get(space)
        if cached is None:
            cached = min_distances(self.vectors[space])
            self._min_distances[space] = cached
        return cached


def min_distances(vectors: np.ndarray) -> np.ndarray:
    """``out[i-1] = min_{j<i} ||v_i - v_j||`` for i >= 1; shape ``[n-1]``."""
    n = len(vectors)
    if n < 2:
        return np.empty(0)
    vectors = vectors.astype(np.float64)
    squared = np.einsum("ij,ij->i", vectors, vectors)
    d2 = squared[:, None] + squared[None, :] - 2.0 * (vectors @ vectors.T)
    # Cancellation leaves exact repeats a hair above zero; they must read as 0 (a repeat).
    d2[d2 < 1e-9 * max(float(squared.max()), 1e-12)] = 0.0
    d2[np.triu_indices(n)] = np.inf  # only earlier queries count
    nearest: np.ndarray = np.sqrt(np.maximum(d2[1:].min(axis=1), 0.0))
    return nearest
