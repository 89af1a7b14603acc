"""Logit leakage (Carlini et al., 2024): read the hidden size off logprobs and logit_bias.

A decoder's logits are ``W @ h`` with ``W`` ``[vocab, hidden]``, so logit vectors from many
contexts span only ``hidden`` dimensions; the singular values of a stack of them fall off a
cliff after the hidden size (576 for SmolLM2-135M). Both probes collect rows of logits,
each known only up to one shift per row (logprobs are logits minus the log-normaliser),
over one fixed set of column tokens, and hand them to :func:`recover_rank`.

Both ask for ``max_tokens=T`` greedy tokens, so one request yields ``T`` rows (one per
generated position). They differ in how a row's columns are read:

- ``wide`` (a server allowing many logprobs, vLLM ``--max-logprobs``): ``top_logprobs=K``
  with ``logit_bias`` +100 on ``K`` fixed column tokens, which then fill the top ``K`` of
  every position. Without the bias the top-K sets of different contexts barely overlap
  (measured on SmolLM2: top-1000 sets of six contexts share one token). One request gives
  ``T`` full rows; ~40 requests recover 576.
- ``bias`` (OpenAI's limits: ``top_logprobs`` ≤ 20): +100 on a *forced* token and +60 on
  a batch of 19 column tokens. The forced token is generated at every step, so the
  contexts are the same across batches, and ``logprob(i) - logprob(forced) + 40`` is
  ``z_i - z_forced``: batches stitch into full rows. ``ceil(columns / 19)`` requests per
  ``T`` rows: about ``rows × 31 / T`` requests for 577 columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modelfence.redteam.metrics import recover_rank
from modelfence.redteam.timing import SteadyTiming
from modelfence.redteam.traffic import CHAT, Exchange, PlannedRequest, chat_body

OPENAI_TOP = 20  # OpenAI's cap on top_logprobs
PER_BATCH = OPENAI_TOP - 1
FORCED_BIAS = 100
PROBE_BIAS = 60
WIDE_BIAS = 100
FIRST_COLUMN_TOKEN = 2000  # column tokens are consecutive ids from here: ordinary words
FORCED_TOKEN = 1000
HIDDEN_TARGET = 576  # what the probe should find on the demo model


@dataclass(frozen=True, slots=True)
class LogitProbe:
    """One probe's shape: ``prompts × positions`` rows over ``columns`` column tokens.

    ``mode`` is ``wide`` (one request per prompt) or ``bias`` (``ceil(columns / 19)``
    requests per prompt).
    """

    prompts: Sequence[str]
    mode: str
    columns: int
    positions: int = 16

    def __post_init__(self) -> None:
        if self.mode not in ("wide", "bias"):
            raise ValueError(f"unknown probe mode {self.mode!r}; known: wide, bias")

    @property
    def batches(self) -> int:
        return 1 if self.mode == "wide" else math.ceil(self.columns / PER_BATCH)

    @property
    def requests(self) -> int:
        return len(self.prompts) * self.batches

    def _body(self, prompt: str, batch: int) -> dict[str, object]:
        if self.mode == "wide":
            top = self.columns
            bias = {str(FIRST_COLUMN_TOKEN + i): WIDE_BIAS for i in range(self.columns)}
        else:
            top = OPENAI_TOP
            first = FIRST_COLUMN_TOKEN + batch * PER_BATCH
            bias = {str(t): PROBE_BIAS for t in range(first, min(first + PER_BATCH, FIRST_COLUMN_TOKEN + self.columns))}
            bias[str(FORCED_TOKEN)] = FORCED_BIAS
        return chat_body([{"role": "user", "content": prompt}], self.positions,
                         temperature=0, logprobs=True, top_logprobs=top, logit_bias=bias)

    def plans(self, client: str, rate: float, rng: np.random.Generator) -> list[PlannedRequest]:
        times = SteadyTiming(rate, jitter=False).arrivals(rng, horizon=self.requests / rate)
        pairs = [(p, b) for p in self.prompts for b in range(self.batches)]
        return [PlannedRequest(at, client, CHAT, self._body(p, b), "extraction", turns=1)
                for at, (p, b) in zip(times, pairs, strict=True)]

    def matrix(self, exchanges: Sequence[Exchange]) -> np.ndarray:
        """Rows ``[contexts, columns]`` of logits, each up to its own shift."""
        rows: dict[tuple[str, int], dict[bytes, float]] = {}
        for exchange in exchanges:
            if not exchange.ok:
                continue
            prompt = exchange.request.body["messages"][-1]["content"]
            for position, step in enumerate(exchange.body["choices"][0]["logprobs"]["content"]):
                cells = rows.setdefault((prompt, position), {})
                if self.mode == "wide":
                    cells.update((bytes(c["bytes"]), c["logprob"]) for c in step["top_logprobs"])
                else:  # the forced token leads; the rest are this batch's columns
                    forced = step["logprob"]
                    shift = FORCED_BIAS - PROBE_BIAS
                    cells.update((bytes(c["bytes"]), c["logprob"] - forced + shift) for c in step["top_logprobs"][1:])
        return complete_block(list(rows.values()))


def complete_block(rows: Sequence[dict[bytes, float]]) -> np.ndarray:
    """The rows × columns block where every cell is known, rows centred.

    A context whose forced path broke in one batch, or a column missing from one answer,
    is left out. Centring removes each row's unknown shift (the rank of the logit
    space is unchanged, up to the all-ones direction).
    """
    if not rows:
        return np.zeros((0, 0))
    counts: dict[bytes, int] = {}
    for cells in rows:
        for column in cells:
            counts[column] = counts.get(column, 0) + 1
    most = max(counts.values())
    columns = sorted(c for c, n in counts.items() if n == most)
    full = np.array([[cells[c] for c in columns] for cells in rows if all(c in cells for c in columns)],
                    dtype=np.float64)
    return full - full.mean(axis=1, keepdims=True) if full.size else full


def probe_rank(probe: LogitProbe, exchanges: Sequence[Exchange]) -> dict[str, float]:
    matrix = probe.matrix(exchanges)
    rank = recover_rank(matrix)[0] if matrix.size else 0
    rows, columns = matrix.shape if matrix.ndim == 2 else (0, 0)
    return {
        "rows": float(rows), "columns": float(columns), "recovered_rank": float(rank),
        # A rank equal to min(rows, columns) is a lower bound only: no cliff within reach.
        "cliff_found": float(bool(matrix.size) and rank < min(rows, columns)),
    }


def bias_requests_needed(rows: int, columns: int = HIDDEN_TARGET + 1, positions: int = 16) -> int:
    """Requests the OpenAI-faithful ``bias`` probe needs for ``rows × columns``."""
    return math.ceil(rows / positions) * math.ceil(columns / PER_BATCH)
