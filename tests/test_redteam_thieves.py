"""Each thief does what its strategy promises, measured with the real detectors' own code."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest

from modelfence.config import DetectionConfig
from modelfence.detect.calibration import calibrate
from modelfence.detect.coactivity import activity_of, lockstep_pairs
from modelfence.detect.detectors import Harvesting
from modelfence.detect.embedding import HashingEmbedder
from modelfence.detect.engine import DetectionEngine, Verdict
from modelfence.detect.features import ClientState, Query, View, space_of
from modelfence.detect.reference import Reference
from modelfence.detect.traffic import TrafficWindows
from modelfence.redteam.attacks.classifier import DigitsData
from modelfence.redteam.populations.benign import BenignPopulation
from modelfence.redteam.prompts import load_prompts
from modelfence.redteam.replay import replay_events
from modelfence.redteam.replay_attacks import answer_classifier
from modelfence.redteam.replay_detection import START_TS, by_client
from modelfence.redteam.tariff import example_config
from modelfence.redteam.theft import payload
from modelfence.redteam.thieves import (
    HydraThief,
    NaiveThief,
    OneBatchThief,
    PacedThief,
    RotatingThief,
    Scale,
    WhiteBoxThief,
    adaptive_library,
    hydra_library,
    paced_hydra_library,
)
from modelfence.redteam.thieves.base import DAY, GIVE_UP, Budget, Knowledge, Thief, text_pool
from modelfence.redteam.traffic import ClientProfile, PlannedRequest
from modelfence.telemetry.events import RequestEvent

CONFIG = DetectionConfig.model_validate({})
SMALL = Scale(classifier_images=256, embedding_texts=192, chat_prompts=40, days=2.0, one_batch_accounts=(6,),
              rotation_accounts=(3,), hydra_accounts=(10, 100), hydra_paced_accounts=(10,))


def _profiles(thief: Thief) -> dict[str, ClientProfile]:
    return {p.name: p for p in thief.accounts()}


def _events(thief: Thief) -> list[RequestEvent]:
    return replay_events(thief.plans(), _profiles(thief), START_TS)


def _most_in_window(times: Sequence[float], amounts: Sequence[float], span: float) -> float:
    """The largest total of ``amounts`` over any ``span`` seconds, both ends included."""
    worst, total, start = 0.0, 0.0, 0
    for end, t in enumerate(times):
        total += amounts[end]
        while times[start] < t - span:
            total -= amounts[start]
            start += 1
        worst = max(worst, total)
    return worst


def _active_hours(times: Sequence[float]) -> tuple[int, int]:
    """(most distinct hours in a calendar day, most in any 24 clock hours)."""
    hours = sorted({int((START_TS + t) // 3600) for t in times})
    per_day = Counter(h // 24 for h in hours)
    sliding = max(sum(1 for h in hours if last - 24 < h <= last) for last in hours)
    return max(per_day.values()), sliding


# -- paced ---------------------------------------------------------------------------


@pytest.mark.parametrize("knowledge", [
    Knowledge(),
    # Tight lines that bind: 16 queries in ten minutes, 4.8 requests and 2,400 tokens a
    # minute, four cents a day.
    Knowledge(volume_threshold=5.0, requests_per_minute=6, tokens_per_minute=3000, usd_per_day=0.05),
], ids=["published", "tight"])
@pytest.mark.parametrize(("asset", "in_distribution"), [
    ("classifier", False), ("classifier", True), ("embeddings", False), ("chat", False)])
def test_paced_thief_stays_under_every_line_on_human_hours(knowledge: Knowledge, asset: str,
                                                           in_distribution: bool) -> None:
    thief = PacedThief(asset, knowledge, Budget(days=7.0, usd=1000.0), in_distribution,  # type: ignore[arg-type]
                       seed=3, target=300 if asset == "chat" else 1500)
    plans = thief.plans()
    times = [p.at for p in plans]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 7 * DAY
    assert thief.spend(plans).units == thief.target  # bought everything it wanted, in time
    assert _most_in_window(times, [p.units for p in plans], 600) <= 0.8 * knowledge.volume_line
    assert _most_in_window(times, [1] * len(plans), 60) <= 0.8 * knowledge.requests_per_minute
    charges = [thief.tariff.charge(p) for p in plans]
    assert _most_in_window(times, [tokens for tokens, _ in charges], 60) <= 0.8 * knowledge.tokens_per_minute
    per_day = np.bincount([int(p.at // DAY) for p in plans], weights=[usd for _, usd in charges])
    assert per_day.max() <= 0.8 * knowledge.usd_per_day
    assert max(_active_hours(times)) <= 16
    gaps = np.diff(times)
    assert gaps.std() / gaps.mean() > 0.5  # never regular
    assert all(p.purpose == "extraction" and p.client == thief.accounts()[0].name for p in plans)


def test_tight_knowledge_really_binds() -> None:
    """The tight lines above are not vacuous: the published pace would break them."""
    tight = Knowledge(volume_threshold=5.0, requests_per_minute=6, tokens_per_minute=3000, usd_per_day=0.05)
    plans = PacedThief("chat", Knowledge(), Budget(), seed=3).plans()
    assert _most_in_window([p.at for p in plans], [1] * len(plans), 600) > 0.8 * tight.volume_line


def _harvesting(thief: Thief, *, saturated: bool = False) -> float:
    events = _events(thief)
    for event in events:
        event.tokens_out = (event.max_tokens or 0) if saturated else 0
    value = Harvesting().statistic(View([Query(e, space_of(e), None) for e in events]), None)
    assert value is not None
    return value


def test_paced_chat_shows_the_harvesting_detector_only_its_system_frame() -> None:
    paced = PacedThief("chat", Knowledge(), Budget(), seed=1)
    naive = NaiveThief("chat", seed=1)
    # Its frame asks for reasoning in the system message, which the gateway reads too: the
    # chain-of-thought signal (weight 1 of 9) on the requests whose frame says so.
    assert 0.05 < _harvesting(paced) <= 1 / 9 + 1e-9
    # Even if every answer used all of max_tokens, that and the frame are all it shows.
    assert _harvesting(paced, saturated=True) < Knowledge().harvesting_share
    # The v1 chain-of-thought harvester is single-turn with the frame in the user turn: 2 of 9
    # (3 of 9 saturated). The harvesting detector alone never reaches 0.5 on it; MMD and
    # volume catch it (docs/DETECTION.md).
    assert _harvesting(naive) == pytest.approx(2 / 9)
    assert _harvesting(naive, saturated=True) == pytest.approx(3 / 9)
    bodies = [p.body for p in paced.plans()]
    assert all([m["role"] for m in b["messages"]] == ["system", "user"] for b in bodies)
    assert all(0.7 <= b["temperature"] <= 1.0 for b in bodies)
    tokens = [b["max_tokens"] for b in bodies]
    assert len(set(tokens)) > len(tokens) / 3 and max(Counter(tokens).values()) <= 5
    assert max(sum(1 for _ in run) for run in _runs(tokens)) <= 2  # never the same value for long


def _runs(values: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for value in values:
        if runs and runs[-1][-1] == value:
            runs[-1].append(value)
        else:
            runs.append([value])
    return runs


def test_in_distribution_thief_sends_the_victims_kind_of_digits_and_asks_for_labels() -> None:
    thief = PacedThief("classifier", Knowledge(), Budget(), in_distribution=True, seed=4, target=1200)
    plans = thief.plans()
    rows = np.concatenate([payload(p) for p in plans])
    pool = DigitsData.split(4).pool.reshape(-1, 64)
    assert {tuple(r) for r in rows[: len(pool)].tolist()} == {tuple(r) for r in pool.tolist()}
    moved = rows[len(pool):]
    # Sub-pixel moves keep a digit's ink and its place: close to the original, never noise.
    assert moved.min() >= 0 and moved.max() <= 16
    nearest = np.sqrt(((moved[:, None, :] - pool[None, :, :]) ** 2).sum(-1)).min(axis=1)
    assert 0 < nearest.min() and nearest.max() < 20
    assert all(p.body["outputs"] == [{"name": "label"}] for p in plans)


# -- what every thief may send --------------------------------------------------------


def test_no_thief_sends_what_its_clone_is_judged_on() -> None:
    seed = 2
    held_images = {tuple(r) for r in DigitsData.split(seed).test.reshape(-1, 64).round(4).tolist()}
    held_texts = set(text_pool(load_prompts(), seed).held_out)
    thieves = [*adaptive_library(SMALL, seed=seed, knowledge=Knowledge(), white_box=None,
                                 embedder=HashingEmbedder()), *hydra_library(SMALL, seed=seed)]
    for thief in thieves:
        for plan in thief.plans():
            sent = payload(plan)
            if isinstance(sent, np.ndarray):
                assert not {tuple(r) for r in sent.round(4).tolist()} & held_images, thief.name
            else:
                assert not set(sent) & held_texts, thief.name


def test_every_thief_keeps_to_its_budget_and_its_own_addresses() -> None:
    thieves = [*adaptive_library(SMALL, seed=5, knowledge=Knowledge(), white_box=None, embedder=HashingEmbedder()),
               *hydra_library(SMALL, seed=5)]
    names = [t.name for t in thieves]
    assert len(set(names)) == len(names)
    assert {t.name.split("/")[0] for t in thieves} >= {
        "naive", "paced", "paced-in-distribution", "one-batch-6", "rotating-3", "hydra-10", "hydra-100"}
    prefixes: Counter[str] = Counter()
    for thief in thieves:
        profiles = _profiles(thief)
        assert len(profiles) <= thief.budget.accounts
        assert all(p.role == "attacker" and p.campaign == thief.name for p in profiles.values())
        prefixes.update(p.ip.rsplit(".", 1)[0] for p in profiles.values())
        plans = thief.plans()
        assert plans and all(p.client in profiles for p in plans)
        assert thief.horizon - thief.budget.days * DAY < thief.budget.days * DAY  # it starts within the run
        assert all(thief.horizon - thief.budget.days * DAY <= p.at < thief.horizon for p in plans)
        assert all(p.purpose in ("extraction", "cover") for p in plans)
        assert thief.spend(plans).usd <= thief.budget.usd  # type: ignore[attr-defined]
    assert max(prefixes.values()) == 1  # no two accounts of any two thieves share a /24
    assert all(int(prefix.split(".")[1]) * 256 + int(prefix.split(".")[2]) >= 40_000
               for prefix in prefixes if prefix.startswith("10."))


def test_a_small_dollar_budget_cuts_the_campaign_short() -> None:
    thief = PacedThief("chat", Knowledge(), Budget(usd=0.05), seed=1)
    spend = thief.spend(thief.plans())
    assert spend.usd <= 0.05 and 0 < spend.units < thief.target


def test_published_knowledge_is_the_example_configuration() -> None:
    default = example_config().limits.tiers["default"]
    published = Knowledge.published()
    assert (published.requests_per_minute, published.tokens_per_minute, published.usd_per_day) == (
        default.requests_per_minute, default.tokens_per_minute, default.usd_per_day)
    assert published == Knowledge()  # the field defaults say the same as the example


def test_plans_are_the_same_for_a_seed_and_differ_for_another() -> None:
    for build in (lambda s: PacedThief("embeddings", Knowledge(), Budget(), seed=s),
                  lambda s: HydraThief("classifier", 50, seed=s, target=300),
                  lambda s: OneBatchThief("chat", 8, seed=s),
                  lambda s: NaiveThief("classifier", seed=s, target=256)):
        assert build(7).plans() == build(7).plans()
        assert build(7).plans() != build(8).plans()
        assert build(7).accounts() == build(7).accounts()


def test_header_order_permutes_only_the_middle_headers() -> None:
    plain = ClientProfile("a", "attacker", "curl/8.5.0", "10.1.2.3")
    usual = plain.wire_headers("k", b"{}", "h")
    assert [name for name, _ in usual][:3] == ["host", "user-agent", "accept"]  # the default is unchanged
    orders = {tuple(n for n, _ in ClientProfile("a", "attacker", "curl/8.5.0", "10.1.2.3", header_order=i)
                    .wire_headers("k", b"{}", "h")) for i in range(120)}
    assert len(orders) == 120  # 5! orders of the five middle headers
    assert all(order[0] == "host" and order[-1] == "content-length" for order in orders)
    assert {frozenset(order) for order in orders} == {frozenset(n for n, _ in usual)}


# -- one batch, rotation --------------------------------------------------------------


@pytest.mark.parametrize("asset", ["classifier", "embeddings", "chat"])
def test_one_batch_thief_uses_every_account_once_on_its_own_fingerprint(asset: str) -> None:
    thief = OneBatchThief(asset, 32, seed=1)  # type: ignore[arg-type]
    profiles = _profiles(thief)
    plans = thief.plans()
    assert Counter(p.client for p in plans) == Counter(list(profiles))  # each account exactly once
    assert {p.units for p in plans} == ({1} if asset == "chat" else {64})
    events = _events(thief)
    assert len({e.ip_prefix for e in events}) == len({e.fingerprint for e in events}) == 32
    assert len({p.user_agent for p in profiles.values()}) == 10  # every client library
    assert len({p.header_order for p in profiles.values()}) == 32
    gaps = np.diff([p.at for p in plans])
    assert gaps.min() > 600 and plans[-1].at - plans[0].at > 0.9 * 6 * DAY  # spread over the days


def test_rotating_thief_rotates_on_every_refusal_until_its_accounts_are_spent() -> None:
    thief = RotatingThief("classifier", 4, seed=2)
    first = thief.accounts()[0]
    plan = thief.plans()[0]
    identities = [first]
    for burnt, status in enumerate((403, 429, 403), start=1):
        reaction = thief.react(plan, status, 100.0)
        assert reaction.rotate and reaction.retry_at is not None and 100 < reaction.retry_at < 110
        identities.append(thief.fresh_account(plan.client, burnt))
    assert thief.react(plan, 403, 200.0) == GIVE_UP  # four accounts: three rotations, then no more
    assert thief.react(plan, 429, 200.0).retry_at == 260.0 and not thief.react(plan, 429, 200.0).rotate
    for old, new in pairwise(identities):
        assert old.ip.rsplit(".", 1)[0] != new.ip.rsplit(".", 1)[0]
        assert old.user_agent != new.user_agent and old.header_order != new.header_order
    assert len({p.name for p in identities}) == 4 and {p.campaign for p in identities} == {thief.name}
    with pytest.raises(ValueError, match="spent"):
        thief.fresh_account(plan.client, 4)
    thief.plans()  # a new run starts with every account again
    assert thief.react(plan, 403, 300.0).rotate
    # Machine speed, as the v1 thief: a 64-image request a second.
    gaps = np.diff([p.at for p in thief.plans()])
    assert np.median(gaps) < 2.0


def test_aged_accounts_signed_up_before_the_campaign_and_rotated_ones_sign_up_fresh() -> None:
    fresh = HydraThief("embeddings", 5, seed=4, target=100)
    assert {p.signed_up for p in fresh.accounts()} == {None}  # new accounts: they sign up when they first send
    aged = HydraThief("embeddings", 5, seed=4, target=100)
    aged.budget = replace(aged.budget, aged_days=8.0)
    profiles = aged.accounts()
    assert {p.signed_up for p in profiles} == {-8 * DAY}
    assert [replace(p, signed_up=None) for p in profiles] == fresh.accounts()  # the same identities
    rotating = RotatingThief("classifier", 3, seed=2)
    rotating.budget = replace(rotating.budget, aged_days=30.0)
    (first,) = rotating.accounts()
    assert first.signed_up == -30 * DAY and rotating.fresh_account(first.name, 1).signed_up is None
    with pytest.raises(ValueError, match="aged_days >= 0"):
        Budget(aged_days=-1.0)


# -- hydra ----------------------------------------------------------------------------


def test_hydra_accounts_each_act_like_a_person_behind_their_own_proxy() -> None:
    thief = HydraThief("chat", 20, requests_per_day=26.0, seed=3, target=10_000)  # a target it never reaches
    profiles = _profiles(thief)
    assert len({p.ip.rsplit(".", 1)[0] for p in profiles.values()}) == 20
    plans = thief.plans()
    per_account = Counter(p.client for p in plans)
    rates = np.array([per_account[name] for name in profiles]) / 7.0
    assert 24 <= rates.mean() <= 28 and rates.min() > 18 and rates.max() < 34
    cover = [p for p in plans if p.purpose == "cover"]
    assert abs(len(cover) / len(plans) - 0.3) < 0.05
    # Cover is a person's question; extraction a chain-of-thought frame over a task.
    assert all([m["role"] for m in p.body["messages"]] == ["user"] for p in cover)
    frames = {p.body["messages"][0]["content"] for p in plans if p.purpose == "extraction"}
    assert len(frames) >= 5
    # Each account keeps its own hours: the peak hours of the day differ between accounts.
    peaks = {np.bincount([int(p.at % DAY // 3600) for p in plans if p.client == name], minlength=24).argmax()
             for name in profiles}
    assert len(peaks) >= 8


@pytest.mark.parametrize(("asset", "batches"), [("classifier", (4, 8)), ("embeddings", (4, 16))])
def test_hydra_sends_small_batches_and_stops_at_its_target(asset: str, batches: tuple[int, int]) -> None:
    thief = HydraThief(asset, 1000, seed=4, target=2000)  # type: ignore[arg-type]
    plans = thief.plans()
    extraction = [p for p in plans if p.purpose == "extraction"]
    assert sum(p.units for p in extraction) == 2000 and plans[-1] is extraction[-1]
    assert all(batches[0] <= p.units <= batches[1] for p in extraction[:-1])
    assert all(p.units <= 3 for p in plans if p.purpose == "cover")
    per_account = Counter(p.client for p in plans)
    assert np.median(list(per_account.values())) <= 2  # most of a thousand send a request or two


def _lockstep_links(plans: list[PlannedRequest], profiles: dict[str, ClientProfile]) -> set[tuple[str, str]]:
    """Pairs the engine's lockstep rule links, checked every 15 s of event time as it does."""
    events = replay_events(plans, profiles, START_TS)
    states: dict[str, ClientState] = {}
    found: set[tuple[str, str]] = set()
    checked = events[0].ts
    traffic = TrafficWindows()
    for query in DetectionEngine(CONFIG).queries_of(events):
        now = query.event.ts
        client = query.event.client
        traffic.add(query)
        states.setdefault(client, ClientState(client, "default", CONFIG.window)).add(query)
        if now - checked >= 15.0:
            checked = now
            active = (activity_of(s, now, None, traffic) for s in states.values())
            found |= set(lockstep_pairs(a for a in active if a is not None))
    return found


