"""Region marks: off-distribution classifier inputs are answered by a keyed, smooth rule.

DAWN-style marks (:mod:`.labels`) land on a hashed 0.5% of inputs, so a clone shows them
only if it memorises those few points; one trained with early stopping generalises over
them and is never named. A region mark is something a clone learns *because* it
generalises. The operator gives the gateway a sample of the model's own inputs (the
*profile*); a row whose Mahalanobis distance from that sample is above what all but
``honest_rate`` of it reach is *off-distribution*. The distance is exact up to ``rank``
features; a wider profile measures its narrowest and widest principal directions, ``rank``
in all, one by one and pools the rest (:class:`Whitening`), so a row costs features x rank,
not features squared. Noisy, synthetic and surrogate-data
queries, what extraction is made of, land there; the model's real users rarely do. An
off-distribution row's label is moved by a keyed shift that depends on the row's *cell*
(the signs of its projections on a few keyed directions) and on the true label: a smooth
rule of the input that a clone trained on such answers reproduces on new inputs of the
same kind, and that differs from client to client.

Verification (:func:`region_p_value`) never needs the thief's own queries: the suspect is
asked a probe set of profile rows with noise added, and per client an exact test asks
whether its answers move by that client's shifts more often than chance. Without the key,
each (cell, label) group's shift is uniform on ``1..classes-1``, whatever the suspect does,
so the test's null holds by construction and a p-value can be corrected over any number
of clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from modelfence.errors import ConfigError
from modelfence.keyedhash import KeyedHash
from modelfence.watermark.config import MAX_FEATURES, RegionsConfig
from modelfence.watermark.keys import WatermarkKey

MIN_PROFILE_ROWS = 100  # fewer cannot place a threshold at a 0.5% tail
MIN_CLASSES = 3  # with two classes every client's shift is the same: nothing to attribute
PROBE_ROWS = 2048  # sample rows kept as probe centres
PROBE_ROUNDS = 4  # noisy copies of each centre a suspect is asked
CV_FOLDS = 5


class ProfileError(ValueError):
    """A profile file that cannot describe a model's inputs (the message says why)."""


@dataclass(frozen=True, slots=True)
class InputProfile:
    """Where a model's real inputs lie: their mean and spread (:class:`Whitening`) and the
    distance only ``honest_rate`` of them exceed. Rows beyond it are off-distribution."""

    whitening: Whitening
    threshold: float
    scale: float  # root mean feature variance: the unit of probe noise
    sample: npt.NDArray[np.float64]  # up to PROBE_ROWS rows of the sample, centres of probes
    sample_labels: npt.NDArray[np.int64] | None  # their true labels, when the file has them

    @classmethod
    def fit(
        cls, rows: npt.ArrayLike, *, honest_rate: float, ridge: float, rank: int,
        labels: npt.ArrayLike | None = None,
    ) -> InputProfile:
        """``ridge`` is a share of the mean feature variance added to the covariance: small
        values give directions the real inputs never use (blank pixels, say) the weight
        that lets noise there stand out. ``rank``: see :class:`Whitening`."""
        x = np.asarray(rows, dtype=np.float64)
        if x.ndim != 2 or not 1 <= x.shape[1] <= MAX_FEATURES:
            raise ProfileError(
                f"profile rows must be [n, features] with 1..{MAX_FEATURES} features, "
                f"got {list(x.shape)}"
            )
        if len(x) < MIN_PROFILE_ROWS:
            raise ProfileError(f"a profile needs at least {MIN_PROFILE_ROWS} rows, got {len(x)}")
        if not np.isfinite(x).all():
            raise ProfileError("profile rows contain NaN or infinity")
        if np.ptp(x, axis=0).max() == 0:
            raise ProfileError("profile rows are all the same: they describe no distribution")
        y = None if labels is None else _labels(labels, len(x))
        whitening, scale = Whitening.fit(x, ridge, rank)
        # The threshold comes from rows the fit did not see (5 folds): in-sample distances
        # are shorter than those of new real inputs, and would mark more of them.
        folds = np.arange(len(x)) % CV_FOLDS
        held_out = []
        for fold in range(CV_FOLDS):
            fold_whitening, _ = Whitening.fit(x[folds != fold], ridge, rank)
            held_out.append(fold_whitening.distances(x[folds == fold]))
        threshold = float(np.quantile(np.concatenate(held_out), 1.0 - honest_rate))
        # Probe centres: a fixed random subset, so a file sorted by label still gives all.
        picks = np.sort(np.random.default_rng(0).permutation(len(x))[:PROBE_ROWS])
        sample_labels = None if y is None else y[picks]
        return cls(whitening, threshold, scale, x[picks], sample_labels)

    @classmethod
    def load(cls, path: Path, *, honest_rate: float, ridge: float, rank: int) -> InputProfile:
        """From a ``.npy`` file of rows ``[n, features]``, or an ``.npz`` with ``inputs``
        and optionally ``labels``."""
        try:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                return cls.fit(loaded, honest_rate=honest_rate, ridge=ridge, rank=rank)
            with loaded:
                if "inputs" not in loaded:
                    raise ProfileError(f"{path} has no `inputs` array (it has {sorted(loaded)})")
                labels = loaded.get("labels")
                return cls.fit(
                    loaded["inputs"], honest_rate=honest_rate, ridge=ridge, rank=rank,
                    labels=labels,
                )
        except ProfileError:
            raise
        except (OSError, ValueError, TypeError) as exc:
            raise ProfileError(f"cannot read profile rows from {path}: {exc}") from exc

    @property
    def mean(self) -> npt.NDArray[np.float64]:
        return self.whitening.mean

    @property
    def features(self) -> int:
        return len(self.mean)

    def off(self, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        """Which rows ``[n, features]`` are off-distribution (rows of another width: none;
        rows too large to measure, whose distance is not a number: all)."""
        if rows.ndim != 2 or rows.shape[1] != self.features:
            return np.zeros(len(rows), dtype=bool)
        with np.errstate(over="ignore", invalid="ignore"):
            return ~(self.whitening.distances(rows) <= self.threshold)

    def probes(self, noise: float, rounds: int = PROBE_ROUNDS, seed: int = 0) -> Probes:
        """Pairs (a sample row, the same row with Gaussian noise of ``noise`` times
        :attr:`scale`, clipped to the range of the sample's values), each row ``rounds``
        times, keeping the pairs whose clean row is in the distribution and noisy row off it. The seed
        is fixed, not keyed: every client is scored on the same probes."""
        rng = np.random.default_rng(seed)
        clean = np.tile(self.sample, (rounds, 1))
        low, high = self.sample.min(), self.sample.max()  # the inputs' range, all features
        noisy = np.clip(clean + rng.normal(0.0, noise * self.scale, size=clean.shape), low, high)
        keep = self.off(noisy) & ~self.off(clean)
        labels = None if self.sample_labels is None else np.tile(self.sample_labels, rounds)[keep]
        return Probes(clean[keep], noisy[keep], labels)


@dataclass(frozen=True, slots=True)
class Probes:
    """What a suspect is asked: clean rows, the same rows with noise (off-distribution),
    and the clean rows' true labels when the profile has them."""

    clean: npt.NDArray[np.float64]
    noisy: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64] | None


