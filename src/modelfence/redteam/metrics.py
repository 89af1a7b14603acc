"""The numbers every scenario reports: clone quality, dollars, and what the defender did.

Pure functions over arrays and exchange logs, so each is tested on cases with a known
answer (identical models agree 100%, a rank-r matrix has rank r, and so on).
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from modelfence.redteam.traffic import Exchange

THROTTLED = 429
BLOCKED = (401, 403)
# Beyond the hidden size only float rounding is left: singular values fall by far more
# than this, while a full-rank spectrum of real logits decays gently.
CLIFF = 1_000.0


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of positions where two label vectors agree (fidelity when ``b`` is the victim's
    labels, accuracy when it is the ground truth)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two non-empty label vectors of one length, got {a.shape} {b.shape}")
    return float((a == b).mean())


def cosine_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of matching rows of ``a`` and ``b`` (both ``[n, d]``)."""
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean((a * b).sum(axis=1) / np.maximum(norms, 1e-12)))


def recover_rank(matrix: np.ndarray) -> tuple[int, np.ndarray]:
    """The rank an attacker reads off a stack of logit vectors, and the singular values.

    Carlini et al. (2024): rows ``[n, m]`` (queries × tokens) of a model with hidden size
    ``h < min(n, m)`` span only ``h`` dimensions, so the singular values drop by orders of
    magnitude after the ``h``-th. The rank is the position of the largest drop in
    ``log σ`` when that drop is a cliff of at least ``CLIFF`` times; without one (the matrix
    is full rank, or too small to show the hidden size) it is ``min(n, m)``.
    """
    singular = np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)
    positive = singular[singular > singular[0] * 1e-12] if singular[0] > 0 else singular[:0]
    if positive.size < 2:
        return int(positive.size), singular
    gaps = -np.diff(np.log(positive))
    cut = int(np.argmax(gaps))
    if gaps[cut] < np.log(CLIFF):
        return int(positive.size), singular
    return cut + 1, singular


@dataclass(frozen=True, slots=True)
class Price:
    """What the operator charges for a model (USD), as in the gateway's ``prices`` config."""

    input_per_1k_tokens: float = 0.0
    output_per_1k_tokens: float = 0.0
    per_request: float = 0.0

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (
            self.per_request
            + tokens_in / 1000 * self.input_per_1k_tokens
            + tokens_out / 1000 * self.output_per_1k_tokens
        )


def price_for(model: str, prices: Mapping[str, Price]) -> Price:
    """The price entry for ``model``: an exact name first, then the first fnmatch pattern."""
    if model in prices:
        return prices[model]
    for pattern, price in prices.items():
        if fnmatch.fnmatchcase(model, pattern):
            return price
    return Price()


def dollar_cost(exchanges: Iterable[Exchange], prices: Mapping[str, Price]) -> float:
    """What the answered requests cost at the configured prices (refused ones are free)."""
    total = 0.0
    for exchange in exchanges:
        if exchange.ok:
            tokens_in, tokens_out = exchange.usage()
            total += price_for(exchange.request.model, prices).cost(tokens_in, tokens_out)
    return total


@dataclass(slots=True)
class DefenderOutcome:
    """What the gateway did to one actor (all of a campaign's identities summed)."""

    requests: int = 0
    answered: int = 0
    throttled: int = 0  # 429
    blocked: int = 0  # 401 / 403
    other_errors: int = 0
    flagged: bool | None = None  # None: detection not available
    requests_before_first_flag: int | None = None  # answered extraction requests
    queries_before_first_flag: int | None = None  # the inputs those requests carried
    quality_at_first_flag: float | None = None
    statuses: dict[int, int] = field(default_factory=dict)


def defender_outcome(exchanges: Sequence[Exchange]) -> DefenderOutcome:
    statuses = Counter(e.status for e in exchanges)
    return DefenderOutcome(
        requests=len(exchanges),
        answered=statuses[200],
        throttled=statuses[THROTTLED],
        blocked=sum(statuses[s] for s in BLOCKED),
        other_errors=sum(n for s, n in statuses.items() if s not in (200, THROTTLED, *BLOCKED)),
        statuses=dict(sorted(statuses.items())),
    )


@dataclass(frozen=True, slots=True)
class BenignOutcome:
    """How honest clients fared: shares ever throttled/blocked/flagged, and latency."""

    clients: int
    throttled_share: float
    blocked_share: float
    flagged_share: float | None
    latency_p50_ms: float
    latency_p95_ms: float


def benign_outcome(
    exchanges: Sequence[Exchange], clients: Sequence[str], flagged: set[str] | None
) -> BenignOutcome:
    """``flagged`` is None when the gateway has no detection to ask."""
    throttled = {e.request.client for e in exchanges if e.status == THROTTLED}
    blocked = {e.request.client for e in exchanges if e.status in BLOCKED}
    latencies = np.array([e.latency_ms for e in exchanges if e.ok] or [0.0])
    n = max(len(clients), 1)
    return BenignOutcome(
        clients=len(clients),
        throttled_share=len(throttled) / n,
        blocked_share=len(blocked) / n,
        flagged_share=None if flagged is None else len(flagged & set(clients)) / n,
        latency_p50_ms=float(np.percentile(latencies, 50)),
        latency_p95_ms=float(np.percentile(latencies, 95)),
    )


def answered_before(exchanges: Iterable[Exchange], at: float) -> tuple[int, int]:
    """(requests, queries) of answered extraction traffic sent before epoch time ``at``:
    what the attacker already held when detection first flagged it."""
    held = [e for e in exchanges if e.ok and e.request.purpose == "extraction" and e.wall_at < at]
    return len(held), sum(e.request.units for e in held)


def quality_at(curve: Sequence[tuple[int, float]], queries: int) -> float | None:
    """The clone quality of the last checkpoint ``(queries, quality)`` reached with at most
    ``queries`` queries (``None`` if the flag came before the first checkpoint).

    A step function on purpose: the attacker could train on what it held at the flag,
    and a checkpoint is the best clone measured from no more than that.
    """
    reached = [quality for spent, quality in sorted(curve) if spent <= queries]
    return reached[-1] if reached else None