def test_hydra_timers_are_independent_where_a_shared_script_would_be_linked() -> None:
    # The library's thousand-account classifier hydra: with plain Poisson timers three pairs
    # of its accounts shared two 10-second slots by chance; its quiet periods rule that out.
    thief = HydraThief("classifier", 1000, seed=1, target=4000)
    plans, profiles = thief.plans(), _profiles(thief)
    assert not _lockstep_links(plans, profiles)
    by_account: dict[str, list[float]] = {}
    for plan in plans:
        by_account.setdefault(plan.client, []).append(plan.at)
    assert min(min(np.diff(t), default=600.0) for t in by_account.values()) >= 600.0
    # One script driving two of its accounts (five batches in ten minutes, a second apart,
    # once the campaign is over) is linked by the same rule.
    first, second = sorted(profiles)[:2]
    end = plans[-1].at
    script = [PlannedRequest(end + 100 * i + d, name, plans[0].route, plans[i].body, "extraction")
              for i in range(5) for d, name in ((0.0, first), (1.0, second))]
    assert (first, second) in {tuple(sorted(pair)) for pair in _lockstep_links(plans + script, profiles)}


def test_hydra_library_of_ten_thousand_accounts_buys_each_target() -> None:
    thieves = hydra_library(Scale(), seed=1)
    firsts = sorted(t.plans()[0].at for t in thieves)  # one after another, not one crowd
    assert min(np.diff(firsts)) > 0.7 * DAY and firsts[-1] < 7 * DAY
    accounts = sum(len(t.accounts()) for t in thieves)
    plans = [t.plans() for t in thieves]
    assert accounts == 3 * (100 + 1000 + 10_000)
    assert {t.spend(p).units for t, p in zip(thieves, plans, strict=True)} == {3000, 1536, 4000}  # type: ignore[attr-defined]


