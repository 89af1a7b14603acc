"""``modelfence.tails`` gives what ``scipy.stats`` gives, edges included."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom, poisson

from modelfence.tails import binom_pmf, binom_sf, poisson_sf


@pytest.mark.parametrize("n", [1, 2, 7, 20, 200, 5_000])
@pytest.mark.parametrize("p", [1e-3, 0.1, 0.25, 0.5, 1.0])
def test_binomial_survival_matches_scipy_stats_from_below_zero_to_past_n(n: int, p: float) -> None:
    k = np.arange(-2, n + 3)
    ours, theirs = binom_sf(k, n, p), binom.sf(k, n, p)
    assert not np.isnan(ours).any()
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-300)
    assert float(binom_sf(-1, n, p)) == 1.0 and float(binom_sf(n, n, p)) == 0.0


@pytest.mark.parametrize("n", [1, 20, 500, 20_000])
@pytest.mark.parametrize("p", [0.5, 1 / 3, 0.02])
def test_binomial_pmf_matches_scipy_stats_and_sums_to_one(n: int, p: float) -> None:
    ours, theirs = binom_pmf(n, p), binom.pmf(np.arange(n + 1), n, p)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-300)
    assert ours.sum() == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("mu", [0.0, 1e-12, 0.3, 0.99, 4.0, 250.0, 2_000.0, 50_000.0])
def test_poisson_survival_matches_scipy_stats_on_both_sides_of_the_mean(mu: float) -> None:
    """Below the mean one minus the lower tail, above it the upper tail (for mu below 1 too,
    where one minus a lower tail near 1 would lose the digits); past mu = 745 the lone
    term exp(-mu) underflows, which summing from the term at k avoids."""
    ks = sorted({*range(-3, 60), *np.linspace(0, 3 * mu + 60, 200).astype(int).tolist()})
    for k in ks:
        expected = float(poisson.sf(k, mu))
        assert poisson_sf(k, mu) == pytest.approx(expected, rel=1e-10, abs=1e-300), k
