"""Detect and attribute after-the-fact text marks: which client's key explains the choices.

Each distinct (group, context) pair of a text is scored once (its first occurrence), so a
repeated phrase cannot inflate the score. For a key that did not mark the text, its
preferred member of each pair is an independent uniform draw, so pair ``i`` of a group with
``k_i`` members matches with probability exactly ``1/k_i`` and the number of matches ``M``
follows a Poisson-binomial law, the same for every key. The p-value ``P[M ≥ m]`` is exact
(convolution of one binomial per group size). Every key is scored; the best key's p-value
times the number of keys tested (Bonferroni) bounds the chance of naming any client for an
unmarked text, or the wrong client for another client's text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from modelfence.tails import binom_pmf
from modelfence.watermark.greenlist import mix
from modelfence.watermark.lexical import Occurrence, occurrence_code


@dataclass(frozen=True, slots=True)
class LexicalScore:
    """The verdict for one text: best candidate, its statistics, and how they were computed."""

    candidate: int | None  # index into the seeds tested; None when nothing could be scored
    scored: int  # distinct (group, context) pairs
    matches: int  # pairs whose form is the candidate's choice
    expected: float  # matches expected by chance, Σ 1/k_i
    p_value: float  # exact Poisson-binomial tail, for the candidate's key alone
    p_adjusted: float  # Bonferroni: p_value × keys tested, capped at 1
    keys_tested: int


def distinct(found: Sequence[Occurrence]) -> list[Occurrence]:
    """The first occurrence of each (group, context) pair, in order."""
    seen: set[tuple[int, int]] = set()
    out: list[Occurrence] = []
    for occ in found:
        pair = (occ.group.id, occ.context)
        if pair not in seen:
            seen.add(pair)
            out.append(occ)
    return out


def match_counts(
    seeds: npt.ArrayLike, pairs: Sequence[Occurrence], *, chunk: int = 2048
) -> npt.NDArray[np.int64]:
    """Matches per seed ``[keys]`` among ``pairs`` ``[T]`` (chunked to bound memory)."""
    seeds_u = np.asarray(seeds, dtype=np.uint64)
    codes = np.array([occurrence_code(p.group, p.context) for p in pairs], dtype=np.uint64)
    sizes = np.array([len(p.group.members) for p in pairs], dtype=np.uint64)
    found = np.array([p.member for p in pairs], dtype=np.uint64)
    out = np.empty(len(seeds_u), dtype=np.int64)
    for start in range(0, len(seeds_u), chunk):
        block = seeds_u[start : start + chunk, None]
        out[start : start + chunk] = ((mix(block ^ codes) % sizes) == found).sum(1)
    return out


def poisson_binomial_sf(matches: int, sizes: Sequence[int]) -> float:
    """``P[M ≥ matches]`` for ``M`` = Σ Bernoulli(1/k) over ``sizes`` (exact; all terms are
    positive, so the tail keeps full relative precision far below 1e-300's neighbourhood)."""
    pmf = np.ones(1)
    for k, n in sorted(Counter(sizes).items()):
        pmf = np.convolve(pmf, binom_pmf(n, 1.0 / k))
    return float(min(1.0, pmf[max(0, matches) :].sum()))


def score_occurrences(found: Sequence[Occurrence], seeds: Sequence[int]) -> LexicalScore:
    """Score a text's occurrences against every seed ``[keys]``; the candidate matches most.

    >>> score_occurrences([], [7]).scored
    0
    """
    pairs = distinct(found)
    keys = len(seeds)
    if not pairs or keys == 0:
        return LexicalScore(None, len(pairs), 0, 0.0, 1.0, 1.0, keys)
    counts = match_counts(seeds, pairs)
    best = int(np.argmax(counts))
    sizes = [len(p.group.members) for p in pairs]
    p = poisson_binomial_sf(int(counts[best]), sizes)
    return LexicalScore(
        best, len(pairs), int(counts[best]), sum(1.0 / k for k in sizes), p, min(1.0, p * keys),
        keys,
    )
