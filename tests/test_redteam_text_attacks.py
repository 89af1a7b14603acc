"""The attacks of the robustness bench do what they claim, and a mark survives deletion."""

from __future__ import annotations

import numpy as np
import pytest

from modelfence.demo.llm import SmolLM
from modelfence.forensics.text import verify_text
from modelfence.identity.secret import ServerSecret
from modelfence.redteam.text_attacks import Substituter, chunks, content_kept, delete_words
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.text_logits import GreenListProcessor

TEXT = (
    "Vaccines work by training the immune system to recognize a specific pathogen. When you "
    "get a vaccine, your body is exposed to a weakened or inactive part of the germ, which "
    "triggers an immune response. Your body then produces antibodies that remember how to "
    "fight the disease.\n\nThis is why vaccines are one of the most important tools in public "
    "health. They have helped to eliminate smallpox and greatly reduce diseases like polio."
)


@pytest.fixture(scope="module")
def llm() -> SmolLM:
    return SmolLM.load(threads=1)


@pytest.fixture(scope="module")
def substituter(llm: SmolLM) -> Substituter:
    return Substituter(llm)


def test_deletion_removes_the_share_of_words_and_keeps_the_order() -> None:
    words = TEXT.split()
    out = delete_words(TEXT, 0.3, np.random.default_rng(1)).split()
    assert len(out) == len(words) - round(0.3 * len(words))
    rest = iter(words)
    assert all(w in rest for w in out)  # a subsequence: nothing moved or changed


@pytest.mark.models
def test_substitution_replaces_the_share_of_words_by_near_synonyms(
    llm: SmolLM, substituter: Substituter
) -> None:
    out, share = substituter(TEXT, 0.5, np.random.default_rng(2))
    before, after = TEXT.split(), out.split()
    assert len(after) == len(before)  # one word for one word
    changed = sum(a != b for a, b in zip(before, after, strict=True))
    assert changed == round(0.5 * len(before)) and share == pytest.approx(changed / len(before))
    nearest = {llm.decode([int(t)]) for t in substituter.candidates(llm.encode(" important")[0])}
    assert {" crucial", " essential"} <= nearest and " importance" not in nearest


@pytest.mark.models
def test_a_mark_survives_30_percent_word_deletion(llm: SmolLM, substituter: Substituter) -> None:
    """A 400-word text with 65% green tokens (marked answers have 55-70%) is still named."""
    ring = WatermarkKeyring(ServerSecret(b"test-text-attacks-0123456789abcdef"))
    clients = [f"client-{i}" for i in range(200)]
    marker = GreenListProcessor.for_key(ring.key(clients[7]))
    rng = np.random.default_rng(3)
    words = substituter.words  # whole-word tokens: one token per word
    ids = [int(rng.choice(words))]
    for _ in range(400):
        pool = words[marker.green(ids[-1], llm.vocab_size)[words]] if rng.random() < 0.65 else words
        ids.append(int(rng.choice(pool)))
    attacked = delete_words(llm.decode(ids), 0.3, rng)
    verdict = verify_text(attacked, clients, ring, tokenize=llm.encode)
    assert verdict.ours and verdict.client == "client-7"
    unmarked = delete_words(llm.decode([int(t) for t in rng.choice(words, 400)]), 0.3, rng)
    assert not verify_text(unmarked, clients, ring, tokenize=llm.encode).ours


def test_chunks_and_content_kept() -> None:
    pieces = chunks(TEXT, 20)
    assert " ".join(pieces).split() == TEXT.split()
    assert all(len(p.split()) >= 20 for p in pieces[:-1])
    assert content_kept(TEXT, TEXT) == 1.0
    assert content_kept("Alpha beta gamma, delta pi.", "delta and BETA alpha") == 0.75
