"""An API that passes on a client's marked vectors is traced over HTTP; the unmarked one is not.

The "copy" answers what the gateway would have answered that client (the real mark on a
deterministic bag-of-words embedder), served as ``/v1/embeddings`` by ``redteam.suspects``
and tested by ``verify_embeddings`` as ``modelfence verify model`` tests a deployment.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from modelfence.forensics.model import Suspect, verify_embeddings
from modelfence.forensics.service import BENIGN
from modelfence.identity.secret import ServerSecret
from modelfence.redteam.suspects import embeddings_server
from modelfence.watermark.embeddings import candidate_words, embedding_mark
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


def test_marked_copy_is_named_and_the_unmarked_embedder_is_not() -> None:
    words = candidate_words()
    marks = {c: embedding_mark(RING.key(c), DIM, words) for c in ("acme", "bob", "carol")}

    def copy(texts: Sequence[str]) -> np.ndarray:
        vectors = _base(texts)
        return np.asarray([marks["acme"].apply(v, t) or v for v, t in zip(vectors, texts, strict=True)])

    for embed, expected in ((copy, "acme"), (_base, None)):
        with embeddings_server(embed) as server:
            suspect = Suspect(server.url)
            verdict = verify_embeddings(suspect, "m", marks, BENIGN)
            suspect.close()
        assert verdict.client == expected and verdict.ours == (expected is not None)
    assert verdict.p_value > 1e-3


def test_innocent_embedders_p_values_are_calibrated_over_many_clients() -> None:
    """Which words are triggers is a keyed random split of one ranking, so for an embedder
    that never saw a mark each client's p-value is uniform: about 5% fall below 0.05."""
    words = candidate_words()
    marks = {f"client-{i}": embedding_mark(RING.key(f"client-{i}"), DIM, words) for i in range(120)}
    with embeddings_server(_base) as server:
        suspect = Suspect(server.url)
        verdict = verify_embeddings(suspect, "m", marks, BENIGN)
        suspect.close()
    p = np.asarray(list(verdict.per_client.values()))
    assert not verdict.ours and verdict.client is None
    assert 0 < float(np.mean(p <= 0.05)) <= 0.12 and float(np.median(p)) > 0.3
