"""The campaign view against a real ``modelfence serve``: an entity drawn as inline SVG with
its links (cut ones dashed, weak ones light) and their evidence in words, pooled numbers,
the accounts' arrival, a cut made from the page; hostile names escaped inside the SVG; a
10,000-member entity drawn within bounds; a client without entity; 404 and 400 pages; the
members' pooled query map when the detector has published one; and in Chromium, from the
client list to the graph, a cut, a node followed, with no CSP violation."""

from __future__ import annotations

import os
import re
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from modelfence.console.data import CAMPAIGN_LINKS
from modelfence.detect.published import write_maps
from modelfence.detect.state import SqlState
from modelfence.testing.processes import GatewayProcess

from .console_client import ConsoleClient, location
from .test_console_accounts import publish
from .test_console_browser import log_in, page  # noqa: F401  (page: Chromium, or a failure saying how)
from .test_console_graph import SWEEP, TIMING, link
from .test_console_pages import HOSTILE_NAMES, browser, gateway, record, state  # noqa: F401

ALERT = re.compile(r'role="alert">([^<]*)')


def graph_of(html: str) -> ET.Element:
    """The page's graph, parsed as XML: it must be well-formed whatever the names are."""
    start = html.index('<svg class="graph"')
    return ET.fromstring(html[start : html.index("</svg>", start) + len("</svg>")])


def drawn_clients(svg: ET.Element) -> dict[str, ET.Element]:
    """Client name -> its circle, read back from each node's link."""
    out = {}
    for a in svg.iter("a"):
        circle = a.find("circle")
        if circle is not None:
            href = a.get("href", "")
            assert href.startswith("/console/client?name="), href
            name = (a.findtext("title") or "").rsplit(": ", 1)[0]
            out[name] = circle
            assert href == "/console/client?name=" + quote(name, safe="/")
    return out


def link_lines(svg: ET.Element) -> dict[str, ET.Element]:
    """'a and b' -> the link's line."""
    return {
        (line.findtext("title") or "").rsplit(": ", 1)[0]: line
        for line in svg.iter("line") if "link" in (line.get("class") or "").split()
    }


