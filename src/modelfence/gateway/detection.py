"""Detection on the request path: read the client's current action, never compute it.

:class:`ActionCache` holds the published non-normal actions in a dict, refreshed in the
background every ``state_poll_seconds`` from the shared state (SQL or Redis); a request
costs one dict lookup; it is also the policy layer's ``RiskSource`` for output hardening.
:class:`Enforce` applies the action: ``block`` answers 403 with code ``client_blocked``;
``tighten`` and above scale the client's limits (Admission reads ``ctx.quota_share``); ``degrade`` and above set ``ctx.degrade`` for output hardening.
If the state cannot be read, the last snapshot stays in force (counted and logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from modelfence.detect.actions import NORMAL, Action
from modelfence.detect.state import StateReader
from modelfence.errors import ModelFenceError, PermissionDenied
from modelfence.gateway.context import context_of
from modelfence.policy.risk import RiskLevel, level_for_action
from modelfence.telemetry.metrics import Metrics
from modelfence.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("modelfence.detect")


class ActionCache:
    def __init__(self, reader: StateReader, *, poll_seconds: float) -> None:
        if poll_seconds <= 0:
            raise ValueError("poll_seconds must be > 0")
        self.reader = reader
        self.poll_seconds = poll_seconds
        self.failures = 0
        self._actions: dict[str, Action] = {}
        self._task: asyncio.Task[None] | None = None

    def get(self, client: str) -> Action:
        return self._actions.get(client, NORMAL)

    def level_for(self, client: str) -> RiskLevel:
        """The output-hardening level (the policy layer's ``RiskSource``)."""
        return level_for_action(self.get(client).level)

    async def refresh(self) -> None:
        try:
            self._actions = await self.reader.actions()
        except (ModelFenceError, OSError) as exc:  # keep the last snapshot
            self.failures += 1
            log.warning("reading detection state failed, keeping the last: %s", exc)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._poll(), name="detection-state")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            await self.refresh()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Enforce:
    def __init__(self, app: ASGIApp, *, actions: ActionCache, metrics: Metrics) -> None:
        self.app = app
        self.actions = actions
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context_of(scope)
        assert ctx.key is not None
        action = self.actions.get(ctx.key.client)
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
