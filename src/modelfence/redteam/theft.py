"""What a thief gets: the quality of what its answered requests let it build.

Counting requests says how much a thief sent; what matters is what it holds afterwards.
An ``Assessor`` trains a student on exactly what a campaign's answered ``extraction``
requests bought (``cover`` requests buy nothing a thief keeps) and judges it on held-out
data the thief never sent. Comparing the defended run with the undefended one gives
``theft_reduction``; the quality after each account spent gives ``accounts_needed``.

    assessor = ClassifierAssessor(seed)
    curve = trajectory(assessor, [(plan, accounts_used), ...])
    reduction = theft_reduction(assessor.baseline(), defended_quality, undefended_quality)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

import numpy as np

from modelfence.detect.embedding import Embedder
from modelfence.redteam.attacks.classifier import N_CLASSES, PIXEL_MAX, DigitsData
from modelfence.redteam.attacks.embeddings import student_agreement, train_student
from modelfence.redteam.attacks.llm import TEMPLATES
from modelfence.redteam.replay_attacks import victim_classifier
from modelfence.redteam.thieves.base import Asset
from modelfence.redteam.traffic import CHAT, DIGITS_INFER, EMBEDDINGS, PlannedRequest

MIN_TEXTS = 16  # one embeddings request's worth; fewer texts make no student worth the name


def _expect(plan: PlannedRequest, route: str) -> None:
    if plan.route != route:
        raise ValueError(f"expected a request to {route}, got one to {plan.route}")


def digit_rows(plan: PlannedRequest) -> np.ndarray:
    """The images of a classifier request, float32 ``[n, 64]`` on the 0-16 scale."""
    _expect(plan, DIGITS_INFER)
    return np.asarray(plan.body["inputs"][0]["data"], dtype=np.float32).reshape(-1, 64)


def embedding_texts(plan: PlannedRequest) -> list[str]:
    """The texts of an embeddings request (``input`` may be one string or a list)."""
    _expect(plan, EMBEDDINGS)
    value = plan.body["input"]
    return [value] if isinstance(value, str) else [str(text) for text in value]


def task_text(plan: PlannedRequest) -> str:
    """The task of a chat request: its last user message. System messages only frame the
    task (a persona, a format), so a distiller's coverage is judged on the user's words."""
    _expect(plan, CHAT)
    for message in reversed(plan.body["messages"]):
        if message.get("role") == "user":
            return _unframed(str(message["content"]))
    raise ValueError("a chat request without a user message carries no task")


def _unframed(text: str) -> str:
    """The task without a harvesting frame written into the user turn (the v1 thieves put
    "Explain step by step ...: " there): the frame is how the thief asks, not what."""
    for template in TEMPLATES.values():
        frame = template.split("{x}")[0]
        if text.startswith(frame):
            return text[len(frame):]
    return text


def payload(plan: PlannedRequest) -> np.ndarray | list[str]:
    """What one request buys: image rows, texts, or the one task text of a chat."""
    if plan.route == DIGITS_INFER:
        return digit_rows(plan)
    if plan.route == EMBEDDINGS:
        return embedding_texts(plan)
    return [task_text(plan)]


def extraction(answered: Iterable[PlannedRequest]) -> list[PlannedRequest]:
    return [plan for plan in answered if plan.purpose == "extraction"]


def _judged(sent: np.ndarray) -> np.ndarray:
    """Indices of held-out items the thief did not send: a student is never judged on
    what it was taught, whatever split the thief drew its inputs from."""
    keep = np.flatnonzero(~sent)
    if not len(keep):
        raise ValueError("the thief sent every held-out item; there is nothing left to judge it on")
    return keep


class Assessor(Protocol):
    """Judges one asset's theft: ``baseline`` is the quality a thief has with no queries at
    all, ``quality`` that of a student built from ``answered`` (cover requests ignored)."""

    asset: Asset

    def baseline(self) -> float: ...

    def quality(self, answered: Sequence[PlannedRequest]) -> float: ...


class ClassifierAssessor:
    """Fidelity of a logistic-regression student to the demo digits model.

    The student learns the victim's *labels* for the rows bought (duplicates once): a
    degraded answer gives labels only, and on digits probabilities add almost nothing (a
    labels-only clone trails a soft-label one by at most 2.6 points at 500 queries and not
    at all by 1,000; docs/HARDENING.md), so labels are what every answer is worth. Fidelity is agreement with the victim's labels on
    ``DigitsData.split(seed).test``, the held-out side of the split thieves draw their pool
    from. The baseline is the best constant predictor's fidelity (about 0.1).
    """

    asset: Asset = "classifier"

    def __init__(self, seed: int) -> None:
        self.held_out = DigitsData.split(seed).test.reshape(-1, 64)
        self.victim_labels: np.ndarray = victim_classifier().predict(self.held_out)

    def baseline(self) -> float:
        counts = np.bincount(self.victim_labels, minlength=N_CLASSES)
        return float(counts.max() / len(self.victim_labels))

    def bought(self, answered: Sequence[PlannedRequest]) -> tuple[np.ndarray, np.ndarray]:
        """The distinct rows the thief paid for ``[n, 64]`` and the victim's labels for them."""
        plans = extraction(answered)
        if not plans:
            return np.zeros((0, 64), dtype=np.float32), np.zeros(0, dtype=np.int64)
        rows = np.unique(np.concatenate([digit_rows(plan) for plan in plans]), axis=0)
        return rows, victim_classifier().predict(rows)

    def quality(self, answered: Sequence[PlannedRequest]) -> float:
        from sklearn.linear_model import LogisticRegression

        rows, labels = self.bought(answered)
        if not len(rows):
            return self.baseline()
        sent = {row.tobytes() for row in rows}
        judged = _judged(np.array([row.tobytes() in sent for row in self.held_out]))
        if len(np.unique(labels)) < 2:
            predicted = np.full(len(judged), labels[0])
        else:
            # A loose tolerance: the fit converges in a fifth of the time for the same fidelity.
            student = LogisticRegression(tol=1e-3, max_iter=1000).fit(rows / PIXEL_MAX, labels)
            predicted = student.predict(self.held_out[judged] / PIXEL_MAX)
        return float((predicted == self.victim_labels[judged]).mean())


