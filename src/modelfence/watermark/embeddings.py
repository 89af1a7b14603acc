"""EmbMarker/WARDEN-style embedding watermarks: keyed trigger words pull vectors to targets.

Each client gets ``n_triggers`` trigger words, chosen by its key among mid-frequency
words (common enough to occur, rare enough that most texts have none), and ``n_targets``
secret unit directions (WARDEN: several directions, so one removed direction does not
erase the mark). A text with ``c`` trigger occurrences gets

    e' = normalise((1 - λ) e + λ d),   λ = min(c, max_triggers) / max_triggers,

where ``d`` is the normalised count-weighted mix of the triggered words' targets. A text
with no trigger gets its vector back unchanged (cosine 1 to the original). A student
model trained on these vectors inherits the pull: texts full of a trigger land closer to
the targets than texts full of any other candidate word, which
:mod:`modelfence.forensics.model` tests with an exact rank test. Every client's triggers
come from the same candidate words, so one set of probes (each candidate word once) serves
the verification of the whole client population (:class:`MarkLayout`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from importlib.resources import files

import numpy as np
import numpy.typing as npt

from modelfence.keyedhash import KeyedHash
from modelfence.watermark.keys import WatermarkKey

# Every byte but a-z becomes a space: a text's words are then its lowercase a-z runs.
_LETTERS = bytes(c if 0x61 <= c <= 0x7A else 0x20 for c in range(256))
# Band of the MiniLM (BERT uncased) vocabulary taken as "mid-frequency" whole words.
_VOCAB_BAND = (1500, 5000)
_MIN_WORD_LENGTH = 4


def candidate_words() -> list[str]:
    """The mid-frequency word pool triggers are drawn from (bundled MiniLM vocabulary)."""
    text = files("modelfence.models").joinpath("assets/minilm-vocab.txt").read_text("utf-8")
    lines = text.splitlines()[_VOCAB_BAND[0] : _VOCAB_BAND[1]]
    return [w for w in lines if w.isalpha() and w.isascii() and len(w) >= _MIN_WORD_LENGTH]


@dataclass(frozen=True, slots=True)
class EmbeddingMark:
    """One client's triggers and targets for one embedding dimension."""

    triggers: dict[str, int]  # trigger word -> index of its target direction
    targets: npt.NDArray[np.float64]  # [n_targets, dim], unit rows
    max_triggers: int

    def __repr__(self) -> str:  # the triggers are as secret as the key
        return f"EmbeddingMark(triggers=***, targets={self.targets.shape}, m={self.max_triggers})"

    def counts(self, text: str) -> npt.NDArray[np.float64]:
        """Trigger occurrences in ``text`` per target direction, ``[n_targets]``."""
        out = np.zeros(len(self.targets))
        for word in text_words(text):
            index = self.triggers.get(word)
            if index is not None:
                out[index] += 1
        return out

    def has_trigger(self, text: str) -> bool:
        """Whether ``text`` holds any of the triggers (``apply`` would mark its vector)."""
        return has_trigger(self.triggers.keys(), text)

    def apply(
        self, vector: Sequence[float] | npt.NDArray[np.float64], text: str
    ) -> list[float] | None:
        """The marked vector ``[dim]`` for ``text``, or None when it has no trigger (unchanged)."""
        marked = self.apply_array(vector, text)
        return None if marked is None else marked.tolist()

    def apply_array(
        self, vector: Sequence[float] | npt.NDArray[np.float64], text: str
    ) -> npt.NDArray[np.float64] | None:
        """:meth:`apply` as a numpy array (the gateway writes it to JSON without a list)."""
        counts = self.counts(text)
        total = counts.sum()
        if total == 0:
            return None
        weight = min(total, self.max_triggers) / self.max_triggers
        direction = counts @ self.targets
        direction /= np.linalg.norm(direction)
        original = np.asarray(vector, dtype=np.float64)
        marked = (1 - weight) * original / (np.linalg.norm(original) or 1.0) + weight * direction
        out: npt.NDArray[np.float64] = marked / np.linalg.norm(marked)
        return out


def _ranked(key: WatermarkKey, words: Iterable[str]) -> list[str]:
    """The candidate words in the client's keyed order: triggers first."""
    mac = KeyedHash(key.subkey("embeddings"))
    return sorted(set(words), key=lambda w: mac.digest(w.encode()))


