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

Cost: all of an answer's values are gathered in one pass, noised and quantised as one
numpy array (one noise draw per answer), and written back. Most of what a profile removes
is never generated nor parsed: the stage asks the upstream for no more than the client
will get (:func:`~modelfence.policy.request_policy.narrowed_request`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from modelfence.policy.noise import default_rng, laplace

# Below this many values (a stream event, a short answer) numpy's cost per call exceeds
# what it saves per value.
_ARRAY_FROM = 32


def quantise(value: float, quantum: float) -> float:
    """``value`` rounded to the nearest multiple of ``quantum`` (ties to even).

    The second rounding clears float noise (``3 * 0.1`` is 0.30000000000000004), and
    ``+ 0.0`` turns ``-0.0`` into ``0.0``.
    """
    return round(round(value / quantum) * quantum, 10) + 0.0


def quantised(values: npt.NDArray[np.float64], quantum: float) -> npt.NDArray[np.float64]:
    """:func:`quantise` over an array, with the same results (tested value for value)."""
    return np.round(np.rint(values / quantum) * quantum, 10) + 0.0


@dataclass(slots=True)
class LogprobHardening:
    quantum: float | None = None
    top_k: int | None = None
    noise_scale: float | None = None  # Laplace b, in nats
    text_only: bool = False
    rng: np.random.Generator = field(default_factory=default_rng)

    def values(self, logprobs: list[float]) -> list[float]:
        """``logprobs`` noised (clipped at 0) and quantised, as the profile says, all at once."""
        if not self.noise_scale and len(logprobs) < _ARRAY_FROM:
            quantum = self.quantum
            return [quantise(v, quantum) for v in logprobs] if quantum else logprobs
        out = np.asarray(logprobs, dtype=np.float64)
        if self.noise_scale:
            out = np.minimum(out + laplace(self.rng, self.noise_scale, len(out)), 0.0)
        if self.quantum:
            out = quantised(out, self.quantum)
        hardened: list[float] = out.tolist()
        return hardened

    def apply(self, payload: Any) -> Any:
        """Harden every choice of ``payload`` in place and return it."""
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list):
            return payload
        positions: list[dict[str, Any]] = []
        for choice in choices:
            logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
            if not isinstance(logprobs, dict):
                continue
            if self.text_only:
                choice["logprobs"] = None
            elif isinstance(logprobs.get("content"), list):
                positions += logprobs["content"]
            elif isinstance(logprobs.get("token_logprobs"), list):
                self._legacy(logprobs)
        if positions:
            self._chat(positions)
        return payload

    def _chat(self, positions: list[dict[str, Any]]) -> None:
        """All chat positions of an answer at once: one pass gathers the values."""
        if self.noise_scale:
            self._chat_noised(positions)
            return
        entries: list[dict[str, Any]] = []
        for position in positions:
            if not isinstance(position, dict):
                continue
            top = position.get("top_logprobs")
            if top:
                if self.top_k is not None:
                    del top[self.top_k :]  # before the values: fewer to touch
                entries += top
            if position.get("logprob") is not None:
                entries.append(position)
        if self.quantum:
            for entry, value in zip(entries, self.values([e["logprob"] for e in entries])):
                entry["logprob"] = value

    def _chat_noised(self, positions: list[dict[str, Any]]) -> None:
        """Noise every alternative, give the chosen token its alternative's value (a chosen
        token without one gets a draw of its own), then re-sort and cut."""
        positions = [p for p in positions if isinstance(p, dict)]
        alternatives = [alt for p in positions for alt in p.get("top_logprobs") or ()]
        own = [p for p in positions if p.get("logprob") is not None and not _listed(p)]
        entries = alternatives + own
        for entry, value in zip(entries, self.values([e["logprob"] for e in entries])):
            entry["logprob"] = value
        for position in positions:
            top = position.get("top_logprobs") or []
            chosen = {alt["token"]: alt["logprob"] for alt in top}.get(position.get("token"))
            if chosen is not None and position.get("logprob") is not None:
                position["logprob"] = chosen
            top.sort(key=_logprob, reverse=True)
            if self.top_k is not None:
                del top[self.top_k :]

    def _legacy(self, logprobs: dict[str, Any]) -> None:
        tokens = logprobs.get("tokens") or []
        tops = logprobs.get("top_logprobs") or []
        chosen = logprobs["token_logprobs"]
        top_of = [tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
                  for i in range(len(chosen))]
        token_of = [tokens[i] if i < len(tokens) else None for i in range(len(chosen))]
        own = [i for i, value in enumerate(chosen)
               if value is not None and token_of[i] not in top_of[i]]
        values = iter(self.values([lp for top in top_of for lp in top.values()]
                                  + [chosen[i] for i in own]))
        top_of = [dict(zip(top, values)) for top in top_of]
        for i in own:
            chosen[i] = next(values)
        for i, top in enumerate(top_of):
            if chosen[i] is not None and token_of[i] in top:
                chosen[i] = top[token_of[i]]
            if top:
                ranked = sorted(top.items(), key=_second, reverse=True)
                tops[i] = dict(ranked[: self.top_k] if self.top_k is not None else ranked)


def _listed(position: dict[str, Any]) -> bool:
    """Whether the chosen token is among the position's alternatives."""
    return any(alt["token"] == position.get("token") for alt in position.get("top_logprobs") or ())


def _logprob(alternative: dict[str, Any]) -> float:
    value: float = alternative["logprob"]
    return value


def _second(item: tuple[str, float]) -> float:
    return item[1]
