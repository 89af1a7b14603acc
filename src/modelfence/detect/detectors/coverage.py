"""Coverage: how fast a client spreads over the input space.

Benign clients work on a few topics and revisit them; an extractor wants answers
everywhere, so its queries fall into many cells of the reference clustering (k-means of
benign queries). The statistic is the share of distinct cells among the client's last
``WINDOW`` queries, compared with the same share for benign clients (calibrated).
"""

from __future__ import annotations

from typing import Literal

from modelfence.detect.features import View
from modelfence.detect.reference import Reference

WINDOW = 100
MIN_QUERIES = 30


class Coverage:
    code = "coverage_growth"
    direction: Literal[1, -1] = 1
    default_threshold: float | None = None

    def statistic(self, view: View, reference: Reference | None) -> float | None:
        values = shares(view, reference).values()
        return max(values) if values else None

    def describe(self, value: float, threshold: float) -> str:
        return f"queries spread over the input space ({value:.0%} distinct regions, {value / threshold:.1f}× benign)"


def shares(view: View, reference: Reference | None) -> dict[str, float]:
    """Per input space of the reference with at least ``MIN_QUERIES`` of the view's queries:
    distinct cells / queries over the last ``WINDOW`` of them."""
    if reference is None:
        return {}
    out = {}
    for space, vectors in view.vectors.items():
        if space in reference.spaces and len(vectors) >= MIN_QUERIES:
            recent = vectors[-WINDOW:]
            out[space] = len(set(reference.spaces[space].cells(recent).tolist())) / len(recent)
    return out
