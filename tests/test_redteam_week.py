"""The honest week: stated rates, shapes, shared addresses, arrivals, sampling, corpus."""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from itertools import pairwise

import numpy as np
import orjson
import pytest

from modelfence.redteam.populations import week as week_module
from modelfence.redteam.populations.week import (
    FULL_COUNTS,
    GROUP_OF,
    GROUPS,
    SEGMENT,
    SEGMENTS,
    STUDENT_TEMPLATES,
    VERIFIED,
    Customer,
    HonestWeek,
    stratified_sample,
)
from modelfence.redteam.prompts import (
    load_evaluation_documents,
    load_evaluation_prompts,
    load_prompts,
)
from modelfence.redteam.timing import DAY
from modelfence.redteam.traffic import CHAT, DIGITS_INFER, EMBEDDINGS, ClientProfile, PlannedRequest

DAYS = 3.0
# Enough customers that every segment's count has a relative noise of ~5% or less.
COUNTS = {"light": 600, "agent": 200, "student": 200, "embed": 200, "classify": 200, "university": 200,
          "nat": 100, "launch": 10, "heavy": 10, "bulk-embed": 2, "bulk-score": 2, "stream": 1, "summariser": 2}
Generated = tuple[list[PlannedRequest], dict[str, ClientProfile]]
WEEK = HonestWeek(COUNTS, days=DAYS, launch_day=1, seed=11)
TOLERANCE = 0.1
SCRIPTED = ("bulk-embed", "launch")  # their rates are checked per night and per day below
PLANS_DIGEST = "7d3b0ffa637798be"


@pytest.fixture(scope="module")
def texts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    return load_evaluation_prompts().all(), load_evaluation_documents()


@pytest.fixture(scope="module")
def customers() -> list[Customer]:
    return WEEK.customers()


@pytest.fixture(scope="module")
def generated(customers: list[Customer]) -> Generated:
    plans, profiles = WEEK.generate(load_evaluation_prompts(), load_evaluation_documents(), customers)
    return plans, {p.name: p for p in profiles}


def _by_segment(generated: Generated) -> dict[str, list[PlannedRequest]]:
    plans, profiles = generated
    out: dict[str, list[PlannedRequest]] = defaultdict(list)
    for plan in plans:
        out[profiles[plan.client].segment].append(plan)
    return out


def test_each_segment_sends_its_stated_rate_per_active_day(customers: list[Customer], generated: Generated) -> None:
    present: dict[str, float] = defaultdict(float)
    for c in customers:
        present[c.segment] += (c.left - c.joined) / DAY
    sent = {name: len(plans) for name, plans in _by_segment(generated).items()}
    for segment in SEGMENTS:
        if segment.name in SCRIPTED:
            continue
        rate = sent[segment.name] / present[segment.name]
        assert abs(rate / segment.rate - 1) < TOLERANCE, (segment.name, rate, segment.rate)


def test_the_docstring_table_states_the_rates_the_code_uses() -> None:
    doc = week_module.__doc__ or ""
    for segment in SEGMENTS:
        row = re.search(rf"^\| {re.escape(segment.name)} \| (\S+) \| (\S+) \| ([\d,]+)", doc, re.MULTILINE)
        assert row is not None, segment.name
        assert (row[1], row[2], float(row[3].replace(",", ""))) == (segment.group, segment.tier, segment.rate)


def test_plans_lie_in_the_week_sorted_benign_with_turns_for_chat(customers: list[Customer], generated: Generated) -> None:
    plans, profiles = generated
    assert {p.segment for p in profiles.values()} == set(COUNTS)
    assert [p.at for p in plans] == sorted(p.at for p in plans)
    assert all(0 <= p.at < DAYS * DAY and p.purpose == "benign" for p in plans)
    assert all(p.turns == len(p.body["messages"]) >= 1 for p in plans if p.route == CHAT)
    joined = {c.name: (c.joined, c.left) for c in customers}
    assert all(joined[p.client][0] <= p.at < joined[p.client][1] for p in plans)
    for profile in profiles.values():
        assert (profile.role, profile.tier) == ("benign", SEGMENT[profile.segment].tier)


