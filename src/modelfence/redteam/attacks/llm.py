"""LLM distillation harvesting: collect (prompt, answer) pairs to fine-tune a student.

Three shapes seen in the wild, all single-turn with a high ``max_tokens`` (the thief
wants whole answers), sent by a script at a steady rate:

- ``broad``: a capability sweep over every topic the prompt corpora cover;
- ``template``: one task, many inputs (a template with slot fillers);
- ``cot``: chain-of-thought elicitation, "explain step by step".

The attacker's outcome is the harvest itself: answered prompts and completion tokens,
which is what a distillation run is trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modelfence.redteam.prompts import PromptCorpus
from modelfence.redteam.timing import SteadyTiming
from modelfence.redteam.traffic import CHAT, Exchange, PlannedRequest, chat_body

TEMPLATES = {
    "template": "Rewrite the following message as a polite customer-support reply: {x}",
    "cot": "Explain step by step, showing your reasoning before the final answer: {x}",
}
HARVEST_STYLES = ("broad", "template", "cot")


def harvest_inputs(style: str, corpus: PromptCorpus, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct prompts in the attacker's style (no repeats: a thief pays per query)."""
    if style == "broad":
        pool: Sequence[str] = corpus.all()
    elif style == "template":
        pool = [TEMPLATES["template"].format(x=t) for t in corpus.by_source.get("chatterbot") or corpus.all()]
    elif style == "cot":
        pool = [TEMPLATES["cot"].format(x=t) for t in corpus.by_source.get("freshqa") or corpus.all()]
    else:
        raise ValueError(f"unknown harvesting style {style!r}; known: {', '.join(HARVEST_STYLES)}")
    picks = rng.permutation(len(pool))[: min(count, len(pool))]
    return [pool[int(i)] for i in picks]


def harvest_plan(
    style: str, client: str, corpus: PromptCorpus, rng: np.random.Generator, *,
    count: int, max_tokens: int, rate: float,
) -> list[PlannedRequest]:
    texts = harvest_inputs(style, corpus, rng, count)
    times = SteadyTiming(rate).arrivals(rng, horizon=10 * count / rate)
    return [
        PlannedRequest(at, client, CHAT, chat_body([{"role": "user", "content": text}], max_tokens),
                       "extraction", turns=1)
        for at, text in zip(times, texts, strict=False)
    ]


def harvest_yield(exchanges: Sequence[Exchange]) -> dict[str, int]:
    """What the thief walked away with."""
    answered = [e for e in exchanges if e.ok]
    return {
        "answered_prompts": len(answered),
        "completion_tokens": sum(e.usage()[1] for e in answered),
    }
