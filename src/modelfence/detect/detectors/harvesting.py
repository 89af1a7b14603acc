"""LLM harvesting: request shapes that serve building a training set, not using answers.

Distillation traffic is single-turn, asks for the longest answers (max_tokens saturated),
deterministic (temperature 0), with logprobs and logit_bias (soft labels and forced
tokens), often eliciting chain-of-thought (asked for in any turn, the system message included). Each alone is common in honest API use; all
together, on nearly every request, are not. The statistic is a weighted mean of the
shares of requests showing each signal (logit_bias with logprobs weighs most).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from modelfence.detect.detectors.base import share
from modelfence.detect.features import View
from modelfence.detect.reference import Reference
from modelfence.operations import Operation
from modelfence.telemetry.events import RequestEvent

MIN_QUERIES = 20
_CHAT = frozenset(op.route for op in Operation if op.generates_text)


def _saturated(e: RequestEvent) -> bool:
    return bool(e.max_tokens) and e.tokens_out >= 0.95 * (e.max_tokens or 0)


_SIGNALS: dict[str, tuple[float, Callable[[RequestEvent], bool]]] = {  # name -> (weight, test)
    "single-turn": (1.0, lambda e: e.turns <= 1),
    "max_tokens saturated": (1.0, _saturated),
    "temperature 0": (1.0, lambda e: e.temperature == 0),
    "logprobs": (2.0, lambda e: e.logprobs or e.top_logprobs > 0),
    "logit_bias": (3.0, lambda e: e.logit_bias_size > 0),
    # On every turn, system messages included (the gateway's ``cot``; for events recorded
    # before the gateway read every turn, the engine reads their last user turn on ingestion).
    "chain-of-thought elicited": (1.0, lambda e: e.cot),
}
_TOTAL = sum(weight for weight, _ in _SIGNALS.values())


class Harvesting:
    code = "llm_harvesting"
    direction: Literal[1, -1] = 1
    default_threshold: float | None = 0.5

    def __init__(self) -> None:
        self._shares: dict[str, float] = {}  # of the last statistic, for describe()

    def statistic(self, view: View, reference: Reference | None) -> float | None:
        events = [e for e in view.events if e.route in _CHAT]
        if len(events) < MIN_QUERIES:
            return None
        self._shares = {
            name: share([test(e) for e in events]) for name, (_, test) in _SIGNALS.items()
        }
        return sum(_SIGNALS[name][0] * s for name, s in self._shares.items()) / _TOTAL

    def describe(self, value: float, threshold: float) -> str:
        # The weightiest signals first: "logprobs on 100%" says more than "single-turn".
        top = sorted(self._shares.items(), key=lambda item: -item[1] * _SIGNALS[item[0]][0])[:3]
        return "; ".join(f"{s:.0%} {name}" for name, s in top if s > 0)