async def test_an_entity_is_drawn_with_its_links_and_why_and_a_link_is_cut_from_it(
    gateway: GatewayProcess, state: SqlState, browser: ConsoleClient  # noqa: F811
) -> None:
    await state.publish([
        record("a", 0.9, level="block", entity="ent_c", queries=500, reasons=[TIMING, SWEEP],
               links=[link("b", "fingerprint", weight=0.8),
                      link("x", "ip_prefix", weight=0.6, cut=True)]),
        record("b", 0.5, level="alert", entity="ent_c", queries=300, reasons=[TIMING],
               links=[link("a", "fingerprint", weight=0.8),
                      link("y", "email_domain", weight=0.3, joins=False),
                      link("c", "lockstep", weight=0.7)]),
        record("c", 0.1, entity="ent_c", queries=200),
        record("x", 0.2, entity="ent_other"),
        record("y", 0.05),
    ])
    signed_up = datetime.now(UTC) - timedelta(days=3)
    for client, account, hours in [("a", "acme", 0), ("b", "bravo", 2), ("c", "charlie", 5)]:
        gateway.create_key(client, account=account, metadata={
            "created_at": (signed_up + timedelta(hours=hours)).isoformat()})

    answer = browser.get("/campaign", entity="ent_c")
    assert answer.status_code == 200, answer.text[:500]
    svg = graph_of(answer.text)
    assert svg.findtext("title") == "Entity ent_c: who is linked to whom"
    assert "5 clients, 3 accounts and the 4 links" in (svg.get("aria-label") or "")
    nodes = drawn_clients(svg)
    assert set(nodes) == {"a", "b", "c", "x", "y"}
    assert "node-block" in (nodes["a"].get("class") or "") and "outside" in (
        nodes["x"].get("class") or "")
    lines = link_lines(svg)
    assert set(lines) == {"a and b", "a and x", "b and y", "b and c"}
    assert lines["a and x"].get("stroke-dasharray") and "cut" in lines["a and x"].get("class", "")
    assert lines["b and y"].get("stroke-opacity") == "0.4"  # below the joining weight: light
    assert lines["a and b"].get("stroke-dasharray") is None
    assert lines["a and b"].get("stroke-opacity") is None
    assert [r.get("class") for r in svg.iter("rect")] == ["account"] * 3

    text = answer.text
    assert "one client fingerprint" in text and "busy in the same moments" in text
    assert "their accounts share an e-mail domain" in text
    assert text.count("Cut link</button>") == 3  # every link but the cut one
    assert 'name="back_entity" value="ent_c"' in text
    assert "<dt>Queries scored</dt><dd>1000 in all</dd>" in text
    assert "highest 0.900, mean 0.500" in text
    assert "<strong>machine_timing</strong>: 2 of 3 members" in text
    assert "3 of them arrived within 24 hours of one another" in text
    assert "No query map" in text  # none published for these clients
    assert "<script" not in text and " style=" not in text

    clients = browser.get("/clients", entity="ent_c").text
    assert 'href="/console/campaign?entity=ent_c"' in clients
    client = browser.get("/client", name="a").text
    assert 'href="/console/campaign?entity=ent_c"' in client
    assert 'href="/console/campaign?client=a"' in client

    cut = browser.post("/cut", {"client": "a", "other": "b", "reason": "one office, two teams",
                                "back_entity": "ent_c"})
    assert location(cut) == "/console/campaign?entity=ent_c&done=cut"
    after = browser.get("/campaign", entity="ent_c", done="cut")
    assert "Done: link cut" in after.text
    assert link_lines(graph_of(after.text))["a and b"].get("stroke-dasharray")
    assert after.text.count("Cut link</button>") == 2
    assert await state.cuts() == [("a", "b")]
    focused = browser.get("/campaign", client="b")
    assert "Campaign: entity ent_c" in focused.text
    assert "focus" in (drawn_clients(graph_of(focused.text))["b"].get("class") or "")
    assert 'name="back_client" value="b"' in focused.text


async def test_hostile_names_are_escaped_inside_the_graph(
    gateway: GatewayProcess, state: SqlState, browser: ConsoleClient  # noqa: F811
) -> None:
    names = [*HOSTILE_NAMES, "名" * 200, "</svg><img src=x onerror=alert(1)>", "a'b\"c<d>&e"]
    await state.publish([
        record(name, 0.9 - i / 100, level="alert", entity="ent_h",
               links=[link(names[(i + 1) % len(names)], "fingerprint", weight=0.8)])
        for i, name in enumerate(names)
    ])
    answer = browser.get("/campaign", entity="ent_h")
    assert answer.status_code == 200, answer.text[:500]
    for raw in ("<script>alert(1)", "<img src=x", 'href="javascript:', "</svg><img"):
        assert raw not in answer.text
    svg = graph_of(answer.text)  # well-formed: every name escaped in text and attributes
    assert set(drawn_clients(svg)) == set(names)
    labels = [t.text for t in svg.iter("text") if t.get("class") == "label"]
    assert "名" * 17 + "…" in labels  # 200 characters shortened; whole in the title
    assert len(link_lines(svg)) == len(names)
    for name in names:  # and each a working link back to its own page
        assert browser.get("/campaign", client=name).status_code == 200, name


