"""Admin routes of the detection layer: who is suspicious, why, and manual overrides.

``GET /admin/v1/clients`` (riskiest first), ``GET /admin/v1/clients/{client}`` (risk,
level, reasons, entity, current action, override, recent usage and audit trail),
``GET /admin/v1/entities/{entity}``, ``GET /admin/v1/alerts`` and
``POST /admin/v1/clients/{client}/action`` to pin a client (``allow``, a level, or
``clear`` to hand it back to the detector). Overrides take effect on every replica at
its next state poll and are written to the audit log.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, func, select

from modelfence.admin.errors import gateway_error_response
from modelfence.detect.actions import Policy
from modelfence.detect.state import ClientRecord, RedisState, SqlState
from modelfence.errors import NotFound
from modelfence.store import transaction
from modelfence.store.schema import (
    client_risk,
    detection_alerts,
    detection_audit,
    detection_overrides,
    request_events,
)

log = logging.getLogger(__name__)

OverrideAction = Literal["allow", "normal", "alert", "tighten", "degrade", "block", "clear"]
_ClientName = Field(min_length=1, max_length=200)


class ActionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    action: OverrideAction = Field(description="allow | a level | clear (back to the detector)")
    note: str = Field("", max_length=2000, description="why; kept in the audit log")


def _client_json(record: ClientRecord) -> dict[str, Any]:
    out = {k: getattr(record, k) for k in record.__dataclass_fields__}
    out["updated_at"] = record.updated_at.isoformat()
    out["action"] = {"level": record.action.level, "quota_share": record.action.quota_share}
    return out


def _rows(rows: Any) -> list[dict[str, Any]]:
    return [
        {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
        for row in rows
    ]


def detection_router(
    state: SqlState, policy: Policy, *, shared: RedisState | None = None
) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["detection"])
    engine = state.engine

    @router.get("/clients")
    async def list_clients(
        min_risk: float = Query(0.0, ge=0, le=1), limit: int = Query(100, ge=1, le=1000)
    ) -> dict[str, Any]:
        """Clients the detector has scored, riskiest first."""
        records = await state.list(min_risk=min_risk, limit=limit)
        return {"object": "list", "data": [_client_json(r) for r in records]}

    @router.get("/clients/{client}", response_model=None)
    async def get_client(client: str) -> dict[str, Any] | JSONResponse:
        """One client: risk, level, reasons, entity, action, override, usage, audit trail."""
        record = await state.get(client)
        overrides = await state.overrides()
        since = datetime.now(UTC) - timedelta(hours=24)
        async with transaction(engine) as conn:
            usage = (
                await conn.execute(
                    select(
                        func.count(),
                        func.coalesce(func.sum(request_events.c.tokens_in), 0),
                        func.coalesce(func.sum(request_events.c.tokens_out), 0),
                    ).where(request_events.c.client == client, request_events.c.ts >= since)
                )
            ).one()
            audit = (
                (
                    await conn.execute(
                        select(detection_audit)
                        .where(detection_audit.c.client == client)
                        .order_by(detection_audit.c.id.desc())
                        .limit(20)
                    )
                )
                .mappings()
                .all()
            )
        if record is None and not usage[0] and client not in overrides:
            return gateway_error_response(
                NotFound(f"no client named {client!r} has been seen", code="client_not_found")
            )
        return {
            "client": client,
            "record": _client_json(record) if record else None,
            "override": overrides.get(client),
            "usage_24h": {"requests": usage[0], "tokens_in": usage[1], "tokens_out": usage[2]},
            "audit": _rows(audit),
        }

    @router.get("/entities/{entity}", response_model=None)
    async def get_entity(entity: str) -> dict[str, Any] | JSONResponse:
        """Keys linked into one entity (shared fingerprints or networks) and their risk."""
        async with transaction(engine) as conn:
            rows = (
                (await conn.execute(select(client_risk).where(client_risk.c.entity == entity)))
                .mappings()
                .all()
            )
        if not rows:
            return gateway_error_response(
                NotFound(f"no entity {entity!r}", code="entity_not_found")
            )
        members = [_client_json(ClientRecord(**row)) for row in rows]
        return {"entity": entity, "risk": max(m["risk"] for m in members), "members": members}

    @router.get("/alerts")
    async def list_alerts(limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        """Most recent alerts first."""
        async with transaction(engine) as conn:
            rows = (
                (
                    await conn.execute(
                        select(detection_alerts).order_by(detection_alerts.c.id.desc()).limit(limit)
                    )
                )
                .mappings()
                .all()
            )
        return {"object": "list", "data": _rows(rows)}

    @router.post("/clients/{client}/action")
    async def set_action(client: str, body: ActionRequest) -> dict[str, Any]:
        """Pin a client's action (or ``clear`` the pin); audited, applied at the next poll."""
        record = await state.get(client)
        previous = record.level if record else "normal"
        now = datetime.now(UTC)
        async with transaction(engine, write=True) as conn:
            await conn.execute(
                delete(detection_overrides).where(detection_overrides.c.client == client)
            )
            if body.action != "clear":
                await conn.execute(
                    detection_overrides.insert().values(
                        client=client, action=body.action, note=body.note, updated_at=now
                    )
                )
        base = record or ClientRecord(
            client=client,
            tier="default",
            entity=None,
            risk=0.0,
            level="normal",
            quota_share=1.0,
            reasons=[],
            queries=0,
            shadow=False,
            updated_at=now,
        )
        pinned = None if body.action == "clear" else body.action
        level = policy.decide(client, base.risk, base.tier, pinned)
        published = replace(
            base,
            level=level,
            quota_share=policy.action(level, base.tier).quota_share,
            shadow=base.shadow and pinned is None,
            updated_at=now,
        )
        await state.publish([published])
        if shared is not None:
            await shared.publish([published])
        await state.audit(
            client=client,
            entity=published.entity,
            previous=previous,
            action=body.action,
            risk=base.risk,
            source="admin",
            shadow=False,
            reasons=[
                {"code": "manual_override", "text": body.note or "set by an operator", "score": 1.0}
            ],
        )
        log.info("admin: detection action of client %r set to %s", client, body.action)
        return {"client": client, "override": pinned, "level": level}

    return router
