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
    STALE_FLUSHES,
    WINDOW,
    TrafficWindows,
)

from .test_detect_streams import event


def feed(traffic: TrafficWindows, rows: np.ndarray, *, model: str = "m", status: int = 200,
         clients: int = 100, client: str | None = None) -> None:
    """Rows in turn from ``clients`` clients (or all from ``client``)."""
    for i, row in enumerate(rows):
        sender = client or f"c{i % clients}"
        traffic.add(Query(event(sender, 0.0, model=model, status=status), f"vec{len(row)}", np.asarray(row)))


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float:
    assert a is not None and b is not None
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_a_key_is_measured_against_the_middle_half_of_the_latest_traffic() -> None:
    rng = np.random.default_rng(3)
    rows = rng.standard_t(3, (3 * WINDOW, 5)).astype(np.float32) * np.array([3.0, 1.0, 1.0, 0.1, 2.0]) + 2.0
    traffic = TrafficWindows()
    feed(traffic, rows[: MIN_ROWS * 2])
    assert traffic.deviation("m:vec5", rows[:2]) is not None  # made here, made again below
    feed(traffic, rows[MIN_ROWS * 2 :])
    def middle_mean(x: np.ndarray) -> np.ndarray:  # of the values between the quartiles
        low, high = np.quantile(x, [0.25, 0.75], axis=0, method="nearest")
        inside = (x >= low) & (x <= high)
        return (x * inside).sum(axis=0) / inside.sum(axis=0)

    latest = rows[-WINDOW:].astype(np.float64)
    low, high = np.quantile(latest, [0.25, 0.75], axis=0)
    spread = (high - low) / 1.349
    spread = np.maximum(spread, np.median(spread))
    probe = rng.normal(0.0, 9.0, (8, 5))
    expected = (middle_mean(probe) - middle_mean(latest)) / spread
    assert np.allclose(traffic.deviation("m:vec5", probe), expected, rtol=1e-3)
    assert traffic.deviation("m:vec6", probe) is None  # a space never seen
    assert traffic.deviation("m:vec5", probe[:, :3]) is None  # rows of another width
    assert traffic.deviation("other:vec5", probe) is None  # another model's traffic


def test_the_yardstick_waits_for_its_first_rows_and_leaves_refused_requests_out() -> None:
    traffic = TrafficWindows()
    feed(traffic, np.random.default_rng(4).normal(0.0, 1.0, (MIN_ROWS - 1, 2)))
    assert traffic.deviation("m:vec2", np.zeros((1, 2))) is None
    feed(traffic, np.full((MIN_ROWS * 4, 2), 100.0), status=429)
    feed(traffic, np.zeros((1, 2)))
    deviation = traffic.deviation("m:vec2", np.ones((1, 2)))
    assert deviation is not None and np.all((deviation > 0.5) & (deviation < 2.0))


