"""Classifier extraction: probing the decision boundary, and inputs unlike real data.

Attacks that refine a copy (Jacobian augmentation, active learning, adaptive KnockoffNets)
query where the victim is least sure: the top-1 minus top-2 probability margin is small.
Synthetic or random inputs also fall outside the data the model serves. The two
statistics are the share of low-margin answers and the share of inputs farther from every
reference centroid than 99% of benign inputs are.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from modelfence.detect.detectors.base import share
from modelfence.detect.features import View
from modelfence.detect.reference import Reference

MIN_QUERIES = 20
LOW_MARGIN = 0.2


class BoundaryProbing:
    code = "boundary_probing"
    direction: Literal[1, -1] = 1
    default_threshold: float | None = 0.5

    def statistic(self, view: View, reference: Reference | None) -> float | None:
        margins = [q.margin for q in view.queries if q.margin is not None]
        if len(margins) < MIN_QUERIES:
            return None
        return share([m < LOW_MARGIN for m in margins])

    def describe(self, value: float, threshold: float) -> str:
        return f"{value:.0%} of queries near the decision boundary"


class OutOfDistribution:
    code = "out_of_distribution"
    direction: Literal[1, -1] = 1
    default_threshold: float | None = 0.3

    def statistic(self, view: View, reference: Reference | None) -> float | None:
        if reference is None:
            return None
        values = []
        for space, vectors in view.vectors.items():
            ref = reference.spaces.get(space)
            if ref is not None and space != "text" and len(vectors) >= MIN_QUERIES:
                values.append(float(np.mean(ref.distance_to_reference(vectors) > ref.ood_radius)))
        return max(values) if values else None

    def describe(self, value: float, threshold: float) -> str:
        return f"{value:.0%} of inputs unlike any benign input"
