"""Probability vectors that agree with the label watermark.

A marked row's vector is a permutation of the original: the keyed wrong label takes the
top probability and the true label takes the wrong label's. Nothing is added or rescaled,
so the vector still sums to what it summed to, its entropy is unchanged (a clone cannot
spot marked rows by a flat distribution), and the same input always gives the same vector.
"""

from __future__ import annotations

from collections.abc import Sequence


def argmax(row: Sequence[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def swap_to_label(row: Sequence[float], label: int) -> list[float]:
    """``row`` ``[classes]`` (probabilities) with entries ``argmax(row)`` and ``label`` swapped.

    >>> swap_to_label([0.1, 0.7, 0.2], 2)
    [0.1, 0.2, 0.7]
    """
    out = list(row)
    top = argmax(out)
    out[top], out[label] = out[label], out[top]
    return out
