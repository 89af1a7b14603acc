"""Detection on the request path: apply the client's current action, never compute it.

:class:`Enforce` reads the action from an :class:`ActionSource` (one dict lookup; the
detection layer keeps it fresh) and applies it: ``block`` answers 403 with code
``client_blocked``; ``tighten`` and above scale the client's limits (Admission reads
``ctx.quota_share``); ``degrade`` and above set ``ctx.degrade`` for output hardening. An
operator's probation sets ``ctx.probation``: Admission holds the client to the probation
allowance.
"""

from __future__ import annotations

from typing import Protocol

from modelfence.detect.actions import Action
from modelfence.errors import PermissionDenied
from modelfence.gateway.context import context_of
from modelfence.telemetry.metrics import Metrics
from modelfence.types import ASGIApp, Receive, Scope, Send


class ActionSource(Protocol):
    def get(self, client: str) -> Action:
        """The client's current action, from memory (called on every request)."""
        ...


class Enforce:
    def __init__(self, app: ASGIApp, *, actions: ActionSource, metrics: Metrics) -> None:
        self.app = app
        self.actions = actions
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context_of(scope)
        assert ctx.key is not None
        action = self.actions.get(ctx.key.client)
        if action.probation:
            ctx.probation = True
            self.metrics.detection_actions.labels("probation").inc()
        if action.level != "normal":
            ctx.risk_level = action.level
            self.metrics.detection_actions.labels(action.level).inc()
            if action.blocks:
                raise PermissionDenied(
                    "This client is blocked: its traffic matches automated model extraction. "
                    "Contact the API operator if this is a mistake.",
                    code="client_blocked",
                )
            ctx.quota_share = action.quota_share
            ctx.degrade = action.degrades
        await self.app(scope, receive, send)
