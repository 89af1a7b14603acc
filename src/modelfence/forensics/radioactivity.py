"""``verify model --kind chat``: was a suspect language model trained on a client's marked text?

Radioactivity (Sander et al., 2024): a model fine-tuned on text marked with a green list
keeps a faint preference for the same green tokens after the same previous tokens. The
suspect is prompted, its answers are tokenised in the mark's vocabulary, and every distinct
(previous, token) pair over all answers is scored once. Deduplication is what keeps the test
valid: a model repeating itself would otherwise count one pair many times. For a model that
never learnt from the marked text a distinct pair is green with probability gamma, so the
green count is Binomial(T, gamma) and its upper tail is an exact p-value.

- supervised: the operator names the client whose harvest is suspected; only that client's
  keys (one per key version) are tested, so the correction is over key versions alone;
- unsupervised: every known client is tested, Bonferroni over clients x key versions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modelfence.forensics.errors import VerifyError
from modelfence.forensics.model import ModelVerdict, Suspect
from modelfence.forensics.text import DEFAULT_ALPHA, Tokenize, candidate_seeds
from modelfence.tails import binom_sf
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.text_detect import Pairs, distinct_pairs, green_counts

TOPICS = (
    "the history of bread", "how bridges carry weight", "learning a second language",
    "why the sky is blue", "planning a vegetable garden", "the life of honeybees",
    "saving money on groceries", "how vaccines work", "the rules of chess",
    "writing a good cover letter", "the water cycle", "training for a first marathon",
    "how computers store numbers", "the causes of inflation", "caring for a new puppy",
    "the invention of the printing press", "how to give useful feedback", "volcanoes",
    "the basics of photography", "making a budget spreadsheet", "the moon landing",
    "how airplanes stay in the air", "composting at home", "the French Revolution",
    "how to prepare for a job interview", "renewable energy", "the human heart",
    "why people procrastinate", "the Roman Empire", "how to brew good coffee",
    "ocean tides", "the ethics of self-driving cars", "how memory works",
    "starting a small business", "the solar system", "how to read a nutrition label",
)
DEFAULT_PROBES = tuple(f"Write a few paragraphs about {topic}." for topic in TOPICS)
TOP_CLIENTS = 10  # per-client p-values reported (of possibly thousands tested)


def green_p_values(pairs: Pairs, seeds: Sequence[int], gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Green counts ``[keys]`` among ``pairs`` and their exact one-sided binomial p-values."""
    greens = green_counts(seeds, *pairs, gamma)
    return greens, binom_sf(greens - 1, len(pairs[0]), gamma)


def verify_chat(
    suspect: Suspect, model: str, clients: Sequence[str], keyring: WatermarkKeyring, *,
    tokenize: Tokenize, prompts: Sequence[str] = DEFAULT_PROBES, client: str | None = None,
    max_tokens: int = 128, gamma: float = 0.25, alpha: float = DEFAULT_ALPHA,
    seed: int | None = None,
) -> ModelVerdict:
    if client is not None and client not in clients:
        raise VerifyError(f"unknown client {client!r}: supervised mode tests a known client")
    tested = [client] if client is not None else list(clients)
    if not tested:
        raise VerifyError("no clients are known: nothing to test")
    if not prompts or not all(p.strip() for p in prompts):
        raise VerifyError("the suspect needs non-empty prompts to answer")
    answers = [suspect.chat(model, prompt, max_tokens, seed) for prompt in prompts]
    pairs = distinct_pairs(tokenize(answer) for answer in answers)
    n = len(pairs[0])
    if n == 0:
        raise VerifyError("the suspect's answers were empty: no token pair could be scored")
    candidates, seeds = candidate_seeds(tested, keyring)
    greens, p_values = green_p_values(pairs, seeds, gamma)
    order = np.argsort(p_values, kind="stable")
    best = int(order[0])
    corrected = min(1.0, float(p_values[best]) * len(seeds))
    ours = corrected <= alpha
    z = (int(greens[best]) - gamma * n) / float(np.sqrt(n * gamma * (1 - gamma)))
    mode = f"supervised (client {client}'s keys)" if client else f"unsupervised ({len(tested)} clients)"
    return ModelVerdict(
        "chat", ours, candidates[best][0] if ours else None, corrected, z, n,
        f"radioactivity, {mode}: {len(answers)} answers of up to {max_tokens} tokens"
        f"{'' if seed is None else f' sampled with seed {seed}'}, distinct "
        "(previous, token) pairs scored once, one-sided exact binomial test vs gamma, "
        "Bonferroni over clients x key versions; statistic = z of the best key",
        {f"{c}@v{v}": float(p_values[i]) for i in order[:TOP_CLIENTS] for c, v in [candidates[i]]},
    )
