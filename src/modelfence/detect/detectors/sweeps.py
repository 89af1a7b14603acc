"""Near-duplicate and perturbation sweeps.

Perturbation attacks (Jacobian augmentation, noisy copies, templated prompts with one
slot changed) send many queries that are almost, but not exactly, an earlier query. The
statistic is the share of a client's queries whose nearest earlier query lies within a
small radius yet is not an exact repeat (exact repeats are retries, which benign clients
send too). The radius is relative to the data's own scale.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from modelfence.detect.features import View
from modelfence.detect.reference import Reference

MIN_QUERIES = 20
RELATIVE_RADIUS = 0.1  # of the median vector norm (1 for unit text embeddings)


class Sweeps:
    code = "perturbation_sweep"
    direction: Literal[1, -1] = 1
    default_threshold: float | None = 0.5

    def statistic(self, view: View, reference: Reference | None) -> float | None:
        values = []
        for space, vectors in view.vectors.items():
            if len(vectors) <= MIN_QUERIES:
                continue
            radius = RELATIVE_RADIUS * float(np.median(np.linalg.norm(vectors, axis=1)))
            distances = view.min_distances(space)
            near = (distances < radius) & (distances > 1e-6 * max(radius, 1e-12))
            values.append(float(near.mean()))
        return max(values) if values else None

    def describe(self, value: float, threshold: float) -> str:
        return f"{value:.0%} of queries are small perturbations of earlier ones"
