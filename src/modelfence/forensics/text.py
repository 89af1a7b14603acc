"""``verify text``: is this text marked by us, and for which client.

The text is tokenised with the demo LLM's tokenizer (the vocabulary the mark was made
in), then scored against every known client's key in every key version up to the
current one (see :mod:`modelfence.watermark.text_detect`); the verdict's p-value is
Bonferroni-corrected for that number of keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

from modelfence.forensics.errors import VerifyError
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.text_detect import score_text
from modelfence.watermark.text_logits import TEXT_PURPOSE

Tokenize = Callable[[str], list[int]]
DEFAULT_ALPHA = 1e-6  # false-attribution target


@dataclass(frozen=True, slots=True)
class TextVerdict:
    ours: bool
    client: str | None
    key_version: int | None
    p_value: float  # Bonferroni-corrected over keys_tested
    p_value_single_key: float
    z: float
    tokens_scored: int
    green: int
    keys_tested: int
    alpha: float
    method: str = (
        "green-list (KGW, h=1) one-sided exact binomial test over distinct (previous, token) "
        "pairs, best key among all clients x key versions, Bonferroni-corrected"
    )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@cache
def demo_tokenizer() -> Tokenize:
    """The demo LLM's tokenizer (imports transformers: seconds; converted from the GGUF file
    once, then read from the cache)."""
    from modelfence.models.gguf import gguf_tokenizer

    tokenizer = gguf_tokenizer()
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False))


def candidate_seeds(
    clients: Sequence[str], keyring: WatermarkKeyring,
) -> tuple[list[tuple[str, int]], list[int]]:
    """Every (client, key version) that could have marked a text, and its text seed."""
    candidates = [(c, v) for v in range(1, keyring.version + 1) for c in clients]
    return candidates, [keyring.key(c, v).seed(TEXT_PURPOSE) for c, v in candidates]


def verify_text(
    text: str, clients: Sequence[str], keyring: WatermarkKeyring, *, tokenize: Tokenize,
    gamma: float = 0.25, alpha: float = DEFAULT_ALPHA,
) -> TextVerdict:
    if not text.strip():
        raise VerifyError("the text to verify is empty")
    if not clients:
        raise VerifyError("no clients are known: nothing to attribute the text to")
    candidates, seeds = candidate_seeds(clients, keyring)
    score = score_text(tokenize(text), seeds, gamma=gamma)
    if score.tokens_scored == 0 or score.candidate is None:
        raise VerifyError("the text is too short: no token pair could be scored")
    client, version = candidates[score.candidate]
    ours = score.p_adjusted <= alpha
    return TextVerdict(
        ours, client if ours else None, version if ours else None, score.p_adjusted,
        score.p_value, score.z, score.tokens_scored, score.green, score.keys_tested, alpha,
    )