async def test_a_10000_member_entity_is_drawn_within_bounds(
    gateway: GatewayProcess, state: SqlState, browser: ConsoleClient  # noqa: F811
) -> None:
    members = 10_000
    records = [
        record(f"bot-{i:05}", (i * 7919 % members) / members, entity="ent_swarm", queries=i,
               reasons=[TIMING] if i % 2 else [],
               links=[link(f"bot-{(i + k) % members:05}", "ip_prefix", weight=0.6)
                      for k in (1, 2, 3, 4, 5)])
        for i in range(members)
    ]
    for start in range(0, members, 1000):
        await state.publish(records[start : start + 1000])
    for i in range(30):
        gateway.create_key(f"bot-{i:05}", account=f"acct-{i:02}")
    started = time.perf_counter()
    answer = browser.get("/campaign", entity="ent_swarm")
    elapsed = time.perf_counter() - started
    assert answer.status_code == 200, answer.text[:500]
    svg = graph_of(answer.text)
    assert len(drawn_clients(svg)) == 50 and len(list(svg.iter("rect"))) <= 10
    lines = link_lines(svg)  # the neighbourhood, not scattered dots: each drawn one linked
    assert {end for pair in lines for end in pair.split(" and ")} == set(drawn_clients(svg))
    assert len(list(svg.iter("circle"))) + len(list(svg.iter("rect"))) <= 60
    assert "And 9950 more members not drawn" in answer.text
    assert "<dt>Members</dt><dd>10000</dd>" in answer.text
    assert "<strong>machine_timing</strong>: 5000 of 10000 members" in answer.text
    assert answer.text.count("Cut link</button>") == CAMPAIGN_LINKS
    assert len(answer.content) < 600_000, len(answer.content)
    timing = answer.headers.get("server-timing", "")
    print(f"10,000-member campaign page: {len(answer.content)} bytes, {elapsed * 1000:.0f} ms "
          f"round trip, server-timing {timing}")


async def test_a_client_without_entity_is_shown_with_its_direct_links(
    gateway: GatewayProcess, state: SqlState, browser: ConsoleClient  # noqa: F811
) -> None:
    await state.publish([
        record("solo", 0.4, level="alert", queries=40,
               links=[link("near", "email_domain", weight=0.3, joins=False),
                      link("apart", "fingerprint", weight=0.8, cut=True)]),
        record("near", 0.2, queries=20),
        record("apart", 0.6, entity="ent_elsewhere", queries=60),
        record("alone", 0.1),
    ])
    answer = browser.get("/campaign", client="solo")
    assert answer.status_code == 200, answer.text[:500]
    assert "Client solo and its direct links" in answer.text
    assert "belongs to no entity" in answer.text
    svg = graph_of(answer.text)
    assert set(drawn_clients(svg)) == {"solo", "near", "apart"}
    lines = link_lines(svg)
    assert set(lines) == {"solo and near", "solo and apart"}
    assert lines["solo and apart"].get("stroke-dasharray")
    assert lines["solo and near"].get("stroke-opacity") == "0.4"
    assert "<dt>Members</dt><dd>3</dd>" in answer.text  # solo and the two it links to
    assert 'name="back_client" value="solo"' in answer.text

    lonely = browser.get("/campaign", client="alone")
    assert lonely.status_code == 200 and "No links." in lonely.text
    assert len(drawn_clients(graph_of(lonely.text))) == 1


def test_unknown_groups_are_404_and_bad_parameters_400_naming_them(
    gateway: GatewayProcess, browser: ConsoleClient  # noqa: F811
) -> None:
    stranger = ConsoleClient(gateway)  # no session: the login form, nothing read
    assert location(stranger.get("/campaign", entity="ent_nothing")) == "/console/login"
    stranger.close()
    missing = browser.get("/campaign", entity="ent_nothing")
    assert missing.status_code == 404
    assert ALERT.findall(missing.text) == [(
        "No entity named &#39;ent_nothing&#39;: no scored client belongs to it now (entities "
        "are rebuilt as links fade or are cut).")]
    nobody = browser.get("/campaign", client="<b>nobody</b>")
    assert nobody.status_code == 404 and "<b>nobody" not in nobody.text
    assert "No client named" in ALERT.findall(nobody.text)[0]
    for query, name in [
        ("", "entity"),
        ("entity=e&client=c", "entity"),
        ("entity=" + "e" * 201, "entity"),
        ("client=%00", "client"),
        ("client=" + "名" * 201, "client"),
        ("entity=e&done=block", "done"),
        ("entity=e&bogus=1", "bogus"),
        ("entity=a&entity=b", "entity"),
    ]:
        response = browser.http.get("/console/campaign?" + query)
        assert response.status_code == 400, (query, response.text[:300])
        assert ALERT.findall(response.text)[0].startswith(f"{name}: "), query
    for form in ({"back_entity": "x" * 201}, {"back_client": "\x00"}):
        refused = browser.post("/cut", {"client": "a", "other": "b", "reason": "r", **form})
        assert refused.status_code == 400 and f"{next(iter(form))}: " in refused.text


