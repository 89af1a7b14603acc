"""The exact null of the stratified rank sum behind ``verify model --kind embeddings``.

Checked against complete enumeration where that is possible and against the tail of a
simulation at the sizes the embedding test uses.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from modelfence.forensics.ranktest import rank_sum_sf

EMBEDDING_STRATA = ((589, 5), (589, 5), (589, 5), (588, 5))  # 2,355 words, 20 triggers, 4 targets


def test_the_tail_equals_complete_enumeration() -> None:
    strata = ((7, 2), (6, 3), (5, 1))
    totals = np.asarray([
        sum(a) + sum(b) + sum(c)
        for a in itertools.combinations(range(1, 8), 2)
        for b in itertools.combinations(range(1, 7), 3)
        for c in itertools.combinations(range(1, 6), 1)
    ])
    for observed in range(int(totals.max()) + 3):
        assert rank_sum_sf(strata, observed) == pytest.approx(float(np.mean(totals >= observed)), abs=1e-13)


def test_the_extreme_tail_is_exact_not_approximated() -> None:
    # All five picks of every stratum at the top: one subset per stratum.
    best = sum(sum(range(n - k + 1, n + 1)) for n, k in EMBEDDING_STRATA)
    exact = 1.0
    for n, k in EMBEDDING_STRATA:
        exact /= float(np.prod([(n - i) / (k - i) for i in range(k)]))  # 1 / C(n, k)
    assert rank_sum_sf(EMBEDDING_STRATA, best) == pytest.approx(exact, rel=1e-9)
    assert rank_sum_sf(EMBEDDING_STRATA, best + 1) == 0.0 and exact < 1e-40


def test_the_tail_matches_simulated_random_subsets() -> None:
    rng = np.random.default_rng(7)
    draws = 50_000
    totals = np.zeros(draws, dtype=np.int64)
    for n, k in EMBEDDING_STRATA:
        keys = rng.random((draws, n))
        totals += (np.argpartition(keys, k, axis=1)[:, :k] + 1).sum(1)
    for quantile in (0.5, 0.9, 0.99, 0.999):
        observed = int(np.quantile(totals, quantile))
        simulated = float(np.mean(totals >= observed))
        sd = np.sqrt(simulated * (1 - simulated) / draws)
        assert abs(rank_sum_sf(EMBEDDING_STRATA, observed) - simulated) < 5 * sd + 1e-6


def test_impossible_strata_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot have"):
        rank_sum_sf(((3, 4),), 5)
