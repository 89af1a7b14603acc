"""Hardening of probability vectors (classifier answers): what KnockoffNets and
CopycatCNN learn from.

Each transform maps one row (class probabilities, summing to 1) to another and keeps the
row's length; :func:`harden_row` applies a profile's transforms in a fixed order —
mode, noise, top-k, rounding::

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

import math
import random
from dataclasses import dataclass, field
from typing import Any

from modelfence.policy.config import ProbabilityMode
from modelfence.policy.noise import default_rng, laplace

_EPS = 1e-6


def _normalised(row: list[float]) -> list[float]:
    total = sum(row)
    return [p / total for p in row] if total > 0 else row


def _argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def labels_only(row: list[float]) -> list[float]:
    top = _argmax(row)
    return [1.0 if i == top else 0.0 for i in range(len(row))]


def reverse_sigmoid(row: list[float], beta: float, gamma: float) -> list[float]:
    def shift(p: float) -> float:
        p = min(max(p, _EPS), 1 - _EPS)
        z = gamma * math.log(p / (1 - p))
        return beta * (1 / (1 + math.exp(-z)) - 0.5)

    out = _normalised([max(p - shift(p), 0.0) for p in row])
    top, new_top = _argmax(row), _argmax(out)
    if top != new_top:
        out[top], out[new_top] = out[new_top], out[top]
    return out


def ood_aware(row: list[float], threshold: float, sharpness: float) -> list[float]:
    confidence = max(row)
    if confidence >= threshold:
        return row
    alpha = 1 - math.exp(-sharpness * (threshold - confidence))
    misinformation = _normalised([1 - p for p in row])
    return [(1 - alpha) * p + alpha * m for p, m in zip(row, misinformation, strict=True)]


def top_k(row: list[float], k: int) -> list[float]:
    if k >= len(row):
        return row
    keep = set(sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k])
    return [p if i in keep else 0.0 for i, p in enumerate(row)]


def noised(row: list[float], rng: random.Random, scale: float) -> list[float]:
    out = [max(p + laplace(rng, scale), 0.0) for p in row]
    return _normalised(out) if sum(out) > 0 else row


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
    rng: random.Random = field(default_factory=default_rng)


def harden_row(row: list[float], h: RowHardening) -> list[float]:
    if h.mode == "labels_only":
        row = labels_only(row)
    elif h.mode == "reverse_sigmoid":
        row = reverse_sigmoid(row, h.beta, h.gamma)
    elif h.mode == "ood_aware":
        row = ood_aware(row, h.threshold, h.sharpness)
    if h.noise_scale:
        row = noised(row, h.rng, h.noise_scale)
    if h.top_k is not None:
        row = top_k(row, h.top_k)
    if h.decimals is not None:
        row = [round(p, h.decimals) for p in row]
    return row


def _is_probabilities(tensor: dict[str, Any]) -> bool:
    shape = tensor.get("shape")
    return (
        str(tensor.get("datatype", "")).startswith("FP")
        and isinstance(shape, list)
        and len(shape) == 2
        and isinstance(tensor.get("data"), list)
    )


def harden_oip(
    payload: Any, h: RowHardening | None, allowed: tuple[str, ...] | None = None
) -> Any:
    """Harden an Open Inference Protocol v2 answer in place and return it.

    Every two-dimensional floating-point output tensor ``[n, classes]`` is taken as rows
    of class probabilities; ``allowed`` (a tier's ``oip_outputs``) drops other tensors.
    """
    outputs = payload.get("outputs") if isinstance(payload, dict) else None
    if not isinstance(outputs, list):
        return payload
    if allowed is not None:
        outputs = payload["outputs"] = [o for o in outputs if o.get("name") in allowed]
    if h is None:
        return payload
    for tensor in outputs:
        if not _is_probabilities(tensor):
            continue
        width = tensor["shape"][1]
        data = tensor["data"]
        hardened: list[float] = []
        for start in range(0, len(data), width):
            hardened += harden_row(data[start : start + width], h)
        tensor["data"] = hardened
    return payload
