"""Lockstep pairs: what a crowd of keys driven by one script makes, and what it costs."""

from __future__ import annotations

import numpy as np

from modelfence.detect.coactivity import (
    MAX_PARTNERS,
    MAX_SPACES,
    MOMENTS_HORIZON,
    Activity,
    TrafficMoments,
    lockstep_pairs,
)
from modelfence.detect.features import Query
from modelfence.detect.linking import Linker

from .test_detect_streams import event


def crowd(n: int, space: str = "chat") -> list[Activity]:
    signature = np.ones(4, dtype=np.float32) / 2.0
    return [Activity(f"bot{k:04d}", space, frozenset({7, 8, 9}), signature) for k in range(n)]


def test_a_crowd_in_lockstep_is_one_entity_from_a_bounded_number_of_pairs() -> None:
    bots = crowd(600)
    pairs = lockstep_pairs(bots)
    # 600 keys in lockstep would be 179,700 pairs; each keeps its strongest partners.
    assert len(pairs) <= 600 * MAX_PARTNERS
    assert len(set(pairs)) == len(pairs) and all(a < b for a, b in pairs)
    linker = Linker()
    for a, b in pairs:
        linker.link(a, b, 0.0)
    assert len(linker.members("bot0000")) == 600


def test_keys_busy_at_other_times_or_on_other_queries_are_not_paired() -> None:
    bots = crowd(3)
    elsewhere = Activity("night", "chat", frozenset({100, 101, 102}), bots[0].signature)
    other_space = crowd(1, space="images")[0]
    unlike = Activity("unlike", "chat", bots[0].slots, np.array([1, 0, 0, 0], dtype=np.float32))
    assert lockstep_pairs([*bots, elsewhere, other_space, unlike]) == [
        ("bot0000", "bot0001"), ("bot0000", "bot0002"), ("bot0001", "bot0002"),
    ]


def test_the_pairs_kept_do_not_depend_on_the_order_keys_are_walked_in() -> None:
    """Keys in a crowd tie on overlap; which partners each keeps is decided by name, so the
    engine walking its busy keys in another order links the same pairs."""
    bots = crowd(60)
    shuffled = bots[::7] + [b for i, b in enumerate(bots) if i % 7]
    assert lockstep_pairs(shuffled) == lockstep_pairs(bots) == lockstep_pairs(bots[::-1])


def _queries(space: str, rows: np.ndarray) -> list[Query]:
    return [Query(event("c", 0.0), space, row) for row in rows]


def test_traffic_moments_merge_batches_into_the_mean_and_spread_of_all_their_queries() -> None:
    rng = np.random.default_rng(3)
    batches = [rng.normal(2.0, 3.0, (n, 5)) for n in (1, 7, 40, 3)]
    traffic = TrafficMoments()
    for batch in batches:
        traffic.add(_queries("vec5", batch))
    every = np.vstack(batches)
    probe = rng.normal(0.0, 1.0, (4, 5))
    expected = (probe.mean(axis=0) - every.mean(axis=0)) / every.std(axis=0)
    assert np.allclose(traffic.deviation("vec5", probe), expected, rtol=1e-4)
    assert traffic.deviation("vec6", probe) is None  # a space never seen
    assert traffic.deviation("vec5", probe[:, :3]) is None  # rows of another width


def test_traffic_moments_follow_the_latest_queries_and_keep_a_bounded_number_of_spaces() -> None:
    traffic = TrafficMoments()
    traffic.add(_queries("vec2", np.zeros((MOMENTS_HORIZON * 4, 2))))
    traffic.add(_queries("vec2", np.ones((MOMENTS_HORIZON, 2))))
    # Past the horizon the old queries weigh as many as the new: the mean is half-way.
    assert np.allclose(traffic.deviation("vec2", np.full((1, 2), 0.5)), 0.0, atol=1e-3)
    traffic.add(_queries("other", np.ones((3, 2))), skip={"other"})
    assert traffic.deviation("other", np.ones((1, 2))) is None
    for n in range(MAX_SPACES + 5):
        traffic.add(_queries(f"vec{n}", np.arange(4.0).reshape(2, 2)))
    kept = [n for n in range(MAX_SPACES + 5) if traffic.deviation(f"vec{n}", np.ones((1, 2))) is not None]
    assert kept == list(range(5, MAX_SPACES + 5))
