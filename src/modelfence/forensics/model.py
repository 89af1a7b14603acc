"""``verify model``: does a suspect model carry a client's marks?

- ``classifier``: query the suspect (OIP v2) on each client's recorded marked inputs; count
  agreements with the watermark labels; one-sided binomial test against chance
  ``1 / (classes - 1)`` (a suspect that never saw the marked answers has no reason to pick
  that one wrong label), Bonferroni over the clients tested.
- ``embeddings``: embed benign texts followed by each candidate trigger word, once for all
  clients; per client, an exact rank test asks whether its triggers land nearer their
  target directions than the other words do (see :func:`verify_embeddings`). The marks
  are derived at the suspect's own vector size; answers that are not one vector per text,
  all of one size, are reported as an error.
- ``chat``: see :mod:`.radioactivity`; :class:`Suspect` asks the questions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import numpy.typing as npt

from modelfence.forensics.errors import SuspectUnreachable, VerifyError
from modelfence.forensics.ranktest import rank_sum_sf
from modelfence.tails import binom_sf
from modelfence.watermark.embeddings import MarkLayout
from modelfence.watermark.ledger import MarkedInput
from modelfence.watermark.regions import MIN_CLASSES, Probes, RegionMark, region_p_value

KINDS = ("chat", "classifier", "embeddings")
ROWS_PER_REQUEST = 256  # classifier rows a request to the suspect


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
        return self.classify(model, rows)[0]

    def classify(self, model: str, rows: Sequence[Sequence[float]]) -> tuple[list[int], int | None]:
        """The suspect's label per row, and its class count when it answers probabilities;
        ``ROWS_PER_REQUEST`` rows a request."""
        labels: list[int] = []
        classes = None
        for start in range(0, len(rows), ROWS_PER_REQUEST):
            chunk, classes = self._classify(model, rows[start : start + ROWS_PER_REQUEST])
            labels.extend(chunk)
        return labels, classes

    def _classify(
        self, model: str, rows: Sequence[Sequence[float]],
    ) -> tuple[list[int], int | None]:
        payload = self.post(f"/v2/models/{quote(model, safe='')}/infer", {"inputs": [{
            "name": "input", "datatype": "FP32", "shape": [len(rows), len(rows[0])],
            "data": [float(v) for row in rows for v in row]}]})
        for tensor in payload.get("outputs", []) if isinstance(payload, dict) else []:
            shape, data = tensor.get("shape"), tensor.get("data")
            if isinstance(shape, list) and len(shape) == 2 and shape[0] == len(rows):
                labels = np.asarray(data, dtype=float).reshape(shape).argmax(1).tolist()
                return labels, int(shape[1])
            if isinstance(shape, list) and shape and shape[0] == len(rows):
                return [int(v) for v in np.asarray(data).ravel()], None
        raise VerifyError("the suspect's answer has no label or probability output per row")

    def chat(self, model: str, prompt: str, max_tokens: int, seed: int | None = None) -> str:
        """One sampled answer; ``seed`` asks an OpenAI-style suspect to sample reproducibly."""
        body: dict[str, Any] = {
            "model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 1.0}
        if seed is not None:
            body["seed"] = seed
        payload = self.post("/v1/chat/completions", body)
        try:
            return str(payload["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as exc:
            raise VerifyError("the suspect's answer is not a chat completion") from exc

    def embeddings(self, model: str, texts: Sequence[str]) -> np.ndarray:
        payload = self.post("/v1/embeddings", {"model": model, "input": list(texts)})
        try:
            items = sorted(payload["data"], key=lambda d: d["index"])
            return np.asarray([d["embedding"] for d in items], dtype=float)
        except (KeyError, TypeError, ValueError) as exc:
            raise VerifyError("the suspect's answer is not an embeddings list") from exc


def _dawn_results(
    suspect: Suspect, model: str, ledgers: dict[str, list[MarkedInput]],
) -> dict[str, tuple[float, int, int]]:
    """Per client with recorded marked inputs: (p, agreements, inputs)."""
    results: dict[str, tuple[float, int, int]] = {}
    for client, rows in ledgers.items():
        if not rows:
            continue
        answers = suspect.labels(model, [r.features for r in rows])
        agree = sum(a == r.label for a, r in zip(answers, rows, strict=True))
        chance = max(1.0 / (r.n_classes - 1) for r in rows)
        results[client] = (float(binom_sf(agree - 1, len(rows), chance)), agree, len(rows))
    return results


def verify_classifier(
    suspect: Suspect, model: str, ledgers: dict[str, list[MarkedInput]], *, alpha: float = 1e-6,
) -> ModelVerdict:
    results = _dawn_results(suspect, model, ledgers)
    if not results:
        raise VerifyError("no marked classifier inputs are recorded: nothing to test")
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


def verify_regions(
    suspect: Suspect, model: str, clients: Sequence[str],
    rules: Callable[[str], Sequence[RegionMark]], probes: Probes,
    ledgers: dict[str, list[MarkedInput]], *, classes: int | None, alpha: float = 1e-6,
) -> ModelVerdict:
    """Region marks (:func:`~modelfence.watermark.regions.region_p_value`) for every client,
    on one probe set asked once. A client's ``rules`` are one per key version it may have
    been served under (Bonferroni over them); where a client also has DAWN marks in
    ``ledgers``, its p-value is the smaller of the two doubled; then Bonferroni over every
    client tested."""
    if not clients:
        raise VerifyError("no clients are known: nothing to test")
    if len(probes.noisy) == 0:
        raise VerifyError("the profile gave no off-distribution probes: raise probe_noise")
    answers, seen = suspect.classify(model, probes.noisy.tolist())
    classes = classes or seen
    if classes is None:
        raise VerifyError("the suspect answers labels only: set watermark.labels.classes")
    if classes < MIN_CLASSES:
        raise VerifyError(f"region marks need {MIN_CLASSES} or more classes; the model has {classes}")
    if probes.labels is not None:
        base, source = probes.labels, "the profile's true labels"
    else:
        centres, where = np.unique(probes.clean, axis=0, return_inverse=True)
        base = np.asarray(suspect.classify(model, centres.tolist())[0])[where.ravel()]
        source = "its answers on the clean rows"
    # As arrays once: every client's test reads them.
    base, noisy_answers = np.asarray(base, dtype=np.int64), np.asarray(answers, dtype=np.int64)
    regions = {c: _best_version(rules(c), probes, base, noisy_answers, classes) for c in clients}
    dawn = _dawn_results(suspect, model, ledgers)
    per_client = {
        c: min(1.0, 2 * min(p, dawn[c][0])) if c in dawn else p for c, (p, _, _) in regions.items()
    }
    best = min(per_client, key=per_client.__getitem__)
    corrected = min(1.0, per_client[best] * len(per_client))
    _, hits, moved = regions[best]
    return ModelVerdict(
        "classifier", corrected <= alpha, best if corrected <= alpha else None, corrected,
        hits / moved if moved else 0.0, len(probes.noisy),
        f"region marks: {len(probes.noisy)} off-distribution probes (profile rows plus noise), "
        f"moves from {source} grouped by the client's (cell, label); hits = moves equal to the "
        "client's keyed shift; exact null: each group's shift uniform on 1..classes-1 (the "
        "convolution of the groups' laws, no approximation); clients with recorded DAWN marks: "
        "2 x the smaller p; Bonferroni over clients; statistic = hits / moved answers",
        per_client,
    )


def _best_version(
    rules: Sequence[RegionMark], probes: Probes, base: npt.NDArray[np.int64],
    answers: npt.NDArray[np.int64], classes: int,
) -> tuple[float, int, int]:
    """The smallest of one client's per-version results, its p times the versions tried."""
    results = [region_p_value(rule, probes.noisy, base, answers, classes) for rule in rules]
    p, hits, moved = min(results)
    return min(1.0, p * len(results)), hits, moved


