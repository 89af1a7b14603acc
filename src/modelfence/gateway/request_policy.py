"""Request policy stage: a tier's request rules, after the body is read, before admission.

Placed before :class:`~modelfence.gateway.admission.Admission` so a refused request costs
the client no quota and the upstream nothing. A rule that neutralises rather than refuses
(``strip_logprobs``) replaces the body the upstream will get.
"""

from __future__ import annotations

import orjson

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
        rules = self.policy.for_tier(ctx.tier).request
        rewritten = apply_rules(rules, ctx.route, ctx.body)
        if rewritten is not None:
            ctx.body = rewritten
            ctx.raw_body = orjson.dumps(rewritten)
        await self.app(scope, receive, send)
