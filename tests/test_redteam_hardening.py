"""Output hardening measured through a real gateway: ``bench/hardening_efficacy.py`` trimmed
to two post-processors, a few dozen honest digits and one small thief budget."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modelfence.redteam import LiveGateway
from modelfence.redteam.attacks.classifier import DigitsData
from modelfence.redteam.hardening import (
    POST_PROCESSORS,
    PolicyOutcome,
    digits_upstream,
    measure_policy,
    postprocessor_overrides,
    stack_overrides,
    victim_labels,
    victim_split,
)
from modelfence.redteam.stack import own_stack
from modelfence.testing.processes import ServiceProcess

from .conftest import PROFILE

pytestmark = [pytest.mark.models, pytest.mark.slow]
pytest.importorskip("art")

BUDGETS = (64,) if PROFILE == "ci" else (64, 128)
HONEST = 48  # held-out digits the honest client asks about


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with digits_upstream(tmp_path_factory.mktemp("efficacy-upstream")) as proc:
        yield proc


def rows_of(gateway: LiveGateway, client: str) -> np.ndarray:
    """Every probability row ``client`` was answered, ``[n, 10]``."""
    data = [e.body["outputs"][0]["data"] for e in gateway.exchanges if e.client == client and e.ok]
    return np.asarray([v for d in data for v in d]).reshape(-1, 10)


def one_hot(rows: np.ndarray) -> np.ndarray:
    return ((rows == 0) | (rows == 1)).all(axis=1) & (rows.sum(axis=1) == 1)


def measure(workdir: Path, upstream: ServiceProcess, name: str,
            data: DigitsData) -> tuple[PolicyOutcome, np.ndarray, np.ndarray]:
    """The outcome, and the honest client's and the soft thief's answered rows."""
    labels = victim_labels(upstream.url, data)
    overrides = stack_overrides(upstream.url, "test-secret-0123456789abcdef",
                                postprocessor_overrides(POST_PROCESSORS[name]))

    async def run(url: str, token: str) -> tuple[PolicyOutcome, np.ndarray, np.ndarray]:
        async with LiveGateway(url, token) as gateway:
            outcome = await measure_policy(gateway, name, data, labels, budgets=BUDGETS,
                                           seed=0, epochs=2)
            return outcome, rows_of(gateway, "honest"), rows_of(gateway, "thief-soft")

    with own_stack(workdir, upstream.url, overrides) as gw:
        return asyncio.run(run(gw.url, gw.admin_token))


@pytest.mark.parametrize("name", ["exact", "labels only"])
def test_postprocessor_through_the_gateway(tmp_path: Path, upstream: ServiceProcess,
                                           name: str) -> None:
    full = victim_split(0)
    data = DigitsData(full.pool, full.pool_labels, full.test[:HONEST], full.test_labels[:HONEST])
    outcome, honest, stolen = measure(tmp_path, upstream, name, data)

    assert honest.shape == (HONEST, 10) and outcome.benign_rows == HONEST
    assert outcome.benign_accuracy is not None and outcome.benign_accuracy > 0.9
    assert np.allclose(honest.sum(axis=1), 1.0, atol=1e-3)
    assert len(stolen) == BUDGETS[-1]
    if name == "labels only":  # every client, honest or not, gets one-hot rows
        assert one_hot(honest).all() and one_hot(stolen).all()
    else:  # exact: the model's own probabilities, hardly ever one-hot
        assert one_hot(honest).mean() < 0.5 and one_hot(stolen).mean() < 0.5
    for thief in outcome.thieves:
        assert [p.budget for p in thief.curve] == list(BUDGETS)
        assert [p.rows_bought for p in thief.curve] == list(BUDGETS)
        assert all(p.stopped is None and p.accuracy is not None for p in thief.curve)
        assert set(thief.statuses) == {200}
    assert not outcome.detection  # the baseline gateway has no detector
