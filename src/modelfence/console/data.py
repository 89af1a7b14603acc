"""What the console reads: the detection state the admin API reads, shaped for pages.

``app.py`` hands the console a :class:`ConsoleData` over the state database the detector
publishes to; every list is paged and sorted in SQL, so a page of 10,000 clients costs a
count and one page of rows. Key rows are read without their hashes; no secret is ever
selected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

from sqlalchemy import ColumnElement, String, case, cast, func, select, update
from sqlalchemy.sql import Select

from modelfence.admin.detection import Alert, AuditEntry
from modelfence.detect.actions import LEVELS
from modelfence.detect.state import ClientRecord, SqlState
from modelfence.store import transaction
from modelfence.store.schema import (
    api_keys,
    client_risk,
    detection_alerts,
    detection_audit,
    detection_overrides,
    request_events,
)

Sort = Literal["risk", "client", "level", "tier", "queries", "updated"]
T = TypeVar("T")

_SORT_COLUMNS: dict[Sort, Any] = {
    "risk": client_risk.c.risk,
    "client": client_risk.c.client,
    "level": case({level: i for i, level in enumerate(LEVELS)}, value=client_risk.c.level, else_=0),
    "tier": client_risk.c.tier,
    "queries": client_risk.c.queries,
    "updated": client_risk.c.updated_at,
}


@dataclass(frozen=True, slots=True)
class ClientFilter:
    """The client list's filters; ``None`` is any. ``reason`` is a reason code."""

    tier: str | None = None
    level: str | None = None
    account: str | None = None
    entity: str | None = None
    reason: str | None = None
    search: str | None = None  # part of the client's name


@dataclass(frozen=True, slots=True)
class ClientRow:
    record: ClientRecord
    accounts: tuple[str, ...]
    override: str | None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    rows: list[T]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


@dataclass(frozen=True, slots=True)
class KeyRow:
    """A key as the console shows it: its public id and prefix, never the key."""

    key_id: str
    prefix: str
    tier: str
    account: str | None
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class Hour:
    start: datetime
    requests: int
    refused: int
    tokens_in: int
    tokens_out: int


@dataclass(frozen=True, slots=True)
class ClientView:
    client: str
    record: ClientRecord | None
    override: tuple[str, str] | None  # (action, note)
    keys: list[KeyRow]
    timeline: list[Hour]  # the last 24 hours, oldest first
    audit: list[AuditEntry]  # newest first


@dataclass(frozen=True, slots=True)
class Overview:
    requests_hour: int
    requests_day: int
    refusals_day: dict[int, int]  # status -> count, in the last 24 hours
    levels: dict[str, int]  # clients per level
    alerts_hour: int
    alerts_day: int
    unacknowledged: int
    newest_event: datetime | None
    newest_verdict: datetime | None
    telemetry_drops: int | None  # this process's dropped events; None with telemetry off

    @property
    def detector_lag(self) -> timedelta | None:
        """How far the newest verdict trails the newest request event (None if it does not)."""
        if self.newest_event is None or self.newest_verdict is None:
            return None
        lag = self.newest_event - self.newest_verdict
        return lag if lag > timedelta(0) else None


def _filtered(query: Select[Any], where: ClientFilter) -> Select[Any]:
    c = client_risk.c
    conditions: list[ColumnElement[bool]] = []
    if where.tier is not None:
        conditions.append(c.tier == where.tier)
    if where.level is not None:
        conditions.append(c.level == where.level)
    if where.entity is not None:
        conditions.append(c.entity == where.entity)
    if where.account is not None:
        owned = select(api_keys.c.client).where(api_keys.c.account == where.account)
        conditions.append(c.client.in_(owned))
    if where.reason is not None:
        # Codes are [a-z0-9_] (checked by the caller). The stored JSON is json.dumps'
        # (`"code": "x"`; JSONB prints the same): only a reason's code matches, never a key.
        conditions.append(
            cast(c.reasons, String).contains(f'"code": "{where.reason}"', autoescape=True)
        )
    if where.search is not None:
        conditions.append(c.client.contains(where.search, autoescape=True))
    return query.where(*conditions)