def test_clients_cannot_move_the_yardstick_with_huge_numbers_or_many_rows() -> None:
    rng = np.random.default_rng(5)
    honest = rng.normal(0.0, 1.0, (WINDOW, 8))
    probe = honest[:50] + np.array([0.5, -0.5] * 4)
    clean = TrafficWindows()
    feed(clean, honest)
    for poisoners, poison in (
        (1, np.array([[1e15] * 8, [-1e15] * 8] * 15)),  # 30 rows of the largest values kept
        (1, np.full((WINDOW // 4, 8), 30.0)),  # a quarter of the window, from one client
        (8, np.full((8 * CLIENT_ROWS, 8), 30.0)),  # 12.5% of it, from eight clients
    ):
        poisoned = TrafficWindows()
        feed(poisoned, honest[:1000])
        feed(poisoned, poison, clients=poisoners)
        feed(poisoned, honest[1000:])
        assert np.allclose(poisoned.deviation("m:vec8", probe), clean.deviation("m:vec8", probe), atol=0.25)


def test_a_window_keeps_each_clients_newest_rows_and_no_more() -> None:
    traffic = TrafficWindows()
    feed(traffic, np.zeros((MIN_ROWS, 1)), clients=MIN_ROWS // CLIENT_ROWS)
    feed(traffic, np.ones((3 * CLIENT_ROWS, 1)), client="c0")  # c0's newest replace its oldest
    assert traffic.deviation("m:vec1", np.ones((1, 1))) is not None
    window = traffic._spaces["m:vec1"]
    assert window.filled == MIN_ROWS
    assert [float(window.rows[slot][0]) for slot in window._slots["c0"]] == [1.0] * CLIENT_ROWS


def test_a_rare_value_in_a_dimension_the_traffic_hardly_uses_does_not_outweigh_the_rest() -> None:
    rng = np.random.default_rng(9)
    traffic = TrafficWindows()
    feed(traffic, np.hstack([rng.normal(0.0, 1.0, (WINDOW, 7)), np.zeros((WINDOW, 1))]))
    bias = np.array([1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 0.0])
    mine = rng.normal(0.0, 1.0, (40, 8)) * [1, 1, 1, 1, 1, 1, 1, 0] + 0.5 * bias
    theirs = rng.normal(0.0, 1.0, (40, 8)) * [1, 1, 1, 1, 1, 1, 1, 0] - 0.5 * bias
    mine[0, 7] = theirs[0, 7] = 1.0  # one query each with the same rare value
    assert cosine(traffic.deviation("m:vec8", mine), traffic.deviation("m:vec8", theirs)) < 0.0


def test_spaces_are_bounded_a_space_in_use_is_kept_and_wide_rows_are_strided() -> None:
    def rows(width: int, n: int = MIN_ROWS) -> np.ndarray:
        return np.arange(float(n))[:, None] * np.ones((1, width))

    def kept(traffic: TrafficWindows, widths: range) -> list[int]:
        return [w for w in widths if traffic.deviation(f"m:vec{w}", np.ones((1, w))) is not None]

    traffic = TrafficWindows()
    for width in range(3, 3 + MAX_SPACES):
        feed(traffic, rows(width))
    feed(traffic, rows(40))  # a new space finds no room: each space kept is in use
    assert kept(traffic, range(3, 41)) == list(range(3, 3 + MAX_SPACES))
    traffic = TrafficWindows()
    for width in range(3, 3 + MAX_SPACES - 1):
        feed(traffic, rows(width))
    feed(traffic, rows(30, 5))  # a space not yet in use
    feed(traffic, rows(31))  # makes room for a new one
    assert kept(traffic, range(3, 41)) == [*range(3, 2 + MAX_SPACES), 31]
    wide = TrafficWindows()
    feed(wide, np.random.default_rng(8).normal(0.0, 1.0, (MIN_ROWS, 4 * MAX_DIMS + 1)))
    deviation = wide.deviation(f"m:vec{4 * MAX_DIMS + 1}", np.ones((1, 4 * MAX_DIMS + 1)))
    assert deviation is not None and len(deviation) <= 512


def test_two_models_taking_rows_of_one_width_are_two_yardsticks() -> None:
    rng = np.random.default_rng(8)
    traffic = TrafficWindows()
    for n in range(MIN_ROWS * 2):
        feed(traffic, rng.normal(0.0, 1.0, (1, 3)), model="a", client=f"a{n % 50}")
        feed(traffic, rng.normal(5.0, 1.0, (1, 3)), model="b", client=f"b{n % 50}")
    deviation = traffic.deviation("b:vec3", rng.normal(5.0, 1.0, (200, 3)))
    assert deviation is not None and np.all(np.abs(deviation) < 0.5)


def test_a_window_stays_consistent_whoever_sends_what() -> None:
    """Every slot belongs to one client's list, no client holds more than its share, and
    each slot holds a row its client sent, through many random senders and wrap-arounds."""
    rng = np.random.default_rng(11)
    traffic = TrafficWindows()
    sent: dict[str, list[float]] = {}
    for _ in range(WINDOW * 3):
        client = f"c{min(int(rng.exponential(30.0)), 400)}"  # a few busy clients, many quiet
        value = float(rng.normal())
        sent.setdefault(client, []).append(value)
        feed(traffic, np.array([[value]]), client=client)
    assert traffic.deviation("m:vec1", np.zeros((1, 1))) is not None
    window = traffic._spaces["m:vec1"]
    owned = sorted(slot for slots in window._slots.values() for slot in slots)
    assert owned == list(range(window.filled)) == list(range(WINDOW))  # it wrapped round
    for client, slots in window._slots.items():
        assert 0 < len(slots) <= CLIENT_ROWS
        assert all(window._owners[slot] == client for slot in slots)
        assert {float(window.rows[slot][0]) for slot in slots} <= {float(np.float32(v)) for v in sent[client]}


def test_a_client_whose_only_row_is_the_oldest_keeps_its_place_when_it_sends_again() -> None:
    traffic = TrafficWindows()
    for n in range(WINDOW):  # one row from each of WINDOW clients: the ring is full
        feed(traffic, np.array([[float(n)]]), client=f"c{n}")
    for n in range(3):  # the oldest rows' own clients send again, and then a newcomer
        feed(traffic, np.array([[-1.0]]), client=f"c{n}")
    feed(traffic, np.array([[-2.0]]), client="new")
    assert traffic.deviation("m:vec1", np.zeros((1, 1))) is not None
    window = traffic._spaces["m:vec1"]
    assert sorted(slot for slots in window._slots.values() for slot in slots) == list(range(WINDOW))
    assert [window._owners[slot] for slot in range(4)] == ["c0", "c1", "c2", "new"]


def test_binary_features_do_not_leave_a_spread_of_nothing() -> None:
    """Most spreads of one-hot or binary features are 0: the floor is the median of the
    others, not 0, so the dense dimensions still count."""
    rng = np.random.default_rng(12)

    def rows(n: int, bias: float) -> np.ndarray:
        return np.hstack([rng.normal(bias, 1.0, (n, 5)), (rng.random((n, 15)) < 0.2).astype(float)])

    traffic = TrafficWindows()
    feed(traffic, rows(WINDOW, 0.0))
    bots = [traffic.deviation("m:vec20", rows(40, 0.7)) for _ in range(6)]
    assert np.mean([cosine(a, b) for i, a in enumerate(bots) for b in bots[i + 1 :]]) > 0.5
    assert all(np.all(np.abs(d) <= 1e3) for d in bots if d is not None)


def test_a_space_no_longer_fed_makes_room_for_a_new_one() -> None:
    traffic = TrafficWindows()
    for width in range(3, 3 + MAX_SPACES):
        feed(traffic, np.arange(float(MIN_ROWS))[:, None] * np.ones((1, width)))
        traffic.deviation(f"m:vec{width}", np.ones((1, width)))  # a flush each
    for _ in range(STALE_FLUSHES):  # only the first space stays fed
        feed(traffic, np.ones((1, 3)))
        traffic.deviation("m:vec3", np.ones((1, 3)))
    feed(traffic, np.arange(float(MIN_ROWS))[:, None] * np.ones((1, 40)))
    assert traffic.deviation("m:vec40", np.ones((1, 40))) is not None
    assert traffic.deviation("m:vec3", np.ones((1, 3))) is not None
    assert traffic.deviation("m:vec4", np.ones((1, 4))) is None  # the least recently fed
