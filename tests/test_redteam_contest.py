"""The contest: honest customers and thieves through the gateway's real limits and
detection, with refusals answered back to the thieves."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from modelfence.config import DetectionConfig
from modelfence.detect.actions import Action, rank
from modelfence.detect.calibration import calibrate
from modelfence.detect.embedding import HashingEmbedder
from modelfence.detect.engine import DetectionEngine
from modelfence.detect.reference import Reference
from modelfence.redteam.contest import Contest
from modelfence.redteam.populations.benign import BenignPopulation, digit_images
from modelfence.redteam.prompts import load_prompts
from modelfence.redteam.replay import replay_events
from modelfence.redteam.replay_detection import START_TS, by_client
from modelfence.redteam.tariff import example_config
from modelfence.redteam.thieves import HydraThief, NaiveThief, RotatingThief
from modelfence.redteam.thieves.base import DAY, Budget
from modelfence.redteam.traffic import (
    CHAT,
    DIGITS_INFER,
    ClientProfile,
    PlannedRequest,
    chat_body,
    digits_body,
)

CONFIG = example_config()
PROBATION_ROWS = CONFIG.accounts.allowance("probation").rows_per_day


def _honest(name: str, times: list[float], tier: str = "default") -> tuple[list[PlannedRequest], ClientProfile]:
    profile = ClientProfile(name, "benign", "OpenAI/Python 1.54.3", "10.30.0.7", tier=tier, segment="light")
    body = chat_body([{"role": "user", "content": "What is the capital of France?"}], 64)
    return [PlannedRequest(t, name, CHAT, body, turns=1) for t in times], profile


def test_limits_refuse_a_burst_and_the_customer_feels_it() -> None:
    plans, profile = _honest("bursty", [i * 0.1 for i in range(100)])  # 100 in ten seconds; the tier allows 60/min
    calm_plans, calm = _honest("calm", [i * 30.0 for i in range(100)])
    calm = replace(calm, ip="10.30.1.7")
    result = Contest(CONFIG, None).run([*plans, *calm_plans], [profile, calm], [])
    assert result.honest["bursty"] == {"refused"}
    assert result.honest["calm"] == set()
    assert result.events == 200
    assert not result.defended


def test_a_higher_tier_is_not_refused_for_the_same_burst() -> None:
    plans, profile = _honest("pro-customer", [i * 0.1 for i in range(100)], tier="pro")
    assert Contest(CONFIG, None).run(plans, [profile], []).honest["pro-customer"] == set()


def test_a_blocked_thief_stops_and_a_rotating_one_moves_on_within_its_budget() -> None:
    naive = NaiveThief("classifier", seed=3, target=640)
    rotating = RotatingThief("classifier", accounts=3, seed=3, target=640, name="rotating/test",
                             subnet_base=41_000)
    contest = Contest(CONFIG, None)
    for thief in (naive, rotating):  # every account they start with is already blocked
        for profile in thief.accounts():
            contest.actions[profile.name] = Action("block")
    result = contest.run([], [], [naive, rotating])
    stopped, moved = result.campaigns[naive.name], result.campaigns[rotating.name]
    assert (stopped.requests, stopped.blocked, stopped.answered) == (1, 1, [])
    assert moved.blocked == 1 and moved.accounts_created == 2 <= rotating.budget.accounts
    assert sum(p.units for p, _ in moved.answered) == 640  # the fresh account bought everything
    assert len(moved.senders) == 2
    assert all(senders == 2 for _, senders in moved.answered)


def test_rotation_stops_when_the_accounts_run_out() -> None:
    rotating = RotatingThief("classifier", accounts=2, seed=3, target=640)
    contest = Contest(CONFIG, None)
    (first,) = rotating.accounts()
    for identity in (first, rotating.fresh_account(first.name, 1)):  # both accounts it may ever have
        contest.actions[identity.name] = Action("block")
    outcome = contest.run([], [], [rotating]).campaigns[rotating.name]
    assert outcome.answered == [] and outcome.accounts_created == 2 and outcome.blocked == 2
    assert len(outcome.senders) == 2


def test_degrade_is_a_friction_only_where_it_changes_the_answer() -> None:
    plans, profile = _honest("watched", [i * 60.0 for i in range(5)])
    asking = replace(profile, name="asks-logprobs", ip="10.30.2.7")
    logprob_plans = [replace(p, client=asking.name, body={**p.body, "logprobs": True, "top_logprobs": 5})
                     for p in plans]
    contest = Contest(CONFIG, None)
    for name in ("watched", "asks-logprobs"):
        contest.actions[name] = Action("degrade", quota_share=0.25)
    met = contest.run([*plans, *logprob_plans], [profile, asking], []).honest
    assert met["watched"] == {"tightened"}  # text only changes nothing for a plain chat
    assert met["asks-logprobs"] == {"degraded", "tightened"}


def test_labels_only_answers_give_the_detector_no_margins() -> None:
    rows = np.asarray(digit_images()[0][:4])
    plans = [PlannedRequest(float(i), c, DIGITS_INFER, digits_body(rows, labels_only=c == "labels"))
             for i, c in enumerate(("labels", "probabilities", "degraded"))]
    profiles = [ClientProfile(c, "benign", "curl/8.5.0", f"10.31.{i}.7") for i, c in
                enumerate(("labels", "probabilities", "degraded"))]
    engine = DetectionEngine(CONFIG.detection, embedder=HashingEmbedder())
    contest = Contest(CONFIG, engine)
    contest.actions["degraded"] = Action("degrade", quota_share=0.25)  # hardening serves labels only
    contest.run(plans, profiles, [])
    margins = {c: [q.margin for q in engine.clients[c].queries] for c in ("labels", "probabilities", "degraded")}
    assert margins["labels"] == [None] * 4 and margins["degraded"] == [None] * 4
    assert all(m is not None for m in margins["probabilities"])


def test_a_request_no_quota_can_pass_is_retried_only_within_the_campaign() -> None:
    thief = NaiveThief("chat", seed=5, target=3, days=1.0)
    contest = Contest(CONFIG, None)
    (account,) = thief.accounts()
    contest.actions[account.name] = Action("tighten", quota_share=1e-9)  # below one request's tokens
    outcome = contest.run([], [], [thief]).campaigns[thief.name]
    assert outcome.answered == [] and 0 < outcome.throttled == outcome.requests
    assert outcome.requests <= 3 * 24 * 60 + 3  # one retry a minute, ending with the first day


def test_a_spent_dollar_budget_stops_every_account_of_the_campaign() -> None:
    thief = NaiveThief("chat", seed=5, target=200)
    assert len(thief.plans()) == 200  # planned with a generous budget, then the budget shrinks
    thief.budget = replace(thief.budget, usd=0.01)
    result = Contest(CONFIG, None).run([], [], [thief])
    outcome = result.campaigns[thief.name]
    assert outcome.usd >= 0.01
    assert outcome.requests < 200
    _, usd = thief.tariff.charge(outcome.answered[0][0])
    assert outcome.usd - usd < 0.01  # stopped at the first answer that reached the budget


@pytest.fixture(scope="module")
def reference() -> Reference:
    corpus = load_prompts()
    population = BenignPopulation(chat_users=60, embedding_users=10, classifier_users=30, batch_summarisers=1,
                                  image_streams=1, max_tokens=64)
    plans, profiles = population.generate(corpus, np.random.default_rng(11), 86_400.0)
    events = replay_events(plans, {p.name: p for p in profiles}, START_TS)
    from modelfence.redteam.replay_attacks import answer_classifier

    answer_classifier(events)
    return calibrate(by_client(events), config=DetectionConfig(), embedder=HashingEmbedder())


def test_detection_cuts_a_machine_speed_thief_short_and_spares_honest_customers(reference: Reference) -> None:
    corpus = load_prompts()
    honest_plans, honest_profiles = BenignPopulation(
        chat_users=20, embedding_users=0, classifier_users=10, batch_summarisers=0, image_streams=0, max_tokens=64,
    ).generate(corpus, np.random.default_rng(12), 86_400.0)
    outcomes = {}
    for defended in (False, True):
        thief = NaiveThief("classifier", seed=9, target=2_000)
        engine = (DetectionEngine(CONFIG.detection, embedder=HashingEmbedder(), reference=reference)
                  if defended else None)
        result = Contest(CONFIG, engine).run(honest_plans, honest_profiles, [thief])
        outcomes[defended] = result
    bought = {d: sum(p.units for p, _ in r.campaigns["naive/classifier"].answered) for d, r in outcomes.items()}
    assert bought[False] == 2_000  # limits alone never stop it
    assert bought[True] < 1_000
    caught = outcomes[True].campaigns["naive/classifier"]
    assert caught.accounts_flagged == 1
    assert rank(outcomes[True].reasons["naive/classifier/0"][0]) >= rank("tighten")
    assert caught.units_before_first_flag is not None and caught.units_before_first_flag <= bought[True]
    assert not any(outcomes[False].honest.values())
    assert sum(bool(met - {"tightened"}) for met in outcomes[True].honest.values()) <= 1


def test_budget_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="accounts >= 1"):
        Budget(accounts=0)


# -- accounts and probation ------------------------------------------------------------


def _unwatched(*clients: str) -> DetectionEngine:
    """A defended run's detector that never acts on ``clients``: only trust and limits bind them."""
    return DetectionEngine(CONFIG.detection.model_copy(update={"allow_list": clients}), embedder=HashingEmbedder())


