"""Admin routes of the policy layer: the effective per-tier policy, and risk-level pins.

``GET /admin/v1/policy`` shows what each configured tier gets (request rules and the
hardening profile per risk level). ``PUT /admin/v1/risk/{client}`` with
``{"level": "high"}`` pins a client's risk level — it applies from that client's next
request on; ``DELETE`` removes the pin. Pins live in this gateway process: across replicas
the detection layer's shared state is what carries risk levels.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict

from modelfence.admin.errors import error_responses
from modelfence.admin.names import Name
from modelfence.policy.config import DPConfig, PolicyConfig, TierPolicy
from modelfence.policy.risk import RiskLevel, RiskOverrides

log = logging.getLogger(__name__)

ClientPath = Annotated[Name, Path(description="the client's name")]


class RiskPin(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: RiskLevel


class RiskPins(BaseModel):
    data: dict[str, RiskLevel]


class PolicyView(BaseModel):
    tiers: dict[str, TierPolicy]
    dp: DPConfig


def policy_router(
    policy: PolicyConfig, tiers: Collection[str], overrides: RiskOverrides
) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["policy"], responses=error_responses(401, 503))

    @router.get("/policy")
    async def get_policy() -> PolicyView:
        """The effective request rules and hardening profiles of every configured tier."""
        return PolicyView(tiers={name: policy.for_tier(name) for name in tiers}, dp=policy.dp)

    @router.get("/risk")
    async def list_pins() -> RiskPins:
        return RiskPins(data=overrides.pins())

    @router.put("/risk/{client}", responses=error_responses(422))
    async def pin(client: ClientPath, body: RiskPin) -> RiskPins:
        """Pin a client's risk level; it can raise what detection says, never lower it."""
        overrides.set(client, body.level)
        log.info("admin: pinned risk level of client %r to %s", client, body.level)
        return RiskPins(data={client: body.level})

    @router.delete("/risk/{client}", responses=error_responses(422))
    async def unpin(client: ClientPath) -> RiskPins:
        overrides.clear(client)
        log.info("admin: removed the risk pin of client %r", client)
        return RiskPins(data=overrides.pins())

    return router