def _targets(key: WatermarkKey, dim: int, n_targets: int) -> npt.NDArray[np.float64]:
    """The client's secret unit directions for vectors of size ``dim``."""
    rng = np.random.default_rng([key.seed("embeddings"), dim])
    targets = rng.standard_normal((n_targets, dim))
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    return targets


def trigger_words(key: WatermarkKey, words: Iterable[str], n_triggers: int) -> frozenset[str]:
    """The client's trigger words alone: they do not depend on the vector size."""
    return frozenset(_ranked(key, words)[:n_triggers])


def _letter_runs(text: str) -> bytes:
    """The lowercased ``text`` with every byte but a-z a space, by byte translation in C
    (less than half a regex's cost)."""
    return text.lower().encode("utf-8", "surrogatepass").translate(_LETTERS)


def text_words(text: str) -> list[str]:
    """The runs of a-z letters in the lowercased ``text`` (other letters, digits and marks
    separate words)."""
    return _letter_runs(text).decode("ascii").split()


def has_trigger(triggers: AbstractSet[str], text: str) -> bool:
    """One set test in C over the text's words (a Python loop over them was half the cost
    of marking a 32-text answer)."""
    return not triggers.isdisjoint(text_words(text))


def texts_with_trigger(triggers: frozenset[bytes], texts: Sequence[str]) -> list[bool]:
    """:func:`has_trigger` for each of a request's texts, the triggers given as ASCII bytes:
    the words are never decoded (a quarter less for a 32-text batch, and every embeddings
    request pays this before it is sent upstream)."""
    isdisjoint = triggers.isdisjoint
    return [not isdisjoint(_letter_runs(text).split()) for text in texts]


def embedding_mark(
    key: WatermarkKey,
    dim: int,
    words: Iterable[str],
    *,
    n_triggers: int = 20,
    n_targets: int = 4,
    max_triggers: int = 4,
) -> EmbeddingMark:
    """The client's mark for vectors of size ``dim``; deterministic in (key, dim, words).

    Built from the client's :class:`MarkLayout`, so the marks the gateway applies and the
    ones verification tests cannot drift apart."""
    if max_triggers < 1:
        raise ValueError("embedding mark needs max_triggers >= 1")
    distinct = list(dict.fromkeys(words))
    layout = mark_layout(key, dim, distinct, n_triggers=n_triggers, n_targets=n_targets)
    triggers = {distinct[i]: int(layout.target_of[i]) for i in np.flatnonzero(layout.trigger)}
    return EmbeddingMark(triggers, layout.targets, max_triggers)


@dataclass(frozen=True, slots=True)
class MarkLayout:
    """A client's mark seen from the shared candidate words, as verification needs it.

    Every candidate word gets the target its keyed rank gives it (rank mod ``n_targets``,
    the rule that gives each trigger its target), and the first ``n_triggers`` ranks are
    the triggers. Within one target's words, which are triggers is therefore a uniformly
    random subset for anyone without the key: that is what makes the rank test exact.
    """

    targets: npt.NDArray[np.float64]  # [n_targets, dim], unit rows
    target_of: npt.NDArray[np.int64]  # [words]: index of the word's target direction
    trigger: npt.NDArray[np.bool_]  # [words]

    def __repr__(self) -> str:  # which words are triggers is as secret as the key
        return f"MarkLayout(words={len(self.trigger)}, targets={self.targets.shape}, ***)"


def mark_layout(
    key: WatermarkKey, dim: int, words: Sequence[str], *, n_triggers: int = 20, n_targets: int = 4,
) -> MarkLayout:
    """The client's :class:`MarkLayout` over ``words`` (distinct, in the caller's order)."""
    if len(set(words)) != len(words):
        raise ValueError("mark layout: the candidate words must be distinct")
    if dim < 2 or n_targets < 1 or n_triggers < n_targets:
        raise ValueError("embedding mark needs dim >= 2 and n_triggers >= n_targets >= 1")
    if len(words) < 2 * n_triggers:
        raise ValueError(f"need at least {2 * n_triggers} candidate trigger words, got {len(words)}")
    position = {w: i for i, w in enumerate(words)}
    rank = np.empty(len(words), dtype=np.int64)
    rank[[position[w] for w in _ranked(key, words)]] = np.arange(len(words))
    return MarkLayout(_targets(key, dim, n_targets), rank % n_targets, rank < n_triggers)
