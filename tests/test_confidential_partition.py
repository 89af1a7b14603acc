"""Partitioning a model into a sealed private part and a public rest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from modelfence.cli import app
from modelfence.confidential.partition import PartitionError, split, split_module

STATE = {
    "backbone.0.weight": np.ones((4, 4), np.float32),
    "backbone.0.bias": np.zeros(4, np.float32),
    "head.weight": np.ones((2, 4), np.float32),
    "head.bias": np.zeros(2, np.float32),
    "header.weight": np.ones(1, np.float32),  # "head" must not take "header"
    "adapters.1.lora_a": np.ones((4, 1), np.float32),
}


def test_a_module_name_protects_its_tensors_and_a_glob_matches_names() -> None:
    public, private = split(STATE, ["head", "adapters.*"])
    assert sorted(private) == ["adapters.1.lora_a", "head.bias", "head.weight"]
    assert sorted(public) == ["backbone.0.bias", "backbone.0.weight", "header.weight"]


def test_a_protected_name_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(PartitionError, match="'haed' matches no tensor"):
        split(STATE, ["head", "haed"])
    with pytest.raises(PartitionError, match="at least one"):
        split(STATE, [])


def test_a_torch_module_splits_by_its_own_module_names() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    public, private = split_module(model, ["2"])
    assert sorted(private) == ["2.bias", "2.weight"] and sorted(public) == ["0.bias", "0.weight"]
    np.testing.assert_array_equal(private["2.weight"], model[2].weight.detach().numpy())
    with pytest.raises(PartitionError, match="bfloat16"):
        split_module(model.to(torch.bfloat16), ["2"])


def test_seal_protect_seals_only_the_named_part(tmp_path: Path) -> None:
    np.savez(tmp_path / "model.npz", **STATE)
    out, key = tmp_path / "head.sealed", tmp_path / "broker.key"
    args = ["seal", str(tmp_path / "model.npz"), str(out), "--artifact-id", "head", "--key-file", str(key)]
    done = CliRunner().invoke(app, [*args, "--new-key", "--protect", "head"])
    assert done.exit_code == 0, done.output
    shown = json.loads(CliRunner().invoke(app, ["inspect", str(out), "--json"]).output)
    assert [t["name"] for t in shown["tensors"]] == ["head.weight", "head.bias"]
    typo = CliRunner().invoke(app, [*args, "--protect", "haed"])
    assert typo.exit_code == 2 and "matches no tensor" in typo.output
