"""The traffic's yardstick: what lockstep compares keys with, and what a hostile client can
do to it."""

from __future__ import annotations

import numpy as np

from modelfence.detect.features import Query
from modelfence.detect.traffic import MAX_SPACES, MIN_ROWS, TAIL, WINDOW, TrafficMoments

from .test_detect_streams import event


def feed(traffic: TrafficMoments, rows: np.ndarray, *, model: str = "m", status: int = 200) -> None:
    for row in rows:
        traffic.add(Query(event("c", 0.0, model=model, status=status), f"vec{len(row)}", np.asarray(row)))


def test_a_key_is_measured_in_spreads_of_the_latest_traffic_winsorised() -> None:
    rng = np.random.default_rng(3)
    rows = rng.standard_t(3, (3 * WINDOW, 5)).astype(np.float32) * 3.0 + 2.0
    traffic = TrafficMoments()
    feed(traffic, rows[:MIN_ROWS * 2])
    assert traffic.deviation("m:vec5", rows[:2]) is not None  # made here, made again below
    feed(traffic, rows[MIN_ROWS * 2 :])
    latest = rows[-WINDOW:].astype(np.float64)
    low, high = np.quantile(latest, [TAIL, 1 - TAIL], axis=0)
    held = np.clip(latest, low, high)
    probe = rng.normal(0.0, 9.0, (4, 5))
    expected = (np.clip(probe, low, high).mean(axis=0) - held.mean(axis=0)) / held.std(axis=0)
    assert np.allclose(traffic.deviation("m:vec5", probe), expected, rtol=1e-3)
    assert traffic.deviation("m:vec6", probe) is None  # a space never seen
    assert traffic.deviation("m:vec5", probe[:, :3]) is None  # rows of another width
    assert traffic.deviation("other:vec5", probe) is None  # another model's traffic


def test_the_yardstick_waits_for_its_first_rows_and_leaves_refused_requests_out() -> None:
    traffic = TrafficMoments()
    feed(traffic, np.random.default_rng(4).normal(0.0, 1.0, (MIN_ROWS - 1, 2)))
    assert traffic.deviation("m:vec2", np.zeros((1, 2))) is None
    feed(traffic, np.full((MIN_ROWS * 4, 2), 100.0), status=429)
    feed(traffic, np.zeros((1, 2)))
    deviation = traffic.deviation("m:vec2", np.ones((1, 2)))
    assert deviation is not None and np.all((deviation > 0.5) & (deviation < 2.0))


def test_one_client_cannot_move_the_yardstick_with_a_few_huge_numbers() -> None:
    rng = np.random.default_rng(5)
    honest = rng.normal(0.0, 1.0, (WINDOW, 8))
    clean, poisoned = TrafficMoments(), TrafficMoments()
    feed(clean, honest)
    poison = np.array([[1e30] * 8, [-3e38] * 8, [1e30] * 8] * 10)  # 30 rows: 1.5% of the window
    feed(poisoned, np.vstack([honest[:1000], poison, honest[1000:]]))
    probe = honest[:50] + np.array([0.5, -0.5] * 4)
    before, after = clean.deviation("m:vec8", probe), poisoned.deviation("m:vec8", probe)
    assert before is not None and after is not None
    assert np.allclose(after, before, atol=0.1)


def test_a_bounded_number_of_spaces_is_kept_and_the_emptiest_make_room() -> None:
    traffic = TrafficMoments()
    feed(traffic, np.random.default_rng(7).normal(0.0, 1.0, (MIN_ROWS * 4, 3)))  # the busy one
    for width in range(4, MAX_SPACES + 10):
        feed(traffic, np.arange(float(MIN_ROWS))[:, None] * np.ones((1, width)))
    kept = [w for w in range(3, MAX_SPACES + 10) if traffic.deviation(f"m:vec{w}", np.ones((1, w))) is not None]
    assert len(kept) <= MAX_SPACES and kept[0] == 3


def test_two_models_taking_rows_of_one_width_are_two_yardsticks() -> None:
    rng = np.random.default_rng(8)
    traffic = TrafficMoments()
    for n in range(MIN_ROWS * 2):
        feed(traffic, rng.normal(0.0, 1.0, (1, 3)), model="a")
        feed(traffic, rng.normal(5.0, 1.0, (1, 3)), model="b")
    deviation = traffic.deviation("b:vec3", rng.normal(5.0, 1.0, (200, 3)))
    assert deviation is not None and np.all(np.abs(deviation) < 0.5)
