"""Request policy stage: a tier's request rules, after the body is read, before admission.

Placed before :class:`~modelfence.gateway.admission.Admission` so a refused request costs
the client no quota and the upstream nothing. A rule that neutralises rather than refuses
(``strip_logprobs``) adds overrides for the upstream body; the client's body stays as sent.
"""

from __future__ import annotations

from modelfence.gateway.context import context_of
from modelfence.policy.config import PolicyConfig
from modelfence.policy.request_policy import apply_rules
from modelfence.types import ASGIApp, Receive, Scope, Send


class RequestPolicy:
    def __init__(self, app: ASGIApp, *, policy: PolicyConfig) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context_of(scope)
        assert ctx.parsed is not None  # ReadRequest runs first
        rules = self.policy.for_tier(ctx.tier).request
        ctx.upstream_overrides.update(
            apply_rules(rules, ctx.parsed.operation, ctx.body, inputs=ctx.parsed.inputs)
        )
        await self.app(scope, receive, send)
