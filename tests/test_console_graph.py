"""The campaign view's reads and drawing, in process: the group pooled in SQL on both
databases (members, queries, risk, levels, reasons, accounts and their arrival), the drawn
clients bounded with outsiders and the focus kept, links merged from both sides with an
operator's cut read at once; the layout deterministic and the drawing bounded."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.console.data import (
    CAMPAIGN_ACCOUNTS,
    CAMPAIGN_CLIENTS,
    CAMPAIGN_OUTSIDE,
    AccountRow,
    Campaign,
    ConsoleData,
    LinkRow,
)
from modelfence.console.graph import HEIGHT, MARGIN, MAX_ACCOUNTS, WIDTH, draw, layout
from modelfence.detect.state import SqlState
from modelfence.identity import SqlKeyStore
from modelfence.identity.base import AccountMetadata
from modelfence.store import create_tables

from .test_admin_api import SECRET
from .test_console_pages import record
from .test_store_database import scratch_engine, store_url  # noqa: F401  (store_url: fixture)

TIMING = {"code": "machine_timing", "text": "regularity 0.97 > 0.9", "score": 0.7}
SWEEP = {"code": "perturbation_sweep", "text": "0.8 near-duplicates", "score": 0.6}


def link(other: str, *kinds: str, weight: float, joins: bool = True,
         cut: bool = False) -> dict[str, Any]:
    return {"other": other, "kinds": list(kinds), "weight": weight, "joins": joins, "cut": cut}


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:  # noqa: F811
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        yield engine


async def test_a_campaign_pools_its_members_and_reads_links_from_both_sides(
    engine: AsyncEngine,
) -> None:
    state = SqlState(engine)
    await state.publish([
        record("a", 0.9, level="block", entity="ent_c", queries=500, reasons=[TIMING, SWEEP],
               links=[link("b", "fingerprint", weight=0.8),
                      link("x", "ip_prefix", weight=0.6, cut=True)]),
        record("b", 0.5, level="alert", entity="ent_c", queries=300, reasons=[TIMING],
               links=[link("a", "fingerprint", "ip_prefix", weight=0.92),
                      link("y", "email_domain", weight=0.3, joins=False)]),
        record("c", 0.1, entity="ent_c", queries=200, links=[link("a", "account", weight=1.0)]),
        record("x", 0.2, entity="ent_other"),
        record("y", 0.05),
    ])
    keys = SqlKeyStore(engine, SECRET)
    day = datetime(2026, 11, 1, tzinfo=UTC)
    for client, account, signed_up in [("a", "acme", day), ("c", "acme", day),
                                       ("b", "burner", day + timedelta(hours=5))]:
        await keys.create(client, "default", account)
        await keys.put_account(account, AccountMetadata(created_at=signed_up))
    await keys.create("b", "default", "late")  # signed up now, with the key
    await state.set_cut("x", "a", cut=True, note="another team")  # after the last publish
    data = ConsoleData(state)

    campaign = await data.campaign(entity="ent_c")
    assert campaign is not None
    assert (campaign.members, campaign.queries) == (3, 1000)
    assert campaign.max_risk == pytest.approx(0.9) and campaign.mean_risk == pytest.approx(0.5)
    assert campaign.levels == {"normal": 1, "alert": 1, "block": 1}  # the ladder's order
    assert campaign.reasons == [("machine_timing", 2), ("perturbation_sweep", 1)]
    assert [r.client for r in campaign.drawn] == ["a", "b", "c"]
    assert [r.client for r in campaign.outside] == ["x", "y"]  # the cut one first
    assert campaign.mapped == ["a", "b", "c"]
    rows = {(row.client, row.other): row for row in campaign.links}
    assert set(rows) == {("a", "b"), ("a", "x"), ("b", "y"), ("c", "a")}
    both = rows[("a", "b")]  # each side published it: kinds joined, the highest weight
    assert both.kinds == ("fingerprint", "ip_prefix") and both.weight == pytest.approx(0.92)
    assert rows[("a", "x")].cut and not rows[("b", "y")].joins
    assert campaign.link_total == 4 and campaign.links[0].other == "a"  # strongest first

    assert [a.account for a in campaign.accounts] == ["acme", "burner", "late"]
    acme, burner, late = campaign.accounts
    assert (acme.clients, acme.created_at, burner.clients) == (2, day, 1)
    assert late.created_at is not None and late.created_at > day + timedelta(days=1)
    assert campaign.account_total == 3
    legacy = AccountRow("legacy", 1, day, None, False)  # a key older than the registry
    assert legacy.arrived == day
    assert campaign.arrivals == (2, day)  # acme and burner within 24 hours; the third later

    assert await data.campaign(entity="ent_nobody") is None
    assert await data.campaign(client="nobody") is None
    by_member = await data.campaign(client="b")
    assert by_member is not None and by_member.entity == "ent_c" and by_member.focus == "b"

    solo = await data.campaign(client="y")  # no entity: itself and its direct links
    assert solo is not None and solo.entity is None and solo.members == 1
    assert [r.client for r in solo.drawn] == ["y"] and solo.links == []


async def test_every_account_and_reason_is_counted_though_few_accounts_are_read(
    engine: AsyncEngine,
) -> None:
    """The count and the busiest day cover every account, past the ``CAMPAIGN_ACCOUNTS``
    listed (read in order of arrival); reasons count members, once each however often one
    gives a code."""
    state = SqlState(engine)
    await state.publish([
        record(f"m{i}", 0.5, entity="ent_big", reasons=[TIMING, TIMING] if i == 1 else [SWEEP])
        for i in range(3)
    ])
    keys = SqlKeyStore(engine, SECRET)
    start = datetime(2020, 1, 1, tzinfo=UTC)
    burst = start + timedelta(days=7 * CAMPAIGN_ACCOUNTS)
    for i in range(CAMPAIGN_ACCOUNTS + 5):  # a week apart, then the last five within minutes
        signed_up = start + timedelta(days=7 * i) if i < CAMPAIGN_ACCOUNTS else burst + timedelta(
            minutes=i)
        await keys.create(f"m{i % 3}", "default", f"acct{i:03d}")
        await keys.put_account(f"acct{i:03d}", AccountMetadata(created_at=signed_up))
    campaign = await ConsoleData(state).campaign(entity="ent_big")
    assert campaign is not None
    assert campaign.account_total == CAMPAIGN_ACCOUNTS + 5
    assert [a.account for a in campaign.accounts] == [
        f"acct{i:03d}" for i in range(CAMPAIGN_ACCOUNTS)]
    assert campaign.arrivals == (5, burst + timedelta(minutes=CAMPAIGN_ACCOUNTS))
    assert campaign.reasons == [("perturbation_sweep", 2), ("machine_timing", 1)]


async def test_a_big_entity_draws_the_neighbourhood_of_the_focus_within_bounds(
    engine: AsyncEngine,
) -> None:
    state = SqlState(engine)
    members = [
        record(f"m{i:04}", 1 - i / 1000, entity="ent_big",
               links=[link(f"m{(i + 1) % 300:04}", "ip_prefix", weight=0.6),
                      link(f"o{i:04}", "email_domain", weight=0.3, joins=False)])
        for i in range(300)
    ]
    await state.publish(members)
    await state.publish([record(f"o{i:04}", 0.1) for i in range(300)])
    data = ConsoleData(state)
    campaign = await data.campaign(client="m0150")  # a member of middling risk
    assert campaign is not None and campaign.members == 300
    assert len(campaign.drawn) + len(campaign.outside) == CAMPAIGN_CLIENTS
    assert len(campaign.outside) == CAMPAIGN_OUTSIDE
    # Along the ring from the focus, joining links first: a connected stretch of it, riskiest
    # first; the outsiders are the members' weak links, each to a drawn member.
    drawn = [r.client for r in campaign.drawn]
    assert drawn == [f"m{i:04}" for i in range(150, 150 + CAMPAIGN_CLIENTS - CAMPAIGN_OUTSIDE)]
    drawn_links = [row for row in campaign.links if row.other in drawn]
    assert len(drawn_links) == len(drawn) - 1
    assert {r.client for r in campaign.outside} <= {row.other for row in campaign.links}
    assert all(r.client.startswith("o") for r in campaign.outside)

    riskiest = await data.campaign(entity="ent_big")  # no focus: from the riskiest member
    assert riskiest is not None and riskiest.drawn[0].client == "m0000"


def test_the_layout_is_deterministic_whatever_the_order() -> None:
    rng = random.Random(7)
    nodes = [f"n{i}" for i in range(40)]
    edges = [(rng.choice(nodes), rng.choice(nodes), rng.random()) for _ in range(80)]
    first = layout(nodes, edges)
    shuffled_nodes, shuffled_edges = nodes[:], [(b, a, w) for a, b, w in edges]
    rng.shuffle(shuffled_nodes)
    rng.shuffle(shuffled_edges)
    assert layout(shuffled_nodes, shuffled_edges) == first
    assert set(first) == set(nodes)
    assert all(0 <= x <= 1 and 0 <= y <= 1 for x, y in first.values())
    assert layout(nodes, edges, seed=1) != first  # the seed, not luck, makes it repeat
    assert layout([], []) == {} and layout(["one"], []) == {"one": (0.5, 0.5)}


def test_linked_clients_are_laid_out_closer_than_strangers() -> None:
    pairs = [(f"a{i}", f"b{i}") for i in range(10)]
    at = layout([n for pair in pairs for n in pair], [(a, b, 1.0) for a, b in pairs])

    def distance(p: str, q: str) -> float:
        return float(((at[p][0] - at[q][0]) ** 2 + (at[p][1] - at[q][1]) ** 2) ** 0.5)

    linked = sum(distance(a, b) for a, b in pairs) / len(pairs)
    strangers = sum(distance(pairs[i][0], pairs[i + 1][0]) for i in range(9)) / 9
    assert linked < strangers / 2


def _campaign(members: int, outside: int, accounts: int) -> Campaign:
    now = datetime.now(UTC)
    drawn = [record(f"m{i}", 1 - i / 100, entity="ent_1", queries=i * 10) for i in range(members)]
    away = [record(f"o{i}", 0.1) for i in range(outside)]
    links = [LinkRow(f"m{i}", f"m{i + 1}", ("fingerprint",), 0.8, True, i == 0)
             for i in range(members - 1)]
    links += [LinkRow(f"m{i}", f"o{i}", ("email_domain",), 0.3, False, False)
              for i in range(outside)]
    links += [LinkRow("m0", "not-drawn", ("lockstep",), 0.9, True, False)]
    return Campaign(
        entity="ent_1", focus="m3", members=10_000, queries=0, max_risk=1.0, mean_risk=0.5,
        levels={"normal": 10_000}, reasons=[], drawn=drawn, outside=away, links=links,
        link_total=len(links), owners={f"m{i}": (f"acct{i % accounts}",) for i in range(members)},
        accounts=[AccountRow(f"acct{i}", 1, now, None, False) for i in range(accounts)],
        account_total=accounts, arrivals=(accounts, now), mapped=[],
    )


def test_the_drawing_is_bounded_and_within_the_picture() -> None:
    drawing = draw(_campaign(40, 10, 30))
    assert len(drawing.dots) == 50 and len(drawing.squares) == MAX_ACCOUNTS
    assert len(drawing.dots) + len(drawing.squares) <= 60
    assert (drawing.hidden_clients, drawing.hidden_accounts) == (10_000 - 40, 30 - MAX_ACCOUNTS)
    assert drawing.hidden_links == 1  # to a client not drawn: listed, not drawn
    assert len(drawing.lines) == 39 + 10
    assert sum(line.cut for line in drawing.lines) == 1
    assert all(not line.joins for line in drawing.lines if line.cut)
    assert sum(dot.focus for dot in drawing.dots) == 1 and drawing.dots[-1].client == "m3"
    assert sum(not dot.member for dot in drawing.dots) == 10
    for dot in drawing.dots:
        assert MARGIN <= dot.x <= WIDTH - MARGIN and MARGIN <= dot.y <= HEIGHT - MARGIN
    assert draw(_campaign(40, 10, 30)) == drawing
