"""Stealing the ``digits`` classifier through the gateway with IBM ART and JBDA.

ART's extraction attacks (KnockoffNets, CopycatCNN) see the victim as an ART classifier;
``GatewayClassifier`` is one whose ``predict`` posts to ``/v2/models/digits/infer`` on the
gateway, so every query the attack makes is a real, counted, priced request. The thief is
a small CNN trained with ART's ``PyTorchClassifier``. ART draws from numpy's global
generator, hence the explicit ``seed_everything`` before each run.

Clone quality is measured on digits the attacker never queried: accuracy against the true
labels and fidelity (agreement) against the victim's own labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelfence.redteam.traffic import DIGITS_INFER, Exchange, PlannedRequest, digits_body

N_CLASSES = 10
PIXEL_MAX = 16.0

Send = Callable[[PlannedRequest], Exchange]


class GatewayRefused(RuntimeError):
    """The gateway stopped answering (throttled or blocked): the attack ends here."""

    def __init__(self, exchange: Exchange) -> None:
        super().__init__(f"gateway answered {exchange.status}")
        self.exchange = exchange


def seed_everything(seed: int) -> None:
    import torch

    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class DigitsOracle:
    """The victim as the attacker sees it: pixels in, probabilities (or labels) out.

    A thief keeps what it bought: answers are remembered per image, and only images not
    seen before go to the gateway, ``batch`` per request. So a larger budget extends a
    smaller one's purchases, and ``rows_queried`` (images paid for) grows cumulatively
    across the checkpoints of one scenario.
    """

    send: Send
    client: str
    labels_only: bool = False
    batch: int = 64
    rows_queried: int = 0
    _answers: dict[bytes, np.ndarray] = field(default_factory=dict, repr=False)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(-1, 64)
        keys = [row.tobytes() for row in x]
        first: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        missing = [key for key in first if key not in self._answers]
        for start in range(0, len(missing), self.batch):
            chunk = missing[start : start + self.batch]
            rows = x[[first[key] for key in chunk]]
            body = digits_body(rows, labels_only=self.labels_only)
            exchange = self.send(PlannedRequest(0.0, self.client, DIGITS_INFER, body, "extraction"))
            if not exchange.ok:
                raise GatewayRefused(exchange)
            data = np.asarray(exchange.body["outputs"][0]["data"], dtype=np.float32)
            answers = np.eye(N_CLASSES, dtype=np.float32)[data.astype(int)] if self.labels_only \
                else data.reshape(len(rows), N_CLASSES)
            self._answers.update(zip(chunk, answers, strict=True))
            self.rows_queried += len(chunk)
        return np.stack([self._answers[key] for key in keys]) if keys else np.zeros((0, N_CLASSES), np.float32)

    def purchased(self) -> tuple[np.ndarray, np.ndarray]:
        """What the thief holds: the images it paid for ``[n, 1, 8, 8]`` and their answers
        ``[n, 10]`` (one-hot when labels only), e.g. to train a clone after a refusal."""
        keys = list(self._answers)
        images = np.frombuffer(b"".join(keys), dtype=np.float32).reshape(-1, 1, 8, 8)
        answers = np.stack([self._answers[key] for key in keys]) if keys else np.zeros((0, N_CLASSES), np.float32)
        return images, answers


def gateway_classifier(oracle: DigitsOracle) -> Any:
    """The oracle wrapped as an ART classifier (inputs ``[n, 1, 8, 8]``, 0-16 pixels)."""
    from art.estimators.classification import BlackBoxClassifier

    return BlackBoxClassifier(
        oracle, input_shape=(1, 8, 8), nb_classes=N_CLASSES, clip_values=(0.0, PIXEL_MAX)
    )


def thief_network(seed: int) -> Any:
    """A fresh small CNN thief as an ART ``PyTorchClassifier`` (a few seconds to train)."""
    import torch
    from art.estimators.classification import PyTorchClassifier
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, N_CLASSES),
    )
    return PyTorchClassifier(
        model, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.Adam(model.parameters(), lr=2e-3),
        input_shape=(1, 8, 8), nb_classes=N_CLASSES, clip_values=(0.0, PIXEL_MAX),
        preprocessing=(0.0, PIXEL_MAX),
    )


@dataclass(frozen=True)
class DigitsData:
    """The attacker's own pool (noisy copies pad it to any budget) and a held-out set."""

    pool: np.ndarray  # [n, 1, 8, 8]
    pool_labels: np.ndarray  # true labels, used only by adaptive KnockoffNets' bandit arms
    test: np.ndarray
    test_labels: np.ndarray

    @classmethod
    def split(cls, seed: int, pool_size: int = 539) -> DigitsData:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        order = np.random.default_rng(seed).permutation(len(x))
        x = x.astype(np.float32).reshape(-1, 1, 8, 8)
        pool, test = order[:pool_size], order[pool_size:]
        return cls(x[pool], y[pool], x[test], y[test])

    def padded_pool(self, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``size`` pool images: the originals, then copies with pixel noise."""
        rng = np.random.default_rng(seed)
        picks = np.arange(size) % len(self.pool)
        noise = rng.normal(0, 1.0, size=(size, 1, 8, 8)) * (np.arange(size) >= len(self.pool))[:, None, None, None]
        return np.clip(self.pool[picks] + noise, 0, PIXEL_MAX).astype(np.float32), self.pool_labels[picks]


def clone_quality(thief: Any, data: DigitsData, victim_labels: np.ndarray) -> dict[str, float]:
    predicted = thief.predict(data.test).argmax(axis=1)
    return {
        "accuracy": float((predicted == data.test_labels).mean()),
        "fidelity": float((predicted == victim_labels).mean()),
    }


def run_art(
    method: str, oracle: DigitsOracle, data: DigitsData, budget: int, seed: int, epochs: int
) -> Any:
    """One ART extraction with ``budget`` stolen samples; returns the trained thief.

    ``method``: ``knockoff-random``, ``knockoff-adaptive`` (``reward='div'``; ``'all'``
    gives NaN on a labels-only victim) or ``copycat``.
    """
    from art.attacks.extraction import CopycatCNN, KnockoffNets

    seed_everything(seed)
    victim = gateway_classifier(oracle)
    thief = thief_network(seed)
    strategy = method.removeprefix("knockoff-")
    # Random sampling and CopycatCNN take the first ``budget`` images of one fixed pool,
    # so each checkpoint's purchases extend the previous one's; adaptive sampling draws
    # its own from the whole pool.
    x, y = data.padded_pool(max(budget, len(data.pool)) if strategy == "adaptive" else budget, seed)
    probabilities = not oracle.labels_only
    if method == "copycat":
        attack: Any = CopycatCNN(victim, batch_size_fit=32, batch_size_query=oracle.batch,
                                 nb_epochs=epochs, nb_stolen=budget, use_probability=probabilities)
        return attack.extract(x, thieved_classifier=thief)
    attack = KnockoffNets(victim, batch_size_fit=32, batch_size_query=oracle.batch, nb_epochs=epochs,
                          nb_stolen=budget, sampling_strategy=strategy, reward="div",
                          verbose=False, use_probability=probabilities)
    # Adaptive sampling's bandit arms are the pool's classes, hence its labels.
    return attack.extract(x, y if strategy == "adaptive" else None, thieved_classifier=thief)


def run_jbda(
    oracle: DigitsOracle, data: DigitsData, budget: int, seed: int, epochs: int,
    seed_per_class: int = 10, step: float = 0.1 * PIXEL_MAX,
) -> Any:
    """Papernot et al.'s Jacobian-based dataset augmentation, within ``budget`` queries.

    Start from ``seed_per_class`` real images per class, label them through the gateway,
    train the substitute, then add ``x + step * sign(∂F_label/∂x)`` for every known point
    and repeat until the budget is spent. Only the labels the victim returned are used.
    """
    seed_everything(seed)
    thief = thief_network(seed)
    rng = np.random.default_rng(seed)
    picks = np.concatenate([
        rng.choice(np.flatnonzero(data.pool_labels == c), seed_per_class, replace=False)
        for c in range(N_CLASSES)
    ])
    known = data.pool[picks]
    labels = oracle(known).argmax(axis=1)
    while True:
        thief.fit(known, np.eye(N_CLASSES)[labels], nb_epochs=epochs, batch_size=32, verbose=False)
        remaining = budget - oracle.rows_queried
        if remaining <= 0:
            return thief
        sign = np.sign(thief.class_gradient(known, label=labels)).reshape(known.shape)
        fresh = np.clip(known + step * sign, 0, PIXEL_MAX).astype(np.float32)
        fresh = fresh[rng.permutation(len(fresh))[:remaining]]
        known = np.concatenate([known, fresh])
        labels = np.concatenate([labels, oracle(fresh).argmax(axis=1)])


def fit_early_stopped(
    thief: Any, images: np.ndarray, answers: np.ndarray, *, seed: int, max_epochs: int = 30,
    patience: int = 5, validation: float = 0.1,
) -> int:
    """Train ``thief`` as a careful thief does: hold out ``validation`` of its purchases,
    stop when their accuracy (against the answers bought) has not improved for
    ``patience`` epochs, keep the best epoch's weights. Returns the epochs trained."""
    import torch

    order = np.random.default_rng(seed).permutation(len(images))
    held = order[: max(1, int(len(images) * validation))]
    train = order[len(held):]
    best, stale, state, epochs = -1.0, 0, None, 0
    for epochs in range(1, max_epochs + 1):
        thief.fit(images[train], answers[train], nb_epochs=1, batch_size=32, verbose=False)
        accuracy = float((thief.predict(images[held]).argmax(1) == answers[held].argmax(1)).mean())
        if accuracy > best:
            best, stale = accuracy, 0
            state = {k: v.detach().clone() for k, v in thief.model.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    if state is not None:
        with torch.no_grad():
            thief.model.load_state_dict(state)
    return epochs
