"""The key index: every issued key is in it, few made-up keys seem to be, and it grows."""

from __future__ import annotations

import secrets

from modelfence.identity.key_index import FALSE_POSITIVE_RATE, MIN_CAPACITY, KeyIndex


def hashes(n: int) -> list[str]:
    return [secrets.token_hex(32) for _ in range(n)]


def test_every_added_hash_is_in_and_made_up_ones_rarely_seem_to_be() -> None:
    issued = hashes(20_000)
    index = KeyIndex(len(issued))
    for key_hash in issued:
        index.add(key_hash)
    assert all(key_hash in index for key_hash in issued)
    made_up = hashes(50_000)
    rate = sum(key_hash in index for key_hash in made_up) / len(made_up)
    assert rate < 2 * FALSE_POSITIVE_RATE  # ~0.8% at 10 bits per key and 7 probes
    assert not index.full


def test_a_hash_seen_again_does_not_count_and_an_index_past_its_size_is_full() -> None:
    index = KeyIndex.of(hashes(10))
    assert index.capacity == MIN_CAPACITY and index.count == 10
    again = hashes(1)[0]
    index.add(again)
    index.add(again)
    assert index.count == 11
    for key_hash in hashes(MIN_CAPACITY):
        index.add(key_hash)
    assert index.full
    assert KeyIndex.of(hashes(3_000)).capacity == 6_000


def test_an_index_built_at_once_answers_as_one_built_key_by_key() -> None:
    """Same bits either way. The counts may differ by the few new hashes that ``add`` took
    for ones already in (false positives, ~0.15 expected over 5,000 adds here)."""
    issued = hashes(5_000)
    at_once = KeyIndex.of(issued)
    one_by_one = KeyIndex(at_once.capacity)
    for key_hash in issued:
        one_by_one.add(key_hash)
    assert at_once._bits == one_by_one._bits and at_once.count == 5_000
    assert 4_995 <= one_by_one.count <= 5_000
