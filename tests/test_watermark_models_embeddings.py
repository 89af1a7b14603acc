"""An API that passes on a client's marked vectors is traced over HTTP; the unmarked one is not.

The "copy" answers what the gateway would have answered that client (the real mark on a
deterministic bag-of-words embedder), served as ``/v1/embeddings`` by ``redteam.suspects``
and tested by ``verify_embeddings`` as ``modelfence verify model`` tests a deployment.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from pydantic import ValidationError

from modelfence.forensics.errors import VerifyError
from modelfence.forensics.model import PROBES_PER_WORD, ModelVerdict, Suspect, verify_embeddings
from modelfence.forensics.service import BENIGN
from modelfence.identity.secret import ServerSecret
from modelfence.redteam.suspects import embeddings_server
from modelfence.watermark.config import WatermarkConfig
from modelfence.watermark.embeddings import MarkLayout, candidate_words, embedding_mark, mark_layout
from modelfence.watermark.keys import WatermarkKeyring

RING = WatermarkKeyring(ServerSecret(b"unit-test-secret-0123456789abcdef"))
DIM = 64


def _base(texts: Sequence[str]) -> np.ndarray:
    """Unit sums of per-word pseudo-random vectors: an embedder with no mark."""
    out = np.zeros((len(texts), DIM))
    for i, text in enumerate(texts):
        for word in text.lower().split():
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "big")
            out[i] += np.random.default_rng(seed).standard_normal(DIM)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def _layouts(clients: Sequence[str]) -> Callable[[str, int], MarkLayout]:
    words = candidate_words()
    cache = {c: mark_layout(RING.key(c), DIM, words) for c in clients}
    return lambda client, dim: cache[client]


def _verify(embed: Callable[[Sequence[str]], np.ndarray], clients: Sequence[str]) -> ModelVerdict:
    with embeddings_server(embed) as server:
        suspect = Suspect(server.url)
        try:
            return verify_embeddings(suspect, "m", clients, _layouts(clients), candidate_words(),
                                     BENIGN, repeat=4)
        finally:
            suspect.close()


def test_marked_copy_is_named_among_a_thousand_clients_and_the_unmarked_embedder_is_not() -> None:
    mark = embedding_mark(RING.key("acme"), DIM, candidate_words())

    def copy(texts: Sequence[str]) -> np.ndarray:
        return np.asarray([mark.apply(v, t) or v for v, t in zip(_base(texts), texts, strict=True)])

    clients = ["acme", *(f"client-{i}" for i in range(999))]
    named = _verify(copy, clients)
    assert named.client == "acme" and named.ours and named.p_value < 1e-12
    assert named.samples == PROBES_PER_WORD * len(candidate_words())
    innocent = _verify(_base, clients)
    assert innocent.client is None and not innocent.ours and innocent.p_value > 1e-3


def test_innocent_embedders_p_values_are_uniform_over_a_thousand_clients() -> None:
    """Which of a target's words are triggers is a keyed random subset, so for an embedder
    that never saw a mark each client's p-value is uniform (the exactness of the null's
    tail is checked in tests/test_forensics_ranktest.py)."""
    clients = [f"client-{i}" for i in range(1000)]
    p = np.asarray(list(_verify(_base, clients).per_client.values()))
    assert 0.03 <= float(np.mean(p <= 0.05)) <= 0.075
    assert 0.001 <= float(np.mean(p <= 0.01)) <= 0.022
    assert 0.45 <= float(np.median(p)) <= 0.55 and p.min() > 1e-6


def test_a_suspect_without_usable_vectors_is_a_clear_error() -> None:
    for answer in (lambda texts: np.ones((len(texts), 1)), lambda texts: np.ones((max(0, len(texts) - 1), DIM))):
        with pytest.raises(VerifyError, match="one vector of 2 or more numbers per text"):
            _verify(answer, ["acme"])


def test_the_config_refuses_fewer_triggers_than_targets_naming_the_keys() -> None:
    with pytest.raises(ValidationError, match=r"watermark\.embeddings\.triggers \(2\) must be at least"):
        WatermarkConfig.model_validate({"embeddings": {"triggers": 2, "targets": 4}})
