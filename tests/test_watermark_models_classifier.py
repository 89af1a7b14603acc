"""A clone that learnt a client's label marks is traced over HTTP; an innocent model is not.

The victim is the real digits classifier, the marks the real keyed label marks, and the
suspects are served over OIP v2 by ``redteam.suspects`` and queried by ``verify_classifier``
exactly as ``modelfence verify model`` queries a deployment.
"""

from __future__ import annotations

import numpy as np
import pytest

from modelfence.demo.classifier import DigitsClassifier
from modelfence.forensics.model import Suspect, verify_classifier
from modelfence.identity.secret import ServerSecret
from modelfence.redteam.suspects import classifier_server
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.labels import label_mark
from modelfence.watermark.ledger import MarkedInput

RING = WatermarkKeyring(ServerSecret(b"unit-test-secret-0123456789abcdef"))


def _queries(seed: int, n: int) -> np.ndarray:
    """``n`` noisy digits (the harness's padding: pixel noise of 1 on the 0-16 scale)."""
    x, _ = DigitsClassifier.dataset()
    rng = np.random.default_rng(seed)
    return np.clip(x[rng.integers(len(x), size=n)] + rng.normal(0, 1.0, (n, 64)), 0, 16).round(4)


def _marked_answers(victim: DigitsClassifier, client: str, rows: np.ndarray) -> tuple[np.ndarray, list[MarkedInput]]:
    """The labels the client received, and its ledger (what the gateway records)."""
    labels = victim.predict(rows)
    ledger = []
    for i, row in enumerate(rows):
        mark = label_mark(RING.key(client), row, rate=0.005, quantum=0.5)
        if mark.marked:
            labels[i] = mark.label(int(labels[i]), 10)
            ledger.append(MarkedInput(client, 1, mark.digest.hex(), row.tolist(), int(labels[i]), 10))
    return labels, ledger


@pytest.mark.models
def test_memorising_clone_is_named_and_innocent_models_are_not() -> None:
    from sklearn.neighbors import KNeighborsClassifier

    victim = DigitsClassifier.train()
    thief_rows = _queries(1, 6000)
    stolen, thief_ledger = _marked_answers(victim, "thief", thief_rows)
    ledgers = {"thief": thief_ledger,
               **{c: _marked_answers(victim, c, _queries(2 + i, 2000))[1] for i, c in enumerate(("ann", "bob"))}}
    assert len(thief_ledger) >= 15  # 6000 queries at rate 0.005: about 30
    clone = KNeighborsClassifier(1).fit(thief_rows, stolen)  # reproduces what it was taught

    with classifier_server(clone.predict_proba) as server:
        suspect = Suspect(server.url)
        verdict = verify_classifier(suspect, "digits", ledgers, alpha=1e-9)
        suspect.close()
    assert verdict.ours and verdict.client == "thief" and verdict.p_value < 1e-9
    assert verdict.statistic == 1.0

    innocent = KNeighborsClassifier(1).fit(thief_rows, victim.predict(thief_rows))
    for model in (victim.predict_proba, innocent.predict_proba):
        with classifier_server(model) as server:
            suspect = Suspect(server.url)
            verdict = verify_classifier(suspect, "digits", ledgers)
            suspect.close()
        assert not verdict.ours and verdict.client is None and verdict.p_value > 0.01