def _record(row: Any) -> ClientRecord:
    return ClientRecord(**{k: row[k] for k in ClientRecord.__dataclass_fields__})


class ConsoleData:
    """Reads for the console pages; ``telemetry_drops`` counts this process's lost events."""

    def __init__(
        self, state: SqlState, *, telemetry_drops: Callable[[], int] | None = None
    ) -> None:
        self.state = state
        self.engine = state.engine
        self.telemetry_drops = telemetry_drops

    async def clients(
        self, where: ClientFilter, *, sort: Sort, descending: bool, page: int, per_page: int
    ) -> Page[ClientRow]:
        order = _SORT_COLUMNS[sort]
        query = (
            _filtered(select(client_risk), where)
            .order_by(order.desc() if descending else order.asc(), client_risk.c.client)
            .offset((page - 1) * per_page)
            .limit(per_page)
        )
        count = _filtered(select(func.count()).select_from(client_risk), where)
        async with transaction(self.engine) as conn:
            total = (await conn.execute(count)).scalar_one()
            records = [_record(row) for row in (await conn.execute(query)).mappings()]
            names = [r.client for r in records]
            owners = await conn.execute(
                select(api_keys.c.client, api_keys.c.account)
                .where(api_keys.c.client.in_(names), api_keys.c.account.is_not(None))
                .distinct()
            )
            pins = await conn.execute(
                select(detection_overrides.c.client, detection_overrides.c.action).where(
                    detection_overrides.c.client.in_(names)
                )
            )
            accounts: dict[str, list[str]] = {}
            for client, account in owners:
                accounts.setdefault(client, []).append(account)
            overrides = dict(pins.all())
        rows = [
            ClientRow(r, tuple(sorted(accounts.get(r.client, ()))), overrides.get(r.client))
            for r in records
        ]
        return Page(rows, total, page, per_page)

    async def tiers(self) -> list[str]:
        async with transaction(self.engine) as conn:
            return list((await conn.execute(select(client_risk.c.tier).distinct())).scalars())

    async def client(self, client: str) -> ClientView | None:
        """One client's page, or None when nothing is known of it."""
        now = datetime.now(UTC)
        since = now - timedelta(hours=24)
        async with transaction(self.engine) as conn:
            row = (
                await conn.execute(select(client_risk).where(client_risk.c.client == client))
            ).mappings().first()
            pin = (
                await conn.execute(
                    select(detection_overrides.c.action, detection_overrides.c.note).where(
                        detection_overrides.c.client == client
                    )
                )
            ).first()
            keys = (
                await conn.execute(
                    select(
                        api_keys.c.key_id, api_keys.c.prefix, api_keys.c.tier, api_keys.c.account,
                        api_keys.c.created_at, api_keys.c.revoked_at,
                    )
                    .where(api_keys.c.client == client)
                    .order_by(api_keys.c.created_at)
                )
            ).all()
            recent = (await conn.execute(_timeline(client, since))).all()
        if row is None and pin is None and not keys and not recent:
            return None
        return ClientView(
            client=client,
            record=None if row is None else _record(row),
            override=None if pin is None else (pin.action, pin.note),
            keys=[KeyRow(*key) for key in keys],
            timeline=_hours(recent, now),
            audit=[AuditEntry.model_validate(a) for a in await self.state.decisions(client)],
        )

    async def audit(self, *, page: int, per_page: int, client: str | None) -> Page[AuditEntry]:
        table = detection_audit
        where = [] if client is None else [table.c.client == client]
        async with transaction(self.engine) as conn:
            total = (
                await conn.execute(select(func.count()).select_from(table).where(*where))
            ).scalar_one()
            rows = (
                await conn.execute(
                    select(table)
                    .where(*where)
                    .order_by(table.c.id.desc())
                    .offset((page - 1) * per_page)
                    .limit(per_page)
                )
            ).mappings().all()
        return Page([AuditEntry.model_validate(dict(r)) for r in rows], total, page, per_page)

    async def alerts(self, *, page: int, per_page: int) -> Page[Alert]:
        table = detection_alerts
        async with transaction(self.engine) as conn:
            total = (await conn.execute(select(func.count()).select_from(table))).scalar_one()
            rows = (
                await conn.execute(
                    select(table)
                    .order_by(table.c.id.desc())
                    .offset((page - 1) * per_page)
                    .limit(per_page)
                )
            ).mappings().all()
        return Page([Alert.model_validate(dict(r)) for r in rows], total, page, per_page)

    async def acknowledge(self, alert_id: int) -> Alert | None:
        """Mark an alert acknowledged (once: the first time is kept); None if there is none."""
        table = detection_alerts
        async with transaction(self.engine, write=True) as conn:
            await conn.execute(
                update(table)
                .where(table.c.id == alert_id, table.c.acknowledged_at.is_(None))
                .values(acknowledged_at=datetime.now(UTC))
            )
            row = (await conn.execute(select(table).where(table.c.id == alert_id))).mappings().first()
        return None if row is None else Alert.model_validate(dict(row))

    async def overview(self) -> Overview:
        now = datetime.now(UTC)
        hour, day = now - timedelta(hours=1), now - timedelta(days=1)
        events, alerts = request_events.c, detection_alerts.c
        async with transaction(self.engine) as conn:

            async def count(table: Any, *where: ColumnElement[bool]) -> int:
                query = select(func.count()).select_from(table).where(*where)
                return int((await conn.execute(query)).scalar_one())

            refusals = await conn.execute(
                select(events.status, func.count())
                .where(events.ts >= day, events.status >= 400)
                .group_by(events.status)
            )
            levels = await conn.execute(
                select(client_risk.c.level, func.count()).group_by(client_risk.c.level)
            )
            return Overview(
                requests_hour=await count(request_events, events.ts >= hour),
                requests_day=await count(request_events, events.ts >= day),
                refusals_day=dict(sorted(refusals.all())),
                levels=dict(levels.all()),
                alerts_hour=await count(detection_alerts, alerts.at >= hour),
                alerts_day=await count(detection_alerts, alerts.at >= day),
                unacknowledged=await count(detection_alerts, alerts.acknowledged_at.is_(None)),
                newest_event=(await conn.execute(select(func.max(events.ts)))).scalar_one(),
                newest_verdict=(
                    await conn.execute(select(func.max(client_risk.c.updated_at)))
                ).scalar_one(),
                telemetry_drops=None if self.telemetry_drops is None else self.telemetry_drops(),
            )


