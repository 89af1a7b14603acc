"""Links between keys: weighted by kind, fading when not seen again, joined only when strong,
and never across a pair an operator cut."""

from __future__ import annotations

import math

from modelfence.detect.linking import JOIN, Linker
from modelfence.telemetry.events import RequestEvent

HOUR = 3600.0


def seen(client: str, ts: float = 0.0, **fields: str) -> RequestEvent:
    return RequestEvent(ts, "r", client, "key", "default", "/v1/chat/completions", "m", 200,
                        **fields)


def entities(linker: Linker, *clients: str) -> list[tuple[str, ...]]:
    return sorted({tuple(linker.members(c)) for c in clients})


def test_a_shared_network_joins_keys_while_it_is_fresh_and_fades_apart() -> None:
    linker = Linker(half_life=24 * HOUR)
    linker.observe(seen("a", ip_prefix="198.51.100.0/24"))
    linker.observe(seen("b", ip_prefix="198.51.100.0/24"))
    assert linker.members("a") == ("a", "b")
    linker.rebuild(2 * HOUR)  # 0.6 x 0.5^(2/24) = 0.57: still joined
    assert linker.members("a") == ("a", "b")
    linker.rebuild(12 * HOUR)  # 0.6 x 0.5^(12/24) = 0.42: a weak link now
    assert linker.members("a") == ("a",) and linker.members("b") == ("b",)
    [link] = linker.links_of("a", 12 * HOUR)
    assert (link.other, link.kinds, link.weight) == ("b", ("ip_prefix",), 0.424)


def test_a_rebuild_joins_and_forgets_where_the_weights_cross_the_thresholds() -> None:
    """A rebuild compares last-seen times with the times the weights cross JOIN and a tenth
    of full weight; a second either side of each crossing decides."""
    joined_until = HOUR * math.log2(0.6 / JOIN)  # ip_prefix weighs 0.6
    forgotten_after = HOUR * math.log2(10.0)
    for now, joined, kept in (
        (joined_until - 1.0, True, True), (joined_until + 1.0, False, True),
        (forgotten_after - 1.0, False, True), (forgotten_after + 1.0, False, False),
    ):
        linker = Linker(half_life=HOUR)
        linker.observe(seen("a", ip_prefix="198.51.100.0/24"))
        linker.observe(seen("b", ip_prefix="198.51.100.0/24"))
        linker.rebuild(now)
        assert (linker.weight("ip_prefix", 0.0, now) >= JOIN) is joined
        assert (linker.members("a") == ("a", "b")) is joined
        assert bool(linker.links_of("a", now)) is kept


def test_account_facts_do_not_fade_and_weak_traits_never_join_alone() -> None:
    linker = Linker(half_life=HOUR)
    for client, account in (("k1", "acct-1"), ("k2", "acct-1"), ("k3", "acct-2"), ("k4", "acct-3")):
        linker.observe(seen(client, account=account))
    linker.set_traits("acct-2", {"payment": "card-hash", "email_domain": "d"})
    linker.set_traits("acct-3", {"payment": "card-hash", "email_domain": "d"})
    linker.set_traits("acct-1", {"email_domain": "d", "signup_network": "n"})
    linker.rebuild(1_000 * HOUR)
    assert entities(linker, "k1", "k2", "k3", "k4") == [("k1", "k2"), ("k3", "k4")]
    kinds = {link.other: link.kinds for link in linker.links_of("k3", 1_000 * HOUR)}
    assert kinds == {"k4": ("email_domain", "payment"), "k1": ("email_domain",),
                     "k2": ("email_domain",)}
    linker.set_traits("acct-3", {"payment": "another-card"})  # the account changed its card
    linker.rebuild(1_000 * HOUR)
    assert linker.members("k3") == ("k3",)


