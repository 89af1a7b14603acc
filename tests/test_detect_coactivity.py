"""Lockstep pairs: what a crowd of keys driven by one script makes, and what it costs."""

from __future__ import annotations

import numpy as np

from modelfence.detect.coactivity import MAX_PARTNERS, Activity, lockstep_pairs
from modelfence.detect.linking import Linker


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
