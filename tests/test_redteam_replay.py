"""Replay builds the same events from the same seed, fast enough for large populations."""

from __future__ import annotations

import time
from itertools import pairwise

import numpy as np

from modelfence.detect.embedding import HashingEmbedder
from modelfence.redteam.populations.benign import BenignPopulation
from modelfence.redteam.prompts import load_prompts
from modelfence.redteam.replay import EventCounter, LimitsBaseline, replay, replay_events
from modelfence.redteam.replay_detection import detection_at_scale

POPULATION = BenignPopulation(chat_users=30, embedding_users=5, classifier_users=5)


def _stream(seed: int) -> tuple[list, dict]:  # type: ignore[type-arg]
    plans, profiles = POPULATION.generate(load_prompts(), np.random.default_rng(seed), 86_400.0)
    return plans, {p.name: p for p in profiles}


def test_same_seed_same_events_other_seed_other_events() -> None:
    first = [e.to_dict() for e in replay_events(*_stream(5), start_ts=0.0)]
    again = [e.to_dict() for e in replay_events(*_stream(5), start_ts=0.0)]
    other = [e.to_dict() for e in replay_events(*_stream(6), start_ts=0.0)]
    assert first == again
    assert first != other
    assert all(a["ts"] <= b["ts"] for a, b in pairwise(first))


def test_events_carry_fingerprints_and_inputs() -> None:
    events = replay_events(*_stream(1), start_ts=0.0)
    routes = {e.route for e in events}
    assert routes == {"/v1/chat/completions", "/v1/embeddings", "/v2/models/{name}/infer"}
    assert all(e.ip_prefix.endswith(".0/24") and e.client_library for e in events)
    digits = [e for e in events if e.route.startswith("/v2")]
    # The input tensor as the gateway records it: one row of 64 pixels per image.
    assert all(e.input_rows and {len(row) for row in e.input_rows} == {64} for e in digits)


def test_consumers_see_every_event_and_limits_deny_a_burst() -> None:
    plans, profiles = _stream(2)
    counter = EventCounter()
    replay(plans, profiles.values(), counter, chunk=100)
    assert sum(counter.per_client.values()) == len(plans)
    baseline = LimitsBaseline(requests_per_minute=60)
    replay(plans, profiles.values(), baseline)
    assert not baseline.denied  # humans stay far below a request a second


def test_ten_thousand_clients_replay_in_reasonable_time() -> None:
    population = BenignPopulation(chat_users=10_000, embedding_users=0, classifier_users=0,
                                  batch_summarisers=0, image_streams=0)
    started = time.perf_counter()
    plans, profiles = population.generate(load_prompts(), np.random.default_rng(0), 86_400.0)
    counter = EventCounter()
    replay(plans, profiles, counter)
    assert len(counter.per_client) > 9_000
    assert time.perf_counter() - started < 180


def test_detection_at_scale_counts_honest_flags_and_caught_attackers() -> None:
    """The replay-detection scenario in miniature (hashing embedder, 300 honest clients)."""
    corpus = load_prompts()
    details = detection_at_scale(
        corpus, lambda name: np.random.default_rng([5, *name.encode()]), clients=300,
        calibration_clients=300, attackers=2, sybils=1, embedder=HashingEmbedder(),
    )
    benign = details["benign"]
    assert benign["clients"] == 302  # with one summariser and one camera stream
    # Calibrated on only 150 scored clients here: the rate at scale is docs/DETECTION.md's.
    assert benign["flagged"] == len(benign["flagged_clients"]) < 0.05 * benign["clients"]
    attacks = details["attacks"]
    assert set(attacks) >= {"harvest-broad", "carlini", "knockoff-random", "copycat", "sybil"}
    assert attacks["sybil"]["keys"] == 12
    assert attacks["carlini"]["detection_rate"] == 1.0  # logit_bias + logprobs, machine-paced
    assert attacks["copycat"]["detection_rate"] == 1.0  # 64-image batches, one a second
    assert details["throughput"]["events_per_second"] > 0
