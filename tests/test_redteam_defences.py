"""The defended stack's configuration: a calibrated detector and the default policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelfence.cli import app
from modelfence.config import Config
from modelfence.detect.reference import Reference
from modelfence.redteam.context import EVALUATOR
from modelfence.redteam.defences import defended_overrides
from modelfence.redteam.stack import baseline_config

pytestmark = pytest.mark.models  # calibration embeds prompts with MiniLM


def test_the_defended_gateway_runs_a_calibrated_detector_and_the_default_policy(tmp_path: Path) -> None:
    overrides = defended_overrides(tmp_path, seed=3, clients=50)
    config = Config.model_validate(baseline_config("http://127.0.0.1:9", tmp_path, overrides))
    undefended = Config.model_validate(baseline_config("http://127.0.0.1:9", tmp_path))
    assert config.detection.enabled and not undefended.detection.enabled
    assert EVALUATOR in config.detection.allow_list
    rules = config.policy.tiers["default"].request
    assert rules.logit_bias_with_logprobs == "forbid"
    assert undefended.policy.tiers["default"].request.logit_bias_with_logprobs == "allow"
    assert config.detection.reference_file is not None
    reference = Reference.load(config.detection.reference_file)
    assert {"text", "vec64"} <= reference.spaces.keys()
    assert reference.thresholds and reference.tier_medians["default"] >= 1


def test_calibrate_writes_the_reference_a_gateway_loads(tmp_path: Path) -> None:
    config = tmp_path / "modelfence.yaml"
    config.write_text("detection: {embedder: hashing, target_fpr: 0.01}\n")
    output = tmp_path / "reference.npz"
    result = CliRunner().invoke(
        app, ["--config", str(config), "calibrate", "--output", str(output), "--clients", "50"]
    )
    assert result.exit_code == 0, result.output
    assert "volume_vs_tier" in result.output and "reference_file" in result.output
    assert Reference.load(output).thresholds.keys() >= {"mmd_shift", "volume_vs_tier"}
    bad = CliRunner().invoke(app, ["--config", str(config), "calibrate", "--clients", "5"])
    assert bad.exit_code == 2 and "clients" in bad.output