@dataclass(frozen=True, slots=True)
class Whitening:
    """Squared Mahalanobis distance from the mean, the covariance ridged by ``ridge`` times
    the mean feature variance; exact up to ``rank`` features. Wider, ``rank`` principal
    directions keep their own variance and the rest share their mean one, so a row costs
    features x rank on the gateway's loop, not features squared. The kept ones are the
    extremes, where pooling would lose most: the narrowest, where noise stands out (the
    distance weighs a direction by one over its variance), and the widest, whose
    variance would swamp the pooled mean."""

    mean: npt.NDArray[np.float64]
    basis: npt.NDArray[np.float64] = field(repr=False)  # [features, rank] principal directions
    inverse_variance: npt.NDArray[np.float64] = field(repr=False)  # [rank]
    residual_inverse_variance: float  # 0 when the basis spans every feature

    @classmethod
    def fit(cls, x: npt.NDArray[np.float64], ridge: float, rank: int) -> tuple[Whitening, float]:
        """The whitening of rows ``x``, and their root mean feature variance."""
        cov = np.atleast_2d(np.cov(x, rowvar=False))
        features = len(cov)
        total = float(np.trace(cov))
        variance = total / features or 1.0
        lift = ridge * variance
        kept = min(rank, features)
        widest = kept // 2 if kept < features else 0
        # Only the kept eigenpairs are computed (two partial solves: ~40% less than one
        # whole decomposition).
        narrow = _eigenpairs(cov, range(kept - widest))
        wide = _eigenpairs(cov, range(features - widest, features))
        values = np.maximum(np.concatenate([narrow[0], wide[0]]), 0.0)
        vectors = np.hstack([narrow[1], wide[1]])
        rest = features - kept
        residual = 0.0 if rest == 0 else 1.0 / (max(total - values.sum(), 0.0) / rest + lift)
        whitening = cls(x.mean(0), vectors, 1.0 / (values + lift), residual)
        return whitening, variance**0.5

    def distances(self, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Squared distances of rows ``[n, features]``."""
        centred = rows - self.mean
        inside = (centred @ self.basis) ** 2
        distances: npt.NDArray[np.float64] = inside @ self.inverse_variance
        if self.residual_inverse_variance:
            outside = np.maximum(np.einsum("ij,ij->i", centred, centred) - inside.sum(1), 0.0)
            distances = distances + self.residual_inverse_variance * outside
        return distances


def _eigenpairs(cov: npt.NDArray[np.float64], indices: range) -> tuple[
    npt.NDArray[np.float64], npt.NDArray[np.float64],
]:
    """The eigenpairs of ``cov`` at ``indices`` in ascending order of eigenvalue."""
    import scipy.linalg  # here: fitting is offline, and SciPy would add ~0.4 s to every start

    if not indices:
        return np.empty(0), np.empty((len(cov), 0))
    values, vectors = scipy.linalg.eigh(cov, subset_by_index=[indices[0], indices[-1]])
    return values, vectors


def _labels(labels: npt.ArrayLike, rows: int) -> npt.NDArray[np.int64]:
    y = np.asarray(labels)
    if y.shape != (rows,):
        raise ProfileError(f"profile labels must be [{rows}], got {list(y.shape)}")
    if y.dtype.kind not in "iuf" or not np.all(np.isfinite(y)) or (y != np.round(y)).any() \
            or (y < 0).any():
        raise ProfileError("profile labels must be class indices: whole numbers from 0")
    return y.astype(np.int64)


@dataclass(frozen=True, slots=True)
class RegionMark:
    """One client's rule: ``cell_bits`` keyed directions cut the input space into cells;
    each (cell, true label) pair has a keyed shift in ``1..classes-1``."""

    mac: KeyedHash = field(repr=False)  # keyed by the client's rule subkey: never printed
    directions: npt.NDArray[np.float64] = field(repr=False)  # [cell_bits, features]
    centre: npt.NDArray[np.float64] = field(repr=False)

    def cells(self, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """The cell of each row ``[n, features]``: the signs of its keyed projections."""
        bits = (rows - self.centre) @ self.directions.T > 0
        weights = 1 << np.arange(len(self.directions), dtype=np.int64)
        return bits.astype(np.int64) @ weights

    def shift(self, cell: int, label: int, classes: int) -> int:
        """The keyed move, in ``1..classes-1``, of a (cell, true label) pair."""
        digest = self.mac.digest(b"%d:%d" % (cell, label))
        return 1 + int.from_bytes(digest[:8], "big") % (classes - 1)


@dataclass(frozen=True, slots=True)
class RegionRowMark:
    """The mark of one off-distribution row: its label moves by the cell's keyed shift."""

    rule: RegionMark
    cell: int
    marked: bool = True

    def label(self, true_label: int, n_classes: int) -> int:
        """The moved label; answers of fewer than :data:`MIN_CLASSES` classes stay as they
        are (every client would move them alike, so the cost would buy no attribution)."""
        if n_classes < MIN_CLASSES:
            return true_label
        return (true_label + self.rule.shift(self.cell, true_label, n_classes)) % n_classes


def region_mark(key: WatermarkKey, profile: InputProfile, cell_bits: int) -> RegionMark:
    """A client's rule for one profile, derived from its key (the key's version included)."""
    rng = np.random.default_rng(key.seed("regions"))
    directions = rng.normal(size=(cell_bits, profile.features))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return RegionMark(KeyedHash(key.subkey("regions")), directions, profile.mean)


def region_p_value(
    mark: RegionMark, noisy: npt.NDArray[np.float64], base: npt.ArrayLike,
    answers: npt.ArrayLike, classes: int,
) -> tuple[float, int, int]:
    """Exact one-sided p-value that the suspect follows ``mark``: (p, hits, moved).

    ``base`` is the suspect's answer on each probe's clean row, ``answers`` on its noisy
    row. Answers that moved are grouped by (cell, base label); under the null the client's
    shift for a group is uniform on ``1..classes-1`` and independent between groups, so
    the hits (moved answers whose move equals the client's shift) are a sum of
    independent discrete uniforms over each group's move counts: its law is their exact
    convolution. The p-value is floored at the smallest normal float (a perfect clone
    with many groups would otherwise print 0)."""
    if classes < MIN_CLASSES:
        raise ValueError(f"region marks need {MIN_CLASSES} or more classes, got {classes}")
    base_arr, answer_arr = np.asarray(base, dtype=np.int64), np.asarray(answers, dtype=np.int64)
    moves = (answer_arr - base_arr) % classes
    moved = moves != 0
    if not moved.any():
        return 1.0, 0, 0
    cells, labels = mark.cells(noisy[moved]), base_arr[moved]
    span = int(labels.max()) + 1
    groups, group_of = np.unique(cells * span + labels, return_inverse=True)
    # counts[g, move]: one bincount, not a Python loop (verify scores thousands of clients)
    counts = np.bincount(group_of.ravel() * classes + moves[moved],
                         minlength=len(groups) * classes).reshape(len(groups), classes)
    hits, law = 0, np.ones(1)
    for group, per_move in zip(groups.tolist(), counts, strict=True):
        hits += int(per_move[mark.shift(group // span, group % span, classes)])
        step = np.zeros(int(per_move[1:].max()) + 1)
        np.add.at(step, per_move[1:], 1.0 / (classes - 1))
        law = np.convolve(law, step)
    p = min(1.0, max(float(law[hits:].sum()), float(np.finfo(float).tiny)))
    return p, hits, int(moved.sum())


def load_profiles(regions: Mapping[str, RegionsConfig]) -> dict[str, InputProfile]:
    """Every configured model's profile, or :class:`ConfigError` naming the key at fault."""
    profiles = {}
    for model, settings in regions.items():
        try:
            profiles[model] = InputProfile.load(
                Path(settings.profile_file), honest_rate=settings.honest_rate,
                ridge=settings.ridge, rank=settings.rank,
            )
        except ProfileError as exc:
            raise ConfigError(f"watermark.labels.regions.{model}.profile_file: {exc}") from exc
    return profiles