def _scorer(name: str, subnet: int, batches: int, signed_up: float | None = None,
            paid_usd: float = 0.0) -> tuple[list[PlannedRequest], ClientProfile]:
    """An honest client scoring ``batches`` batches of 64 digits, one every two minutes."""
    body = digits_body(np.asarray(digit_images()[0][:64]))
    profile = ClientProfile(name, "benign", "python-httpx/0.27.0", f"10.32.{subnet}.7", segment="classify",
                            signed_up=signed_up, paid_usd=paid_usd)
    return [PlannedRequest(3_600.0 + 120.0 * i, name, DIGITS_INFER, body) for i in range(batches)], profile


def _bought(thief: NaiveThief, engine: DetectionEngine | None) -> int:
    outcome = Contest(CONFIG, engine).run([], [], [thief]).campaigns[thief.name]
    return sum(p.units for p, _ in outcome.answered)


def test_probation_caps_a_new_thief_account_at_its_daily_rows_when_defended() -> None:
    def thief() -> NaiveThief:
        return NaiveThief("classifier", seed=9, target=2_000, days=1.0)  # 2,000 images within an hour

    account = thief().accounts()[0].name
    assert _bought(thief(), None) == 2_000  # undefended: limits alone, no trust levels
    defended = _bought(thief(), _unwatched(account))
    assert PROBATION_ROWS is not None and 0 < defended <= PROBATION_ROWS


