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


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased MMD² between samples ``x [n, d]`` and ``y [m, d]`` (RBF kernel)."""
    gamma = 1.0 / (2.0 * bandwidth * bandwidth)

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        k: np.ndarray = np.exp(-gamma * np.maximum(d2, 0.0))
        return k

    n, m = len(x), len(y)
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    xx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(xx + yy - 2.0 * kxy.mean())


class Mmd:
    code = "mmd_shift"
    direction: Literal[1, -1] = 1
    default_threshold: float | None = None

    def statistic(self, view: View, reference: Reference | None) -> float | None:
        if reference is None:
            return None
        values = [
            mmd2(
                vectors[-WINDOW:], reference.spaces[space].sample, reference.spaces[space].bandwidth
            )
            for space, vectors in view.vectors.items()
            if space in reference.spaces and len(vectors) >= MIN_QUERIES
        ]
        return max(values) if values else None

    def describe(self, value: float, threshold: float) -> str:
        return (
            f"queries unlike benign traffic (MMD² {value:.3f}, {value / threshold:.1f}× threshold)"
        )
