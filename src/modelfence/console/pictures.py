"""What the console's pictures read: a client's risk over time and its query map.

Both come from tables the detector keeps bounded (``detect/published.py``): the risk
history (one row per published change, pruned after ``detection.history_retention_days``)
and the query maps (one row per client, drawn against one row per reference). Reads are
bounded too: at most :data:`HISTORY_ROWS` changes for one chart, at most
:data:`MAP_CLIENTS` clients in one pooled map. :class:`~modelfence.console.data.ConsoleData`
exposes them as ``risk_history`` and ``query_map``; ``console/charts.py`` turns them into
SVG geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.config import DetectionConfig
from modelfence.store import transaction
from modelfence.store.schema import (
    client_query_maps,
    client_risk,
    client_risk_history,
    reference_maps,
)

Span = Literal["24h", "7d"]  # the risk chart's spans (the client page's ``span``)
SPANS: dict[str, timedelta] = {"24h": timedelta(hours=24), "7d": timedelta(days=7)}
HISTORY_ROWS = 5_000  # newest changes read for one chart; older ones in the span are left out
MAP_CLIENTS = 500  # clients pooled in one query map, at most
COVERAGE_WINDOW = 100  # queries per client counted for coverage, as the coverage detector
THRESHOLDS = ("alert", "tighten", "degrade", "block")


@dataclass(frozen=True, slots=True)
class RiskPoint:
    at: datetime
    risk: float
    level: str


@dataclass(frozen=True, slots=True)
class RiskHistory:
    """A client's published risk from ``start`` to ``end``, with its tier's thresholds."""

    client: str
    start: datetime
    end: datetime
    tier: str
    thresholds: dict[str, float]  # alert, tighten, degrade, block (detection.tiers)
    before: RiskPoint | None  # the last change before ``start``: where the curve begins
    points: list[RiskPoint]  # changes from ``start`` on, oldest first
    truncated: bool  # more than HISTORY_ROWS changes: only the newest are in ``points``

    @property
    def empty(self) -> bool:
        return self.before is None and not self.points

    def level_changes(self) -> list[tuple[str, RiskPoint]]:
        """``(previous level, point)`` for each change of level inside the span."""
        out = []
        previous = self.before.level if self.before is not None else None
        for point in self.points:
            if previous is not None and point.level != previous:
                out.append((previous, point))
            previous = point.level
        return out

    def peak(self) -> RiskPoint | None:
        """The highest risk in the span (the value carried in from before counts)."""
        candidates = [*([self.before] if self.before else []), *self.points]
        return max(candidates, key=lambda p: p.risk, default=None)


@dataclass(frozen=True, slots=True)
class ReferenceMap:
    """The honest reference of one input space, projected once by the detector."""

    reference: str
    space: str
    cells: int  # K, the reference's k-means cells
    points: list[tuple[float, float]]  # the projected benign sample
    shares: list[float]  # each cell's share of benign queries
    coverage_median: float | None  # honest clients' distinct cells / queries (last 100)


@dataclass(frozen=True, slots=True)
class ClientQueries:
    client: str
    points: list[tuple[float, float]]  # newest last, at most 200
    cells: list[int]  # the reference cell of each point
    queries: int  # all the client's queries the detector has seen
    updated_at: datetime

    @property
    def window(self) -> list[int]:
        """Cells of the client's last ``COVERAGE_WINDOW`` queries."""
        return self.cells[-COVERAGE_WINDOW:]

    @property
    def covered(self) -> int:
        return len(set(self.window))


@dataclass(frozen=True, slots=True)
class QueryMap:
    """Clients' recent queries against one reference; one client, or several pooled."""

    reference: ReferenceMap
    clients: list[ClientQueries]
    # Asked for, but mapped against another reference (or another input space), or past
    # MAP_CLIENTS: not drawn. Clients with no map at all are in neither list.
    left_out: list[str]

    @property
    def points(self) -> int:
        return sum(len(c.points) for c in self.clients)

    @property
    def counted(self) -> int:
        """Queries behind :attr:`covered`: each client's last ``COVERAGE_WINDOW``."""
        return sum(len(c.window) for c in self.clients)

    @property
    def covered(self) -> int:
        """Distinct reference cells among each client's last ``COVERAGE_WINDOW`` queries."""
        return len({cell for c in self.clients for cell in c.window})

    def benign_cells(self, queries: int) -> float | None:
        """The cells an honest client's last ``queries`` (≤ 100) typically cover: the
        benign median coverage times ``queries``; None when the reference lacks it."""
        median = self.reference.coverage_median
        if median is None:
            return None
        return min(self.reference.cells, median * min(queries, COVERAGE_WINDOW))

    @property
    def benign_share_reached(self) -> float:
        """Share of honest queries that fall in the cells these queries reach."""
        shares = self.reference.shares
        reached = {cell for c in self.clients for cell in c.cells}
        return sum(shares[cell] for cell in reached if 0 <= cell < len(shares))

    def summary(self) -> dict[str, Any]:
        """The numbers and the clients' points, without the reference's sample (exports)."""
        single = self.clients[0] if len(self.clients) == 1 else None
        return {
            "reference": self.reference.reference,
            "space": self.reference.space,
            "cells": self.reference.cells,
            "covered": self.covered,
            "counted": self.counted,
            "benign_median_cells": self.benign_cells(len(single.window)) if single else None,
            "benign_share_reached": round(self.benign_share_reached, 4),
            "clients": [
                {"client": c.client, "queries": c.queries, "updated_at": c.updated_at,
                 "covered": c.covered, "points": c.points, "cells": c.cells}
                for c in self.clients
            ],
            "left_out": self.left_out,
        }


