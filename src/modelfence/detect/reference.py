"""The benign reference: what normal queries look like, per input space.

Built once from benign data only (``modelfence detect calibrate``, or the red-team
harness's benign population) and loaded by every detector process. Per space it holds a
sample of benign vectors (the MMD comparison set), k-means centroids (the cells that
coverage counts) and the distance to the nearest centroid that 99% of benign queries stay
within (the out-of-distribution radius). Calibrated thresholds ride along in the same file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SpaceReference:
    sample: np.ndarray  # [m, d] benign vectors
    centroids: np.ndarray  # [k, d]
    ood_radius: float  # 99th percentile of benign distance to the nearest centroid
    bandwidth: float  # RBF kernel bandwidth for MMD (median heuristic)
    # The benign clients' median coverage (distinct cells / queries over their last 100),
    # set by calibration; None in references made before it was kept. The console compares
    # a client's coverage with it (detect/querymap.py).
    coverage_median: float | None = None

    def cells(self, vectors: np.ndarray) -> np.ndarray:
        """Index of the nearest centroid of each vector, ``[n]``."""
        return nearest(vectors, self.centroids)[0]

    def distance_to_reference(self, vectors: np.ndarray) -> np.ndarray:
        return nearest(vectors, self.centroids)[1]


@dataclass(frozen=True, slots=True)
class Reference:
    spaces: dict[str, SpaceReference]
    thresholds: dict[str, float] = field(default_factory=dict)  # reason code -> calibrated
    # Tier -> the benign median of the volume statistic. Preferred over the live
    # population's median, which a large enough botnet could drag along.
    tier_medians: dict[str, float] = field(default_factory=dict)
    # The embedder (``detection.embedder``) whose vectors the text space and thresholds
    # were fitted to; None in references made before it was kept.
    embedder: str | None = None

    def save(self, path: str | Path) -> None:
        """Write the ``.npz``. With ``embedder`` set it holds ``meta/embedder``, which
        releases before it was kept cannot load (they read every other prefix as a space)."""
        arrays: dict[str, np.ndarray] = {}
        for name, ref in self.spaces.items():
            arrays[f"{name}/sample"] = ref.sample
            arrays[f"{name}/centroids"] = ref.centroids
            arrays[f"{name}/scalars"] = np.array([ref.ood_radius, ref.bandwidth])
            if ref.coverage_median is not None:
                arrays[f"{name}/coverage_median"] = np.array([ref.coverage_median])
        for code, value in self.thresholds.items():
            arrays[f"threshold/{code}"] = np.array([value])
        for tier, value in self.tier_medians.items():
            arrays[f"tier_median/{tier}"] = np.array([value])
        if self.embedder is not None:
            arrays["meta/embedder"] = np.array(self.embedder)
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        with np.load(path) as data:
            names = {
                key.split("/")[0]
                for key in data.files
                if not key.startswith(("threshold/", "tier_median/", "meta/"))
            }
            spaces = {
                name: SpaceReference(
                    sample=data[f"{name}/sample"],
                    centroids=data[f"{name}/centroids"],
                    ood_radius=float(data[f"{name}/scalars"][0]),
                    bandwidth=float(data[f"{name}/scalars"][1]),
                    coverage_median=(
                        float(data[f"{name}/coverage_median"][0])
                        if f"{name}/coverage_median" in data.files
                        else None
                    ),
                )
                for name in names
            }
            thresholds = {
                key.removeprefix("threshold/"): float(data[key][0])
                for key in data.files
                if key.startswith("threshold/")
            }
            medians = {
                key.removeprefix("tier_median/"): float(data[key][0])
                for key in data.files
                if key.startswith("tier_median/")
            }
            embedder = str(data["meta/embedder"]) if "meta/embedder" in data.files else None
        return cls(spaces, thresholds, medians, embedder)


def check_embedder(reference: Reference, embedder: str, path: str) -> None:
    """Refuse a reference calibrated with another embedder than the detector's: its text
    space and thresholds were placed for other vectors, so it would flag or miss clients
    silently. A reference that does not say (made before it was kept) is taken, warned of."""
    if reference.embedder is None:
        log.warning(
            "detection.reference_file %s does not record the embedder it was calibrated with "
            "(made by an earlier release): detection.embedder (%s here) must be that one",
            path, embedder,
        )
    elif reference.embedder != embedder:
        raise ValueError(
            f"detection.reference_file: {path} was calibrated with embedder "
            f"{reference.embedder!r}, but detection.embedder gives {embedder!r}; set "
            f"detection.embedder: {reference.embedder}, or calibrate again with this "
            "config (modelfence calibrate --config ...)"
        )


def nearest(vectors: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, L2 distance) of the nearest of ``points`` for each of ``vectors``."""
    d2 = (
        np.einsum("ij,ij->i", vectors, vectors)[:, None]
        + np.einsum("ij,ij->i", points, points)[None, :]
        - 2.0 * (vectors @ points.T)
    )
    index = d2.argmin(axis=1)
    return index, np.sqrt(np.maximum(d2[np.arange(len(vectors)), index], 0.0))


def fit_space(
    vectors: np.ndarray, *, cells: int = 64, sample: int = 256, seed: int = 0
) -> SpaceReference:
    """A :class:`SpaceReference` from benign vectors ``[n, d]`` (n >= 2 * cells advised)."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    vectors = np.asarray(vectors, dtype=np.float32)
    k = max(2, min(cells, len(vectors) // 2))
    kmeans = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(vectors)
    centroids = kmeans.cluster_centers_.astype(np.float32)
    chosen = vectors[rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False)]
    _, dist = nearest(vectors, centroids)
    pair = chosen[rng.choice(len(chosen), size=min(len(chosen), 128), replace=False)]
    d = np.sqrt(np.maximum(((pair[:, None, :] - pair[None, :, :]) ** 2).sum(-1), 0.0))
    bandwidth = float(np.median(d[np.triu_indices(len(pair), 1)])) or 1.0
    return SpaceReference(chosen, centroids, float(np.quantile(dist, 0.99)), bandwidth)