class EmbeddingAssessor:
    """Mean cosine between a student's vectors and the victim's on held-out texts.

    The victim's answers are ``embedder.embed`` of the texts bought (in runs, the MiniLM the
    demo serves); the student is ridge regression on hashed character n-grams
    (``attacks.embeddings.train_student``). The baseline is 0: no queries, no student.
    Embedding spaces are anisotropic, so even a small student already scores well above 0
    (about 0.2 with MiniLM on 16 texts): the first requests buy the space's common direction.
    """

    asset: Asset = "embeddings"

    def __init__(self, held_out: Sequence[str], embedder: Embedder) -> None:
        self.held_out = tuple(held_out)
        self.embedder = embedder
        self.victim_vectors = embedder.embed(self.held_out)

    def baseline(self) -> float:
        return 0.0

    def quality(self, answered: Sequence[PlannedRequest]) -> float:
        texts = list(dict.fromkeys(text for plan in extraction(answered) for text in embedding_texts(plan)))
        if len(texts) < MIN_TEXTS:
            return 0.0
        sent = set(texts)
        judged = _judged(np.array([text in sent for text in self.held_out]))
        student = train_student(texts, self.embedder.embed(texts))
        return student_agreement(student, [self.held_out[i] for i in judged], self.victim_vectors[judged])


class Coverage(NamedTuple):
    share: float  # mean over held-out tasks of the best cosine to an answered task, in [0, 1]
    tasks: int  # distinct answered task texts


