"""Output hardening stage: rewrite answers by the client's tier and current risk level.

The level is read from a :class:`~modelfence.policy.risk.RiskSource` on every request, so
a change (from detection or an operator pin) applies to the very next request; an account's
trust level may raise it (``trust_levels``: probation answers are graded, e.g. rounded,
top-1 logprobs, OOD-aware probabilities, shortened reasoning). A client
whose profile is the identity — every normal-risk client with the default policy — never
has its ``send`` wrapped: it gets the upstream's bytes exactly. Requests that cannot leak
what a profile protects (embeddings; chat without logprobs where the profile keeps the
reasoning) pass through as well.

Where a profile removes logprobs (``text_only``) or alternatives (``top_logprobs``), the
upstream is asked for no more than the client will get: only the upstream body changes
(``ctx.upstream_overrides``; detection still sees what the client asked for), for plain
answers and streams alike, and the answer is hardened all the same, so it is right even
when an upstream ignores the narrower request.

With ``dp_noise`` the answer spends from the client's differential-privacy budget when it
starts; a refused spend (or an accountant failure: this fails closed) turns the answer
into text only (LLM) or labels only (classifier).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from modelfence.errors import ModelFenceError
from modelfence.gateway.context import RequestContext, context_of
from modelfence.gateway.rewrite import (
    BodyRewriter,
    ClosedEvents,
    PayloadTransform,
    ResponseRewriting,
    SSERewriter,
    Unread,
)
from modelfence.operations import Operation
from modelfence.policy.config import DPConfig, Hardening, PolicyConfig
from modelfence.policy.dp import BudgetAccountant
from modelfence.policy.llm_hardening import LogprobHardening
from modelfence.policy.noise import default_rng
from modelfence.policy.probs_hardening import RowHardening, harden_oip
from modelfence.policy.reasoning import ReasoningTrim
from modelfence.policy.request_policy import narrowed_request, upstream_payload, wants_logprobs
from modelfence.policy.risk import RiskLevel, RiskSource, stronger
from modelfence.types import ASGIApp, Headers, Scope

log = logging.getLogger("modelfence.policy")


@dataclass(frozen=True, slots=True)
class _Plan:
    client: str
    profile: Hardening
    oip: bool
    allowed_outputs: tuple[str, ...] | None
    logprobs: bool = False  # an LLM answer with logprobs to harden
    think_opened: bool = False  # its content starts inside the reasoning (see ReasoningTrim)


class OutputHardening(ResponseRewriting[_Plan]):
    def __init__(
        self,
        app: ASGIApp,
        *,
        policy: PolicyConfig,
        risk: RiskSource,
        accountant: BudgetAccountant,
        trust_levels: Mapping[str, RiskLevel] | None = None,
        think_opened: frozenset[str] = frozenset(),
        rng: np.random.Generator | None = None,
        on_unread: Unread | None = None,
    ) -> None:
        """``think_opened``: the upstreams whose answers start inside a ``<think>`` block
        that the chat template opened in the prompt."""
        super().__init__(app, on_unread=on_unread)
        self.policy = policy
        self.risk = risk
        self.trust_levels = trust_levels or {}  # account trust -> its least hardening
        self.accountant = accountant
        self.think_opened = think_opened
        self.rng = rng or default_rng()

    def plan(self, scope: Scope) -> _Plan | None:
        ctx = context_of(scope)
        operation = ctx.operation
        if ctx.key is None or operation is None:
            return None
        tier = self.policy.for_tier(ctx.tier)
        level = self.risk.level_for(ctx.key.client)
        floor = self.trust_levels.get(ctx.trust)
        profile = tier.profile(level if floor is None else stronger(level, floor))
        if operation is Operation.OIP_INFER:
            allowed = tier.request.oip_outputs
            if profile.for_classifiers.is_identity and allowed is None:
                return None
            return _Plan(ctx.key.client, profile, True, allowed)
        if not operation.generates_text or profile.is_identity:
            return None
        logprobs = wants_logprobs(operation, ctx.body)
        if not logprobs and profile.reasoning == "keep":
            return None
        if logprobs:
            _narrow(ctx, operation, profile)
        return _Plan(ctx.key.client, profile, False, None, logprobs, ctx.upstream in self.think_opened)

    async def transform_for(
        self, scope: Scope, plan: _Plan, status: int
    ) -> PayloadTransform | None:
        if status != 200:
            return None
        profile = plan.profile
        dp = self.policy.dp
        spends = profile.dp_noise and (plan.oip or plan.logprobs)
        noised = spends and await self._spend(plan.client, dp)
        spent_out = spends and not noised
        if plan.oip:
            return self._probabilities(plan, dp if noised else None, labels_only=spent_out)
        logprobs = LogprobHardening(
            quantum=profile.logprob_quantum,
            top_k=profile.top_logprobs,
            noise_scale=dp.logprob_sensitivity / dp.epsilon_per_response if noised else None,
            text_only=profile.text_only or spent_out,
            rng=self.rng,
        ).apply if plan.logprobs else None
        if profile.reasoning == "keep":
            assert logprobs is not None  # plan() made no plan otherwise
            return logprobs
        return ReasoningTrim(profile.reasoning, profile.reasoning_max_chars, first=logprobs,
                             opened=plan.think_opened)

    def body_rewriter(self, headers: Headers, transform: PayloadTransform) -> BodyRewriter | None:
        rewriter = super().body_rewriter(headers, transform)
        if isinstance(rewriter, SSERewriter) and isinstance(transform, ReasoningTrim):
            transform.stream = True
            return ClosedEvents(transform, transform.held, self.on_unread)  # held tags go last
        return rewriter

    def _probabilities(
        self, plan: _Plan, dp: DPConfig | None, *, labels_only: bool
    ) -> PayloadTransform:
        p = plan.profile
        rows = RowHardening(
            mode="labels_only" if labels_only else p.probabilities,
            top_k=p.prob_top_k,
            decimals=p.prob_decimals,
            beta=p.reverse_sigmoid_beta,
            gamma=p.reverse_sigmoid_gamma,
            threshold=p.ood_threshold,
            sharpness=p.ood_sharpness,
            noise_scale=dp.probability_sensitivity / dp.epsilon_per_response if dp else None,
            rng=self.rng,
        )
        identity = p.for_classifiers.is_identity and not labels_only
        return lambda payload: harden_oip(payload, None if identity else rows, plan.allowed_outputs)

    async def _spend(self, client: str, dp: DPConfig) -> bool:
        try:
            return await self.accountant.spend(client, dp.epsilon_per_response)
        except ModelFenceError as exc:
            log.warning("DP budget spend failed for client %r; answering text or labels only: %s",
                        client, exc)
            return False


def _narrow(ctx: RequestContext, operation: Operation, profile: Hardening) -> None:
    """Ask the upstream for no more logprobs than the profile lets through.

    Not with DP noise: its alternatives are noised, re-sorted, then cut, so all of them count.
    """
    asked = upstream_payload(ctx.body, ctx.upstream_overrides)  # after the request policy
    narrowed = narrowed_request(
        operation, asked, text_only=profile.text_only,
        top_k=None if profile.dp_noise else profile.top_logprobs,
    )
    ctx.upstream_overrides.update(narrowed)
