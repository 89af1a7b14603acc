"""Calibration from benign clients only: held-out benign clients pass, attackers do not."""

from __future__ import annotations

from pathlib import Path

from modelfence.config import DetectionConfig
from modelfence.detect.calibration import calibrate
from modelfence.detect.detectors import all_detectors
from modelfence.detect.embedding import HashingEmbedder
from modelfence.detect.engine import DetectionEngine
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
