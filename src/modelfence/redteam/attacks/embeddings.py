"""Embedding-API theft: imitate ``/v1/embeddings`` with a cheap student.

The student maps hashed character n-grams (no model weights at all) to the victim's
384-d vectors with ridge regression, trained only on what the API returned. Agreement
is the mean cosine between student and victim vectors on texts the attacker never sent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modelfence.redteam.metrics import cosine_agreement
from modelfence.redteam.timing import SteadyTiming
from modelfence.redteam.traffic import EMBEDDINGS, Exchange, PlannedRequest, embeddings_body

BATCH = 16


def theft_plan(texts: Sequence[str], client: str, rate: float, rng: np.random.Generator) -> list[PlannedRequest]:
    batches = [list(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]
    times = SteadyTiming(rate).arrivals(rng, horizon=10 * len(batches) / rate)
    return [
        PlannedRequest(at, client, EMBEDDINGS, embeddings_body(batch), "extraction")
        for at, batch in zip(times, batches, strict=False)
    ]


def harvested_pairs(exchanges: Sequence[Exchange]) -> tuple[list[str], np.ndarray]:
    """(texts, vectors ``[n, 384]``) from answered requests, in sending order."""
    texts: list[str] = []
    vectors: list[list[float]] = []
    for exchange in sorted((e for e in exchanges if e.ok), key=lambda e: e.request.at):
        inputs = exchange.request.body["input"]
        for item in sorted(exchange.body["data"], key=lambda d: d["index"]):
            texts.append(inputs[item["index"]])
            vectors.append(item["embedding"])
    return texts, np.asarray(vectors, dtype=np.float64)


def train_student(texts: Sequence[str], vectors: np.ndarray) -> object:
    """Ridge from hashed character n-grams to the victim's vectors.

    Solved in its dual (Cholesky on the ``n × n`` kernel: seconds for a few thousand
    texts, where the iterative sparse solvers take minutes); the targets are centred
    instead of fitting an intercept, which that solver cannot do on sparse features.
    """
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    student = make_pipeline(
        HashingVectorizer(analyzer="char_wb", ngram_range=(2, 4), n_features=2**15, alternate_sign=False),
        TransformedTargetRegressor(Ridge(alpha=1.0, fit_intercept=False, solver="cholesky"),
                                   transformer=StandardScaler(with_std=False)),
    )
    student.fit(list(texts), vectors)
    return student


def student_agreement(student: object, texts: Sequence[str], victim: np.ndarray) -> float:
    predicted = student.predict(list(texts))  # type: ignore[attr-defined]
    return cosine_agreement(predicted, victim)
