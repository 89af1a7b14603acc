"""Admin routes of the detection layer: who is suspicious, why, and manual overrides.

``GET /admin/v1/clients`` (riskiest first), ``GET /admin/v1/clients/{client}`` (risk,
level, reasons, entity, current action, override, recent usage and audit trail),
``GET /admin/v1/entities/{entity}``, ``GET /admin/v1/alerts`` and
``POST /admin/v1/clients/{client}/action`` to pin a client (``allow``, a level,
``shadow``, ``probation``, or ``clear`` to hand it back to the detector). Overrides take
effect on every replica at its next state poll and are written to the audit log. A
client's record lists its strongest links (kinds and weights);
``PUT|DELETE /admin/v1/clients/{client}/links/{other}/cut`` cuts one (the two are never one
entity again) or restores it, audited too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from modelfence.admin.errors import error_responses
from modelfence.admin.names import Name, Note
from modelfence.detect.actions import Level
from modelfence.detect.overrides import OperatorActions, OverrideAction
from modelfence.detect.state import ClientRecord, SqlState
from modelfence.errors import NotFound
from modelfence.store import transaction
from modelfence.store.schema import (
    client_risk,
    detection_alerts,
    request_events,
)

ClientPath = Annotated[Name, Path(description="the client's name")]
OtherPath = Annotated[Name, Path(description="the other client's name")]


class _Query(BaseModel):
    # A misspelt query parameter is an error, not silently the default.
    model_config = ConfigDict(extra="forbid")


class ClientsQuery(_Query):
    min_risk: float = Field(0.0, ge=0, le=1, description="only clients at least this risky")
    limit: int = Field(100, ge=1, le=1000)


class AlertsQuery(_Query):
    limit: int = Field(100, ge=1, le=1000)


class ActionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    action: OverrideAction = Field(
        description="allow (pinned to normal) | a level (pinned there) | shadow (scored, "
        "recorded and alerted, nothing applied) | probation (held to the probation allowance "
        "whatever the account; detection keeps deciding the level) | clear (back to the "
        "detector)"
    )
    note: Note = Field("", description="why; kept in the audit log")


class AppliedAction(BaseModel):
    level: Level
    quota_share: float = Field(description="the client's limits are multiplied by this")
    probation: bool = Field(description="held to the probation allowance (an operator's pin)")


class ClientState(BaseModel):
    """A client as the detector last published it."""

    client: str
    tier: str
    entity: str | None
    risk: float
    level: Level
    quota_share: float
    reasons: list[dict[str, Any]] = Field(
        description='[{"code", "text", "score", "value", "threshold", "since"}], strongest '
        "first: `value` is the statistic measured, `threshold` the line it crossed, `since` "
        "when it first crossed it (event time, seconds since 1970); the three are absent from "
        "records published before they were kept"
    )
    queries: int
    shadow: bool = Field(
        description="the level is recorded, not applied (shadow mode, or the client's "
        "shadow pin)"
    )
    updated_at: datetime
    links: list[dict[str, Any]] | None = Field(
        None,
        description='[{"other", "kinds", "weight", "joins", "cut"}]: the strongest evidence '
        "that this client and another are one actor; `weight` adds the kinds up, `joins` says "
        "whether one kind alone is strong enough (0.5) to put them in one entity, unless cut",
    )
    probation: bool = Field(description="an operator put the client on probation")
    action: AppliedAction = Field(
        description="what gateways apply (no level when shadowed; probation in every mode)"
    )

    @classmethod
    def of(cls, record: ClientRecord) -> ClientState:
        fields = {k: getattr(record, k) for k in record.__dataclass_fields__}
        action = record.action
        return cls(
            **fields,
            action=AppliedAction(
                level=action.level, quota_share=action.quota_share, probation=action.probation
            ),
        )


class ClientList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ClientState]


class Usage(BaseModel):
    requests: int
    tokens_in: int
    tokens_out: int


class AuditEntry(BaseModel):
    id: int
    at: datetime
    client: str
    entity: str | None
    previous: str
    action: str
    risk: float
    source: str = Field(description="detector | admin")
    shadow: bool
    reasons: list[dict[str, Any]]


class ClientDetail(BaseModel):
    client: str
    record: ClientState | None = Field(description="null until the detector has scored it")
    override: str | None = Field(description="the operator's pin, if any")
    usage_24h: Usage
    audit: list[AuditEntry] = Field(description="the last 20 decisions, newest first")


class EntityDetail(BaseModel):
    entity: str
    risk: float = Field(description="the riskiest member's risk")
    members: list[ClientState]


class Alert(BaseModel):
    id: int
    at: datetime
    client: str
    entity: str | None
    level: str
    risk: float
    reasons: list[dict[str, Any]]
    delivered: bool
    acknowledged_at: datetime | None = Field(
        None, description="when an operator acknowledged it in the console; null until then"
    )
    shadow: bool | None = Field(
        None,
        description="the level was recorded, not applied (shadow mode, or the client's shadow "
        "pin); null on alerts raised before this was recorded",
    )


class AlertList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Alert]


class ActionResult(BaseModel):
    client: str
    override: OverrideAction | None = Field(description="the pin now in force; null if cleared")
    level: Level


class CutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: Note = Field("", description="why; kept in the audit log")


class CutResult(BaseModel):
    client: str
    other: str
    cut: bool = Field(description="true: never one entity again, until restored")


def detection_router(state: SqlState, actions: OperatorActions) -> APIRouter:
    """``actions``: the operator pins and cuts, the same object the console acts through."""
    router = APIRouter(prefix="/v1", tags=["detection"], responses=error_responses(401, 422, 503))
    engine = state.engine

    @router.get("/clients")
    async def list_clients(query: Annotated[ClientsQuery, Query()]) -> ClientList:
        """Clients the detector has scored, riskiest first."""
        records = await state.list(min_risk=query.min_risk, limit=query.limit)
        return ClientList(data=[ClientState.of(r) for r in records])

    @router.get("/clients/{client}", responses=error_responses(404))
    async def get_client(client: ClientPath) -> ClientDetail:
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
        audit = await state.decisions(client)
        if record is None and not usage[0] and client not in overrides:
            raise NotFound(f"no client named {client!r} has been seen", code="client_not_found")
        return ClientDetail(
            client=client,
            record=ClientState.of(record) if record else None,
            override=overrides.get(client),
            usage_24h=Usage(requests=usage[0], tokens_in=usage[1], tokens_out=usage[2]),
            audit=[AuditEntry.model_validate(row) for row in audit],
        )

    @router.get("/entities/{entity}", responses=error_responses(404))
    async def get_entity(
        entity: Annotated[Name, Path(description="an entity id, as a client record names it")],
    ) -> EntityDetail:
        """Keys linked into one entity (shared fingerprints or networks) and their risk."""
        async with transaction(engine) as conn:
            rows = (
                (await conn.execute(select(client_risk).where(client_risk.c.entity == entity)))
                .mappings()
                .all()
            )
        if not rows:
            raise NotFound(f"no entity {entity!r}", code="entity_not_found")
        members = [ClientState.of(ClientRecord(**row)) for row in rows]
        return EntityDetail(entity=entity, risk=max(m.risk for m in members), members=members)

    @router.get("/alerts")
    async def list_alerts(query: Annotated[AlertsQuery, Query()]) -> AlertList:
        """Most recent alerts first."""
        async with transaction(engine) as conn:
            rows = (
                (
                    await conn.execute(
                        select(detection_alerts)
                        .order_by(detection_alerts.c.id.desc())
                        .limit(query.limit)
                    )
                )
                .mappings()
                .all()
            )
        return AlertList(data=[Alert.model_validate(dict(row)) for row in rows])

    @router.post("/clients/{client}/action")
    async def set_action(client: ClientPath, body: ActionRequest) -> ActionResult:
        """Pin a client's action (or ``clear`` the pin); audited, applied at the next poll."""
        pinned = await actions.pin(client, body.action, body.note)
        return ActionResult(client=client, override=pinned.override, level=pinned.level)

    async def _cut(client: str, other: str, cut: bool, note: str) -> CutResult:
        if client == other:
            raise RequestValidationError(
                [{"type": "value_error", "loc": ("path", "other"), "input": other,
                  "msg": "a client cannot be cut from itself"}]
            )
        await actions.cut(client, other, cut=cut, note=note)
        return CutResult(client=client, other=other, cut=cut)

    @router.put("/clients/{client}/links/{other}/cut")
    async def cut_link(client: ClientPath, other: OtherPath, body: CutRequest) -> CutResult:
        """Cut the link between two clients: the detector never puts them in one entity again
        (whatever evidence links them) until the cut is removed; audited, applied within
        seconds."""
        return await _cut(client, other, True, body.note)

    @router.delete("/clients/{client}/links/{other}/cut")
    async def restore_link(client: ClientPath, other: OtherPath) -> CutResult:
        """Remove a cut: the evidence decides again."""
        return await _cut(client, other, False, "")

    return router
