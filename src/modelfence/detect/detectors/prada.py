"""PRADA (Juuti et al., 2019): the distances between an extractor's queries are not normal.

Natural queries of one client have minimum distances to their earlier queries that are
roughly normally distributed; synthetic and perturbation-based queries (a seed plus many
small steps) make that distribution skewed or bimodal. The Shapiro–Wilk W statistic of
the minimum distances measures it: W near 1 is normal, PRADA flags W below a threshold
δ (0.90 is the paper's range; calibrate it on benign clients).

It runs on classifier input spaces only, as in the paper. On text embeddings the
spacing of one honest user's prompts is not normal either (with δ = 0.90, 8 of 20
crafted benign chat users fell below it), so text relies on the other detectors.
"""

from __future__ import annotations

from functools import lru_cache
from statistics import NormalDist
from typing import Literal

import numpy as np

from modelfence.detect.features import TEXT, View
from modelfence.detect.reference import Reference

MIN_QUERIES = 20


class Prada:
    code = "prada_distance"
    direction: Literal[1, -1] = -1
    default_threshold: float | None = 0.90

    def statistic(self, view: View, reference: Reference | None) -> float | None:
        values = [
            _w(view.min_distances(space))
            for space, vectors in view.vectors.items()
            if space != TEXT and len(vectors) > MIN_QUERIES
        ]
        finite = [w for w in values if w is not None]
        return min(finite) if finite else None

    def describe(self, value: float, threshold: float) -> str:
        return f"query spacing not natural (Shapiro-Wilk W {value:.2f} < {threshold:.2f})"


def _w(distances: np.ndarray) -> float | None:
    # Exact repeats (distance 0) are retries or caches, which honest clients send too.
    distances = distances[distances > 1e-9]
    if len(distances) <= MIN_QUERIES:
        return None
    if np.ptp(distances) <= 1e-9:
        return 0.0  # identical spacing everywhere: as unnatural as it gets
    return shapiro_w(distances)


# Royston's (1992) polynomials in 1/sqrt(n) for the two outermost weights of each side.
_OUTER = (0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056)
_NEXT = (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633)


def shapiro_w(values: np.ndarray) -> float:
    """The Shapiro-Wilk W of ``values`` (more than 5 of them): the squared correlation of
    the sorted values with Royston's weights.

    What ``scipy.stats.shapiro`` returns as its statistic (within 1e-8 in the tests),
    without the second that importing ``scipy.stats`` adds to the detector's start."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    centred = x - x.mean()  # the weights sum to 0: centring changes nothing but rounding
    return float((_weights(len(x)) @ centred) ** 2 / (centred @ centred))


@lru_cache(maxsize=64)
def _weights(n: int) -> np.ndarray:
    """Royston's weights for ``n`` sorted values: proportional to the expected normal order
    statistics, the outer two of each side corrected, their squares summing to 1."""
    quantile = NormalDist().inv_cdf
    m = np.array([quantile((i - 0.375) / (n + 0.25)) for i in range(1, n + 1)])
    summ2 = float(m @ m)
    root_n = n**-0.5
    outer = m[-1] / np.sqrt(summ2) + np.polynomial.polynomial.polyval(root_n, _OUTER)
    inner = m[-2] / np.sqrt(summ2) + np.polynomial.polynomial.polyval(root_n, _NEXT)
    scale = (summ2 - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * outer**2 - 2 * inner**2)
    weights = m / np.sqrt(scale)
    weights[[0, 1, -2, -1]] = -outer, -inner, inner, outer
    weights.flags.writeable = False  # shared by every caller through the cache
    return weights
