"""The TEESlice-style experiment, small: every deployment queried through real sealed parts,
attested workers and the key broker; sealing only the head leaves a thief far ahead of
sealing the whole fine-tuned slice."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from modelfence.redteam.slice_theft import (
    DEPLOYMENTS,
    SIZES,
    Setup,
    SliceTheftResult,
    format_table,
    main,
    populations,
    run,
)

TINY = Setup(seeds=(0,), budgets=(25, 100))


@pytest.fixture(scope="module")
def result() -> SliceTheftResult:
    return run(TINY)


def test_the_populations_are_disjoint_and_the_public_set_is_mirrored() -> None:
    data = populations(0)
    sets = [data.test_x, data.pool_x, data.private_x]
    assert [len(s) for s in sets] == [SIZES["test"], SIZES["pool"], SIZES["private"]]
    assert len(data.public_x) == 1797 - sum(SIZES.values())
    rows = {row.tobytes() for s in sets for row in s}
    assert sum(len(s) for s in sets) - len(rows) < 10  # load_digits holds a few duplicate images
    unmirrored = data.public_x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64)
    images = {row.tobytes() for row in (load_digits().data / 16.0).astype(np.float32)}
    assert all(row.tobytes() in images for row in unmirrored)  # digits, mirrored for pre-training
    assert sum(row.tobytes() in images for row in data.public_x) < len(data.public_x) / 2
    np.testing.assert_array_equal(populations(0).pool_x, data.pool_x)  # fixed by the seed


def test_every_deployment_budget_and_seed_is_measured(result: SliceTheftResult) -> None:
    names = [d.name for d in DEPLOYMENTS]
    assert names == ["none", "head", "slice", "slice-labels", "black-box"]
    assert sorted((r["deployment"], r["budget"]) for r in result.runs) == sorted(
        (n, b) for n in names for b in TINY.budgets)
    for run_ in result.runs:
        assert 0.0 <= run_["fidelity"] <= 1.0 and 0.0 <= run_["clone_accuracy"] <= 1.0
    assert set(result.latency_us) == set(names) - {"none"}
    assert all(t["calls"] == max(TINY.budgets) and t["worker_p50"] > 0 for t in result.latency_us.values())
    assert result.mismatches == 0  # the worker answered what the same layers compute in-process
    assert result.cell("none", 25, "fidelity") == (1.0, 0.0)
    json.loads(result.to_json())
    table = format_table(result)
    assert "| head |" in table and "| black-box |" in table


def test_fine_tuning_matters_the_public_model_is_far_worse(result: SliceTheftResult) -> None:
    assert result.victim_accuracy[0] >= 0.9
    assert result.victim_accuracy[0] - result.public_accuracy[0] >= 0.3


def test_sealing_only_the_head_leaves_the_thief_far_ahead_of_sealing_the_slice(result: SliceTheftResult) -> None:
    smallest = min(TINY.budgets)
    head, _ = result.cell("head", smallest, "fidelity")
    private_slice, _ = result.cell("slice", smallest, "fidelity")
    assert head >= private_slice + 0.15, (head, private_slice)
    assert head >= 0.8  # the shipped fine-tuned features make the head easy to fit


def test_budgets_beyond_the_pool_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--budgets", "25,1000"])
    assert "budgets must be" in capsys.readouterr().err