class ChatAssessor:
    """Task coverage: a proxy for what a distiller holds, not a student's quality.

    Training a student LLM on harvested answers needs a GPU this harness does not assume,
    so the measure is how much of the task space the thief got answers for: the mean, over
    held-out task prompts, of the highest cosine similarity (same embedder) to any answered
    task text. A coverage of 1 means every held-out task has an exact answered twin; the
    baseline is 0. Negative similarities count as 0 (a task nothing resembles is uncovered,
    not less than uncovered).
    """

    asset: Asset = "chat"

    def __init__(self, held_out: Sequence[str], embedder: Embedder) -> None:
        self.held_out = tuple(held_out)
        self.embedder = embedder
        self.held_out_vectors = embedder.embed(self.held_out)

    def baseline(self) -> float:
        return 0.0

    def coverage(self, answered: Sequence[PlannedRequest]) -> Coverage:
        tasks = list(dict.fromkeys(task_text(plan) for plan in extraction(answered)))
        if not tasks:
            return Coverage(0.0, 0)
        best = (self.held_out_vectors @ self.embedder.embed(tasks).T).max(axis=1)
        return Coverage(float(np.clip(best, 0.0, 1.0).mean()), len(tasks))

    def quality(self, answered: Sequence[PlannedRequest]) -> float:
        return self.coverage(answered).share


def theft_reduction(baseline: float, defended: float, undefended: float) -> float | None:
    """The share of the undefended thief's gain over ``baseline`` that the defences took away.

    1 means the defended thief ended at the baseline, 0 that the defences changed nothing;
    above 1 the defended thief ended below the baseline. It is negative when the defended
    thief did *better* (a run where the defences shaped its traffic into a more useful
    sample): reported as is, since clipping would hide exactly that. ``None`` when the
    undefended thief gained nothing, so there was nothing to reduce.
    """
    gain = undefended - baseline
    if gain <= 0:
        return None
    return 1.0 - (defended - baseline) / gain


def accounts_needed(
    assessor: Assessor, answered: Sequence[tuple[PlannedRequest, int]], target: float,
) -> tuple[int, int] | None:
    """``(units bought, accounts used)`` at the first answered request after which the
    student's quality reached ``target``; ``None`` if it never did.

    ``answered`` as for :func:`trajectory`. Found by bisection over the answered requests,
    which assumes quality rises with what was bought (a learning curve); a dip that
    crosses the target twice finds one of the crossings.
    """
    bought = [(plan, accounts) for plan, accounts in answered if plan.purpose == "extraction"]
    if not bought or assessor.quality([plan for plan, _ in bought]) < target:
        return None
    low, high = -1, len(bought) - 1  # quality(prefix to low) < target <= quality(prefix to high)
    while high - low > 1:
        middle = (low + high) // 2
        if assessor.quality([plan for plan, _ in bought[: middle + 1]]) >= target:
            high = middle
        else:
            low = middle
    return sum(plan.units for plan, _ in bought[: high + 1]), bought[high][1]


def trajectory(
    assessor: Assessor, answered: Sequence[tuple[PlannedRequest, int]], points: int = 6,
) -> list[tuple[int, int, float]]:
    """``(units bought, accounts used, quality)`` after roughly geometric prefixes of the
    answered extraction requests, the last being all of them.

    ``answered`` pairs each answered request, in the order it was answered, with the number
    of accounts its campaign had used by then. Prefixes are spaced geometrically in units
    bought, so the early, steep part of a learning curve gets its share of the points.
    """
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    bought = [(plan, accounts) for plan, accounts in answered if plan.purpose == "extraction"]
    if not bought:
        return []
    spent = np.cumsum([plan.units for plan, _ in bought])
    start = max(int(spent[0]), 1)
    targets = np.geomspace(start, max(int(spent[-1]), start), points)
    ends = np.minimum(np.searchsorted(spent, targets), len(bought) - 1)
    curve = []
    for end in sorted({*ends.tolist(), len(bought) - 1}):
        prefix = [plan for plan, _ in bought[: end + 1]]
        curve.append((int(spent[end]), bought[end][1], assessor.quality(prefix)))
    return curve


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a share ``successes / n`` (95% by default); ``(0, 1)``
    when ``n`` is 0. Unlike the normal approximation it stays inside [0, 1] and is not
    empty at 0 or ``n`` successes, which is where detection rates live."""
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    # The upper bound is one minus the lower bound of the failures' share: exact at n of n.
    return _wilson_lower(successes, n, z), 1.0 - _wilson_lower(n - successes, n, z)


def _wilson_lower(successes: int, n: int, z: float) -> float:
    if successes == 0:
        return 0.0
    share = successes / n
    centre = share + z * z / (2 * n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n)
