"""Hardening of OpenAI-style answers: the log-probabilities are what leak the logit layer.

:class:`LogprobHardening` rewrites, in place, every ``logprobs`` block of a chat or
completions payload — a whole response or one stream chunk, they share the shape::

    >>> h = LogprobHardening(quantum=0.5, top_k=1)
    >>> payload = {"choices": [{"logprobs": {"content": [{"token": "a", "logprob": -0.37,
    ...     "top_logprobs": [{"token": "a", "logprob": -0.37}, {"token": "b", "logprob": -1.4}]}]}}]}
    >>> h.apply(payload)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    [{'token': 'a', 'logprob': -0.5}]

Order per value: Laplace noise (clipped at 0: a log-probability), then quantisation to a
multiple of ``quantum``. The chosen token and its entry among the alternatives get the same
value, so answers stay self-consistent; alternatives are re-sorted after noise, then cut to
``top_k``. ``text_only`` removes the logprobs altogether.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from modelfence.policy.noise import default_rng, laplace


def quantise(value: float, quantum: float) -> float:
    """``value`` rounded to the nearest multiple of ``quantum`` (``+ 0.0`` drops ``-0.0``)."""
    return round(round(value / quantum) * quantum, 10) + 0.0


def _logprob(alternative: dict[str, Any]) -> float:
    value: float = alternative["logprob"]
    return value


@dataclass(slots=True)
class LogprobHardening:
    quantum: float | None = None
    top_k: int | None = None
    noise_scale: float | None = None  # Laplace b, in nats
    text_only: bool = False
    rng: random.Random = field(default_factory=default_rng)

    def value(self, logprob: float) -> float:
        if self.noise_scale:
            logprob = min(logprob + laplace(self.rng, self.noise_scale), 0.0)
        if self.quantum:
            logprob = quantise(logprob, self.quantum)
        return logprob

    def apply(self, payload: Any) -> Any:
        """Harden every choice of ``payload`` in place and return it."""
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list):
            return payload
        for choice in choices:
            logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
            if not isinstance(logprobs, dict):
                continue
            if self.text_only:
                choice["logprobs"] = None
            elif isinstance(logprobs.get("content"), list):
                for position in logprobs["content"]:
                    self._chat_position(position)
            elif isinstance(logprobs.get("token_logprobs"), list):
                self._legacy(logprobs)
        return payload

    def _chat_position(self, position: dict[str, Any]) -> None:
        alternatives = position.get("top_logprobs") or []
        chosen: float | None = None
        if self.noise_scale:
            # Noise is drawn once per token, so the chosen token and its alternative agree.
            noised = {alt["token"]: self.value(alt["logprob"]) for alt in alternatives}
            for alt in alternatives:
                alt["logprob"] = noised[alt["token"]]
            alternatives.sort(key=_logprob, reverse=True)
            chosen = noised.get(position.get("token"))
        if self.top_k is not None:
            del alternatives[self.top_k :]  # before quantising: fewer values to touch
        if not self.noise_scale:
            for alt in alternatives:
                alt["logprob"] = self.value(alt["logprob"])
        if position.get("logprob") is not None:
            position["logprob"] = chosen if chosen is not None else self.value(position["logprob"])

    def _legacy(self, logprobs: dict[str, Any]) -> None:
        tokens = logprobs.get("tokens") or []
        tops = logprobs.get("top_logprobs") or []
        chosen = logprobs["token_logprobs"]
        for i, value in enumerate(chosen):
            top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
            hardened = {token: self.value(lp) for token, lp in top.items()}
            if value is not None:
                token = tokens[i] if i < len(tokens) else None
                chosen[i] = hardened[token] if token in hardened else self.value(value)
            if top:
                ranked = sorted(hardened.items(), key=lambda item: item[1], reverse=True)
                tops[i] = dict(ranked[: self.top_k] if self.top_k is not None else ranked)
