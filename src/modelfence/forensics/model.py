"""``verify model``: does a suspect model carry a client's marks?

- ``classifier``: query the suspect (OIP v2) on each client's recorded marked inputs; count
  agreements with the watermark labels; one-sided binomial test against chance
  ``1 / (classes - 1)`` (a suspect that never saw the marked answers has no reason to pick
  that one wrong label), Bonferroni over the clients tested.
- ``embeddings``: embed benign texts followed by each of the client's trigger words and
  by each of its decoy words; a rank test asks whether triggers land nearer their target
  directions than decoys do (see :func:`verify_embeddings`). Vectors of another size than
  the marks' cannot come from our answers: that is reported as an error.
- ``chat``: see :mod:`.radioactivity`; :class:`Suspect` asks the questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
from scipy.stats import binom, mannwhitneyu

from modelfence.forensics.errors import SuspectUnreachable, VerifyError
from modelfence.watermark.embeddings import EmbeddingMark
from modelfence.watermark.ledger import MarkedInput

KINDS = ("chat", "classifier", "embeddings")


@dataclass(frozen=True, slots=True)
class ModelVerdict:
    kind: str
    ours: bool
    client: str | None
    p_value: float
    statistic: float
    samples: int
    method: str
    per_client: dict[str, float]  # client -> uncorrected p-value

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Suspect:
    """A suspect API: ``url`` plus an optional bearer key; failures become SuspectUnreachable."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 30.0) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.url = url

    def close(self) -> None:
        self._client.close()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            response = self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise SuspectUnreachable(f"suspect {self.url} is unreachable: {exc}") from exc
        if response.status_code != 200:
            raise SuspectUnreachable(
                f"suspect {self.url}{path} answered {response.status_code}: is it the right kind?"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise SuspectUnreachable(f"suspect {self.url}{path} did not answer JSON") from exc

    def labels(self, model: str, rows: Sequence[Sequence[float]]) -> list[int]:
        payload = self.post(f"/v2/models/{quote(model, safe='')}/infer", {"inputs": [{
            "name": "input", "datatype": "FP32", "shape": [len(rows), len(rows[0])],
            "data": [v for row in rows for v in row]}]})
        for tensor in payload.get("outputs", []) if isinstance(payload, dict) else []:
            shape, data = tensor.get("shape"), tensor.get("data")
            if isinstance(shape, list) and len(shape) == 2 and shape[0] == len(rows):
                return np.asarray(data, dtype=float).reshape(shape).argmax(1).tolist()  # type: ignore[no-any-return]
            if isinstance(shape, list) and shape and shape[0] == len(rows):
                return [int(v) for v in np.asarray(data).ravel()]
        raise VerifyError("the suspect's answer has no label or probability output per row")

    def chat(self, model: str, prompt: str, max_tokens: int) -> str:
        payload = self.post("/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 1.0})
        try:
            return str(payload["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as exc:
            raise VerifyError("the suspect's answer is not a chat completion") from exc

    def embeddings(self, model: str, texts: Sequence[str]) -> np.ndarray:
        payload = self.post("/v1/embeddings", {"model": model, "input": list(texts)})
        try:
            items = sorted(payload["data"], key=lambda d: d["index"])
            return np.asarray([d["embedding"] for d in items], dtype=float)
        except (KeyError, TypeError) as exc:
            raise VerifyError("the suspect's answer is not an embeddings list") from exc


def verify_classifier(
    suspect: Suspect, model: str, ledgers: dict[str, list[MarkedInput]], *, alpha: float = 1e-6,
) -> ModelVerdict:
    ledgers = {c: rows for c, rows in ledgers.items() if rows}
    if not ledgers:
        raise VerifyError("no marked classifier inputs are recorded: nothing to test")
    results: dict[str, tuple[float, int, int]] = {}
    for client, rows in ledgers.items():
        answers = suspect.labels(model, [r.features for r in rows])
        agree = sum(a == r.label for a, r in zip(answers, rows, strict=True))
        chance = max(1.0 / (r.n_classes - 1) for r in rows)
        results[client] = (float(binom.sf(agree - 1, len(rows), chance)), agree, len(rows))
    best = min(results, key=lambda c: results[c][0])
    p, agree, n = results[best]
    corrected = min(1.0, p * len(results))
    return ModelVerdict(
        "classifier", corrected <= alpha, best if corrected <= alpha else None, corrected,
        agree / n, n,
        "agreement with the watermark labels on the client's recorded marked inputs; one-sided "
        "binomial test vs chance 1/(classes-1); Bonferroni over clients; statistic = agreement",
        {c: r[0] for c, r in results.items()},
    )


PROBES_PER_WORD = 5  # benign texts each trigger or decoy word is appended to
EMBED_BATCH = 64  # texts per request to the suspect


def word_probes(words: Sequence[str], benign: Sequence[str], repeat: int) -> list[str]:
    """Each word repeated ``repeat`` times (full mark weight) after each benign text."""
    return [f"{text} " + " ".join([word] * repeat) for word in words for text in benign]


def _own_target_cosine(vectors: np.ndarray, mark: EmbeddingMark, targets: Sequence[int]) -> np.ndarray:
    """Cosine ``[n]`` of each vector ``[n, dim]`` to its word's target direction."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return (unit * mark.targets[np.asarray(targets)]).sum(1)  # type: ignore[no-any-return]


def verify_embeddings(
    suspect: Suspect, model: str, marks: dict[str, EmbeddingMark], benign: Sequence[str],
    *, alpha: float = 1e-6,
) -> ModelVerdict:
    """Per client: do its trigger words pull the suspect's vectors to its targets more than
    its decoy words do? Triggers and decoys are the first words of one keyed random ranking,
    so for a suspect that never learnt the mark which of them are triggers is a random
    split (balanced per target direction), and a one-sided Mann-Whitney test on per-word
    scores is calibrated (checked over many keys in the tests)."""
    if not marks:
        raise VerifyError("no clients are known: nothing to test")
    if len(benign) < PROBES_PER_WORD:
        raise VerifyError(f"need at least {PROBES_PER_WORD} benign texts")
    results: dict[str, tuple[float, float]] = {}
    for client, mark in marks.items():
        # A decoy gets the target its rank would have given a trigger: rank i -> i % targets.
        triggers, n_targets = sorted(mark.triggers), len(mark.targets)
        words = [*triggers, *mark.decoys]
        own = [mark.triggers[w] for w in triggers] + [
            (len(triggers) + j) % n_targets for j in range(len(mark.decoys))]
        texts = word_probes(words, benign[:PROBES_PER_WORD], mark.max_triggers)
        vectors = np.concatenate([suspect.embeddings(model, texts[i : i + EMBED_BATCH])
                                  for i in range(0, len(texts), EMBED_BATCH)])
        if vectors.shape[1] != mark.targets.shape[1]:
            raise VerifyError(f"suspect vectors have {vectors.shape[1]} dimensions, marks {mark.targets.shape[1]}")
        cosine = _own_target_cosine(vectors, mark, np.repeat(own, PROBES_PER_WORD).tolist())
        scores = cosine.reshape(len(words), PROBES_PER_WORD).mean(1)
        # Each target direction sits at its own angle to the suspect's vectors: compare
        # words with the other words of their own target, so that angle cancels out.
        for target in range(n_targets):
            same = np.asarray(own) == target
            scores[same] -= scores[same].mean()
        test = mannwhitneyu(scores[: len(triggers)], scores[len(triggers) :], alternative="greater",
                            method="exact")
        results[client] = (float(test.pvalue), float(test.statistic) / (len(triggers) * len(mark.decoys)))
    best = min(results, key=lambda c: results[c][0])
    corrected = min(1.0, results[best][0] * len(results))
    return ModelVerdict(
        "embeddings", corrected <= alpha, best if corrected <= alpha else None, corrected,
        results[best][1], PROBES_PER_WORD * (len(marks[best].triggers) + len(marks[best].decoys)),
        f"per word, mean cosine to the word's target direction of {PROBES_PER_WORD} benign "
        "texts followed by the word (a decoy takes the target of its rank), centred per "
        "target; the client's trigger words vs its decoy words (same keyed ranking), "
        "one-sided Mann-Whitney test; Bonferroni over clients; "
        "statistic = share of (trigger, decoy) pairs where the trigger scores higher",
        {c: r[0] for c, r in results.items()},
    )