# -- white box ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> Reference:
    """A reference calibrated on a small honest v1 population (hashing embedder)."""
    population = BenignPopulation(chat_users=40, embedding_users=10, classifier_users=10, batch_summarisers=0,
                                  image_streams=0, max_tokens=256)
    plans, profiles = population.generate(load_prompts(), np.random.default_rng(11), DAY)
    events = replay_events(plans, {p.name: p for p in profiles}, START_TS)
    answer_classifier(events)
    return calibrate(by_client(events), config=CONFIG, embedder=HashingEmbedder())


def _worst_risk(thief: Thief, reference: Reference) -> float:
    """The thief's highest risk in a fresh engine that never saw its planning."""
    events = _events(thief)
    answer_classifier(events)
    engine = DetectionEngine(CONFIG, embedder=HashingEmbedder(), reference=reference)
    worst = [0.0]

    def note(verdict: Verdict) -> None:
        worst[0] = max(worst[0], verdict.risk)

    engine.listener = note
    for start in range(0, len(events), 100):
        engine.process(events[start : start + 100])
    return worst[0]


@pytest.mark.parametrize(("asset", "target"), [("classifier", 600), ("embeddings", 400), ("chat", 120)])
def test_white_box_thief_stays_below_the_alert_line_of_a_fresh_detector(
        reference: Reference, asset: str, target: int) -> None:
    knowledge = Knowledge.white_box(reference)
    thief = WhiteBoxThief(asset, knowledge, HashingEmbedder(), seed=1, target=target, days=3.0)  # type: ignore[arg-type]
    plans = thief.plans()
    cost = thief.self_check
    assert cost is not None and cost.sent == len(plans) and cost.worst_risk < 0.15
    assert thief.spend(plans).units >= 0.9 * target
    alert = CONFIG.tier("default").alert
    assert _worst_risk(thief, reference) < alert
    # The same detector catches the v1 thief on the same asset: the test can fail.
    assert _worst_risk(NaiveThief(asset, seed=1, target=target), reference) >= alert  # type: ignore[arg-type]
    tier = example_config().limits.tiers["default"]
    times = [p.at for p in plans]
    assert _most_in_window(times, [p.units for p in plans], 600) <= 0.85 * knowledge.volume_line
    assert _most_in_window(times, [1] * len(plans), 60) <= 0.85 * (tier.requests_per_minute or 0)
    assert max(_active_hours(times)) <= 16
    assert max(np.diff(times)) < CONFIG.idle_evict_hours * 3600  # its window is never evicted


