"""The exact null distribution of a stratified rank sum.

In each stratum ``n`` items are ranked 1..n and ``k`` of them are picked uniformly at
random without replacement; the statistic is the sum of the picked items' ranks over all
strata. Its distribution is the convolution of the strata's subset-sum distributions,
counted exactly by dynamic programming (a count is an integer below C(n, k), exact in
float64 while C(n, k) < 2^53, which holds for the embedding test's 589 words and 5
triggers per stratum). The upper tail is summed from the top, so p-values of 1e-30 keep
their relative precision: no normal approximation is involved anywhere.

>>> round(rank_sum_sf(((4, 2),), 7), 4)  # pairs of 1..4 summing to 7 or more: {3,4}
0.1667
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

Strata = tuple[tuple[int, int], ...]  # (items, picks) per stratum


@lru_cache(maxsize=32)
def _subset_sums(n: int, k: int) -> npt.NDArray[np.float64]:
    """P(the sum of k distinct ranks drawn from 1..n equals s), indexed by s."""
    counts = np.zeros((k + 1, k * n + 1))
    counts[0, 0] = 1.0
    for item in range(1, n + 1):
        for size in range(min(item, k), 0, -1):
            counts[size, item:] += counts[size - 1, :-item]
    return counts[k] / math.comb(n, k)  # type: ignore[no-any-return]


@lru_cache(maxsize=32)
def _upper_tail(strata: Strata) -> npt.NDArray[np.float64]:
    """``tail[s]`` = P(total >= s) under the null."""
    pmf = np.ones(1)
    for n, k in strata:
        if not 0 <= k <= n:
            raise ValueError(f"a stratum of {n} items cannot have {k} picks")
        pmf = np.convolve(pmf, _subset_sums(n, k))
    return np.cumsum(pmf[::-1])[::-1]


def rank_sum_sf(strata: Sequence[tuple[int, int]], observed: int) -> float:
    """P(total rank sum >= ``observed``) when each stratum's picks are a random subset."""
    tail = _upper_tail(tuple((int(n), int(k)) for n, k in strata))
    if observed <= 0:
        return 1.0
    return float(min(1.0, tail[observed])) if observed < len(tail) else 0.0
