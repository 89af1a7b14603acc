"""The measure of theft: students trained on what answered extraction requests bought."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import pytest

from modelfence.demo.classifier import DigitsClassifier
from modelfence.detect.embedding import HashingEmbedder, load_embedder
from modelfence.redteam.attacks.classifier import DigitsData
from modelfence.redteam.attacks.llm import TEMPLATES
from modelfence.redteam.prompts import load_prompts
from modelfence.redteam.theft import (
    ChatAssessor,
    ClassifierAssessor,
    EmbeddingAssessor,
    accounts_needed,
    digit_rows,
    embedding_texts,
    payload,
    task_text,
    theft_reduction,
    trajectory,
    wilson,
)
from modelfence.redteam.thieves.base import TextPool, text_pool
from modelfence.redteam.traffic import (
    CHAT,
    DIGITS_INFER,
    EMBEDDINGS,
    PlannedRequest,
    chat_body,
    digits_body,
    embeddings_body,
)

SEED = 7


def digits(rows: np.ndarray, purpose: str = "extraction", batch: int = 64) -> list[PlannedRequest]:
    rows = rows.reshape(-1, 64)
    return [PlannedRequest(float(i), "thief", DIGITS_INFER, digits_body(rows[i : i + batch]), purpose)
            for i in range(0, len(rows), batch)]


def embeds(texts: Sequence[str], purpose: str = "extraction", batch: int = 16) -> list[PlannedRequest]:
    return [PlannedRequest(float(i), "thief", EMBEDDINGS, embeddings_body(list(texts[i : i + batch])), purpose)
            for i in range(0, len(texts), batch)]


def chats(tasks: Sequence[str], purpose: str = "extraction", frame: str = "") -> list[PlannedRequest]:
    system = [{"role": "system", "content": frame}] if frame else []
    return [PlannedRequest(float(i), "thief", CHAT,
                           chat_body([*system, {"role": "user", "content": task}], 256), purpose)
            for i, task in enumerate(tasks)]


@pytest.fixture(scope="module")
def classifier() -> ClassifierAssessor:
    return ClassifierAssessor(SEED)


@pytest.fixture(scope="module")
def data() -> DigitsData:
    return DigitsData.split(SEED)


@pytest.fixture(scope="module")
def texts() -> TextPool:
    return text_pool(load_prompts(), SEED)


# -- the arithmetic of a result ---------------------------------------------------------------


def test_theft_reduction_on_known_cases() -> None:
    assert theft_reduction(0.1, 0.2, 0.5) == pytest.approx(0.75)  # undefended gain 0.4, defended 0.1
    assert theft_reduction(0.1, 0.5, 0.5) == pytest.approx(0.0)
    assert theft_reduction(0.1, 0.1, 0.5) == pytest.approx(1.0)
    assert theft_reduction(0.1, 0.6, 0.5) == pytest.approx(-0.25)  # the defended thief did better
    assert theft_reduction(0.1, 0.05, 0.5) == pytest.approx(1.125)  # below the baseline: not clipped
    assert theft_reduction(0.1, 0.3, 0.1) is None
    assert theft_reduction(0.1, 0.3, 0.05) is None


def test_wilson_matches_known_intervals() -> None:
    low, high = wilson(0, 100)
    assert low == 0.0 and high == pytest.approx(0.0370, abs=5e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=5e-4)
    assert wilson(37, 50) == pytest.approx((0.6045, 0.8413), abs=5e-4)
    low, high = wilson(100, 100)
    assert low == pytest.approx(0.9630, abs=5e-4) and high == 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    framed = PlannedRequest(0.0, "thief", CHAT, chat_body([{"role": "user", "content": TEMPLATES["cot"].format(
        x="Who won?")}], 64), "extraction", turns=1)
    assert task_text(framed) == "Who won?"  # a frame in the user turn is how it asks, not what

    with pytest.raises(ValueError):
        wilson(3, 2)


# -- what a request buys ----------------------------------------------------------------------


def test_payload_of_each_asset() -> None:
    rows = np.arange(3 * 64, dtype=np.float32).reshape(3, 64) % 17
    [image] = digits(rows)
    assert np.array_equal(digit_rows(image), rows)
    assert np.array_equal(payload(image), rows) and image.units == 3

    [batch] = embeds(["a", "b", "c", "d"])
    assert embedding_texts(batch) == ["a", "b", "c", "d"] and batch.units == 4
    single = PlannedRequest(0.0, "thief", EMBEDDINGS, {"model": "m", "input": "one text"}, "extraction")
    assert payload(single) == ["one text"] and single.units == 1

    messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "arr"}, {"role": "user", "content": "the task"},
                {"role": "system", "content": "Answer in French."}]
    chat = PlannedRequest(0.0, "thief", CHAT, chat_body(messages, 64), "extraction", turns=2)
    assert task_text(chat) == "the task" and payload(chat) == ["the task"] and chat.units == 1

    with pytest.raises(ValueError):
        task_text(PlannedRequest(0.0, "thief", CHAT, chat_body(messages[:1], 64), "extraction"))
    with pytest.raises(ValueError):
        digit_rows(batch)


# -- the classifier ---------------------------------------------------------------------------


def test_classifier_baseline_is_the_best_constant(classifier: ClassifierAssessor, data: DigitsData) -> None:
    assert 0.08 < classifier.baseline() < 0.13
    assert classifier.quality([]) == classifier.baseline()
    assert classifier.quality(digits(data.pool, purpose="cover")) == classifier.baseline()


def test_classifier_fidelity_grows_with_what_was_bought(classifier: ClassifierAssessor, data: DigitsData) -> None:
    pool = data.pool.reshape(-1, 64)
    curve = [classifier.quality(digits(pool[:n])) for n in (64, 128, 256, 539)]
    assert curve[-1] > 0.85
    assert curve[-1] > curve[0]
    assert all(later >= earlier - 0.03 for earlier, later in pairwise(curve))


def test_classifier_counts_duplicate_rows_once(classifier: ClassifierAssessor, data: DigitsData) -> None:
    once = digits(data.pool[:200])
    twice = once + digits(data.pool[:200])
    assert len(classifier.bought(twice)[0]) == len(classifier.bought(once)[0]) == 200
    assert classifier.quality(twice) == classifier.quality(once)


def test_classifier_student_learns_the_victims_labels_not_the_truth(classifier: ClassifierAssessor) -> None:
    x, y = DigitsClassifier.dataset()
    victim = DigitsClassifier.train(seed=0).predict(x)
    differ = np.flatnonzero(victim != y)
    rows, labels = classifier.bought(digits(np.concatenate([x[differ], x[:300]])))
    lookup = {row.tobytes(): label for row, label in zip(rows, labels, strict=True)}
    assert [lookup[x[i].tobytes()] for i in differ] == victim[differ].tolist()
    assert all(lookup[x[i].tobytes()] != y[i] for i in differ)


def test_classifier_with_one_class_bought_predicts_it(classifier: ClassifierAssessor, data: DigitsData) -> None:
    row = data.pool[:1]
    [label] = classifier.bought(digits(row))[1]
    assert classifier.quality(digits(row)) == pytest.approx(float(np.mean(classifier.victim_labels == label)))


def test_classifier_is_never_judged_on_rows_it_sent(classifier: ClassifierAssessor, data: DigitsData) -> None:
    with pytest.raises(ValueError, match="held-out"):
        classifier.quality(digits(data.test))


# -- embeddings -------------------------------------------------------------------------------


def test_embedding_student_needs_sixteen_texts_and_ignores_cover(texts: TextPool) -> None:
    assessor = EmbeddingAssessor(texts.held_out, HashingEmbedder())
    assert assessor.baseline() == 0.0 and assessor.quality([]) == 0.0
    assert assessor.quality(embeds(texts.pool[:15]) * 2) == 0.0  # duplicates count once
    assert assessor.quality(embeds(texts.pool[:16])) > 0.0
    assert assessor.quality(embeds(texts.pool[:1536], purpose="cover")) == 0.0


def test_embedding_agreement_grows_with_texts_bought(texts: TextPool) -> None:
    assessor = EmbeddingAssessor(texts.held_out, HashingEmbedder())
    small, large = (assessor.quality(embeds(texts.pool[:n])) for n in (64, 1536))
    assert 0.0 < small < large and large > 0.75


def test_embedding_assessor_with_minilm(texts: TextPool) -> None:
    from modelfence.models.embedder import find_model

    try:
        find_model()
    except FileNotFoundError as missing:
        pytest.skip(f"the MiniLM model files are absent: {missing}")
    assessor = EmbeddingAssessor(texts.held_out[:32], load_embedder("minilm"))
    small, large = (assessor.quality(embeds(texts.pool[:n])) for n in (16, 128))
    assert 0.0 < small < large


# -- chat -------------------------------------------------------------------------------------


def test_chat_coverage_is_one_when_every_task_was_answered(texts: TextPool) -> None:
    assessor = ChatAssessor(texts.held_out[:50], HashingEmbedder())
    full = assessor.coverage(chats(texts.held_out[:50]))
    assert full.share == pytest.approx(1.0, abs=1e-5) and full.tasks == 50
    unrelated = assessor.coverage(chats(texts.pool[:50]))
    assert 0.0 < unrelated.share < 0.9 and unrelated.tasks == 50
    assert assessor.quality(chats(texts.held_out[:25])) < full.share
    assert assessor.baseline() == 0.0


def test_chat_coverage_ignores_cover_and_system_frames(texts: TextPool) -> None:
    held_out = texts.held_out[:50]
    assessor = ChatAssessor(held_out, HashingEmbedder())
    assert assessor.coverage(chats(held_out, purpose="cover")) == (0.0, 0)
    framed = chats(texts.pool[:50], frame=" ".join(held_out))
    assert assessor.quality(framed) == pytest.approx(assessor.quality(chats(texts.pool[:50])))


# -- trajectories -----------------------------------------------------------------------------


def test_trajectory_follows_units_and_accounts(classifier: ClassifierAssessor, data: DigitsData) -> None:
    rows, _ = data.padded_pool(2_000, SEED)
    bought = digits(rows)  # 32 requests of 64 rows, the last of 16
    cover = digits(data.pool[:3], purpose="cover")
    answered = [(plan, 1 + i // 8) for i, plan in enumerate(bought)] + [(cover[0], 4)]
    curve = trajectory(classifier, answered)
    assert len(curve) == 6
    assert curve[0][:2] == (64, 1) and curve[-1][:2] == (2_000, 4)  # the cover request buys nothing
    spent = [point[0] for point in curve]
    assert spent == sorted(set(spent))
    assert 1.5 < spent[2] / spent[1] < 3.0  # roughly geometric
    assert curve[-1][2] == classifier.quality(bought) and curve[-1][2] > curve[0][2]
    assert trajectory(classifier, [(cover[0], 1)]) == []
    assert [point[0] for point in trajectory(classifier, answered[:2])] == [64, 128]


def test_accounts_needed_finds_the_first_request_reaching_the_target(
    classifier: ClassifierAssessor, data: DigitsData,
) -> None:
    rows, _ = data.padded_pool(2_000, SEED)
    bought = digits(rows)
    answered = [(plan, 1 + i // 8) for i, plan in enumerate(bought)]
    full = classifier.quality(bought)
    target = 0.95 * full
    units, accounts = accounts_needed(classifier, answered, target) or (0, 0)
    index = next(i for i in range(len(bought)) if sum(p.units for p in bought[: i + 1]) == units)
    assert classifier.quality(bought[: index + 1]) >= target > classifier.quality(bought[:index])
    assert accounts == 1 + index // 8
    assert accounts_needed(classifier, answered, full + 0.01) is None
    assert accounts_needed(classifier, [], 0.5) is None
