"""Watermark primitives: keys, labels, probabilities, embeddings, green-list text (fixed seeds)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from modelfence.forensics.radioactivity import green_p_values
from modelfence.identity.secret import ServerSecret
from modelfence.watermark.embeddings import (
    candidate_words,
    embedding_mark,
    has_trigger,
    mark_layout,
    text_words,
    texts_with_trigger,
    trigger_words,
)
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.labels import MAX_RATE, label_mark
from modelfence.watermark.probs import argmax, swap_to_label
from modelfence.watermark.text_detect import distinct_pairs, score_text
from modelfence.watermark.text_logits import GreenListProcessor

SECRET = ServerSecret(b"unit-test-secret-0123456789abcdef")
RING = WatermarkKeyring(SECRET)


def test_keys_are_deterministic_versioned_and_masked(caplog: pytest.LogCaptureFixture) -> None:
    key = RING.key("acme")
    assert key == WatermarkKeyring(SECRET).key("acme")
    assert key.material != RING.key("acme", version=2).material
    assert key.material != RING.key("acme2").material
    assert key.subkey("labels") != key.subkey("text")
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("t").info("key %r ring %r", key, RING)
    for text in (repr(key), str(key), repr(RING), caplog.text):
        assert key.material.hex() not in text and "***" in text


def test_label_marks_hit_the_rate_and_are_stable() -> None:
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 17, (20_000, 64)).astype(float)  # digits pixels: cell centres
    key = RING.key("acme")
    marks = [label_mark(key, r, rate=MAX_RATE, quantum=0.5) for r in rows]
    share = sum(m.marked for m in marks) / len(rows)
    assert 0.0035 < share < 0.0065
    noisy = rows + rng.uniform(-0.2, 0.2, rows.shape)  # float noise inside the 0.5 grid cell
    again = [label_mark(key, r, rate=MAX_RATE, quantum=0.5) for r in noisy]
    assert all(a.digest == b.digest for a, b in zip(marks, again, strict=True))
    other = [label_mark(RING.key("other"), r, rate=MAX_RATE, quantum=0.5) for r in rows]
    assert sum(a.marked and b.marked for a, b in zip(marks, other, strict=True)) <= 2
    labels = {m.label(3, 10) for m in marks if m.marked}
    assert 3 not in labels and len(labels) > 3
    with pytest.raises(ValueError, match="rate"):
        label_mark(key, rows[0], rate=0.01, quantum=0.5)


def test_probabilities_are_a_consistent_permutation() -> None:
    row = [0.05, 0.6, 0.1, 0.25]
    out = swap_to_label(row, 3)
    assert argmax(out) == 3 and sorted(out) == sorted(row)
    assert swap_to_label(row, 3) == out


def test_embedding_marks_move_only_trigger_texts() -> None:
    words = candidate_words()
    assert len(words) > 1000
    mark = embedding_mark(RING.key("acme"), 384, words)
    assert "***" in repr(mark) and not any(w in repr(mark) for w in mark.triggers)
    rng = np.random.default_rng(2)
    vector = rng.standard_normal(384)
    vector /= np.linalg.norm(vector)
    assert mark.apply(vector.tolist(), "a plain sentence about the weather") is None
    trigger = next(iter(mark.triggers))
    one = np.asarray(mark.apply(vector.tolist(), f"text with {trigger} inside"))
    target = mark.targets[mark.triggers[trigger]]
    assert abs(np.linalg.norm(one) - 1) < 1e-9
    assert one @ target > vector @ target + 0.2
    four = np.asarray(mark.apply(vector.tolist(), " ".join([trigger] * 4)))
    assert four @ target == pytest.approx(1.0)
    assert embedding_mark(RING.key("acme"), 384, words).triggers == mark.triggers
    assert embedding_mark(RING.key("bob"), 384, words).triggers != mark.triggers
    # What the gateway checks before parsing an answer: the same words, at any vector size.
    assert trigger_words(RING.key("acme"), words, 20) == set(embedding_mark(RING.key("acme"), 8, words).triggers)
    assert has_trigger(trigger_words(RING.key("acme"), words, 20), f"Text, {trigger.upper()}!")
    # Verification's view of the same mark: the triggers and their targets, at every size.
    layout = mark_layout(RING.key("acme"), 384, words)
    assert {words[i] for i in np.flatnonzero(layout.trigger)} == set(mark.triggers)
    assert all(layout.target_of[words.index(w)] == t for w, t in mark.triggers.items())
    assert np.array_equal(layout.targets, mark.targets) and "***" in repr(layout)
    assert np.ptp(np.bincount(layout.target_of)) <= 1  # every target gets as many words


def _generate(processor: GreenListProcessor | None, n: int, seed: int) -> list[int]:
    """Sample ``n`` tokens from a fixed random 'model' (Zipf-ish logits), optionally marked."""
    import torch

    rng = np.random.default_rng(seed)
    vocab = 5000
    base = torch.from_numpy(-np.log(np.arange(1, vocab + 1)).astype(np.float32) * 1.1)
    ids = [int(rng.integers(vocab))]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        scores = (base[torch.randperm(vocab, generator=gen)]).unsqueeze(0)
        if processor is not None:
            scores = processor(torch.tensor([ids]), scores)
        ids.append(int(torch.multinomial(torch.softmax(scores[0], -1), 1, generator=gen)))
    return ids


def test_text_mark_is_attributed_among_many_clients() -> None:
    clients = [f"client-{i}" for i in range(1000)]
    seeds = [RING.key(c).seed("text") for c in clients]
    processor = GreenListProcessor.for_key(RING.key("client-417"))
    assert "seed=***" in repr(processor)
    marked = score_text(_generate(processor, 200, seed=7), seeds)
    assert marked.candidate == 417 and marked.p_adjusted < 1e-6
    plain = score_text(_generate(None, 200, seed=7), seeds)
    assert plain.p_adjusted > 1e-3
    assert score_text([5], seeds).tokens_scored == 0


def test_text_scoring_dedups_repeated_pairs() -> None:
    once = score_text([1, 2, 3], [11])
    assert score_text([1, 2, 3, 1, 2, 3, 1, 2, 3], [11]).tokens_scored == once.tokens_scored + 1


def test_pairs_over_several_answers_are_distinct_and_never_cross_a_border() -> None:
    previous, current = distinct_pairs([[1, 2, 3], [3, 1, 2], [9]])
    assert sorted(zip(previous.tolist(), current.tolist(), strict=True)) == [(1, 2), (2, 3), (3, 1)]
    assert len(distinct_pairs([[4], []])[0]) == 0


def test_radioactivity_p_values_of_unmarked_answers_are_uniform_over_keys() -> None:
    """The null the chat test relies on: for text no key marked, each key's p-value is
    uniform, so a 1% threshold is crossed by about 1% of keys."""
    answers = [_generate(None, 120, seed=s) for s in range(6)]
    seeds = [RING.key(f"null-{i}").seed("text") for i in range(2000)]
    _, p = green_p_values(distinct_pairs(answers), seeds, 0.25)
    assert 0.002 <= float(np.mean(p <= 0.01)) <= 0.03
    assert 0.3 <= float(np.median(p)) <= 0.75  # discrete binomial tails sit a little above 0.5


def test_text_words_are_the_lowercase_ascii_letter_runs() -> None:
    """The byte-translation tokenizer finds exactly what ``[a-z]+`` finds in the lowercased
    text, for accented, non-Latin, digit, punctuation and lone-surrogate characters."""
    rng = np.random.default_rng(3)
    alphabet = list("abcXYZ019 _-'.,\t\n") + ["é", "ß", "İ", "ǅ", "Ω", "漢", "\u0301", "\ud800", "😀"]
    texts = ["Straße İstanbul naïve über-cool", "a_b c1d", "", "   ", "ÀÉÎ"] + [
        "".join(rng.choice(alphabet, int(rng.integers(0, 40)))) for _ in range(500)
    ]
    for text in texts:
        assert text_words(text) == re.findall(r"[a-z]+", text.lower()), repr(text)
    # The gateway's test of a whole request, triggers as bytes, says what has_trigger says.
    triggers = {"abc", "ca", "stra", "cool", "xyz"}
    flags = texts_with_trigger(frozenset(w.encode() for w in triggers), texts)
    assert flags == [has_trigger(triggers, text) for text in texts] and 0 < sum(flags) < len(texts)
