"""Query maps: a client's recent queries against the honest reference, in two dimensions.

For each input space of the loaded :class:`~modelfence.detect.reference.Reference` the
detector fixes one projection, computed once: the two principal axes of the reference's
benign sample (PCA, signs fixed so that the same reference always gives the same picture).
The reference's own sample projected with it, and each k-means cell's share of the benign
sample, are published once per reference (``reference_maps``); each client's last
``MAX_POINTS`` query vectors, projected the same way with the cell each falls in, are
published per client and overwritten (``client_query_maps``). The console draws the honest
sample in grey and the client's queries in colour, and counts the cells they cover
(``console/data.py``). Storage: ``detect/published.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from modelfence.detect.reference import Reference, SpaceReference

MAX_POINTS = 200  # a client's newest queries on its map
REFERENCE_POINTS = 400  # the benign sample's points drawn (fit_space keeps 256 by default)
DECIMALS = 4  # coordinates are rounded: the picture needs no more


@dataclass(frozen=True, slots=True)
class SpaceMap:
    """The fixed projection of one input space of a reference."""

    space: str
    reference: str  # digest of the space's reference: what client maps are drawn against
    ref: SpaceReference
    mean: np.ndarray  # [d]
    axes: np.ndarray  # [2, d], orthonormal

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """``[n, 2]`` coordinates of ``[n, d]`` vectors."""
        centred = np.asarray(vectors, dtype=np.float64) - self.mean
        out: np.ndarray = centred @ self.axes.T
        return out

    def reference_row(self, now: datetime) -> dict[str, Any]:
        """The ``reference_maps`` row: the sample projected and the cells' benign shares."""
        sample = self.ref.sample
        cells = len(self.ref.centroids)
        counts = np.bincount(self.ref.cells(sample), minlength=cells) if len(sample) else None
        shares = [0.0] * cells if counts is None else (counts / len(sample)).tolist()
        return {
            "reference": self.reference,
            "space": self.space,
            "cells": cells,
            "points": _points(self.project(sample[:REFERENCE_POINTS])),
            "shares": [round(float(s), 6) for s in shares],
            "coverage_median": self.ref.coverage_median,
            "created_at": now,
        }

    def client_row(
        self, client: str, vectors: np.ndarray, *, queries: int, now: datetime
    ) -> dict[str, Any]:
        """The ``client_query_maps`` row of a client's newest ``MAX_POINTS`` vectors."""
        recent = np.asarray(vectors[-MAX_POINTS:], dtype=np.float32)
        return {
            "client": client,
            "reference": self.reference,
            "space": self.space,
            "points": _points(self.project(recent)),
            "cells": [int(c) for c in self.ref.cells(recent)],
            "queries": queries,
            "updated_at": now,
        }


def space_maps(reference: Reference) -> dict[str, SpaceMap]:
    """One :class:`SpaceMap` per space of ``reference`` (PCA of its benign sample)."""
    return {space: _space_map(space, ref) for space, ref in sorted(reference.spaces.items())}


def client_row(
    maps: Mapping[str, SpaceMap],
    client: str,
    vectors: Mapping[str, np.ndarray],
    *,
    queries: int,
    now: datetime,
) -> dict[str, Any] | None:
    """A client's map in the mapped space where it has the most queries; None if none."""
    mapped = [(len(v), space) for space, v in vectors.items() if space in maps and len(v)]
    if not mapped:
        return None
    _, space = max(mapped)
    return maps[space].client_row(client, vectors[space], queries=queries, now=now)


def _space_map(space: str, ref: SpaceReference) -> SpaceMap:
    sample = np.asarray(ref.sample, dtype=np.float64)
    dims = sample.shape[1] if sample.ndim == 2 else len(ref.centroids[0])
    mean = sample.mean(axis=0) if len(sample) else np.zeros(dims)
    axes = np.zeros((2, dims))
    if len(sample) >= 2:
        _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
        found = vt[:2]
        axes[: len(found)] = found
    for axis in axes:  # an axis's sign is arbitrary: fix it (largest loading positive)
        if axis[np.argmax(np.abs(axis))] < 0:
            axis *= -1.0
    digest = hashlib.sha256(space.encode())
    for part in (ref.sample, ref.centroids):
        array = np.ascontiguousarray(part)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(repr(ref.coverage_median).encode())
    return SpaceMap(space, digest.hexdigest()[:32], ref, mean, axes)


def _points(xy: np.ndarray) -> list[list[float]]:
    return [[round(float(x), DECIMALS), round(float(y), DECIMALS)] for x, y in xy]