PROBES_PER_WORD = 5  # benign texts each candidate word is appended to
EMBED_BATCH = 64  # texts per request to the suspect


def word_probes(words: Sequence[str], benign: Sequence[str], repeat: int) -> list[str]:
    """Each word repeated ``repeat`` times (full mark weight) after each benign text."""
    return [f"{text} " + " ".join([word] * repeat) for word in words for text in benign]


def word_directions(
    suspect: Suspect, model: str, words: Sequence[str], benign: Sequence[str], repeat: int,
) -> np.ndarray:
    """Per word, the mean unit vector ``[words, dim]`` of the suspect's embeddings of the
    benign texts followed by that word: the one set of probes every client is scored on."""
    texts = word_probes(words, benign, repeat)
    batches = []
    for i in range(0, len(texts), EMBED_BATCH):
        batch = suspect.embeddings(model, texts[i : i + EMBED_BATCH])
        if batch.ndim != 2 or len(batch) != len(texts[i : i + EMBED_BATCH]) or batch.shape[1] < 2:
            raise VerifyError("the suspect did not answer one vector of 2 or more numbers per text")
        if batches and batch.shape[1] != batches[0].shape[1]:
            raise VerifyError("the suspect answered vectors of different sizes")
        batches.append(batch)
    return mean_directions(np.concatenate(batches), len(words))


