"""The v2 yardstick end to end: the trimmed ``adaptive`` scenario (a two-day honest
population with every adaptive thief, undefended and defended), as CI runs it."""

from __future__ import annotations

import json

import pytest

from modelfence.redteam import run_redteam
from modelfence.redteam.contest import FRICTIONS
from modelfence.redteam.evaluation import weighted_share
from modelfence.redteam.populations.week import GROUPS
from modelfence.redteam.suites import SUITES

pytestmark = pytest.mark.models  # MiniLM judges the embedding and chat thieves


@pytest.fixture(scope="module")
def adaptive(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("adaptive")
    report = run_redteam("ci", scenario="adaptive", output=out, seed=1)
    data = json.loads((out / "results.json").read_text())
    data["report"] = report.read_text()
    return data


def test_every_run_records_its_seed_commit_and_time_and_starts_no_stack(adaptive: dict) -> None:
    meta = adaptive["meta"]
    assert meta["seed"] == 1 and meta["seconds"] > 0 and meta["commit"]
    assert meta["gateway"].startswith("none (replay only")
    details = adaptive["scenarios"][0]["details"]
    assert details["seed"] == 1
    assert set(details["seconds"]) == {"calibration", "generation", "undefended", "defended", "judging"}
    assert details["embedder"] == "TextEmbedder"  # the served MiniLM is the victim and the judge


def test_every_thief_is_judged_undefended_and_defended(adaptive: dict) -> None:
    attacks = adaptive["scenarios"][0]["details"]["attacks"]
    strategies = {a["strategy"] for a in attacks}
    assert {"naive", "paced", "one-batch", "rotating", "white-box"} <= strategies
    assert "paced-in-distribution/classifier" in {a["attack"] for a in attacks}
    assert {a["asset"] for a in attacks} == {"chat", "embeddings", "classifier"}
    for attack in attacks:
        undefended, defended = attack["undefended"], attack["defended"]
        assert undefended["units"] > 0, attack["attack"]  # limits alone let every thief buy something
        assert defended["units"] <= undefended["units"], attack["attack"]
        assert undefended["accounts_used"] <= attack["budget"]["accounts"]
        assert defended["accounts_used"] <= attack["budget"]["accounts"]
        assert 0.0 <= attack["baseline"] <= undefended["quality"] <= 1.0
        if attack["theft_reduction"] is not None:
            gain = undefended["quality"] - attack["baseline"]
            expected = 1 - (defended["quality"] - attack["baseline"]) / gain
            assert attack["theft_reduction"] == pytest.approx(expected, abs=1e-3)
        assert attack["needed_for_95"]["undefended"] is not None  # reaching 95% of itself
    naive = {a["attack"]: a for a in attacks}["naive/classifier"]
    assert naive["defended"]["units"] < naive["undefended"]["units"]  # detection stops the machine-speed floor
    assert naive["defended"]["accounts_flagged"] == 1


def test_honest_friction_is_reported_per_group_with_intervals(adaptive: dict) -> None:
    honest = adaptive["scenarios"][0]["details"]["honest"]
    assert honest["population"] == sum(SUITES["ci"].v2.counts.values())
    for side in ("undefended", "defended"):
        for group in (*GROUPS, "all"):
            share = honest[side]["any_friction"][group]
            low, high = share["interval"]
            assert low <= share["share"] <= high
    assert "| 24/7 |" in adaptive["report"] and "theft reduction" in adaptive["report"]


def test_probation_is_measured_on_defended_runs_only(adaptive: dict) -> None:
    honest = adaptive["scenarios"][0]["details"]["honest"]
    for side in ("undefended", "defended"):
        assert set(honest[side]["by_kind"]) == {*FRICTIONS, "flagged"}
    for kind in ("probation", "probation_after_week", "account_budget"):
        assert honest["undefended"]["by_kind"][kind]["share"] == 0  # no trust levels without defences
    assert "met a probation cap (defended)" in adaptive["report"]
    assert "after their first week" in adaptive["report"]


def test_weighted_share_uses_the_effective_sample_size() -> None:
    # Two strata: 10 sampled of 1,000 (weight 100), none met friction; 10 of 10, all did.
    rows = [(False, 100.0)] * 10 + [(True, 1.0)] * 10
    share = weighted_share(rows)
    assert share["share"] == pytest.approx(10 / 1010, abs=1e-5)
    assert share["represents"] == 1010 and share["sampled"] == 20
    # Kish: (sum w)^2 / sum w^2 = 1010^2 / 100010 ≈ 10.2 effective clients, so a wide interval.
    assert share["interval"][1] > 0.2
    assert weighted_share([])["share"] is None