def test_distinct_prefixes_except_nat_and_university(generated: Generated) -> None:
    _, profiles = generated
    prefixes: dict[str, set[str]] = defaultdict(set)
    own = []
    for p in profiles.values():
        prefix = p.ip.rsplit(".", 1)[0]
        _, a, b = map(int, prefix.split("."))
        assert 20_000 <= a * 256 + b < 40_000  # clear of the v1 populations and attackers
        prefixes[p.segment].add(prefix)
        if p.segment not in ("nat", "university"):
            own.append(prefix)
    assert len(own) == len(set(own))
    assert not (prefixes["nat"] | prefixes["university"]) & set(own)


def test_nat_keys_share_one_address_and_client_library(generated: Generated) -> None:
    _, profiles = generated
    nat = [p for p in profiles.values() if p.segment == "nat"]
    assert len(nat) == COUNTS["nat"]
    assert len({(p.ip, p.user_agent, p.extra_headers) for p in nat}) == 1


def test_university_keys_use_at_most_four_addresses_of_one_24(generated: Generated) -> None:
    _, profiles = generated
    ips = {p.ip for p in profiles.values() if p.segment == "university"}
    assert 2 <= len(ips) <= 4
    assert len({ip.rsplit(".", 1)[0] for ip in ips}) == 1