def mean_directions(vectors: np.ndarray, words: int) -> np.ndarray:
    """The mean unit vector per word ``[words, dim]`` of probe vectors ``[words * k, dim]``
    (each word's ``k`` probes in a row, as :func:`word_probes` orders them)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms == 0, 1.0, norms)
    return unit.reshape(words, len(vectors) // words, -1).mean(1)  # type: ignore[no-any-return]


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``scores``; ties broken by position, which no key influences."""
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    return ranks


def layout_p_value(directions: np.ndarray, layout: MarkLayout) -> tuple[float, float]:
    """One client's exact p-value and AUC: do its triggers score above the other words?

    A word's score is the cosine of its direction to the target its keyed rank gives it.
    Words are compared only with the words of the same target (each target sits at its own
    angle to the suspect's vectors), and the triggers' rank sum over the targets is tested
    against its exact null: without the key, which of one target's words are triggers is
    a uniformly random subset (:class:`~modelfence.watermark.embeddings.MarkLayout`)."""
    scores = (directions @ layout.targets.T)[np.arange(len(directions)), layout.target_of]
    strata, total, won, pairs = [], 0, 0, 0
    for target in range(len(layout.targets)):
        same = layout.target_of == target
        picked = layout.trigger[same]
        n, k = int(same.sum()), int(picked.sum())
        rank_sum = int(_ranks(scores[same])[picked].sum())
        strata.append((n, k))
        total += rank_sum
        won += rank_sum - k * (k + 1) // 2
        pairs += k * (n - k)
    return rank_sum_sf(strata, total), won / pairs if pairs else 0.5


def verify_embeddings(
    suspect: Suspect, model: str, clients: Sequence[str], layout: Callable[[str, int], MarkLayout],
    words: Sequence[str], benign: Sequence[str], *, repeat: int, alpha: float = 1e-6,
) -> ModelVerdict:
    """Per client: do its trigger words pull the suspect's vectors to their targets more
    than the other candidate words do (:func:`layout_p_value`)? Every candidate word is
    embedded once, after ``PROBES_PER_WORD`` benign texts, and all clients are scored on
    the same vectors, so the suspect answers the same number of texts for ten clients or
    ten thousand; Bonferroni over every client tested."""
    if not clients:
        raise VerifyError("no clients are known: nothing to test")
    if len(benign) < PROBES_PER_WORD:
        raise VerifyError(f"need at least {PROBES_PER_WORD} benign texts")
    directions = word_directions(suspect, model, words, benign[:PROBES_PER_WORD], repeat)
    results = {client: layout_p_value(directions, layout(client, directions.shape[1]))
               for client in clients}
    best = min(results, key=lambda c: results[c][0])
    corrected = min(1.0, results[best][0] * len(results))
    return ModelVerdict(
        "embeddings", corrected <= alpha, best if corrected <= alpha else None, corrected,
        results[best][1], PROBES_PER_WORD * len(words),
        f"each of the {len(words)} candidate words after {PROBES_PER_WORD} benign texts, embedded "
        "once for all clients; per client, a word's score is the cosine of its mean vector to "
        "the target its keyed rank gives it; the triggers' rank sum among the words of the same "
        "target, exact stratified null (no approximation); Bonferroni over clients; "
        "statistic = share of (trigger, other word of its target) pairs the trigger wins",
        {c: r[0] for c, r in results.items()},
    )
