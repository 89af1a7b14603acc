"""What a leaker does to marked text before publishing it: delete words, swap synonyms, paraphrase.

The robustness bench (``bench/watermark_robustness.py``) applies these to decoded answers
to see how many tokens a mark made at the source still needs. Every attack works on plain
text, as a leaker would, and none knows a client's key.

- :func:`delete_words`: a share of the whitespace-separated words, drawn at random.
- :class:`Substituter`: no offline thesaurus ships with our dependencies, so the synonym
  source is the demo LLM itself, as in a context-aware synonym attack: a word's candidates
  are its nearest whole-word tokens in the model's input-embedding space (cosine), other
  forms of the same word excluded, and the candidate the *unmarked* model finds most
  likely at that position (left context only) replaces it.
- :func:`paraphrase`: the demo LLM rewrites the text a few sentences at a time, sampled
  without a mark (a 135M model loses much of a whole long text when asked to rewrite it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from modelfence.demo.llm import SmolLM

WHOLE_WORD = re.compile(r" [A-Za-z]+")  # a token that is one space-led word of letters
SENTENCE_END = re.compile(r"(?<=[.!?:])\s+|\n+")
PARAPHRASE_PROMPT = (
    "Paraphrase the following text. Keep its meaning, but use different words and "
    "sentences. Reply with the paraphrase only.\n\n{text}"
)


def delete_words(text: str, share: float, rng: np.random.Generator) -> str:
    """``text`` without ``round(share × words)`` of its words; the other separators are kept."""
    pieces = re.findall(r"\s*\S+", text)
    drop = set(rng.choice(len(pieces), round(share * len(pieces)), replace=False).tolist())
    kept = "".join(p for i, p in enumerate(pieces) if i not in drop)
    return kept.lstrip()


def _same_word(a: str, b: str) -> bool:
    """Whether two words look like forms of one word (``cat``/``cats``, ``a``/``an``)."""
    a, b = a.lower(), b.lower()
    return a.startswith(b) or b.startswith(a) or a[:4] == b[:4]


class Substituter:
    """Replaces a share of a text's words by the LLM's in-context nearest neighbours."""

    def __init__(self, llm: SmolLM, *, neighbours: int = 10) -> None:
        import torch

        self.llm = llm
        self.neighbours = neighbours
        pieces = [llm.tokenizer.decode([i]) for i in range(llm.vocab_size)]
        # Token ids of the replaceable words, candidates included.
        self.words = np.array([i for i, p in enumerate(pieces) if WHOLE_WORD.fullmatch(p)])
        self._text = {int(i): pieces[i] for i in self.words}
        weights = llm.model.get_input_embeddings().weight.detach()[torch.from_numpy(self.words)]
        self._unit = torch.nn.functional.normalize(weights.float(), dim=1).numpy()
        self._row = {int(t): r for r, t in enumerate(self.words)}
        self._cache: dict[int, npt.NDArray[np.int64]] = {}

    def candidates(self, token: int) -> npt.NDArray[np.int64]:
        """Up to ``neighbours`` whole-word tokens nearest to ``token``, same case, other words."""
        found = self._cache.get(token)
        if found is None:
            word = self._text[token].strip()
            order = np.argsort(-(self._unit @ self._unit[self._row[token]]))
            picked = []
            for row in order[1:]:  # [0] is the token itself
                other = self._text[int(self.words[row])].strip()
                if other[0].isupper() == word[0].isupper() and not _same_word(word, other):
                    picked.append(int(self.words[row]))
                    if len(picked) == self.neighbours:
                        break
            found = self._cache[token] = np.array(picked, dtype=np.int64)
        return found

    def __call__(self, text: str, share: float, rng: np.random.Generator) -> tuple[str, float]:
        """``text`` with ``share`` of its words replaced, and the share actually replaced.

        Only whole-word tokens can be replaced; when fewer than ``share`` of the words are
        such tokens, all of them are, and the share returned says so.
        """
        import torch

        enc = self.llm.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids: list[int] = enc["input_ids"]
        spans: list[tuple[int, int]] = enc["offset_mapping"]
        eligible = [
            i for i, t in enumerate(ids)
            if t in self._row and (i + 1 == len(ids) or not text[spans[i + 1][0]].isalpha())
        ]
        words = len(text.split())
        chosen = sorted(rng.choice(eligible, min(len(eligible), round(share * words)),
                                   replace=False).tolist())
        with torch.inference_mode():
            start = torch.tensor([[self.llm.bos_token_id, *ids]])
            logits = self.llm.model(input_ids=start).logits[0]
        out, last = [], 0
        for i in chosen:
            options = self.candidates(ids[i])
            # logits[i] (after the BOS shift) predict ids[i] from its left context alone.
            best = int(options[int(torch.argmax(logits[i, torch.from_numpy(options)]))])
            start, end = spans[i]
            out += [text[last:start], self._text[best]]
            last = end
        out.append(text[last:])
        return "".join(out), len(chosen) / max(1, words)


def chunks(text: str, words: int) -> list[str]:
    """Consecutive sentences in pieces of at least ``words`` words (the last may be shorter)."""
    pieces, current = [], []
    for sentence in filter(None, (s.strip() for s in SENTENCE_END.split(text))):
        current.append(sentence)
        if sum(len(s.split()) for s in current) >= words:
            pieces.append(" ".join(current))
            current = []
    if current:
        pieces.append(" ".join(current))
    return pieces


def paraphrase(
    llm: SmolLM, texts: Sequence[str], *, chunk_words: int = 60, max_tokens: int = 160,
    temperature: float = 0.7, top_p: float = 0.9, batch: int = 32, seed: int = 0,
) -> list[str]:
    """Each text rewritten by the demo LLM, ``chunk_words`` words at a time, without a mark.

    Sampled at ``temperature`` 0.7 and ``top_p`` 0.9: greedy decoding copies the text back
    unchanged, and temperature 1 loses most of its content (both seen on this model).
    """
    import torch

    parts = [chunks(text, chunk_words) for text in texts]
    prompts = [
        llm.encode_chat([{"role": "user", "content": PARAPHRASE_PROMPT.format(text=c)}])
        for piece in parts for c in piece
    ]
    pad, rewritten = llm.bos_token_id, []
    for start in range(0, len(prompts), batch):
        rows = prompts[start : start + batch]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        torch.manual_seed(seed + start)
        with torch.inference_mode():
            out = llm.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True,
                temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_tokens,
                pad_token_id=pad,
            )
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in llm.eos_token_ids), len(row))
            rewritten.append(llm.decode(row[:end]).strip())
    pieces = iter(rewritten)
    return [" ".join(next(pieces) for _ in piece) for piece in parts]


def content_kept(original: str, attacked: str) -> float:
    """Share of the original's distinct words of 4+ letters that the attacked text still has."""
    def words(text: str) -> set[str]:
        return {w.lower() for w in re.findall(r"[A-Za-z]{4,}", text)}

    before = words(original)
    return len(before & words(attacked)) / max(1, len(before))
