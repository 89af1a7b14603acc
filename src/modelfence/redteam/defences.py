"""The defended stack: the harness's own gateway with ModelFence's defences switched on.

The baseline (``stack.baseline_config``) turns detection and the request rules off so that
undefended numbers exist. This is the same gateway as a deployment would run it: the
default request policy and output hardening, and the detector with a reference
calibrated from an honest population drawn with its own seed, never from the attacks it
then faces. The harness's evaluator identity (which measures clones on held-out data) is
on the allow-list, as an operator's own monitoring would be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from modelfence.config import DetectionConfig
from modelfence.detect.embedding import load_embedder
from modelfence.detect.reference import Reference
from modelfence.policy.config import RequestRules
from modelfence.redteam.context import EVALUATOR
from modelfence.redteam.prompts import load_prompts
from modelfence.redteam.replay_detection import calibrated_reference

CALIBRATION_CLIENTS = 2_000


def calibrate_reference(
    path: Path, *, seed: int, clients: int = CALIBRATION_CLIENTS, config: DetectionConfig | None = None
) -> Reference:
    """Calibrate on ``clients`` honest clients (seeded apart from every scenario) and save
    the ``.npz`` a gateway's ``detection.reference_file`` loads."""
    config = config or DetectionConfig.model_validate({})
    reference = calibrated_reference(load_prompts(), np.random.default_rng([seed, 0xCA11B]), clients,
                                     config, load_embedder(config.embedder))
    reference.save(path)
    return reference


def defended_overrides(workdir: Path, *, seed: int, clients: int = CALIBRATION_CLIENTS) -> dict[str, Any]:
    reference = workdir / "reference.npz"
    calibrate_reference(reference, seed=seed, clients=clients)
    return {
        "policy": {"tiers": {"default": {"request": RequestRules.model_validate({}).model_dump()}}},
        "detection": {"enabled": True, "reference_file": str(reference), "allow_list": [EVALUATOR],
                      "state_poll_seconds": 0.5},
    }