def test_adaptive_library_with_white_box() -> None:
    reference = Reference({}, {"around_the_clock": 20.0}, {"default": 4.0})
    thieves = adaptive_library(SMALL, seed=1, knowledge=Knowledge(), white_box=Knowledge.white_box(reference),
                               embedder=HashingEmbedder())
    assert [t.name for t in thieves if t.strategy == "white-box"] == [
        "white-box/chat", "white-box/embeddings", "white-box/classifier"]
    assert len(thieves) == 3 * 5 + 1  # five strategies per asset, the in-distribution variant once


def test_paced_hydras_take_turns_within_the_week() -> None:
    thieves = paced_hydra_library(Scale(), seed=3)
    spans = [(t.plans()[0].at, t.plans()[-1].at) for t in thieves]
    assert [t.name for t in thieves] == [f"hydra-paced100-1000/{a}" for a in ("chat", "classifier", "embeddings")]
    assert all(end < later for (_, end), (later, _) in pairwise(spans))  # never two at once
    assert all(t.horizon <= 7 * DAY for t in thieves) and spans[-1][1] < 7 * DAY
    for thief in thieves:  # each still buys its whole target, within the week
        assert thief.spend(thief.plans()).units == Scale().hydra_target(thief.asset)  # type: ignore[attr-defined]


def test_a_paced_hydra_signs_its_accounts_up_one_after_another_and_still_buys_its_target() -> None:
    thief = HydraThief("classifier", 1000, seed=2, target=4000, signups_per_day=200.0, start=DAY)
    plans = thief.plans()
    first: dict[str, float] = {}
    for plan in plans:
        first.setdefault(plan.client, plan.at)
    slots = {name: int(name.rsplit("/", 1)[1]) for name in first}
    assert all(at >= DAY + slots[name] * DAY / 200 for name, at in first.items())  # not before its sign-up
    assert thief.name == "hydra-paced200-1000/classifier"
    assert sum(p.units for p in plans if p.purpose == "extraction") == 4000
    days = (plans[-1].at - DAY) / DAY
    assert days < 2 and len(first) < 400  # a day or two, a few hundred accounts, each sending more