async def test_the_members_queries_are_drawn_pooled_against_the_honest_reference(
    gateway: GatewayProcess, state: SqlState, browser: ConsoleClient  # noqa: F811
) -> None:
    await state.publish([record(name, 0.5, entity="ent_q") for name in ("q1", "q2", "q3")])
    now = datetime.now(UTC)
    await write_maps(
        state.engine,
        references=[{"reference": "ref1", "space": "text", "cells": 4,
                     "points": [[0.0, 0.0], [1.0, 1.0], [0.5, 0.2]],
                     "shares": [0.4, 0.3, 0.2, 0.1], "coverage_median": 0.1,
                     "created_at": now}],
        clients=[{"client": name, "reference": "ref1", "space": "text",
                  "points": [[0.1 * i, 0.2] for i in range(5)], "cells": [0, 1, 2, 3, 0],
                  "queries": 5, "updated_at": now} for name in ("q1", "q2")],
    )
    answer = browser.get("/campaign", entity="ent_q")
    assert answer.status_code == 200, answer.text[:500]
    found = re.search(r'<svg[^>]*class="map"', answer.text)
    assert found is not None, "no query map drawn"
    scatter = answer.text[found.start() : answer.text.index("</svg>", found.start())]
    assert scatter.count("<circle") == 3 + 10  # the reference and both members' queries
    assert "the last 10 queries of 2 clients" in answer.text