def test_an_aged_thief_account_leaves_probation() -> None:
    thief = NaiveThief("classifier", seed=9, target=2_000, days=1.0)
    thief.budget = replace(thief.budget, aged_days=8.0)
    assert _bought(thief, _unwatched(thief.accounts()[0].name)) == 2_000


def test_a_capped_thief_retries_when_the_next_day_opens_not_every_minute() -> None:
    thief = NaiveThief("classifier", seed=9, target=2_000, days=3.0)
    outcome = Contest(CONFIG, _unwatched(thief.accounts()[0].name)).run([], [], [thief]).campaigns[thief.name]
    bought = sum(p.units for p, _ in outcome.answered)
    assert PROBATION_ROWS is not None and 2 * PROBATION_ROWS < bought <= 3 * PROBATION_ROWS  # one cap a day
    assert outcome.requests < 200  # retries a minute apart would be thousands a day


def test_probation_frictions_fall_on_newcomers_not_on_established_accounts() -> None:
    batches = 20  # 1,280 images in under an hour
    plans, profiles = [], []
    for name, subnet, signed_up, paid in (("established", 1, -100 * DAY, 0.0), ("newcomer", 2, None, 0.0),
                                          ("joined-yesterday", 3, -DAY, 0.0), ("paid", 4, 0.0, 25.0)):
        more, profile = _scorer(name, subnet, batches, signed_up, paid)
        plans += more
        profiles.append(profile)
    names = [p.name for p in profiles]
    defended = Contest(CONFIG, _unwatched(*names)).run(plans, profiles, [])
    assert defended.honest["established"] == set() and defended.honest["paid"] == set()
    for newcomer in ("newcomer", "joined-yesterday"):
        assert defended.honest[newcomer] == {"refused", "probation"}
    assert not any(Contest(CONFIG, None).run(plans, profiles, []).honest.values())


def test_a_week_old_account_that_detection_demotes_meets_probation_after_its_first_week() -> None:
    plans, profile = _scorer("demoted", 5, 3, -30 * DAY)
    contest = Contest(CONFIG, DetectionEngine(CONFIG.detection, embedder=HashingEmbedder()))
    contest.actions["demoted"] = Action("degrade", quota_share=0.25)  # 75 probation rows a day
    plans = [replace(p, at=i * 0.5) for i, p in enumerate(plans)]  # all before the detector's first batch
    met = contest.run(plans, [profile], []).honest["demoted"]
    assert {"refused", "probation", "probation_after_week"} <= met and "account_budget" not in met


def test_a_hydra_signing_up_in_bulk_is_held_once_its_sign_up_surge_is_found() -> None:
    def hydra() -> HydraThief:
        return HydraThief("classifier", 1_000, seed=3, target=4_000, days=2.0)

    rng = np.random.default_rng(0)  # a steady business: ~500 sign-ups a day, from a week before
    times = np.sort(rng.uniform(-7 * DAY, 2 * DAY, size=4_500))
    signups = [(f"customer-{i}", float(at)) for i, at in enumerate(times)]
    undefended = Contest(CONFIG, None).run([], [], [hydra()]).campaigns["hydra-1000/classifier"]
    contest = Contest(CONFIG, DetectionEngine(CONFIG.detection, embedder=HashingEmbedder()))
    defended = contest.run([], [], [hydra()], signups=signups).campaigns["hydra-1000/classifier"]
    [surge] = contest.signups.surges
    assert surge.accounts >= len(defended.senders)  # every account that signed up, as one crowd
    bought = [sum(p.units for p, _ in outcome.answered) for outcome in (undefended, defended)]
    assert bought[0] >= 4_000 and bought[1] < 0.05 * bought[0]  # the first crowd's first answers
    assert len(defended.refused_early) > 0.9 * len(defended.senders)  # the hydra target's "within 2 days"
    held = sum(bool(contest.signups.held(START_TS + at)) for _, at in signups)
    assert held < 60  # the customers who signed up in those hours, not the week's
    assert Contest(CONFIG, None).signups.surges == ()  # undefended: no watch at work
