"""The harness's own arithmetic, on cases with known answers."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from modelfence.redteam.detection import first_flag
from modelfence.redteam.metrics import (
    Price,
    agreement,
    answered_before,
    benign_outcome,
    cosine_agreement,
    defender_outcome,
    dollar_cost,
    quality_at,
    recover_rank,
)
from modelfence.redteam.timing import HumanTiming, SteadyTiming, VirtualClock
from modelfence.redteam.traffic import CHAT, DIGITS_INFER, Exchange, PlannedRequest


def test_identical_models_agree_fully_and_disjoint_not_at_all() -> None:
    labels = np.arange(50) % 10
    assert agreement(labels, labels) == 1.0
    assert agreement(labels, (labels + 1) % 10) == 0.0
    vectors = np.random.default_rng(0).normal(size=(20, 384))
    assert cosine_agreement(vectors, vectors) == pytest.approx(1.0)
    assert cosine_agreement(vectors, -vectors) == pytest.approx(-1.0)


@pytest.mark.parametrize("hidden", [5, 24, 64])
def test_svd_recovers_the_rank_of_shifted_logit_rows(hidden: int) -> None:
    rng = np.random.default_rng(hidden)
    w = rng.normal(size=(200, hidden))
    h = rng.normal(size=(150, hidden))
    logits = h @ w.T
    # Logprobs are logits up to one shift per row; differences to a reference keep the rank.
    shifted = logits + rng.normal(size=(150, 1)) * 10
    differences = shifted[:, 1:] - shifted[:, :1]
    assert recover_rank(differences)[0] == hidden


def test_full_rank_matrix_reports_its_smaller_side() -> None:
    assert recover_rank(np.random.default_rng(1).normal(size=(30, 40)))[0] == 30


def _exchange(route: str, status: int, body: object, client: str = "c") -> Exchange:
    model = {"model": "smollm2-135m-instruct"} if route == CHAT else {}
    return Exchange(PlannedRequest(0.0, client, route, model), client, status, 10.0, body)


def test_dollar_cost_charges_answered_requests_only() -> None:
    prices = {"smollm2-*": Price(input_per_1k_tokens=0.5, output_per_1k_tokens=1.5), "digits": Price(per_request=0.01)}
    usage = {"usage": {"prompt_tokens": 1000, "completion_tokens": 2000}}
    exchanges = [
        _exchange(CHAT, 200, usage),  # 0.5 + 3.0
        _exchange(CHAT, 429, usage),  # refused: free
        _exchange(DIGITS_INFER, 200, {}),  # 0.01
    ]
    assert dollar_cost(exchanges, prices) == pytest.approx(3.51)


def test_defender_and_benign_outcomes_count_statuses() -> None:
    exchanges = [_exchange(CHAT, s, {}, client) for s, client in [(200, "a"), (429, "a"), (403, "b"), (500, "b"), (200, "c")]]
    outcome = defender_outcome(exchanges)
    assert (outcome.answered, outcome.throttled, outcome.blocked, outcome.other_errors) == (2, 1, 1, 1)
    benign = benign_outcome(exchanges, ["a", "b", "c", "d"], flagged=None)
    assert benign.throttled_share == 0.25 and benign.blocked_share == 0.25 and benign.flagged_share is None


def test_human_timing_statistics_with_a_fixed_seed() -> None:
    timing = HumanTiming(sessions_per_day=3, requests_per_session=4, think_median=25)
    days = 200
    times = np.array(timing.arrivals(np.random.default_rng(3), horizon=days * 86_400.0))
    assert times.tolist() == timing.arrivals(np.random.default_rng(3), horizon=days * 86_400.0)
    assert 0.6 * 12 < len(times) / days < 1.4 * 12  # ~3 sessions × ~4 requests a day
    gaps = np.diff(times)
    assert 15 < np.median(gaps[gaps < 600]) < 45  # think time around its 25 s median
    hours = (times % 86_400) // 3600
    assert (hours == 15).sum() > 5 * (hours == 3).sum()  # afternoon busier than night


def test_steady_timing_rate_and_virtual_clock() -> None:
    times = SteadyTiming(rate=2.0).arrivals(np.random.default_rng(0), horizon=1000.0)
    assert len(times) == pytest.approx(2000, rel=0.1)
    now = [100.0]
    clock = VirtualClock(60.0, now=lambda: now[0])
    now[0] += 1.0
    assert clock.virtual_now() == pytest.approx(60.0)
    assert clock.delay_until(120.0) == pytest.approx(1.0)
    assert clock.delay_until(30.0) == 0.0


def _timed(status: int, wall_at: float, rows: int) -> Exchange:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 64], "data": []}]}
    return Exchange(PlannedRequest(0.0, "thief", DIGITS_INFER, body, "extraction"), "thief", status, 1.0, {}, 0.0, {}, wall_at)


def test_queries_before_the_first_flag_count_answered_extraction_only() -> None:
    exchanges = [_timed(200, 10.0, 64), _timed(429, 11.0, 64), _timed(200, 12.0, 16), _timed(200, 30.0, 64)]
    assert answered_before(exchanges, at=20.0) == (2, 80)
    assert answered_before(exchanges, at=5.0) == (0, 0)


def test_quality_at_the_flag_is_the_last_checkpoint_reached() -> None:
    curve = [(100, 0.8), (300, 0.93), (1000, 0.97)]
    assert quality_at(curve, 299) == 0.8
    assert quality_at(curve, 300) == 0.93
    assert quality_at(curve, 99) is None


def test_first_flag_reads_the_earliest_raise_from_the_audit_trail() -> None:
    detail = {
        "record": {"level": "tighten", "updated_at": "2026-01-01T00:10:00+00:00"},
        "audit": [  # newest first, as the admin API answers
            {"at": "2026-01-01T00:05:00+00:00", "action": "tighten"},
            {"at": "2026-01-01T00:02:00+00:00", "action": "normal"},
            {"at": "2026-01-01T00:01:00+00:00", "action": "alert"},
        ],
    }
    flag = first_flag("thief", detail)
    assert flag is not None and flag.level == "alert"
    assert flag.at == datetime(2026, 1, 1, 0, 1, tzinfo=UTC).timestamp()
    # A raising row aged out of the trail: the record's update time bounds the flag.
    aged = first_flag("thief", {**detail, "audit": []})
    assert aged is not None and aged.level == "tighten"
    assert first_flag("honest", {"record": {"level": "normal", "updated_at": "2026-01-01T00:00:00+00:00"}, "audit": []}) is None


def test_pins_that_set_no_level_and_cut_links_are_not_flags() -> None:
    detail = {
        "record": {"level": "normal", "updated_at": "2026-01-01T00:10:00+00:00"},
        "audit": [{"at": f"2026-01-01T00:0{i}:00+00:00", "action": action}
                  for i, action in enumerate(("shadow", "probation", "cut_link", "allow"))],
    }
    assert first_flag("watched", detail) is None