def _timeline(client: str, start: datetime) -> Select[Any]:
    """The client's events since ``start`` counted and summed per hour, in the database.

    ``(hour, requests, refused, tokens_in, tokens_out)`` for each of the 24 hours from
    ``start`` that has events; ``hour`` is 0 to 23 (later events count in the last hour).
    Every event is counted, however many. The hour is found by comparing ``ts`` with the
    hours' bounds, as ``ts >= start`` compares it: exact on SQLite's text and PostgreSQL's
    timestamps alike.
    """
    events = request_events.c
    hour = case(
        *[(events.ts < start + timedelta(hours=i + 1), i) for i in range(23)], else_=23
    )
    rows = (
        select(hour.label("hour"), events.status, events.tokens_in, events.tokens_out)
        .where(events.client == client, events.ts >= start)
        .subquery()
    )
    # Grouped by the subquery's column: PostgreSQL would not match two copies of the CASE,
    # each with its own bound parameters.
    return select(
        rows.c.hour,
        func.count(),
        func.sum(case((rows.c.status >= 400, 1), else_=0)),
        func.sum(rows.c.tokens_in),
        func.sum(rows.c.tokens_out),
    ).group_by(rows.c.hour)


def _hours(counts: Sequence[Any], now: datetime) -> list[Hour]:
    """``(hour, requests, refused, tokens_in, tokens_out)`` rows as 24 hours ending now."""
    start = now - timedelta(hours=24)
    buckets = [[0, 0, 0, 0] for _ in range(24)]
    for hour, *totals in counts:
        buckets[int(hour)] = [int(total or 0) for total in totals]
    return [Hour(start + timedelta(hours=i), *b) for i, b in enumerate(buckets)]
