"""The traffic's yardstick: what lockstep compares keys with, and what a hostile client can
do to it."""

from __future__ import annotations

import numpy as np

from modelfence.detect.features import Query
from modelfence.detect.traffic import (
    CLIENT_ROWS,
    MAX_DIMS,
    MAX_SPACES,
    MIN_ROWS,
    TAIL,
    WINDOW,
    TrafficMoments,
)

from .test_detect_streams import event


def feed(traffic: TrafficMoments, rows: np.ndarray, *, model: str = "m", status: int = 200,
         clients: int = 100, client: str | None = None) -> None:
    """Rows in turn from ``clients`` clients (or all from ``client``)."""
    for i, row in enumerate(rows):
        sender = client or f"c{i % clients}"
        traffic.add(Query(event(sender, 0.0, model=model, status=status), f"vec{len(row)}", np.asarray(row)))


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float:
    assert a is not None and b is not None
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_a_key_is_measured_in_spreads_of_the_latest_traffic_winsorised() -> None:
    rng = np.random.default_rng(3)
    rows = rng.standard_t(3, (3 * WINDOW, 5)).astype(np.float32) * np.array([3.0, 1.0, 1.0, 0.1, 2.0]) + 2.0
    traffic = TrafficMoments()
    feed(traffic, rows[: MIN_ROWS * 2])
    assert traffic.deviation("m:vec5", rows[:2]) is not None  # made here, made again below
    feed(traffic, rows[MIN_ROWS * 2 :])
    latest = rows[-WINDOW:].astype(np.float64)
    low, high = np.quantile(latest, [TAIL, 1 - TAIL], axis=0)
    held = np.clip(latest, low, high)
    spread = np.maximum(held.std(axis=0), np.median(held.std(axis=0)))
    probe = rng.normal(0.0, 9.0, (4, 5))
    expected = (np.clip(probe, low, high).mean(axis=0) - held.mean(axis=0)) / spread
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


def test_one_client_cannot_move_the_yardstick_with_huge_numbers_or_many_rows() -> None:
    rng = np.random.default_rng(5)
    honest = rng.normal(0.0, 1.0, (WINDOW, 8))
    probe = honest[:50] + np.array([0.5, -0.5] * 4)
    clean = TrafficMoments()
    feed(clean, honest)
    for poison in (np.array([[1e30] * 8, [-3e38] * 8] * 15),  # 30 rows: 1.5% of the window
                   np.full((WINDOW // 4, 8), 30.0)):  # a quarter of it, from one client
        poisoned = TrafficMoments()
        feed(poisoned, honest[:1000])
        feed(poisoned, poison, client="poisoner")
        feed(poisoned, honest[1000:])
        assert np.allclose(poisoned.deviation("m:vec8", probe), clean.deviation("m:vec8", probe), atol=0.1)


def test_a_window_keeps_each_clients_newest_rows_and_no_more() -> None:
    traffic = TrafficMoments()
    feed(traffic, np.zeros((MIN_ROWS, 1)), clients=MIN_ROWS // CLIENT_ROWS)
    feed(traffic, np.ones((3 * CLIENT_ROWS, 1)), client="c0")  # c0's newest replace its oldest
    deviation = traffic.deviation("m:vec1", np.ones((1, 1)))
    # A quarter of the window's rows are 1: mean 0.25, spread √(0.25 · 0.75).
    assert deviation is not None and np.isclose(deviation[0], np.sqrt(3.0), rtol=1e-3)


def test_a_rare_value_in_a_dimension_the_traffic_hardly_uses_does_not_outweigh_the_rest() -> None:
    rng = np.random.default_rng(9)
    traffic = TrafficMoments()
    feed(traffic, np.hstack([rng.normal(0.0, 1.0, (WINDOW, 7)), np.zeros((WINDOW, 1))]))
    bias = np.array([1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 0.0])
    mine = rng.normal(0.0, 1.0, (40, 8)) * [1, 1, 1, 1, 1, 1, 1, 0] + 0.5 * bias
    theirs = rng.normal(0.0, 1.0, (40, 8)) * [1, 1, 1, 1, 1, 1, 1, 0] - 0.5 * bias
    mine[0, 7] = theirs[0, 7] = 1.0  # one query each with the same rare value
    assert cosine(traffic.deviation("m:vec8", mine), traffic.deviation("m:vec8", theirs)) < 0.0


def test_spaces_are_bounded_the_least_recently_fed_make_room_and_wide_rows_are_strided() -> None:
    traffic = TrafficMoments()
    busy = np.random.default_rng(7).normal(0.0, 1.0, (MIN_ROWS, 3))
    feed(traffic, busy)
    for width in range(4, MAX_SPACES + 10):
        feed(traffic, np.arange(float(MIN_ROWS))[:, None] * np.ones((1, width)))
        feed(traffic, busy[:1])  # the busy space is fed between the others
    kept = [w for w in range(3, MAX_SPACES + 10) if traffic.deviation(f"m:vec{w}", np.ones((1, w))) is not None]
    assert len(kept) == MAX_SPACES and kept[0] == 3 and kept[-1] == MAX_SPACES + 9
    wide = TrafficMoments()
    feed(wide, np.random.default_rng(8).normal(0.0, 1.0, (MIN_ROWS, 4 * MAX_DIMS + 1)))
    deviation = wide.deviation(f"m:vec{4 * MAX_DIMS + 1}", np.ones((1, 4 * MAX_DIMS + 1)))
    assert deviation is not None and len(deviation) <= 512


def test_two_models_taking_rows_of_one_width_are_two_yardsticks() -> None:
    rng = np.random.default_rng(8)
    traffic = TrafficMoments()
    for n in range(MIN_ROWS * 2):
        feed(traffic, rng.normal(0.0, 1.0, (1, 3)), model="a", client=f"a{n % 50}")
        feed(traffic, rng.normal(5.0, 1.0, (1, 3)), model="b", client=f"b{n % 50}")
    deviation = traffic.deviation("b:vec3", rng.normal(5.0, 1.0, (200, 3)))
    assert deviation is not None and np.all(np.abs(deviation) < 0.5)
