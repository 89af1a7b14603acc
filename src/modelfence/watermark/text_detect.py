"""Detect and attribute green-list text marks: which client's key explains the tokens.

Scoring follows KGW with the deduplication of Sander et al. (radioactivity): each distinct
(previous token, token) pair counts once, so repeated phrases cannot inflate the score.
For ``T`` scored pairs of which ``g`` are green under a key, the one-sided exact binomial
p-value is ``P[Binomial(T, γ) ≥ g]`` and ``z = (g − γT) / √(T γ (1 − γ))``. Every known key
is scored; the best client's p-value is multiplied by the number of keys tested
(Bonferroni), so "this text is client X's" is wrong with probability at most that value
for unmarked text, whatever the number of clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from modelfence.tails import binom_sf
from modelfence.watermark.greenlist import context_codes, is_green, threshold, token_codes


@dataclass(frozen=True, slots=True)
class TextScore:
    """The verdict for one text: best candidate, its statistics, and how they were computed."""

    candidate: int | None  # index into the seeds tested; None when no token could be scored
    tokens_scored: int  # distinct (previous, token) pairs
    green: int  # green pairs under the candidate's key
    z: float
    p_value: float  # one-sided exact binomial, for the candidate's key alone
    p_adjusted: float  # Bonferroni: p_value × keys tested, capped at 1
    keys_tested: int


Pairs = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]


def scored_pairs(token_ids: Sequence[int]) -> Pairs:
    """Distinct (previous, current) pairs of a token sequence, as two ``[T]`` arrays."""
    return distinct_pairs([token_ids])


def distinct_pairs(sequences: Iterable[Sequence[int]]) -> Pairs:
    """Distinct (previous, current) pairs over several texts, none across their borders."""
    stacks = [
        np.stack([ids[:-1], ids[1:]], axis=1)
        for ids in (np.asarray(s, dtype=np.int64) for s in sequences) if len(ids) >= 2
    ]
    if not stacks:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    pairs = np.unique(np.concatenate(stacks), axis=0)
    return pairs[:, 0], pairs[:, 1]


def green_counts(
    seeds: npt.ArrayLike, previous: npt.ArrayLike, current: npt.ArrayLike, gamma: float,
    *, chunk: int = 1024,
) -> npt.NDArray[np.int64]:
    """Green pairs per seed ``[keys]`` among pairs ``[T]`` (chunked to bound memory)."""
    seeds_u = np.asarray(seeds, dtype=np.uint64)
    tokens = token_codes(current)
    cut = threshold(gamma)
    out = np.empty(len(seeds_u), dtype=np.int64)
    for start in range(0, len(seeds_u), chunk):
        block = seeds_u[start : start + chunk, None]
        out[start : start + chunk] = is_green(context_codes(block, previous), tokens, cut).sum(1)
    return out


def score_text(token_ids: Sequence[int], seeds: Sequence[int], *, gamma: float = 0.25) -> TextScore:
    """Score ``token_ids`` against every seed ``[keys]``; the candidate has the most green pairs.

    >>> score_text([1, 2], [7]).tokens_scored
    1
    """
    return score_pairs(scored_pairs(token_ids), seeds, gamma=gamma)


def score_pairs(pairs: Pairs, seeds: Sequence[int], *, gamma: float = 0.25) -> TextScore:
    """Score distinct ``pairs`` against every seed; the candidate has the most green pairs."""
    previous, current = pairs
    n, keys = len(previous), len(seeds)
    if n == 0 or keys == 0:
        return TextScore(None, n, 0, 0.0, 1.0, 1.0, keys)
    greens = green_counts(seeds, previous, current, gamma)
    best = int(np.argmax(greens))
    g = int(greens[best])
    p = float(binom_sf(g - 1, n, gamma))
    z = (g - gamma * n) / float(np.sqrt(n * gamma * (1 - gamma)))
    return TextScore(best, n, g, z, p, min(1.0, p * keys), keys)