def test_a_trait_hub_emptied_by_new_traits_is_dropped_at_the_rebuild() -> None:
    linker = Linker(half_life=HOUR)
    linker.observe(seen("k1", account="acct-1"))
    linker.set_traits("acct-1", {"email_domain": "d"})
    linker.set_traits("acct-1", {"email_domain": "e"})  # the old domain's hub is empty now
    linker.rebuild(1.0)
    assert [key for key in linker._hubs if key.startswith("email_domain:")] == ["email_domain:e"]


def test_a_cut_pair_is_never_in_one_entity_even_through_a_third_key() -> None:
    linker = Linker()
    for client in ("a", "c", "b"):
        linker.observe(seen(client, fingerprint="same-machine"))
    assert linker.members("a") == ("a", "b", "c")
    assert linker.set_cuts([("a", "b")]) and not linker.set_cuts([("b", "a")])
    linker.rebuild(1.0)
    assert "b" not in linker.members("a") and len(linker.members("c")) == 2
    linker.observe(seen("b", ts=2.0, fingerprint="same-machine"))  # new evidence: still cut
    linker.link("a", "b", 2.0)
    assert "b" not in linker.members("a")
    assert next(link for link in linker.links_of("a", 2.0) if link.other == "b").cut
    assert linker.set_cuts([])
    linker.rebuild(3.0)
    assert linker.members("a") == ("a", "b", "c")


def test_lockstep_links_fade_like_other_behaviour() -> None:
    linker = Linker(half_life=HOUR)
    linker.observe(seen("x"))
    linker.observe(seen("y"))
    linker.link("x", "y", 0.0)
    assert linker.members("x") == ("x", "y")
    linker.rebuild(2 * HOUR)
    assert linker.members("x") == ("x",)
    linker.rebuild(10 * HOUR)  # faded below a tenth of its weight: forgotten
    assert linker.links_of("x", 10 * HOUR) == []


def test_accounts_on_probation_sharing_an_uncommon_frame_are_joined() -> None:
    linker = Linker()
    for i in range(3):  # a campaign's new accounts, one frame, distinct everything else
        linker.observe(seen(f"bot{i}", frame_hash="harvest-frame", trust="probation",
                            ip_prefix=f"10.{i}.0.0/24"))
    linker.observe(seen("old-customer", frame_hash="harvest-frame", trust="standard"))
    assert linker.members("bot0") == ("bot0", "bot1", "bot2")  # the customer is not joined
    for i in range(3):  # a frame every kind of client uses is no evidence
        linker.observe(seen(f"user{i}", frame_hash="what is the", trust="standard"))
    linker.observe(seen("newbie1", frame_hash="what is the", trust="probation"))
    linker.observe(seen("newbie2", frame_hash="what is the", trust="probation"))
    linker.rebuild(1.0)
    assert linker.members("newbie1") == ("newbie1",)
    assert linker.members("bot1") == ("bot0", "bot1", "bot2") and linker.on_probation("bot1")
    # Operators are shown the same evidence: a frame links only accounts on probation, and
    # only while it is uncommon.
    assert {(link.other, link.kinds) for link in linker.links_of("bot0", 1.0)} == {
        ("bot1", ("frame",)), ("bot2", ("frame",))}
    assert linker.links_of("old-customer", 1.0) == []
    assert linker.links_of("newbie1", 1.0) == [] and linker.links_of("user0", 1.0) == []


def test_an_entity_read_before_a_join_shows_the_join_and_keeps_its_smallest_members_id() -> None:
    linker = Linker()
    for client in ("m", "z", "b"):
        linker.observe(seen(client, ip_prefix=f"net-{client}"))
    assert [linker.members(c) for c in ("m", "z", "b")] == [("m",), ("z",), ("b",)]
    linker.observe(seen("z", ip_prefix="net-m"))
    assert linker.members("m") == linker.members("z") == ("m", "z")
    linker.observe(seen("b", ip_prefix="net-z"))
    assert linker.members("z") == ("b", "m", "z")
    # One id for all, its smallest member's: the id a linker gives "b" on its own.
    assert linker.entity_of("m") == linker.entity_of("z") == Linker().entity_of("b")
