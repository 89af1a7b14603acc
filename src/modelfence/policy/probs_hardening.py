"""Hardening of probability vectors (classifier answers): what KnockoffNets and
CopycatCNN learn from.

Each transform maps a matrix of rows ``[n, classes]`` (class probabilities, each row
summing to 1) to another of the same shape, all rows at once (numpy: a batch of 32 rows
costs little more than one); :func:`harden_rows` applies a profile's transforms in a fixed
order — mode, noise, top-k, rounding — and :func:`harden_row` does it to one list::

    >>> harden_row([0.7, 0.2, 0.1], RowHardening(mode="labels_only"))
    [1.0, 0.0, 0.0]
    >>> harden_row([0.7, 0.2, 0.1], RowHardening(top_k=1, decimals=1))
    [0.7, 0.0, 0.0]

Modes:

- ``labels_only``: the one-hot of the top class (the shape stays, so clients keep parsing).
- ``reverse_sigmoid`` (Lee et al., "Defending against NN model stealing attacks using
  deceptive perturbations", 2019): ``y - beta * (sigmoid(gamma * logit(y)) - 1/2)``,
  renormalised. Confident classes are pushed down, unlikely ones up, which poisons the
  soft labels a thief trains on; the top class is kept on top (swapped back if the
  perturbation moved it), so label accuracy is unchanged.
- ``ood_aware``, in the spirit of Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020):
  the maximum probability is a cheap in-distribution score. Rows whose top probability is
  at least ``threshold`` are returned exactly; below it the answer is blended with a
  misinformation vector ``∝ 1 - y`` (mass moved to the least likely classes) with weight
  ``alpha = 1 - exp(-sharpness * (threshold - max(y)))``. Attack queries (synthetic,
  noisy, out-of-distribution) tend to be the uncertain ones.
"""


from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from modelfence.policy.config import ProbabilityMode
from modelfence.policy.noise import default_rng, laplace

Rows = npt.NDArray[np.float64]  # [n, classes]

_EPS = 1e-6


def _normalised(rows: Rows) -> Rows:
    """Each row divided by its sum; rows summing to zero or less are left as they are."""
    total = rows.sum(axis=1, keepdims=True)
    return rows / np.where(total > 0, total, 1.0)


def _one_hot(rows: Rows, columns: npt.NDArray[np.intp]) -> Rows:
    out = np.zeros_like(rows)
    out[np.arange(len(rows)), columns] = 1.0
    return out


def labels_only(rows: Rows) -> Rows:
    return _one_hot(rows, rows.argmax(axis=1))


def reverse_sigmoid(rows: Rows, beta: float, gamma: float) -> Rows:
    p = np.minimum(np.maximum(rows, _EPS), 1 - _EPS)
    # sigmoid(gamma * logit(p)) written as p^g / (p^g + (1 - p)^g): fewer array operations.
    pg, qg = p**gamma, (1 - p) ** gamma
    out = _normalised(np.maximum(rows - beta * (pg / (pg + qg) - 0.5), 0.0))
    top, new_top = rows.argmax(axis=1), out.argmax(axis=1)
    moved = np.flatnonzero(top != new_top)
    if moved.size:
        a, b = top[moved], new_top[moved]
        out[moved, a], out[moved, b] = out[moved, b], out[moved, a]
    return out


def ood_aware(rows: Rows, threshold: float, sharpness: float) -> Rows:
    confidence = rows.max(axis=1, keepdims=True)
    if (confidence >= threshold).all():
        return rows
    alpha = np.where(confidence >= threshold, 0.0, 1 - np.exp(sharpness * (confidence - threshold)))
    return (1 - alpha) * rows + alpha * _normalised(1 - rows)


def top_k(rows: Rows, k: int) -> Rows:
    if k >= rows.shape[1]:
        return rows
    # A stable sort of the negated rows: among equal values the first class is kept.
    keep = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    index = np.arange(len(rows))[:, None]
    out = np.zeros_like(rows)
    out[index, keep] = rows[index, keep]
    return out


def noised(rows: Rows, rng: np.random.Generator, scale: float) -> Rows:
    out = np.maximum(rows + laplace(rng, scale, rows.shape), 0.0)
    return np.where(out.sum(axis=1, keepdims=True) > 0, _normalised(out), rows)


@dataclass(slots=True)
class RowHardening:
    mode: ProbabilityMode = "exact"
    top_k: int | None = None
    decimals: int | None = None
    beta: float = 0.3
    gamma: float = 0.4
    threshold: float = 0.9
    sharpness: float = 40.0
    noise_scale: float | None = None
    rng: np.random.Generator = field(default_factory=default_rng)


def harden_rows(rows: Rows, h: RowHardening) -> Rows:
    """``rows`` ``[n, classes]`` hardened by ``h`` (a new array; ``rows`` is not changed)."""
    if h.mode == "labels_only":
        rows = labels_only(rows)
    elif h.mode == "reverse_sigmoid":
        rows = reverse_sigmoid(rows, h.beta, h.gamma)
    elif h.mode == "ood_aware":
        rows = ood_aware(rows, h.threshold, h.sharpness)
    if h.noise_scale:
        rows = noised(rows, h.rng, h.noise_scale)
    if h.top_k is not None:
        rows = top_k(rows, h.top_k)
    if h.decimals is not None:
        rows = rows.round(h.decimals)
    return rows


def harden_row(row: list[float], h: RowHardening) -> list[float]:
    hardened: list[float] = harden_rows(np.asarray([row], dtype=np.float64), h)[0].tolist()
    return hardened


def _width(tensor: dict[str, Any]) -> int | None:
    """The number of classes of a two-dimensional floating-point tensor, else None."""
    shape = tensor.get("shape")
    if not str(tensor.get("datatype", "")).startswith("FP") or not isinstance(shape, list):
        return None
    if len(shape) != 2 or not isinstance(shape[1], int) or shape[1] < 1:
        return None
    return shape[1] if isinstance(tensor.get("data"), list) else None


def harden_oip(
    payload: Any, h: RowHardening | None, allowed: tuple[str, ...] | None = None
) -> Any:
    """Harden an Open Inference Protocol v2 answer in place and return it.

    Every two-dimensional floating-point output tensor ``[n, classes]`` is taken as rows
    of class probabilities (its data flat or nested); ``allowed`` (a tier's
    ``oip_outputs``) drops other tensors. A probability tensor whose data does not fit its
    shape is dropped too: what cannot be hardened is not released.
    """
    outputs = payload.get("outputs") if isinstance(payload, dict) else None
    if not isinstance(outputs, list):
        return payload
    if allowed is not None:
        outputs = payload["outputs"] = [o for o in outputs if o.get("name") in allowed]
    if h is None:
        return payload
    kept = []
    for tensor in outputs:
        width = _width(tensor) if isinstance(tensor, dict) else None
        if width is not None:
            try:
                rows = np.asarray(tensor["data"], dtype=np.float64).reshape(-1, width)
            except (TypeError, ValueError):
                continue
            tensor["data"] = harden_rows(rows, h).ravel().tolist()
        kept.append(tensor)
    payload["outputs"] = kept
    return payload
