"""The ``policy:`` section of the config: request rules and output hardening, per tier.

Kept apart from ``modelfence.config`` so the policy layer owns its own knobs; the root
config only embeds :class:`PolicyConfig`. Defaults change nothing a normal client sees,
except that they close the known logit-leak probe (Carlini et al. 2024)::

    policy:
      tiers:
        default:
          request: {logit_bias_with_logprobs: forbid, max_top_logprobs: 5}
          hardening:
            normal: {}                                  # exact answers, byte for byte
            elevated: {logprob_quantum: 0.5, top_logprobs: 1, probabilities: ood_aware,
                       prob_decimals: 2, reasoning: shorten}        # 400 characters
            high: {text_only: true, probabilities: labels_only, reasoning: drop}
      dp: {epsilon_per_response: 0.5, budget: 200, window_seconds: 86400}

Tiers not listed under ``policy.tiers`` get the ``default`` entry.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from modelfence.policy.reasoning import ReasoningMode
from modelfence.policy.risk import RiskLevel

LogitBiasWithLogprobs = Literal["forbid", "strip_logprobs", "allow"]
ProbabilityMode = Literal["exact", "labels_only", "reverse_sigmoid", "ood_aware"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RequestRules(_Frozen):
    """What a request may ask for; a violation is a 400 naming the parameter and the limit."""

    logit_bias_with_logprobs: LogitBiasWithLogprobs = Field(
        "forbid",
        description="forbid: 400; strip_logprobs: the upstream gets the request without "
        "logprobs; allow: pass through (leaks the logit layer)",
    )
    max_top_logprobs: int | None = Field(5, ge=0, description="cap on top_logprobs / logprobs")
    max_logit_bias_entries: int | None = Field(300, ge=0)
    max_logit_bias_magnitude: float | None = Field(100.0, ge=0)
    max_n: int | None = Field(None, ge=1)
    max_inputs: int | None = Field(
        None, ge=1, description="cap on inputs per request: classifier rows, embedding texts, "
        "completion prompts (one huge batch is refused before anything is answered)",
    )
    max_tokens: int | None = Field(None, ge=1, description="cap on max_tokens and friends")
    allow_echo: bool = True
    oip_outputs: tuple[str, ...] | None = Field(
        None, description="output tensors this tier may receive; null: all"
    )


class Hardening(_Frozen):
    """One output-hardening profile; the empty profile returns upstream bytes untouched."""

    logprob_quantum: float | None = Field(
        None, gt=0, description="round every logprob to a multiple of this (nats)"
    )
    top_logprobs: int | None = Field(None, ge=0, description="keep at most this many alternatives")
    text_only: bool = Field(False, description="remove logprobs from LLM answers")
    dp_noise: bool = Field(False, description="Laplace noise charged to the client's DP budget")
    probabilities: ProbabilityMode = "exact"
    prob_top_k: int | None = Field(None, ge=1, description="zero all but the k largest")
    prob_decimals: int | None = Field(None, ge=0, le=8)
    reverse_sigmoid_beta: float = Field(0.3, gt=0, lt=2)
    reverse_sigmoid_gamma: float = Field(0.4, gt=0)
    ood_threshold: float = Field(
        0.9, gt=0, le=1, description="ood_aware: max probability at or above this is exact"
    )
    ood_sharpness: float = Field(40.0, gt=0)
    reasoning: ReasoningMode = Field(
        "keep", description="a reasoning model's chain of thought: keep, shorten to "
        "reasoning_max_chars per choice, or drop (see modelfence.policy.reasoning)",
    )
    reasoning_max_chars: int = Field(
        400, ge=0, le=1_000_000, description="shorten: characters of reasoning kept per choice"
    )

    @property
    def is_identity(self) -> bool:
        """Whether the profile changes nothing (``reasoning_max_chars`` counts only when it
        shortens)."""
        return _is_identity(self)

    @property
    def for_classifiers(self) -> Hardening:
        """The profile as classifier answers see it: they hold no reasoning."""
        return self if self.reasoning == "keep" else _without_reasoning(self)


_IDENTITY = Hardening()


@lru_cache(maxsize=256)  # profiles come from the config: a handful, asked on every request
def _is_identity(profile: Hardening) -> bool:
    if profile.reasoning != "shorten":
        profile = profile.model_copy(update={"reasoning_max_chars": _IDENTITY.reasoning_max_chars})
    return profile == _IDENTITY


@lru_cache(maxsize=256)
def _without_reasoning(profile: Hardening) -> Hardening:
    return profile.model_copy(update={"reasoning": "keep"})


def _default_hardening() -> dict[RiskLevel, Hardening]:
    return {
        RiskLevel.NORMAL: Hardening(),
        RiskLevel.ELEVATED: Hardening(
            logprob_quantum=0.5, top_logprobs=1, probabilities="ood_aware", prob_decimals=2,
            reasoning="shorten",
        ),
        RiskLevel.HIGH: Hardening(text_only=True, probabilities="labels_only", reasoning="drop"),
    }


class TierPolicy(_Frozen):
    request: RequestRules = RequestRules()
    hardening: dict[RiskLevel, Hardening] = Field(default_factory=_default_hardening)

    @field_validator("hardening")
    @classmethod
    def _every_level(cls, value: dict[RiskLevel, Hardening]) -> dict[RiskLevel, Hardening]:
        # Levels left out keep their defaults, so a tier can tune one level alone.
        return {**_default_hardening(), **value}

    def profile(self, level: RiskLevel) -> Hardening:
        return self.hardening[level]


class DPConfig(_Frozen):
    """Laplace noise with scale ``sensitivity / epsilon_per_response`` on every released
    value; each noised answer spends ``epsilon_per_response`` of the client's ``budget``
    for the current window (accounted per answer, not per value: a calibration of the
    noise to a budget, not a formal guarantee over a whole vector)."""

    epsilon_per_response: float = Field(0.5, gt=0)
    budget: float = Field(200.0, gt=0, description="epsilon per client per window")
    window_seconds: float = Field(86_400, gt=0)
    logprob_sensitivity: float = Field(1.0, gt=0, description="nats")
    probability_sensitivity: float = Field(0.05, gt=0, description="probability units")


class PolicyConfig(_Frozen):
    tiers: dict[str, TierPolicy] = Field(default_factory=lambda: {"default": TierPolicy()})
    dp: DPConfig = DPConfig()

    def for_tier(self, tier: str) -> TierPolicy:
        return self.tiers.get(tier) or self.tiers.get("default") or _DEFAULT_TIER


_DEFAULT_TIER = TierPolicy()
