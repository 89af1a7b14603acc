"""SVG geometry for the console's pictures, computed on the server (no script anywhere).

:func:`risk_chart` lays out a client's risk over time (a step curve: risk holds until the
next published change) with its tier's thresholds as labelled lines and each change of
level marked; :func:`scatter` lays out a query map: the honest reference's sample and the
clients' queries. Templates draw the result (``templates/charts.html``) with presentation
attributes and the stylesheet's classes only: the CSP allows no inline ``style``. Sizes
are bounded: at most :data:`MAX_VERTICES` curve points, :data:`MAX_MARKS` level marks and
:data:`MAX_QUERY_DOTS` query dots, however much data there is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from modelfence.console.pictures import QueryMap, RiskHistory, RiskPoint

WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 40, 110, 12, 28  # margins: risk labels, threshold labels, time
BUCKETS = 240  # time buckets a long history is thinned to (each keeps its extremes)
MAX_VERTICES = 4 * BUCKETS
MAX_MARKS = 60
LABEL_GAP = 12  # threshold labels at least this far apart vertically
MAP_SIZE, MAP_PAD = 360, 10
MAX_QUERY_DOTS = 2_000


@dataclass(frozen=True, slots=True)
class Threshold:
    name: str
    value: float
    y: float
    label_y: float


@dataclass(frozen=True, slots=True)
class Mark:
    x: float
    y: float
    previous: str
    level: str
    at: datetime
    risk: float


@dataclass(frozen=True, slots=True)
class Tick:
    at: float  # x or y
    label: str


@dataclass(frozen=True, slots=True)
class RiskChart:
    width: int
    height: int
    left: float
    right: float
    top: float
    bottom: float
    path: str  # polyline points, "x,y x,y …"
    thresholds: list[Threshold]
    marks: list[Mark]  # the newest MAX_MARKS changes of level
    hidden_marks: int  # older changes of level not marked
    x_ticks: list[Tick]
    y_ticks: list[Tick]


def risk_chart(history: RiskHistory) -> RiskChart | None:
    """The chart of ``history``; None when there is nothing to draw (no change, ever)."""
    if history.empty:
        return None
    left, right, top, bottom = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM
    span = (history.end - history.start).total_seconds() or 1.0

    def x(at: datetime) -> float:
        share = (at - history.start).total_seconds() / span
        return round(left + min(1.0, max(0.0, share)) * (right - left), 1)

    def y(risk: float) -> float:
        return round(bottom - min(1.0, max(0.0, risk)) * (bottom - top), 1)

    points = _thinned(history.points, history.start, span)
    vertices: list[tuple[float, float]] = []
    current = history.before.risk if history.before is not None else None
    if current is not None:
        vertices.append((left, y(current)))
    for point in points:
        px = x(point.at)
        if current is not None:
            vertices.append((px, y(current)))  # risk held until this change
        vertices.append((px, y(point.risk)))
        current = point.risk
    assert current is not None  # not empty
    vertices.append((right, y(current)))  # and holds until now

    changes = history.level_changes()
    marks = [
        Mark(x(p.at), y(p.risk), previous, p.level, p.at, p.risk)
        for previous, p in changes[-MAX_MARKS:]
    ]
    return RiskChart(
        width=WIDTH, height=HEIGHT, left=left, right=right, top=top, bottom=bottom,
        path=" ".join(f"{vx:g},{vy:g}" for vx, vy in vertices),
        thresholds=_thresholds(history.thresholds, y),
        marks=marks,
        hidden_marks=max(0, len(changes) - MAX_MARKS),
        x_ticks=_time_ticks(history.start, history.end, x),
        y_ticks=[Tick(y(v), f"{v:.1f}") for v in (0.0, 0.5, 1.0)],
    )


def _thinned(points: list[RiskPoint], start: datetime, span: float) -> list[RiskPoint]:
    """At most ``MAX_VERTICES`` points: per time bucket its first, lowest, highest and last
    (every level change stays a mark, whatever is thinned here)."""
    if len(points) <= MAX_VERTICES:
        return points
    buckets: dict[int, list[RiskPoint]] = {}
    for point in points:
        share = (point.at - start).total_seconds() / span
        buckets.setdefault(min(BUCKETS - 1, max(0, int(share * BUCKETS))), []).append(point)
    out: list[RiskPoint] = []
    for index in sorted(buckets):
        group = buckets[index]
        keep = {id(group[0]): group[0], id(group[-1]): group[-1]}
        for extreme in (min(group, key=lambda p: p.risk), max(group, key=lambda p: p.risk)):
            keep[id(extreme)] = extreme
        out += sorted(keep.values(), key=lambda p: p.at)
    return out


def _thresholds(values: dict[str, float], y: Callable[[float], float]) -> list[Threshold]:
    ordered = sorted(values.items(), key=lambda item: -item[1])  # top of the chart first
    out: list[Threshold] = []
    label_y = float("-inf")
    for name, value in ordered:
        line_y = y(value)
        label_y = max(line_y + 4, label_y + LABEL_GAP)  # pushed down past the label above
        out.append(Threshold(name, value, line_y, round(label_y, 1)))
    return out


def _time_ticks(start: datetime, end: datetime, x: Callable[[datetime], float]) -> list[Tick]:
    span = end - start
    if span <= timedelta(days=1):
        step, fmt = timedelta(hours=4), "%H:00"
        first = start.replace(minute=0, second=0, microsecond=0)
        first += timedelta(hours=(4 - first.hour % 4) % 4)
    else:
        step, fmt = timedelta(days=1), "%m-%d"
        first = start.replace(hour=0, minute=0, second=0, microsecond=0)
    ticks = []
    at = first
    while at <= end:
        if at > start:  # not on the left edge: the span's start is no landmark
            ticks.append(Tick(x(at), at.strftime(fmt)))
        at += step
    return ticks


@dataclass(frozen=True, slots=True)
class Dot:
    x: float
    y: float
    outside: bool = False  # beyond the reference's area: drawn on its edge


@dataclass(frozen=True, slots=True)
class Scatter:
    size: int
    reference: list[Dot]
    queries: list[Dot]  # the newest MAX_QUERY_DOTS of the clients' queries
    outside: int  # queries beyond the reference's area (drawn on its edge)
    total: int  # the clients' points on the map (drawn or not)


def scatter(query_map: QueryMap) -> Scatter:
    """The map framed on the honest reference: queries beyond it sit on the frame's edge
    (counted in ``outside``) rather than shrinking the reference to a dot."""
    reference = query_map.reference.points
    queries = [p for c in query_map.clients for p in c.points]
    framed = reference or queries
    xs, ys = [p[0] for p in framed], [p[1] for p in framed]
    x0, x1 = _padded(min(xs, default=-1.0), max(xs, default=1.0))
    y0, y1 = _padded(min(ys, default=-1.0), max(ys, default=1.0))
    inner = MAP_SIZE - 2 * MAP_PAD

    def dot(px: float, py: float) -> Dot:
        cx, cy = min(max(px, x0), x1), min(max(py, y0), y1)
        return Dot(
            round(MAP_PAD + (cx - x0) / (x1 - x0) * inner, 1),
            round(MAP_PAD + (y1 - cy) / (y1 - y0) * inner, 1),  # up is up
            (cx, cy) != (px, py),
        )

    drawn = [dot(px, py) for px, py in queries]
    stride = -(-len(drawn) // MAX_QUERY_DOTS) if drawn else 1
    return Scatter(
        size=MAP_SIZE,
        reference=[dot(px, py) for px, py in reference],
        queries=drawn[::-1][::stride][::-1],  # thinned evenly, the newest kept
        outside=sum(d.outside for d in drawn),
        total=len(drawn),
    )


def _padded(low: float, high: float) -> tuple[float, float]:
    if high - low < 1e-9:
        return low - 1.0, high + 1.0
    pad = (high - low) * 0.06
    return low - pad, high + pad
