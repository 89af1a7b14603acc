"""Each detector on crafted streams: it fires on its pattern and stays quiet on benign ones."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from modelfence.config import DetectionConfig
from modelfence.detect.detectors import (
    AroundTheClock,
    BoundaryProbing,
    Coverage,
    Detector,
    Harvesting,
    Mmd,
    OutOfDistribution,
    Prada,
    Regularity,
    Sweeps,
    Volume,
    signal,
)
from modelfence.detect.detectors.prada import shapiro_w
from modelfence.detect.embedding import HashingEmbedder
from modelfence.detect.engine import DetectionEngine
from modelfence.detect.features import ClientState, View, min_distances
from modelfence.detect.reference import Reference, fit_space
from modelfence.telemetry.events import RequestEvent

from .test_detect_streams import benign_chat, harvester, natural_vectors, perturbation_sweep

EMBEDDER = HashingEmbedder()


def view_of(events: list[RequestEvent]) -> View:
    return View(DetectionEngine(DetectionConfig(), embedder=EMBEDDER).queries_of(events))


def fires(
    detector: Detector, events: list[RequestEvent], reference: Reference | None = None
) -> bool:
    value = detector.statistic(view_of(events), reference)
    threshold = (
        reference.thresholds.get(detector.code) if reference else None
    ) or detector.default_threshold
    assert value is not None and threshold is not None
    return signal(detector, value, threshold) is not None


@pytest.fixture(scope="module")
def vector_reference() -> Reference:
    benign = [e for seed in range(6) for e in natural_vectors(f"b{seed}", 80, seed)]
    vectors = np.array([e.input_rows[0] for e in benign if e.input_rows], dtype=np.float32)
    space = fit_space(vectors, cells=16, seed=0)
    return Reference({"vec16": space}, {"mmd_shift": 0.05, "coverage_growth": 0.9})


def test_min_distances_are_to_earlier_queries_only() -> None:
    v = np.array([[0.0], [10.0], [1.0], [10.5]])
    assert min_distances(v).tolist() == [10.0, 1.0, 0.5]


def test_prada_fires_on_perturbation_sweeps_not_natural_queries() -> None:
    assert fires(Prada(), perturbation_sweep("a", 120, seed=1))
    assert not fires(Prada(), natural_vectors("b", 120, seed=2))


@pytest.mark.parametrize("n", [21, 22, 57, 400, 4_999, 6_000])
def test_shapiro_w_is_scipys_statistic(n: int) -> None:
    from scipy.stats import shapiro

    rng = np.random.default_rng(n)
    for values in (rng.standard_normal(n), rng.exponential(size=n), rng.uniform(size=n),
                   np.concatenate([rng.normal(0, 1, n // 2), rng.normal(6, 1, n - n // 2)]),
                   1e3 + 1e-6 * rng.standard_normal(n)):  # far from 0, little spread
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns past 5,000 values
            expected = shapiro(values).statistic
        assert shapiro_w(values) == pytest.approx(expected, abs=1e-8)


def test_sweeps_fires_on_small_steps_not_on_natural_or_exact_retries() -> None:
    assert fires(Sweeps(), perturbation_sweep("a", 120, seed=1))
    natural = natural_vectors("b", 120, seed=2)
    retries = natural + [natural[-1]] * 10  # exact repeats are retries, not sweeps
    assert not fires(Sweeps(), retries)


def test_harvesting_fires_on_distillation_shapes_not_on_chat() -> None:
    detector = Harvesting()
    assert fires(detector, harvester("a", 40, seed=1))
    assert "logprobs" in detector.describe(1.0, 0.5)
    assert not fires(Harvesting(), benign_chat("b", 40, seed=2))


def test_harvesting_ignores_a_single_honest_habit() -> None:
    # Temperature 0 and single-turn alone are common honest API use.
    events = [
        RequestEvent(**{**e.to_dict(), "logprobs": False, "top_logprobs": 0, "tokens_out": 50})
        for e in harvester("a", 40, seed=1)
    ]
    assert not fires(Harvesting(), events)


def test_regularity_fires_on_a_metronome_not_on_people() -> None:
    assert fires(Regularity(), harvester("a", 40, seed=1, gap=2.0))
    assert not fires(Regularity(), benign_chat("b", 60, seed=2))


def test_volume_compares_with_the_tier_median() -> None:
    detector = Volume()
    detector.tier_median = {"default": 3.0}  # queries in ten minutes
    assert fires(detector, harvester("a", 60, seed=1, gap=2.0))  # 60 in two minutes: 20×
    detector.tier_median = {"default": 30.0}
    assert not fires(detector, harvester("a", 60, seed=1, gap=2.0))


def test_boundary_probing_fires_on_low_margins() -> None:
    assert fires(BoundaryProbing(), perturbation_sweep("a", 60, seed=1))
    assert not fires(BoundaryProbing(), natural_vectors("b", 60, seed=2))


def test_mmd_and_coverage_and_ood_use_the_reference(vector_reference: Reference) -> None:
    shifted = natural_vectors("a", 80, seed=9)
    for e in shifted:
        e.input_rows = [[v * 0.2 + 4.0 for v in row] for row in e.input_rows or []]
    assert fires(Mmd(), shifted, vector_reference)
    assert fires(OutOfDistribution(), shifted, vector_reference)
    assert not fires(Mmd(), natural_vectors("b", 80, seed=10), vector_reference)
    assert not fires(OutOfDistribution(), natural_vectors("b", 80, seed=10), vector_reference)
    # Without a reference these detectors stay silent rather than guess.
    assert Mmd().statistic(view_of(shifted), None) is None
    assert Coverage().statistic(view_of(shifted), None) is None


def test_reference_round_trips_through_a_file(
    vector_reference: Reference, tmp_path: object
) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "reference.npz"
    vector_reference.save(path)
    loaded = Reference.load(path)
    assert loaded.thresholds == vector_reference.thresholds
    np.testing.assert_allclose(
        loaded.spaces["vec16"].centroids, vector_reference.spaces["vec16"].centroids
    )


def test_prada_ignores_exact_repeats() -> None:
    natural = natural_vectors("b", 60, seed=2)
    repeated = [e for e in natural for _ in range(3)]  # every query sent three times
    assert not fires(Prada(), repeated)
    assert Prada().statistic(view_of(natural[:1] * 60), None) is None


def test_around_the_clock_needs_a_full_day_and_fires_on_a_247_script() -> None:
    config = DetectionConfig.model_validate({})
    engine = DetectionEngine(config, embedder=EMBEDDER)
    script = harvester("bot", 26 * 4, seed=1, gap=900.0)  # every 15 minutes for 26 hours
    person = [e for day in range(2) for e in benign_chat("p", 20, seed=day, start=day * 86_400.0 + 9 * 3600)]
    for name, events in (("bot", script), ("p", person)):
        state = ClientState(name, "default", config.window)
        for query in engine.queries_of(events):
            state.add(query)
        value = AroundTheClock().statistic(View(state.queries, state=state), None)
        if name == "bot":
            assert value is not None and value >= 24
        else:
            assert value is not None and value <= 3
    young = ClientState("new", "default", config.window)
    for query in engine.queries_of(script[:40]):
        young.add(query)
    assert AroundTheClock().statistic(View(young.queries, state=young), None) is None
