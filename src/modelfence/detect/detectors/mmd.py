"""Maximum mean discrepancy of a client's recent queries against benign reference queries.

An extractor's queries are drawn to cover the model, not to get work done, so their
embedding distribution differs from benign traffic (arXiv 2606.05725 reports 0.3% benign
false positives on LLM traffic). The statistic is the unbiased MMD² with an RBF kernel
(bandwidth: median heuristic on the reference) between the client's last ``window``
queries and the reference sample. It has no default threshold: it runs once calibration
on benign-vs-benign windows has set one at the target false-positive rate.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from modelfence.detect.features import View
from modelfence.detect.reference import Reference

WINDOW = 64
MIN_QUERIES = 30


def _kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    k: np.ndarray = np.exp(-gamma * np.maximum(d2, 0.0))
    return k


def _within(k: np.ndarray) -> float:
    n = len(k)
    return float((k.sum() - np.trace(k)) / (n * (n - 1)))


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float, *, yy: float | None = None) -> float:
    """Unbiased MMD² between samples ``x [n, d]`` and ``y [m, d]`` (RBF kernel); ``yy``
    is the reference's own term when already known (it never changes)."""
    gamma = 1.0 / (2.0 * bandwidth * bandwidth)
    if yy is None:
        yy = _within(_kernel(y, y, gamma))
    return _within(_kernel(x, x, gamma)) + yy - 2.0 * float(_kernel(x, y, gamma).mean())


class Mmd:
    code = "mmd_shift"
    direction: Literal[1, -1] = 1
    default_threshold: float | None = None

    def __init__(self) -> None:
        # reference sample's id -> (the sample, its own kernel term); holding the sample
        # keeps its id from being reused by another array
        self._yy: dict[int, tuple[np.ndarray, float]] = {}

    def statistic(self, view: View, reference: Reference | None) -> float | None:
        if reference is None:
            return None
        values = []
        for space, vectors in view.vectors.items():
            ref = reference.spaces.get(space)
            if ref is None or len(vectors) < MIN_QUERIES:
                continue
            cached = self._yy.get(id(ref.sample))
            if cached is None:
                gamma = 1.0 / (2.0 * ref.bandwidth * ref.bandwidth)
                cached = (ref.sample, _within(_kernel(ref.sample, ref.sample, gamma)))
                self._yy[id(ref.sample)] = cached
            values.append(mmd2(vectors[-WINDOW:], ref.sample, ref.bandwidth, yy=cached[1]))
        return max(values) if values else None

    def describe(self, value: float, threshold: float) -> str:
        return (
            f"queries unlike benign traffic (MMD² {value:.3f}, {value / threshold:.1f}× threshold)"
        )
