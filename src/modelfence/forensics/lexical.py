"""``verify text``, after-the-fact marks: which client's keyed word choices does this text make.

The text's lexicon occurrences are read once (no tokenizer: the scheme works on words),
then scored against every known client's key in every key version up to the current one
(see :mod:`modelfence.watermark.lexical_detect`); the verdict's p-value is
Bonferroni-corrected for that number of keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from modelfence.forensics.errors import VerifyError
from modelfence.forensics.text import DEFAULT_ALPHA
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.lexical import LEXICAL_PURPOSE, occurrences
from modelfence.watermark.lexical_detect import score_occurrences
from modelfence.watermark.lexicon import Lexicon, default_lexicon


@dataclass(frozen=True, slots=True)
class LexicalVerdict:
    ours: bool
    client: str | None
    key_version: int | None
    p_value: float  # Bonferroni-corrected over keys_tested
    p_value_single_key: float
    occurrences_scored: int  # distinct (group, previous word) pairs
    matches: int  # of them, the ones in the candidate's preferred form
    expected_matches: float  # by chance, for a key that did not mark the text
    keys_tested: int
    alpha: float
    method: str = (
        "after-the-fact lexical marks: exact Poisson-binomial test (P[match] = 1/group size) "
        "over distinct (group, previous word) occurrences, best key among all clients x key "
        "versions, Bonferroni-corrected"
    )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_lexical(
    text: str, clients: Sequence[str], keyring: WatermarkKeyring, *,
    lexicon: Lexicon | None = None, alpha: float = DEFAULT_ALPHA,
) -> LexicalVerdict:
    """Score ``text`` against every client; a text with no scoreable word is "not ours"
    (p = 1) rather than an error, since at-source marked text may contain none."""
    if not text.strip():
        raise VerifyError("the text to verify is empty")
    if not clients:
        raise VerifyError("no clients are known: nothing to attribute the text to")
    candidates = [(c, v) for v in range(1, keyring.version + 1) for c in clients]
    seeds = [keyring.key(c, v).seed(LEXICAL_PURPOSE) for c, v in candidates]
    score = score_occurrences(occurrences(text, lexicon or default_lexicon()), seeds)
    client: str | None = None
    version: int | None = None
    if score.candidate is not None and score.p_adjusted <= alpha:
        client, version = candidates[score.candidate]
    return LexicalVerdict(
        client is not None, client, version, score.p_adjusted, score.p_value, score.scored,
        score.matches, score.expected, score.keys_tested, alpha,
    )