def test_nat_works_office_hours_in_one_time_zone(generated: Generated) -> None:
    hours = {int(p.at % DAY // 3600) for p in _by_segment(generated)["nat"]}
    assert len(hours) <= 10  # 09:00-18:00 local, one local time for the whole office


def test_bulk_embed_sends_782_batches_of_64_every_night_from_the_same_corpus(generated: Generated) -> None:
    by_client: dict[str, list[PlannedRequest]] = defaultdict(list)
    for plan in _by_segment(generated)["bulk-embed"]:
        by_client[plan.client].append(plan)
    for plans in by_client.values():
        nights: list[list[PlannedRequest]] = [[plans[0]]]
        for before, plan in pairwise(plans):
            if plan.at - before.at > 3600:
                nights.append([])
            nights[-1].append(plan)
        whole = [night for night in nights if night[-1].at < DAYS * DAY - 3600]
        assert len(whole) >= DAYS - 1
        for night in whole:
            assert len(night) == 782 and sum(p.units for p in night) == 50_000
            assert {p.units for p in night[:-1]} == {64}
            assert 1.5 < np.mean(np.diff([p.at for p in night])) < 2.5
            assert all(p.route == EMBEDDINGS for p in night)
        assert all(a.body is b.body for a, b in zip(whole[0], whole[1], strict=True))


def test_bulk_score_and_stream_send_images(generated: Generated) -> None:
    segments = _by_segment(generated)
    score = segments["bulk-score"]
    assert {p.units for p in score} == {64} and all(p.route == DIGITS_INFER for p in score)
    gaps = np.diff([p.at for p in score if p.client == score[0].client])
    daytime = gaps[gaps < 3600]
    assert 0.7 * 180 <= daytime.min() and daytime.max() <= 1.3 * 180
    stream = segments["stream"]
    assert {p.units for p in stream} == {1}
    frames = Counter(orjson.dumps(p.body) for p in stream)
    assert 1 < len(frames) < len(stream) / 5  # a camera sees the same scenes again


def test_launch_day_brings_twenty_times_the_volume(generated: Generated) -> None:
    per_day = Counter(int(p.at // DAY) for p in _by_segment(generated)["launch"])
    others = np.mean([n for day, n in per_day.items() if day != WEEK.launch_day])
    assert 15 < per_day[WEEK.launch_day] / others < 25
    assert abs(others / COUNTS["launch"] / SEGMENT["launch"].rate - 1) < 0.25


def test_agents_send_tools_and_system_messages_in_long_conversations(generated: Generated) -> None:
    segments = _by_segment(generated)
    for name in ("agent", "nat"):
        plans = segments[name]
        assert all(p.body["messages"][0]["role"] == "system" for p in plans)
        assert all(1 <= len(p.body["tools"]) <= 4 for p in plans)
        assert all(0 <= p.body["temperature"] <= 1 and p.body["max_tokens"] in (512, 1024, 2048) for p in plans)
        assert max(p.turns for p in plans) == 20 and all(p.turns <= 20 for p in plans)
        assert any(m["role"] == "tool" for p in plans for m in p.body["messages"])


def test_light_users_configure_their_client_like_people_do(generated: Generated) -> None:
    plans = _by_segment(generated)["light"]
    with_system = {p.client for p in plans if p.body["messages"][0]["role"] == "system"}
    assert 0.22 < len(with_system) / len({p.client for p in plans}) < 0.38
    assert {p.body.get("max_tokens") for p in plans} == {None, 256, 512, 1024}
    assert {p.body.get("temperature") for p in plans} == {None, 0.7, 1.0}
    assert max(p.turns for p in plans) <= 6 and Counter(p.turns > 1 for p in plans)[True] > len(plans) / 4


def test_students_ask_for_step_by_step_reasoning_and_follow_up(generated: Generated) -> None:
    for name in ("student", "university"):
        plans = _by_segment(generated)[name]
        openers = [p.body["messages"][0]["content"] for p in plans if p.turns == 1]
        forms = [re.escape(t).replace(r"\{\}", ".+") for t in STUDENT_TEMPLATES]
        assert all(any(re.fullmatch(form, text) for form in forms) for text in openers)
        assert sum(p.turns > 1 for p in plans) > len(plans) / 4


def test_arrivals_and_churn() -> None:
    week = HonestWeek({"light": 4_000, "heavy": 50}, seed=2)
    people = week.customers()
    light = [c for c in people if c.segment == "light"]
    late = [c.joined for c in light if c.joined > 0]
    assert abs(len(late) / len(light) - 0.3) < 0.03
    assert Counter(int(t // DAY) for t in late).keys() == {1, 2, 3, 4, 5, 6}  # new customers every day
    assert abs(sum(c.left < week.horizon for c in light) / len(light) - 0.1) < 0.02
    assert all(c.joined < c.left for c in light)
    assert all((c.joined, c.left) == (0, week.horizon) for c in people if c.segment == "heavy")


def test_full_counts() -> None:
    total = sum(FULL_COUNTS.values())
    assert total >= 10_000
    assert sum(FULL_COUNTS[s] for s in ("heavy", "bulk-embed", "bulk-score", "stream", "summariser")) >= 200
    assert set(FULL_COUNTS) == set(SEGMENT)
    assert len(HonestWeek(FULL_COUNTS).customers()) == total
    assert set(GROUP_OF.values()) == set(GROUPS)
    with pytest.raises(ValueError):
        HonestWeek({"light": 100_000})


def test_stratified_sample_weights(customers: list[Customer]) -> None:
    sample, weights = stratified_sample(customers, {"light": 60, "agent": 7, "nat": 3, "stream": 50},
                                        np.random.default_rng(0))
    got = Counter(c.segment for c in sample)
    assert (got["light"], got["agent"], got["nat"], got["stream"]) == (60, 7, COUNTS["nat"], COUNTS["stream"])
    assert weights["light"] == COUNTS["light"] / 60 and weights["agent"] == pytest.approx(COUNTS["agent"] / 7)
    assert weights["nat"] == weights["university"] == weights["stream"] == weights["embed"] == 1.0
    assert got["embed"] == COUNTS["embed"] and len({c.name for c in sample}) == len(sample)


def test_a_sample_gets_exactly_the_plans_of_the_full_week(customers: list[Customer], generated: Generated) -> None:
    plans, profiles = generated
    sample, _ = stratified_sample(customers, {"light": 5, "agent": 2, "student": 2, "classify": 2, "embed": 2,
                                              "university": 2, "nat": 2, "stream": 0, "launch": 1, "heavy": 1,
                                              "bulk-embed": 1, "bulk-score": 1, "summariser": 1},
                                    np.random.default_rng(1))
    small = [c for c in sample if c.segment not in ("nat", "university")] + [
        c for c in sample if c.segment in ("nat", "university")][:3]
    sub_plans, sub_profiles = WEEK.generate(load_evaluation_prompts(), load_evaluation_documents(), small)
    names = {c.name for c in small}

    def key(p: PlannedRequest) -> tuple[float, str, bytes, int]:
        return p.at, p.client, orjson.dumps(p.body), p.turns

    assert sorted(map(key, sub_plans)) == sorted(key(p) for p in plans if p.client in names)
    assert all(profiles[p.name] == p for p in sub_profiles)


def test_profiles_carry_each_customers_account_drawn_from_its_own_stream(customers: list[Customer],
                                                                          generated: Generated) -> None:
    _, profiles = generated
    again = HonestWeek(COUNTS, days=DAYS, launch_day=1, seed=11)
    for customer in customers:
        account = WEEK.account(customer)
        profile = profiles[customer.name]
        assert (profile.signed_up, profile.paid_usd, profile.verified) == account == again.account(customer)
        if customer.joined > 0:
            assert account.signed_up == customer.joined  # a newcomer signs up when it joins
        else:
            assert -730 * DAY <= account.signed_up < 0
    other = HonestWeek(COUNTS, days=DAYS, launch_day=1, seed=12)
    assert all(WEEK.account(c).signed_up != other.account(c).signed_up for c in customers if c.joined == 0)


def test_accounts_sign_up_pay_and_verify_in_the_stated_shares() -> None:
    week = HonestWeek({"light": 3_000, "agent": 900, "university": 300, "heavy": 100, "nat": 50, "stream": 40},
                      seed=2)
    accounts = [(c, week.account(c)) for c in week.customers()]
    from_start = [a for c, a in accounts if c.joined == 0 and c.segment not in VERIFIED]
    recent = [a for a in from_start if a.signed_up >= -7 * DAY]
    assert abs(len(recent) / len(from_start) - 0.5) < 0.03
    assert all(-7 * DAY <= a.signed_up < 0 for a in recent)
    # A steady business: as many sign-ups a day in the week before as in the week itself.
    joined = [c for c, _ in accounts if c.joined > 0]
    before = sum(a.signed_up >= -7 * DAY for c, a in accounts if c.joined == 0)
    assert 0.8 < (before / 7) / (len(joined) / 6) < 1.25
    unverified = [a for c, a in accounts if c.segment not in VERIFIED]
    paying = [a for a in unverified if a.paid_usd > 0]
    assert abs(len(paying) / len(unverified) - 0.35) < 0.03
    assert all(20 <= a.paid_usd <= 200 for a in paying) and not any(a.verified for a in unverified)
    assert {c.segment for c, _ in accounts if c.segment in VERIFIED} == {"heavy", "nat", "stream"}
    assert all(a.verified and 500 <= a.paid_usd <= 5_000 for c, a in accounts if c.segment in VERIFIED)


def test_account_draws_change_no_plan() -> None:
    """The digest of a small week's plans and profiles (account fields aside) as they were
    generated before customers had accounts."""
    week = HonestWeek({s.name: 1 for s in SEGMENTS}, days=1.5, launch_day=1, seed=7)
    plans, profiles = week.generate(load_evaluation_prompts(), load_evaluation_documents(), week.customers())
    digest = hashlib.sha256()
    for p in plans:
        digest.update(orjson.dumps([round(p.at, 6), p.client, p.route, p.body, p.turns], default=float))
    for f in profiles:
        digest.update(orjson.dumps([f.name, f.role, f.user_agent, f.ip, f.extra_headers, f.tier, f.segment,
                                    f.header_order]))
    assert (len(plans), digest.hexdigest()[:16]) == (11_574, PLANS_DIGEST)


def test_the_evaluation_corpus_shares_no_text_with_calibration(texts: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    prompts, documents = texts
    corpus = load_evaluation_prompts()
    assert min(corpus.sources.values()) > 50 and len(documents) > 300 and not corpus.missing
    assert not (set(prompts) | set(documents)) & set(load_prompts().all())
    assert len(set(prompts) | set(documents)) == len(prompts) + len(documents)
    assert all(8 <= len(t) <= 600 for t in prompts) and all(len(t) > 600 for t in documents)
    assert all(" ".join(t.split()) == t for t in (*prompts, *documents))
