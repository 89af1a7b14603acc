"""What thieves send: their own digits and texts, and the requests that carry them.

Every thief draws from its side of the splits the judge uses: ``DigitsData.split(seed).pool``
(539 real digits) and ``text_pool(corpus, seed).pool``; the held-out sides are what its
clone is judged on and are never sent. Past the 539 digits a careful thief sends the same
digits moved by a fraction of a pixel (bilinear: a quarter, then half a pixel); whole-pixel
moves would not do, as 85% of digits moved by one pixel lie farther from every reference
cell than 99% of honest images, against 1–3% of quarter-pixel moves. The v1 thief sends
noisy copies instead (``padded_pool``).

A chat thief that wants natural-looking requests puts its frame ("explain step by step")
in the system message and only the task in the user turn, samples at a temperature and
varies ``max_tokens``: the request shape honest applications have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from modelfence.redteam.attacks.classifier import DigitsData
from modelfence.redteam.prompts import PromptCorpus, load_prompts
from modelfence.redteam.thieves.base import Asset, text_pool
from modelfence.redteam.traffic import (
    CHAT,
    DIGITS_INFER,
    EMBEDDINGS,
    PlannedRequest,
    chat_body,
    digits_body,
    embeddings_body,
)

# (rows, columns, share of a pixel) of the augmented rounds: the digits themselves, then a
# quarter of a pixel in each of eight directions, then half a pixel along the axes.
SHIFTS: tuple[tuple[int, int, float], ...] = (
    (0, 0, 0.0),
    (0, 1, 0.25), (0, -1, 0.25), (1, 0, 0.25), (-1, 0, 0.25),
    (1, 1, 0.25), (1, -1, 0.25), (-1, 1, 0.25), (-1, -1, 0.25),
    (1, 0, 0.5), (-1, 0, 0.5), (0, 1, 0.5), (0, -1, 0.5),
)
# System prompts that elicit reasoning, as chat applications phrase them.
COT_FRAMES: tuple[str, ...] = (
    "Explain step by step, showing your reasoning before the final answer.",
    "You are a patient tutor. Think through the question carefully, show your work, then answer.",
    "Work through the problem in numbered steps and state the final answer on its own line.",
    "Before answering, reason about the question out loud; then give a short, clear answer.",
    "You are an expert assistant. Lay out the reasoning behind your answer, then summarise it.",
    "Break the task into parts, solve each one, and explain how they fit together.",
)
CHAT_MAX_TOKENS = (384, 768)  # a distiller wants whole answers, but not always the same length
COVER_MAX_TOKENS = (64, 256)
TEMPERATURE = (0.7, 1.0)


@cache  # every thief of a run splits the same way; loading the digits takes a moment
def digits(seed: int) -> DigitsData:
    return DigitsData.split(seed)


@cache
def pool_texts(seed: int) -> tuple[str, ...]:
    return text_pool(load_prompts(), seed).pool


@cache
def pool_corpus(seed: int) -> PromptCorpus:
    """The public corpus without the held-out texts, per source (the v1 planners pick by
    source)."""
    corpus, keep = load_prompts(), set(pool_texts(seed))
    return PromptCorpus({source: tuple(t for t in texts if t in keep) for source, texts in corpus.by_source.items()},
                        corpus.missing)


def shifted(images: np.ndarray, rows: int, columns: int, share: float = 1.0) -> np.ndarray:
    """``images [n, 8, 8]`` moved ``share`` of the way to ``rows`` down and ``columns``
    right (bilinear between the image and its whole-pixel move, blank where it left)."""
    moved = np.zeros_like(images)
    h, w = images.shape[1:]
    moved[:, max(rows, 0) : h + min(rows, 0), max(columns, 0) : w + min(columns, 0)] = (
        images[:, max(-rows, 0) : h + min(-rows, 0), max(-columns, 0) : w + min(-columns, 0)]
    )
    out: np.ndarray = ((1.0 - share) * images + share * moved).astype(images.dtype)
    return out


def digit_rounds(seed: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """At least ``count`` in-distribution images ``[n, 64]`` in rounds: the pool in a
    shuffled order, then the pool moved by each of ``SHIFTS`` in turn (a digit and its
    moved copies are whole rounds apart, farther than the detector's window)."""
    pool = digits(seed).pool.reshape(-1, 8, 8)
    rounds = []
    for r in range(-(-count // len(pool))):
        rows = shifted(pool, *SHIFTS[r % len(SHIFTS)]).reshape(-1, 64)
        rounds.append(rows[rng.permutation(len(rows))])
    return rounds


def digit_rows(seed: int, count: int, rng: np.random.Generator, *, in_distribution: bool) -> np.ndarray:
    """``count`` images ``[count, 64]``: augmented real digits, or the v1 noisy padding
    (shuffled, as KnockoffNets' random sampling sends them)."""
    if in_distribution:
        return np.concatenate(digit_rounds(seed, count, rng))[:count]
    rows, _ = digits(seed).padded_pool(count, int(rng.integers(1 << 30)))
    rows = rows.reshape(-1, 64)
    return rows[rng.permutation(len(rows))]


def task_texts(seed: int, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` texts of the pool in a shuffled order, going round again when one pass
    is not enough (a chat thief re-asks a task under another frame)."""
    pool = pool_texts(seed)
    out: list[str] = []
    while len(out) < count:
        out.extend(pool[int(i)] for i in rng.permutation(len(pool)))
    return out[:count]


def inputs_for(asset: Asset, seed: int, count: int, rng: np.random.Generator, *,
               in_distribution: bool = True) -> np.ndarray | list[str]:
    """``count`` inputs for ``asset``: images ``[count, 64]`` or texts."""
    if asset == "classifier":
        return digit_rows(seed, count, rng, in_distribution=in_distribution)
    return task_texts(seed, count, rng)


def framed_chat(task: str, frame: str, rng: np.random.Generator) -> dict[str, Any]:
    """A chain-of-thought request shaped like an application's: frame in the system
    message, task alone in the user turn, a sampling temperature, varied ``max_tokens``."""
    messages = [{"role": "system", "content": frame}, {"role": "user", "content": task}]
    return chat_body(messages, int(rng.integers(*CHAT_MAX_TOKENS)),
                     temperature=round(float(rng.uniform(*TEMPERATURE)), 2))


@dataclass
class Requests:
    """Hands a thief's inputs out in order, each batch as the request that buys it, and
    makes cover: small honest-looking requests from the thief's own real data."""

    asset: Asset
    inputs: np.ndarray | Sequence[str]
    rng: np.random.Generator
    seed: int
    labels_only: bool = False
    position: int = 0

    @property
    def left(self) -> int:
        return len(self.inputs) - self.position

    def extraction(self, size: int) -> PlannedRequest | None:
        """The next ``size`` inputs (one task for a chat) as a request, None when none are left."""
        size = 1 if self.asset == "chat" else min(size, self.left)
        if self.left <= 0:
            return None
        chunk = self.inputs[self.position : self.position + size]
        self.position += size
        return self._carrying(chunk)

    def _carrying(self, chunk: np.ndarray | Sequence[str]) -> PlannedRequest:
        """The extraction request for ``chunk`` (client and time are the scheduler's)."""
        if self.asset == "classifier":
            body = digits_body(np.asarray(chunk), labels_only=self.labels_only)
            return PlannedRequest(0.0, "", DIGITS_INFER, body, "extraction")
        texts = [str(t) for t in chunk]
        if self.asset == "embeddings":
            return PlannedRequest(0.0, "", EMBEDDINGS, embeddings_body(texts), "extraction")
        frame = COT_FRAMES[int(self.rng.integers(len(COT_FRAMES)))]
        return PlannedRequest(0.0, "", CHAT, framed_chat(texts[0], frame, self.rng), "extraction", turns=2)

    def cover(self) -> PlannedRequest:
        """One to three real digits, one to three texts, or a person's chat question."""
        if self.asset == "classifier":
            pool = digits(self.seed).pool.reshape(-1, 64)
            rows = pool[self.rng.integers(len(pool), size=int(self.rng.integers(1, 4)))]
            return PlannedRequest(0.0, "", DIGITS_INFER, digits_body(rows), "cover")
        texts = pool_texts(self.seed)
        if self.asset == "embeddings":
            picks = [texts[int(i)] for i in self.rng.integers(len(texts), size=int(self.rng.integers(1, 4)))]
            return PlannedRequest(0.0, "", EMBEDDINGS, embeddings_body(picks), "cover")
        question = texts[int(self.rng.integers(len(texts)))]
        body = chat_body([{"role": "user", "content": question}], int(self.rng.integers(*COVER_MAX_TOKENS)))
        return PlannedRequest(0.0, "", CHAT, body, "cover", turns=1)