async def risk_history(
    engine: AsyncEngine, client: str, *, span: timedelta, detection: DetectionConfig,
    now: datetime | None = None,
) -> RiskHistory:
    """The client's published changes over ``span`` up to now, and its tier's thresholds."""
    end = now or datetime.now(UTC)
    start = end - span
    history = client_risk_history.c
    async with transaction(engine) as conn:
        rows = (
            await conn.execute(
                select(history.at, history.risk, history.level)
                .where(history.client == client, history.at >= start)
                .order_by(history.at.desc(), history.id.desc())
                .limit(HISTORY_ROWS + 1)
            )
        ).all()
        truncated = len(rows) > HISTORY_ROWS
        before = None
        if not truncated:
            before = (
                await conn.execute(
                    select(history.at, history.risk, history.level)
                    .where(history.client == client, history.at < start)
                    .order_by(history.at.desc(), history.id.desc())
                    .limit(1)
                )
            ).first()
        tier = await conn.scalar(select(client_risk.c.tier).where(client_risk.c.client == client))
    tier = tier or "default"
    levels = detection.tier(tier)
    return RiskHistory(
        client=client,
        start=start,
        end=end,
        tier=tier,
        thresholds={name: float(getattr(levels, name)) for name in THRESHOLDS},
        before=None if before is None else RiskPoint(*before),
        points=[RiskPoint(*row) for row in reversed(rows[:HISTORY_ROWS])],
        truncated=truncated,
    )


async def query_map(engine: AsyncEngine, clients: Sequence[str]) -> QueryMap | None:
    """The named clients' query maps pooled against one reference (the one most of their
    points are drawn against); None when none of them has a map or its reference is gone.

    At most :data:`MAP_CLIENTS` distinct names are read (the first ones given); the rest
    are listed in ``left_out`` like clients mapped against another reference.
    """
    names = list(dict.fromkeys(clients))
    asked, beyond = names[:MAP_CLIENTS], names[MAP_CLIENTS:]
    maps = client_query_maps.c
    async with transaction(engine) as conn:
        rows = (
            (await conn.execute(select(client_query_maps).where(maps.client.in_(asked))))
            .mappings()
            .all()
        )
        if not rows:
            return None
        weight: dict[str, int] = {}
        for row in rows:
            weight[row["reference"]] = weight.get(row["reference"], 0) + len(row["points"])
        chosen = max(sorted(weight), key=lambda ref: weight[ref])
        reference = (
            await conn.execute(
                select(reference_maps).where(reference_maps.c.reference == chosen)
            )
        ).mappings().first()
    if reference is None:
        return None
    by_name = {row["client"]: row for row in rows}
    drawn = [
        ClientQueries(
            client=name,
            points=[(float(x), float(y)) for x, y in by_name[name]["points"]],
            cells=[int(c) for c in by_name[name]["cells"]],
            queries=by_name[name]["queries"],
            updated_at=by_name[name]["updated_at"],
        )
        for name in asked
        if name in by_name and by_name[name]["reference"] == chosen
    ]
    left_out = [
        name for name in asked if name in by_name and by_name[name]["reference"] != chosen
    ]
    return QueryMap(
        reference=ReferenceMap(
            reference=reference["reference"],
            space=reference["space"],
            cells=reference["cells"],
            points=[(float(x), float(y)) for x, y in reference["points"]],
            shares=[float(s) for s in reference["shares"]],
            coverage_median=reference["coverage_median"],
        ),
        clients=drawn,
        left_out=left_out + beyond,
    )