def test_in_a_browser_the_analyst_opens_a_campaign_cuts_a_link_and_follows_a_client(
    gateway: GatewayProcess, page: Any, tmp_path: Path  # noqa: F811
) -> None:
    """From the campaign list and the client list's entity column to the graph, a link cut with a reason, a node
    followed to its client; the page breaks no rule of the CSP (no script, no inline style).
    The screenshot goes where the browser test's go (``$MODELFENCE_CONSOLE_SCREENSHOTS``)."""
    shots = Path(os.environ.get("MODELFENCE_CONSOLE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    kinds = [("fingerprint", 0.8), ("ip_prefix", 0.6), ("lockstep", 0.8), ("account", 1.0)]
    crew = [f"scraper-{i:02}" for i in range(12)]
    records = [
        record(name, round(0.95 - i * 0.07, 2), entity="ent_7c1d",
               level=["block", "degrade", "tighten", "alert", "normal"][min(i // 2, 4)],
               queries=400 + 150 * (i % 5), reasons=[TIMING, SWEEP][: 1 + i % 2],
               links=[link(crew[(i + step) % 12], *[kinds[(i + step) % 4][0]],
                           weight=kinds[(i + step) % 4][1]) for step in (1, 3)]
               + ([link("acme-analytics", "email_domain", weight=0.3, joins=False)]
                  if i == 4 else []))
        for i, name in enumerate(crew)
    ]
    records.append(record("acme-analytics", 0.05, queries=2000))
    publish(tmp_path, *records)
    signed_up = datetime.now(UTC) - timedelta(days=2)
    for i, name in enumerate(crew[:6]):
        gateway.create_key(name, account=f"trial-{i // 2}", metadata={
            "created_at": (signed_up + timedelta(hours=3 * i)).isoformat()})
    violations: list[str] = []
    page.on("console", lambda message: violations.append(message.text)
            if "Content Security Policy" in message.text else None)

    console = log_in(page, gateway)
    page.get_by_role("link", name="Campaigns", exact=True).click()
    page.wait_for_url(console + "/campaigns")
    assert page.get_by_role("link", name="Campaign view of entity ent_7c1d").is_visible()
    page.screenshot(path=shots / "console-campaigns.png", full_page=True)
    page.goto(console + "/clients")
    page.get_by_role("link", name="Campaign view of entity ent_7c1d").first.click()
    page.wait_for_url(console + "/campaign?entity=ent_7c1d")
    assert page.get_by_role("heading", level=1).inner_text() == "Campaign: entity ent_7c1d"
    graph = page.get_by_role("group", name=re.compile("^13 clients, 3 accounts"))
    assert graph.is_visible() and graph.locator("circle").count() == 13
    page.screenshot(path=shots / "console-campaign.png", full_page=True)

    row = page.get_by_role("row").filter(has=page.get_by_role("link", name="acme-analytics"))
    row.get_by_placeholder("why").fill("a shared mail provider, not one actor")
    row.get_by_role("button", name="Cut link").click()
    page.wait_for_url(console + "/campaign?entity=ent_7c1d&done=cut")
    assert "Done: link cut" in page.get_by_role("status").inner_text()
    assert row.get_by_role("cell", name="cut", exact=True).is_visible()

    graph.get_by_role("link", name=re.compile("^scraper-03: ")).click()
    page.wait_for_url(console + "/client?name=scraper-03")
    assert violations == []


async def test_campaigns_are_listed_riskiest_first_pooled_over_their_members(
    gateway: GatewayProcess, state: SqlState, browser: ConsoleClient  # noqa: F811
) -> None:
    hostile = "ent_<b>\"x\"</b>"
    await state.publish([
        record("rank-a1", 0.991, level="block", entity="ent_rank_a", queries=100),
        record("rank-a2", 0.5, level="tighten", entity="ent_rank_a", queries=50),
        record("rank-a3", 0.1, entity="ent_rank_a", queries=10),
        record("rank-b1", 0.992, level="alert", entity="ent_rank_b", queries=7),
        record("rank-h1", 0.993, level="degrade", entity=hostile, queries=1),
        record("rank-h2", 0.2, entity=hostile, queries=1),
    ])
    answer = browser.get("/campaigns", per_page="200")
    assert answer.status_code == 200, answer.text[:500]
    assert "<b>\"x\"" not in answer.text
    rows = re.findall(r"<tr>\s*<td><a href=\"/console/campaign\?entity=([^\"]+)\"[^>]*>.*?</a></td>"
                      r"((?:\s*<td class=\"num\">[^<]*</td>)+)", answer.text, re.DOTALL)
    listed = {h: re.findall(r'class="num">([^<]*)<', cells) for h, cells in rows}
    order = [h for h, _ in rows]
    ours = [quote(hostile), "ent_rank_b", "ent_rank_a"]
    assert [h for h in order if h in ours] == ours  # by the riskiest member, highest first
    # members, highest risk, mean risk, tightened or more, blocked, queries
    assert listed["ent_rank_a"] == ["3", "0.99", "0.53", "2", "1", "160"]
    assert listed["ent_rank_b"] == ["1", "0.99", "0.99", "0", "0", "7"]
    assert listed[quote(hostile)][:1] == ["2"]
    for query, name in [("per_page=0", "per_page"), ("page=x", "page"), ("bogus=1", "bogus")]:
        refused = browser.http.get("/console/campaigns?" + query)
        assert refused.status_code == 400, (query, refused.text[:300])
        assert ALERT.findall(refused.text)[0].startswith(f"{name}: "), query
