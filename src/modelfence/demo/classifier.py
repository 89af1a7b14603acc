"""The demo classifier: scikit-learn's bundled 8x8 digits, served as model ``digits``.

A support-vector machine with Platt-calibrated probabilities, trained at start-up in a
fraction of a second from data that ships with scikit-learn, so the demo needs no files.
It is the victim of the classifier-extraction red-team scenarios (KnockoffNets, CopycatCNN)::

    >>> clf = DigitsClassifier.train()
    >>> x, y = DigitsClassifier.dataset()
    >>> clf.predict_proba(x[:2]).shape
    (2, 10)
    >>> clf.test_accuracy > 0.95
    True
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

MODEL_NAME = "digits"
MODEL_VERSION = "1"
INPUT_NAME = "input"
PROBABILITIES_OUTPUT = "probabilities"
LABEL_OUTPUT = "label"
N_FEATURES = 64
N_CLASSES = 10
# Pixel intensities in load_digits run from 0 to 16; inputs outside stay accepted (an
# attacker's synthetic queries often are), they are only required to be finite.
PIXEL_MAX = 16.0


@dataclass(frozen=True, slots=True)
class DigitsClassifier:
    """A fitted digits model; ``test_accuracy`` is measured on a held-out split."""

    estimator: Any
    test_accuracy: float
    n_train: int
    n_test: int
    seed: int
    train_seconds: float

    @staticmethod
    def dataset() -> tuple[np.ndarray, np.ndarray]:
        """All 1,797 digits: pixels float32 ``[n, 64]`` on the 0-16 scale, labels int64 ``[n]``."""
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)

    @classmethod
    def train(cls, *, seed: int = 0, test_size: float = 0.25) -> DigitsClassifier:
        """Fit on a stratified split of ``load_digits`` (deterministic for a given seed)."""
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        started = time.perf_counter()
        x, y = cls.dataset()
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=test_size, random_state=seed, stratify=y
        )
        # SVC(probability=True) is deprecated since scikit-learn 1.9; this is its replacement
        # (the same Platt scaling on internal cross-validation).
        estimator = CalibratedClassifierCV(SVC(), method="sigmoid", ensemble=False, cv=5)
        estimator.fit(x_train, y_train)
        predicted = estimator.predict_proba(x_test).argmax(axis=1)
        accuracy = float((predicted == y_test).mean())
        return cls(
            estimator=estimator,
            test_accuracy=accuracy,
            n_train=len(y_train),
            n_test=len(y_test),
            seed=seed,
            train_seconds=time.perf_counter() - started,
        )

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 ``[n, 10]``, rows summing to 1; ``x`` is ``[n, 64]``."""
        x = check_pixels(x)
        proba = np.asarray(self.estimator.predict_proba(x), dtype=np.float32)
        # Renormalise after the float32 cast so each row sums to 1 within float32 rounding.
        proba /= proba.sum(axis=1, keepdims=True)
        return proba

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Labels int64 ``[n]``: the argmax of :meth:`predict_proba`, so the two never disagree."""
        labels: np.ndarray = self.predict_proba(x).argmax(axis=1).astype(np.int64)
        return labels


def check_pixels(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 ``[n, 64]``, or ``ValueError`` saying what is wrong with it."""
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != N_FEATURES or arr.shape[0] < 1:
        raise ValueError(f"expected shape [N, {N_FEATURES}] with N >= 1, got {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError("input contains NaN or infinity")
    return arr


def oip_metadata() -> dict[str, Any]:
    """Open Inference Protocol v2 model metadata (``GET /v2/models/digits``)."""
    return {
        "name": MODEL_NAME,
        "versions": [MODEL_VERSION],
        "platform": "scikit-learn",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, N_FEATURES]}],
        "outputs": [
            {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, N_CLASSES]},
            {"name": LABEL_OUTPUT, "datatype": "INT64", "shape": [-1]},
        ],
    }
