"""What the console reads: the detection state the admin API reads, shaped for pages.

``app.py`` hands the console a :class:`ConsoleData` over the state database the detector
publishes to; every list is paged and sorted in SQL, so a page of 10,000 clients costs a
count and one page of rows. Key rows are read without their hashes; no secret is ever
selected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

from sqlalchemy import (
    ColumnElement,
    String,
    case,
    cast,
    distinct,
    extract,
    func,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Select

from modelfence.admin.detection import Alert, AuditEntry
from modelfence.config import DetectionConfig
from modelfence.console import pictures
from modelfence.console.pictures import QueryMap, RiskHistory
from modelfence.detect.actions import LEVELS
from modelfence.detect.state import ClientRecord, SqlState
from modelfence.store import transaction
from modelfence.store.schema import (
    accounts,
    api_keys,
    client_risk,
    detection_alerts,
    detection_audit,
    detection_link_cuts,
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


CAMPAIGN_CLIENTS = 50  # clients drawn at most: the group's riskiest, then linked outsiders
CAMPAIGN_OUTSIDE = 10  # linked clients outside the group drawn at most
CAMPAIGN_LINKS = 200  # links listed at most, strongest first
CAMPAIGN_ACCOUNTS = 100  # accounts listed at most (every one is counted)
ARRIVAL_WINDOW = timedelta(hours=24)  # accounts arriving this close together: a campaign sign


@dataclass(frozen=True, slots=True)
class LinkRow:
    """A link of a drawn member, as both clients published it: kinds joined, the highest
    weight; ``cut`` also when an operator cut it after the detector last published."""

    client: str  # the drawn member that published it
    other: str
    kinds: tuple[str, ...]
    weight: float
    joins: bool
    cut: bool


@dataclass(frozen=True, slots=True)
class AccountRow:
    account: str
    clients: int  # the group's clients holding a key of the account
    first_key: datetime
    created_at: datetime | None  # sign-up, from the account registry; None: not registered
    verified: bool

    @property
    def arrived(self) -> datetime:
        return self.first_key if self.created_at is None else self.created_at


@dataclass(frozen=True, slots=True)
class Campaign:
    """A group of linked clients: an entity's members, or (``entity`` None) one client with
    no entity and the clients it links to directly. Numbers pool the whole group; the
    drawn clients and their links are bounded (``CAMPAIGN_*``)."""

    entity: str | None
    focus: str | None  # the client asked for
    members: int
    queries: int
    max_risk: float
    mean_risk: float
    levels: dict[str, int]  # members per level
    reasons: list[tuple[str, int]]  # (reason code, members giving it), most common first
    drawn: list[ClientRecord]  # reached from the focus (or the riskiest); riskiest first
    outside: list[ClientRecord]  # clients outside the group the drawn ones link to
    links: list[LinkRow]  # the drawn members' links, strongest first (CAMPAIGN_LINKS at most)
    link_total: int
    owners: dict[str, tuple[str, ...]]  # drawn client -> the accounts holding its keys
    accounts: list[AccountRow]  # earliest arrival first
    account_total: int
    arrivals: tuple[int, datetime | None]  # most accounts arriving within ARRIVAL_WINDOW, from
    mapped: list[str]  # the members whose queries a query map pools: the riskiest MAP_CLIENTS


@dataclass(frozen=True, slots=True)
class EntityRow:
    """One entity (linked clients) in the campaign list: pooled over all its members."""

    entity: str
    members: int
    max_risk: float
    mean_risk: float
    queries: int
    blocked: int  # members at block
    acted: int  # members at tighten or above
    updated_at: datetime


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
        self,
        state: SqlState,
        *,
        telemetry_drops: Callable[[], int] | None = None,
        detection: DetectionConfig | None = None,
    ) -> None:
        self.state = state
        self.engine = state.engine
        self.telemetry_drops = telemetry_drops
        # The detection config app.py runs with: the tiers' thresholds the risk chart draws.
        self.detection = detection or DetectionConfig.model_validate({})

    async def risk_history(
        self, client: str, *, span: timedelta = timedelta(hours=24)
    ) -> RiskHistory:
        """The client's published risk over ``span``, with its tier's thresholds."""
        return await pictures.risk_history(self.engine, client, span=span,
                                           detection=self.detection)

    async def query_map(self, clients: Sequence[str]) -> QueryMap | None:
        """Where the named clients' recent queries fall against the honest reference, pooled
        (one client, or a campaign's); None when none of them has a map."""
        return await pictures.query_map(self.engine, clients)

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

    async def entities(self, *, page: int, per_page: int) -> Page[EntityRow]:
        """Entities riskiest first (by their riskiest member), counted and paged in SQL."""
        risk = client_risk.c
        acted = risk.level.in_(("tighten", "degrade", "block"))
        grouped = (
            select(
                risk.entity,
                func.count().label("members"),
                func.max(risk.risk).label("max_risk"),
                func.avg(risk.risk).label("mean_risk"),
                func.sum(risk.queries).label("queries"),
                func.sum(case((risk.level == "block", 1), else_=0)).label("blocked"),
                func.sum(case((acted, 1), else_=0)).label("acted"),
                func.max(risk.updated_at).label("updated_at"),
            )
            .where(risk.entity.is_not(None))
            .group_by(risk.entity)
        )
        count = select(func.count(distinct(risk.entity))).where(risk.entity.is_not(None))
        async with transaction(self.engine) as conn:
            total = (await conn.execute(count)).scalar_one()
            rows = (
                await conn.execute(
                    grouped.order_by(func.max(risk.risk).desc(), risk.entity)
                    .offset((page - 1) * per_page)
                    .limit(per_page)
                )
            ).all()
        return Page(
            [EntityRow(r.entity, r.members, r.max_risk, float(r.mean_risk), int(r.queries or 0),
                       int(r.blocked), int(r.acted), r.updated_at) for r in rows],
            total, page, per_page,
        )

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
            recent = (await conn.execute(timeline_query(client, since))).all()
        if row is None and pin is None and not keys and not recent:
            return None
        return ClientView(
            client=client,
            record=None if row is None else _record(row),
            override=None if pin is None else (pin.action, pin.note),
            keys=[KeyRow(*key) for key in keys],
            timeline=timeline_hours(recent, now),
            audit=[AuditEntry.model_validate(a) for a in await self.state.decisions(client)],
        )

    async def campaign(
        self, *, entity: str | None = None, client: str | None = None
    ) -> Campaign | None:
        """The entity's members, or the entity of ``client`` (that client and the clients it
        links to when it has none); None when no scored client answers. Pooled numbers are
        counted in SQL over every member; only ``CAMPAIGN_CLIENTS`` records are read whole."""
        c = client_risk.c
        async with transaction(self.engine) as conn:
            linked: list[str] = []
            focus: ClientRecord | None = None
            if client is not None:
                focus = await SqlState.get_in(conn, client)
                if focus is None:
                    return None
                entity = focus.entity
                linked = [link["other"] for link in focus.links or ()]
            group = c.entity == entity if entity is not None else c.client.in_([client, *linked])
            pooled = (
                await conn.execute(
                    select(func.count(), func.sum(c.queries), func.max(c.risk), func.avg(c.risk))
                    .where(group)
                )
            ).one()
            if not pooled[0]:
                return None
            levels: dict[str, int] = dict((await conn.execute(
                select(c.level, func.count()).where(group).group_by(c.level))).all())
            reasons = (await conn.execute(_reason_counts(conn.dialect.name, group))).all()
            riskiest = select(client_risk).where(group).order_by(c.risk.desc(), c.client)
            top = [_record(row) for row in (await conn.execute(
                riskiest.limit(CAMPAIGN_CLIENTS))).mappings()]
            mapped = list((await conn.execute(
                riskiest.with_only_columns(c.client).limit(pictures.MAP_CLIENTS))).scalars())
            drawn, outside = await _drawn(conn, top, entity, {client, *linked}, focus)
            links, link_total = await _links(conn, drawn, outside)
            everyone = [r.client for r in (*drawn, *outside)]
            owners: dict[str, list[str]] = {}
            for name, account in await conn.execute(
                select(api_keys.c.client, api_keys.c.account)
                .where(api_keys.c.client.in_(everyone), api_keys.c.account.is_not(None))
                .distinct()
            ):
                owners.setdefault(name, []).append(account)
            accounts, account_total, arrivals = await _accounts(
                conn, select(c.client).where(group)
            )
        return Campaign(
            entity=entity,
            focus=client,
            members=pooled[0],
            queries=int(pooled[1] or 0),
            max_risk=float(pooled[2]),
            mean_risk=float(pooled[3]),
            levels={level: levels[level] for level in (*LEVELS, *levels) if level in levels},
            reasons=[(code, int(count)) for code, count in reasons],
            drawn=drawn,
            outside=outside,
            links=links,
            link_total=link_total,
            owners={name: tuple(sorted(found)) for name, found in owners.items()},
            accounts=accounts,
            account_total=account_total,
            arrivals=arrivals,
            mapped=mapped,
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


def timeline_query(client: str | ColumnElement[bool], start: datetime) -> Select[Any]:
    """The client's events since ``start`` counted and summed per hour, in the database.

    ``client`` may instead be a condition on ``request_events`` (the account page's).

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
        .where(events.client == client if isinstance(client, str) else client, events.ts >= start)
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


def timeline_hours(counts: Sequence[Any], now: datetime) -> list[Hour]:
    """``(hour, requests, refused, tokens_in, tokens_out)`` rows as 24 hours ending now."""
    start = now - timedelta(hours=24)
    buckets = [[0, 0, 0, 0] for _ in range(24)]
    for hour, *totals in counts:
        buckets[int(hour)] = [int(total or 0) for total in totals]
    return [Hour(start + timedelta(hours=i), *b) for i, b in enumerate(buckets)]


# --- campaigns -------------------------------------------------------------------------


async def _records(conn: AsyncConnection, names: Sequence[str]) -> list[ClientRecord]:
    out = []
    for start in range(0, len(names), 500):
        chunk = names[start : start + 500]
        query = select(client_risk).where(client_risk.c.client.in_(chunk))
        out += [_record(row) for row in (await conn.execute(query)).mappings()]
    return out


async def _spread(
    conn: AsyncConnection,
    top: list[ClientRecord],
    member: Callable[[ClientRecord], bool],
    focus: ClientRecord | None,
) -> list[ClientRecord]:
    """Up to ``CAMPAIGN_CLIENTS`` members in the order they are reached from the focus (or
    the riskiest member) along the strongest links, joining ones first: a connected picture
    of why they are one group, where the riskiest of a big entity would be scattered dots.
    Where the links run out (each client publishes its strongest 20), the riskiest members
    not reached fill the places. Reads at most ``CAMPAIGN_CLIENTS`` names a round."""
    start = focus or top[0]
    reached = {start.client: start}
    seen: dict[str, ClientRecord | None] = {r.client: r for r in top}  # records read
    pull: dict[str, tuple[bool, float]] = {}  # a client not tried -> its strongest link in
    tried = {start.client}

    def follow(record: ClientRecord) -> None:
        for link in record.links or ():
            if link["other"] not in tried:
                strength = (bool(link["joins"]) and not link["cut"], float(link["weight"]))
                pull[link["other"]] = max(pull.get(link["other"], strength), strength)

    follow(start)
    while pull and len(reached) < CAMPAIGN_CLIENTS:
        wanted = sorted(pull, key=lambda name: (not pull[name][0], -pull[name][1], name))
        wanted = wanted[: CAMPAIGN_CLIENTS - len(reached)]
        unread = [name for name in wanted if name not in seen]
        seen.update(dict.fromkeys(unread))
        seen.update((r.client, r) for r in await _records(conn, unread))
        for name in wanted:
            del pull[name]
            tried.add(name)
            record = seen[name]
            if record is not None and member(record):
                reached[name] = record
                follow(record)
    for record in top:
        if len(reached) >= CAMPAIGN_CLIENTS:
            break
        reached.setdefault(record.client, record)
    return list(reached.values())


async def _drawn(
    conn: AsyncConnection,
    top: list[ClientRecord],
    entity: str | None,
    names: set[str | None],
    focus: ClientRecord | None,
) -> tuple[list[ClientRecord], list[ClientRecord]]:
    """The group's clients to draw (riskiest first) and the outsiders they link to,
    ``CAMPAIGN_CLIENTS`` in all. Outsiders (an operator's cuts first, then the strongest
    links) take the places of the members reached last, up to ``CAMPAIGN_OUTSIDE``: what
    was cut away stays in sight."""

    def member(record: ClientRecord) -> bool:
        return record.entity == entity if entity is not None else record.client in names

    def strongest(records: list[ClientRecord]) -> dict[str, tuple[bool, float]]:
        inside = {r.client for r in records}
        found: dict[str, tuple[bool, float]] = {}
        for record in records:
            for link in record.links or ():
                if link["other"] not in inside:
                    mine = (bool(link["cut"]), float(link["weight"]))
                    found[link["other"]] = max(found.get(link["other"], mine), mine)
        return found

    reached = await _spread(conn, top, member, focus)
    candidates = strongest(reached)
    outsiders = [r for r in await _records(conn, sorted(candidates)) if not member(r)]
    places = min(len(outsiders), CAMPAIGN_OUTSIDE)
    drawn = reached[: CAMPAIGN_CLIENTS - places]  # the focus, reached first, stays
    reach = strongest(drawn)
    outside = sorted(
        (r for r in outsiders if r.client in reach),
        key=lambda r: (not reach[r.client][0], -reach[r.client][1], r.client),
    )[:places]
    return sorted(drawn, key=lambda r: (-r.risk, r.client)), outside


async def _links(
    conn: AsyncConnection, drawn: list[ClientRecord], outside: list[ClientRecord]
) -> tuple[list[LinkRow], int]:
    """Every link the drawn members published, one row a pair, strongest first, and how many
    there are. At most ``CAMPAIGN_LINKS``, kept in this order: each drawn client's strongest
    line (no client left unconnected by the bound), the other lines, the links leading out."""
    merged: dict[tuple[str, str], LinkRow] = {}
    for record in drawn:
        for link in record.links or ():
            a, b = sorted((record.client, link["other"]))
            seen = merged.get((a, b))
            row = LinkRow(record.client, link["other"], tuple(sorted(link["kinds"])),
                          float(link["weight"]), bool(link["joins"]), bool(link["cut"]))
            if seen is not None:
                row = replace(seen, kinds=tuple(sorted({*seen.kinds, *row.kinds})),
                              weight=max(seen.weight, row.weight), joins=seen.joins or row.joins,
                              cut=seen.cut or row.cut)
            merged[(a, b)] = row
    names = [r.client for r in drawn]
    cuts = detection_link_cuts.c
    cut = {
        (a, b) for a, b in await conn.execute(
            select(cuts.client, cuts.other).where(or_(cuts.client.in_(names), cuts.other.in_(names)))
        )
    }
    rows = [replace(row, cut=True) if pair in cut else row for pair, row in merged.items()]
    shown = {r.client for r in (*drawn, *outside)}
    rows.sort(key=lambda row: (-row.weight, row.client, row.other))
    first: dict[str, LinkRow] = {}
    for row in rows:
        if row.other in shown:
            first.setdefault(row.client, row)
            first.setdefault(row.other, row)
    chosen = set(first.values())
    kept = sorted(rows, key=lambda row: 0 if row in chosen else 1 if row.other in shown else 2)
    kept = kept[:CAMPAIGN_LINKS]
    return sorted(kept, key=lambda row: (-row.weight, row.client, row.other)), len(rows)


def _reason_counts(dialect: str, group: ColumnElement[bool]) -> Select[Any]:
    """``(code, members giving it)`` over the members ``group`` selects, most common first:
    counted in the database (the reasons column is a JSON array of objects with a code),
    so a view reads one row per code, however many members there are."""
    c = client_risk.c
    if dialect == "postgresql":
        element = func.json_array_elements(c.reasons).table_valued("value")
        code: ColumnElement[Any] = element.c.value.op("->>")(literal_column("'code'"))
    else:
        element = func.json_each(c.reasons).table_valued("value")
        code = func.json_extract(element.c.value, literal_column("'$.code'"))
    # Literal keys, not bound ones: PostgreSQL matches the GROUP BY to the select's
    # expression only when both are the same text.
    members = func.count(c.client.distinct())
    return (
        select(code, members)
        .select_from(client_risk)
        .join(element, true())
        .where(group)
        .group_by(code)
        .order_by(members.desc(), code)
    )


async def _accounts(
    conn: AsyncConnection, members: Select[Any]
) -> tuple[list[AccountRow], int, tuple[int, datetime | None]]:
    """The accounts holding keys of ``members`` (a select of client names): the earliest
    ``CAMPAIGN_ACCOUNTS`` to arrive, how many there are, and the most that arrived within
    one ``ARRIVAL_WINDOW`` with when that window starts. Three bounded reads, all counted
    in the database (a window function over arrival times in seconds)."""
    keys = api_keys.c
    owned = (
        select(
            keys.account,
            func.count(keys.client.distinct()).label("clients"),
            func.min(keys.created_at).label("first_key"),
        )
        .where(keys.account.is_not(None), keys.client.in_(members))
        .group_by(keys.account)
        .subquery()
    )
    arrived = func.coalesce(accounts.c.created_at, owned.c.first_key)
    joined = owned.outerjoin(accounts, accounts.c.account_id == owned.c.account)
    rows = await conn.execute(
        select(owned, accounts.c.created_at, accounts.c.verified)
        .select_from(joined)
        .order_by(arrived, owned.c.account)
        .limit(CAMPAIGN_ACCOUNTS)
    )
    found = [
        AccountRow(row.account, row.clients, row.first_key, row.created_at, bool(row.verified))
        for row in rows
    ]
    total = (await conn.execute(select(func.count()).select_from(joined))).scalar_one()
    if conn.dialect.name == "postgresql":
        seconds: ColumnElement[Any] = extract("epoch", arrived)
    else:  # stored as ISO text; julianday counts days from a fixed origin
        seconds = func.julianday(arrived) * 86400
    window = int(ARRIVAL_WINDOW.total_seconds())
    times = select(
        arrived.label("at"),
        func.count().over(order_by=seconds, range_=(0, window)).label("within"),
    ).select_from(joined).subquery()
    best = (
        await conn.execute(
            select(times.c.within, times.c.at)
            .order_by(times.c.within.desc(), times.c.at)
            .limit(1)
        )
    ).first()
    arrivals = (0, None) if best is None else (int(best.within), best.at)
    return found, int(total), arrivals
