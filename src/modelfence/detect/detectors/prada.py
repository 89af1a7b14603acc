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

import warnings
from typing import Literal

import numpy as np
from scipy.stats import shapiro

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on n > 5000 and on ties; neither matters
        return float(shapiro(distances).statistic)
