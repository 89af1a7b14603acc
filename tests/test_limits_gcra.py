"""Properties of the GCRA arithmetic; time is an argument, nothing sleeps."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfence.limits.gcra import SLACK_SECONDS, Rate, Verdict, adjust, admit, remaining

rates = st.builds(
    Rate,
    limit=st.floats(1, 1000),
    period=st.floats(1, 3600),
    burst=st.none() | st.floats(1, 1000),
)
starts = st.floats(0, 2e9)  # epoch-sized times too, where float rounding bites
# A run of requests: seconds since the previous one, and its cost in units.
runs = st.lists(st.tuples(st.floats(0, 30), st.integers(0, 20)), min_size=1, max_size=40)


def replay(
    rate: Rate, start: float, run: list[tuple[float, int]]
) -> tuple[float, float, list[tuple[float, int, Verdict]]]:
    """Feed ``run`` through GCRA; return the final TAT and clock and every verdict."""
    tat, now, seen = start, start, []
    for gap, cost in run:
        now += gap
        verdict = admit(rate, tat, now, cost)
        seen.append((now, cost, verdict))
        tat = verdict.tat
    return tat, now, seen


def test_example_from_the_docstring() -> None:
    verdict = admit(Rate(limit=60), tat=0.0, now=100.0, cost=10)
    assert verdict == Verdict(True, 110.0, 50, 10.0, 0.0)


@settings(deadline=None)
@given(rates, starts, runs)
def test_never_admits_more_than_burst_plus_rate_over_any_window(
    rate: Rate, start: float, run: list[tuple[float, int]]
) -> None:
    _, _, seen = replay(rate, start, run)
    admitted = [(now, cost) for now, cost, verdict in seen if verdict.allowed]
    for i, (first, _) in enumerate(admitted):
        total = 0
        for now, cost in admitted[i:]:
            total += cost
            allowance = rate.capacity + (now - first + SLACK_SECONDS) / rate.interval
            assert total <= allowance + 1e-6 * allowance


@given(rates, starts, runs, st.integers(0, 2000))
def test_denial_changes_nothing_and_says_when_to_retry(
    rate: Rate, start: float, run: list[tuple[float, int]], cost: int
) -> None:
    tat, now, _ = replay(rate, start, run)
    verdict = admit(rate, tat, now, cost)
    if verdict.allowed:
        assert verdict.retry_after == 0
        return
    assert verdict.tat == tat
    if verdict.retry_after == math.inf:
        assert cost > rate.capacity
        assert not admit(rate, now, now, cost).allowed  # not even into an empty bucket
        return
    assert verdict.retry_after > 0
    assert admit(rate, tat, now + verdict.retry_after, cost).allowed
    too_early = now + verdict.retry_after - 3 * SLACK_SECONDS
    if too_early > now:
        assert not admit(rate, tat, too_early, cost).allowed


@given(rates, starts, runs)
def test_remaining_is_exactly_what_one_more_call_admits(
    rate: Rate, start: float, run: list[tuple[float, int]]
) -> None:
    tat, now, seen = replay(rate, start, run)
    left = remaining(rate, tat, now)
    assert seen[-1][2].remaining == left
    assert 0 <= left <= math.floor(rate.capacity + SLACK_SECONDS / rate.interval)
    assert admit(rate, tat, now, left).allowed
    assert not admit(rate, tat, now, left + 1).allowed


@given(rates, starts, runs)
def test_bucket_is_full_again_after_reset(
    rate: Rate, start: float, run: list[tuple[float, int]]
) -> None:
    _, now, seen = replay(rate, start, run)
    verdict = seen[-1][2]
    assert verdict.reset_seconds >= 0
    assert remaining(rate, verdict.tat, now + verdict.reset_seconds) == remaining(rate, now, now)


@given(rates, starts, runs, st.integers(0, 5000))
def test_refund_never_fills_past_capacity(
    rate: Rate, start: float, run: list[tuple[float, int]], refund: int
) -> None:
    tat, now, _ = replay(rate, start, run)
    refunded = adjust(rate, tat, now, -refund)
    assert refunded >= now
    assert remaining(rate, refunded, now) <= remaining(rate, now, now)


@given(rates, starts, runs, st.integers(1, 5000))
def test_charge_then_equal_refund_restores_the_backlog(
    rate: Rate, start: float, run: list[tuple[float, int]], units: int
) -> None:
    tat, now, _ = replay(rate, start, run)
    charged = adjust(rate, tat, now, units)
    assert charged > max(tat, now)
    assert adjust(rate, charged, now, -units) == pytest.approx(max(tat, now), abs=1e-5)


@given(rates, st.floats(1.0001, 100))
def test_cost_above_capacity_never_fits(rate: Rate, factor: float) -> None:
    verdict = admit(rate, 0.0, 1000.0, math.ceil(rate.capacity * factor) + 1)
    assert not verdict.allowed
    assert verdict.retry_after == math.inf
    assert verdict.remaining == remaining(rate, 0.0, 1000.0)


@pytest.mark.parametrize("limit, period, burst", [(0, 60, None), (1, 0, None), (1, 60, 0)])
def test_rate_rejects_non_positive_values(limit: float, period: float, burst: float | None) -> None:
    with pytest.raises(ValueError, match="positive"):
        Rate(limit, period, burst)
