"""Calibration from benign clients only: held-out benign clients pass, attackers do not."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from modelfence.config import Config, DetectionConfig
from modelfence.detect.calibration import calibrate
from modelfence.detect.detectors import all_detectors
from modelfence.detect.embedding import HashingEmbedder
from modelfence.detect.engine import DetectionEngine
from modelfence.detect.process import build_engine
from modelfence.detect.reference import Reference

from .test_detect_engine import replay
from .test_detect_streams import benign_chat, harvester, natural_vectors, perturbation_sweep

CONFIG = DetectionConfig(evaluate_every=10)


def test_thresholds_come_from_benign_clients_and_hold_on_new_ones(tmp_path: Path) -> None:
    benign = {f"b{i}": benign_chat(f"b{i}", 40, seed=i) for i in range(16)}
    benign |= {f"v{i}": natural_vectors(f"v{i}", 40, seed=i) for i in range(16)}
    reference = calibrate(benign, config=CONFIG, embedder=HashingEmbedder(), fpr=0.05, cells=8)
    assert {"text", "vec16"} <= reference.spaces.keys()
    assert {"mmd_shift", "coverage_growth", "out_of_distribution"} <= reference.thresholds.keys()
    defaults = {d.code: d.default_threshold for d in all_detectors()}
    assert reference.thresholds["machine_timing"] >= defaults["machine_timing"]  # never tighter
    assert reference.tier_medians["default"] >= 1  # benign queries in ten minutes
    path = tmp_path / "reference.npz"
    reference.save(path)
    assert Reference.load(path).tier_medians == reference.tier_medians

    engine = DetectionEngine(CONFIG, embedder=HashingEmbedder(), reference=Reference.load(path))
    events = [e for i in range(10) for e in benign_chat(f"new{i}", 40, seed=500 + i)]
    events += [e for i in range(10) for e in natural_vectors(f"newv{i}", 40, seed=500 + i)]
    events += harvester("thief", 60, seed=1) + perturbation_sweep("prober", 60, seed=2)
    verdicts = replay(engine, events)
    flagged = {c for c, v in verdicts.items() if v.level != "normal"}
    assert {"thief", "prober"} <= flagged
    assert len(flagged - {"thief", "prober"}) <= 1  # 20 new benign clients at fpr 0.05


def test_a_reference_names_its_embedder_and_a_detector_with_another_refuses_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    benign = {f"b{i}": benign_chat(f"b{i}", 40, seed=i) for i in range(16)}
    reference = calibrate(benign, config=CONFIG, embedder=HashingEmbedder(), fpr=0.05, cells=8)
    assert reference.embedder == "hashing"
    path, legacy = tmp_path / "reference.npz", tmp_path / "legacy.npz"
    reference.save(path)
    replace(reference, embedder=None).save(legacy)  # as releases before it was kept wrote it

    def detector(embedder: str, reference_file: Path) -> DetectionEngine:
        return build_engine(Config.model_validate({
            "store": f"sqlite:///{tmp_path / 'state.db'}",
            "detection": {"embedder": embedder, "reference_file": str(reference_file)},
        }))

    reference = detector("hashing", path).reference
    assert reference is not None and reference.embedder == "hashing"
    with pytest.raises(ValueError, match=(
        r"detection.reference_file: .*reference.npz was calibrated with embedder 'hashing', "
        r"but detection.embedder gives 'minilm'; set detection.embedder: hashing"
    )):
        detector("minilm", path)
    with caplog.at_level(logging.WARNING, logger="modelfence.detect.reference"):
        assert detector("minilm", legacy).reference is not None
    assert "does not record the embedder it was calibrated with" in caplog.text
