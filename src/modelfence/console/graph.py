"""The campaign graph, laid out on the server: positions and shapes the template draws as SVG.

:func:`layout` is a small force layout (Fruchterman-Reingold) started from a fixed seed:
the same clients and links give the same picture, whatever order they come in, and no
script runs in the page. :func:`draw` turns a :class:`~modelfence.console.data.Campaign`
into what the template writes out: clients as circles (colour: level; area: queries),
accounts as squares, links as lines (colour: the kind of the strongest evidence; width:
weight; lighter when the link does not join; dashed when cut). Every name stays data for
the template, which escapes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modelfence.console.data import Campaign
from modelfence.detect.linking import WEIGHTS

WIDTH, HEIGHT = 800, 560
MARGIN = 60  # room for the labels around the outermost nodes
MAX_ACCOUNTS = 10  # account squares drawn at most, beside the clients (60 nodes in all)
MAX_WEIGHT_LABELS = 24  # more lines than this: weights only in the table and the tooltips
SEED = 20_261_203
# Pull toward the centre. Strong, so that clients with one link (an outsider, an account)
# stay near the rest instead of flying out and squeezing the group into a corner of the
# picture once it is scaled to fit.
GRAVITY = 2.0

# Kinds of evidence drawn alike: who owns the keys, where requests come from, how they
# behave, and the weak traits of the accounts' sign-up.
FAMILIES: dict[str, str] = {
    "account": "owner",
    "payment": "owner",
    "organisation": "owner",
    "fingerprint": "network",
    "ip_prefix": "network",
    "lockstep": "behaviour",
    "frame": "behaviour",
    "signup_network": "signup",
    "email_domain": "signup",
}


def layout(
    nodes: Sequence[str],
    edges: Sequence[tuple[str, str, float]],
    *,
    seed: int = SEED,
    iterations: int = 250,
) -> dict[str, tuple[float, float]]:
    """Positions in the unit square for ``nodes``, pulled together by ``edges`` (a, b,
    strength in 0..1) and apart by each other. Deterministic: nodes are placed in name order
    from ``seed``, and edges between the same pair count once (the strongest).

    >>> layout(["a", "b"], [("a", "b", 1.0)]) == layout(["b", "a"], [("b", "a", 1.0)])
    True
    """
    order = sorted(set(nodes))
    n = len(order)
    if n <= 1:
        return {name: (0.5, 0.5) for name in order}
    index = {name: i for i, name in enumerate(order)}
    pull = np.zeros((n, n))
    for a, b, strength in edges:
        i, j = index[a], index[b]
        if i != j:
            pull[i, j] = pull[j, i] = max(pull[i, j], strength)
    position = np.random.default_rng(seed).random((n, 2))
    k = math.sqrt(1.0 / n)  # the distance at which pull and push balance for a full link
    for step in range(iterations):
        delta = position[:, None, :] - position[None, :, :]
        distance = np.maximum(np.linalg.norm(delta, axis=2), 1e-3)
        force = k * k / distance - pull * distance * distance / k
        np.fill_diagonal(force, 0.0)
        move = (delta / distance[:, :, None] * force[:, :, None]).sum(axis=1)
        move += GRAVITY * (0.5 - position)
        length = np.maximum(np.linalg.norm(move, axis=1), 1e-9)
        step_size = 0.1 * (1.0 - step / iterations)  # cooling
        position += move / length[:, None] * np.minimum(length, step_size)[:, None]
    low, span = position.min(axis=0), np.ptp(position, axis=0)
    unit = (position - low) / np.where(span > 0, span, 1.0)
    return {name: (round(float(x), 4), round(float(y), 4)) for name, (x, y) in zip(order, unit)}


@dataclass(frozen=True, slots=True)
class Dot:
    """A client."""

    client: str
    label: str  # the name, shortened to fit
    x: float
    y: float
    r: float
    level: str
    risk: float
    queries: int
    member: bool  # False: outside the group, drawn because a member links to it
    focus: bool  # the client the page was asked for


@dataclass(frozen=True, slots=True)
class Square:
    """An account of the group holding keys of drawn members."""

    account: str
    label: str
    x: float
    y: float
    clients: int  # drawn members it holds keys of


@dataclass(frozen=True, slots=True)
class Line:
    """A link between two drawn clients."""

    a: str
    b: str
    x1: float
    y1: float
    x2: float
    y2: float
    kinds: tuple[str, ...]
    family: str
    weight: float
    joins: bool
    cut: bool

    @property
    def width(self) -> float:
        return round(1.0 + 4.0 * self.weight, 2)


@dataclass(frozen=True, slots=True)
class Drawing:
    dots: list[Dot]
    squares: list[Square]
    lines: list[Line]
    owned: list[tuple[float, float, float, float]]  # client-to-account lines
    hidden_clients: int  # members of the group not drawn
    hidden_accounts: int  # accounts involved not drawn
    hidden_links: int  # links listed, not drawn (an end not drawn)
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def weight_labels(self) -> bool:
        return len(self.lines) <= MAX_WEIGHT_LABELS


def shorten(name: str, size: int = 18) -> str:
    return name if len(name) <= size else name[: size - 1] + "…"


def draw(campaign: Campaign) -> Drawing:
    """What the template draws for ``campaign``: every client it holds, the accounts that
    own most of them (``MAX_ACCOUNTS``), and the links between drawn clients."""
    clients = [*campaign.drawn, *campaign.outside]
    names = {r.client for r in clients}
    held: dict[str, int] = {}  # the group's accounts, by drawn members holding their keys
    for record in campaign.drawn:
        for account in campaign.owners.get(record.client, ()):
            held[account] = held.get(account, 0) + 1
    shown = sorted(held, key=lambda account: (-held[account], account))[:MAX_ACCOUNTS]
    links = [link for link in campaign.links if link.client in names and link.other in names]
    pulls = [
        (f"c:{link.client}", f"c:{link.other}",
         0.1 if link.cut else link.weight if link.joins else link.weight / 2)
        for link in links
    ]
    pulls += [
        (f"c:{name}", f"a:{account}", 0.5)
        for name in sorted(names) for account in campaign.owners.get(name, ()) if account in shown
    ]
    unit = layout([f"c:{name}" for name in names] + [f"a:{a}" for a in shown], pulls)

    def at(key: str) -> tuple[float, float]:
        x, y = unit[key]
        return (round(MARGIN + x * (WIDTH - 2 * MARGIN), 1),
                round(MARGIN + y * (HEIGHT - 2 * MARGIN), 1))

    most = max((r.queries for r in clients), default=0) or 1
    members = {r.client for r in campaign.drawn}
    dots = [
        Dot(r.client, shorten(r.client), *at(f"c:{r.client}"),
            r=round(6.0 + 12.0 * math.sqrt(max(r.queries, 0) / most), 1), level=r.level,
            risk=r.risk, queries=r.queries, member=r.client in members,
            focus=r.client == campaign.focus)
        for r in clients
    ]
    squares = [Square(a, shorten(a, 14), *at(f"a:{a}"), held[a]) for a in shown]
    lines = []
    for link in links:
        strongest = max(link.kinds, key=lambda kind: (WEIGHTS.get(kind, 0.0), kind))
        lines.append(Line(link.client, link.other, *at(f"c:{link.client}"),
                          *at(f"c:{link.other}"), kinds=link.kinds,
                          family=FAMILIES.get(strongest, "other"), weight=link.weight,
                          joins=link.joins and not link.cut, cut=link.cut))
    owned = [
        (*at(f"c:{name}"), *at(f"a:{account}"))
        for name in sorted(names) for account in campaign.owners.get(name, ()) if account in shown
    ]
    return Drawing(
        dots=sorted(dots, key=lambda dot: (dot.focus, dot.risk, dot.client)),  # focus on top
        squares=squares,
        lines=lines,
        owned=owned,
        hidden_clients=campaign.members - len(campaign.drawn),
        hidden_accounts=campaign.account_total - len(shown),
        hidden_links=len(campaign.links) - len(links),
    )
