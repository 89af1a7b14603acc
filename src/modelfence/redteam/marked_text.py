"""Batched sampling from the demo LLM, each row marked for its own client or unmarked.

The watermark harnesses (attribution, robustness, radioactivity) need hundreds of long
answers; the demo upstream's own loop samples one token of one answer at a time, while
``model.generate`` over a left-padded batch is several times faster on the CPU. The
sampling is the upstream's: top-p 1, the client's ``GreenListProcessor``, at the
temperature a client asks for (the upstream's default is 1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modelfence.watermark.text_logits import GreenListProcessor

if TYPE_CHECKING:
    import torch

    from modelfence.demo.llm import SmolLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Answer:
    prompt: list[int]  # chat-template token ids
    tokens: list[int]  # generated ids, end of text excluded
    client: int | None  # index of the client it was marked for; None: unmarked


@dataclass(frozen=True, slots=True)
class Job:
    prompt: list[int]
    processor: GreenListProcessor | None
    client: int | None


class PerRow:
    """One processor (or none) per batch row, in the transformers call form."""

    def __init__(self, processors: Sequence[GreenListProcessor | None]) -> None:
        self.processors = list(processors)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, processor in enumerate(self.processors):
            if processor is not None:
                processor(input_ids[row : row + 1], scores[row : row + 1])
        return scores


def sample_answers(
    llm: SmolLM, jobs: Sequence[Job], *, batch: int = 32, max_tokens: int = 220,
    min_tokens: int = 0, seed: int = 0, temperature: float = 1.0,
) -> list[Answer]:
    """Sample every job's answer, ``batch`` rows at a time (left-padded).

    Special tokens other than end of text are never sampled; end of text is suppressed
    until ``min_tokens``, so harnesses can ask for answers long enough for every cut.
    """
    import torch

    tok, model = llm.tokenizer, llm.model
    special = sorted(set(tok.all_special_ids) - llm.eos_token_ids)
    pad = llm.bos_token_id
    answers: list[Answer] = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        width = max(len(j.prompt) for j in chunk)
        ids = torch.tensor([[pad] * (width - len(j.prompt)) + j.prompt for j in chunk])
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in chunk])
        torch.manual_seed(seed + start)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                top_p=1.0, max_new_tokens=max_tokens, min_new_tokens=min_tokens,
                suppress_tokens=special, pad_token_id=pad,
                logits_processor=[PerRow([j.processor for j in chunk])],
            )
        for job, row in zip(chunk, out[:, width:].tolist(), strict=True):
            tokens = []
            for token in row:
                if token in llm.eos_token_ids:
                    break
                tokens.append(token)
            answers.append(Answer(job.prompt, tokens, job.client))
        logger.info("sampled %d/%d answers", start + len(chunk), len(jobs))
    return answers
