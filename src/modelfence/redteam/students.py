"""A small language model trained from scratch on harvested answers: the thief's student.

Radioactivity is a claim about models that really learnt from marked text, so the harness
needs one it can afford to train on a CPU: a GRU over the token ids that occur in the
harvest (remapped to a compact vocabulary, everything else one "unknown" id), trained on
(prompt, answer) pairs with the loss on the answer. Its answers are token ids of the
victim's tokenizer, so they can be decoded and served like any chat model's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

UNKNOWN = 0  # compact id of every token the harvest never showed


@dataclass(frozen=True, slots=True)
class Example:
    prompt: list[int]  # victim token ids, context only
    answer: list[int]  # victim token ids, learnt


class _GRU(nn.Module):
    def __init__(self, vocab: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, state = self.rnn(self.embed(ids), state)
        return self.head(out), state


class StudentLM:
    """Train with :meth:`train`; :meth:`answer` samples a reply to a prompt's token ids."""

    def __init__(self, vocabulary: Iterable[int], *, dim: int = 192, hidden: int = 384) -> None:
        self.vocabulary = np.asarray(sorted(set(vocabulary)), dtype=np.int64)  # compact id - 1 -> victim id
        self._compact = {int(t): i + 1 for i, t in enumerate(self.vocabulary)}
        self.net = _GRU(len(self.vocabulary) + 1, dim, hidden)

    def compact(self, ids: Sequence[int]) -> list[int]:
        return [self._compact.get(int(t), UNKNOWN) for t in ids]

    @classmethod
    def train(
        cls, examples: Sequence[Example], *, end: int, epochs: int = 12, batch: int = 16,
        lr: float = 3e-3, max_len: int = 384, seed: int = 0,
    ) -> tuple[StudentLM, list[float]]:
        """Fit the answers (each followed by ``end``, the victim's end-of-text id); returns
        the student and the mean loss per epoch."""
        torch.manual_seed(seed)
        student = cls({t for e in examples for t in e.answer} | {end})
        rows = []
        for e in examples:
            ids = (student.compact(e.prompt) + student.compact(e.answer + [end]))[-max_len:]
            labels = ([-100] * len(e.prompt) + student.compact(e.answer + [end]))[-max_len:]
            rows.append((ids, labels))
        optimiser = torch.optim.Adam(student.net.parameters(), lr=lr)
        rng = np.random.default_rng(seed)
        losses = []
        student.net.train()
        for _ in range(epochs):
            total = 0.0
            order = rng.permutation(len(rows))
            for start in range(0, len(order), batch):
                chunk = [rows[i] for i in order[start : start + batch]]
                width = max(len(ids) for ids, _ in chunk) - 1
                inputs = torch.tensor([(i[:-1] + [UNKNOWN] * width)[:width] for i, _ in chunk])
                targets = torch.tensor([(lab[1:] + [-100] * width)[:width] for _, lab in chunk])
                logits, _ = student.net(inputs)
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
                optimiser.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                nn.utils.clip_grad_norm_(student.net.parameters(), 1.0)
                optimiser.step()
                total += loss.item() * len(chunk)
            losses.append(total / len(rows))
        student.net.eval()
        return student, losses

    def answer(self, prompt: Sequence[int], *, end: int, max_tokens: int, seed: int,
               temperature: float = 1.0) -> list[int]:
        """Sample up to ``max_tokens`` victim token ids after ``prompt`` (stops at ``end``)."""
        generator = torch.Generator().manual_seed(seed)
        out: list[int] = []
        with torch.inference_mode():
            logits, state = self.net(torch.tensor([self.compact(prompt) or [UNKNOWN]]))
            for _ in range(max_tokens):
                scores = logits[0, -1] / temperature
                scores[UNKNOWN] = -torch.inf  # an unknown id has no text to send
                token = int(self.vocabulary[int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)) - 1])
                if token == end:
                    break
                out.append(token)
                logits, state = self.net(torch.tensor([[self._compact[token]]]), state)
        return out
