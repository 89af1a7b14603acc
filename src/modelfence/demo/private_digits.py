"""The demo's ``digits`` model with a sealed private head, served through the isolated worker.

What a model owner does offline (:func:`prepare`): train a small network on the digits,
ship its first layer in the clear (``public.npz``; think of a public backbone) and seal
its privately trained head (``head.sealed``) under the key broker's key-encryption key.
What the model server does (:func:`load`): start the measured worker, attest it to the
gateway's key broker, and have the worker open the head with the key released to it. The
server then computes the public layer itself and asks the worker for the rest; the head's
weights are never in the server's memory, and what leaves the worker is what its measured
configuration allows (probabilities rounded to two decimals).

The platform is ``sim``: the attestation is simulated, not hardware-backed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from base64 import b64decode, b64encode
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelfence.confidential.attestation import SimPlatform
from modelfence.confidential.launcher import LaunchedWorker, WorkerClient, launch, provision
from modelfence.confidential.remote import RemoteBroker
from modelfence.confidential.sealing import seal
from modelfence.demo.classifier import PIXEL_MAX, DigitsClassifier

PUBLIC_FILE = "public.npz"
SEALED_FILE = "head.sealed"
PLATFORM_KEY_FILE = "platform.key"
PROFILE_FILE = "profile.npz"  # the training inputs and labels: where real queries lie
ARTIFACT_ID = "digits-head"
WORKER_CONFIG = json.dumps({"output": "probabilities", "decimals": 2}).encode()
HIDDEN = 64
BROKER_URL_ENV = "MODELFENCE_BROKER_URL"
BROKER_TOKEN_ENV = "MODELFENCE_BROKER_TOKEN"


def prepare(folder: Path, kek: bytes, *, seed: int = 0) -> Ed25519PrivateKey:
    """Train, split and seal into ``folder``; returns the sim platform key it wrote there
    (the broker needs its public half)."""
    from sklearn.neural_network import MLPClassifier

    x_train, _, y_train, _ = _split(seed)
    # The inputs the model was trained on, for the gateway's region marks
    # (watermark.labels.regions.digits.profile_file).
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    np.savez(folder / PROFILE_FILE, inputs=x_train, labels=y_train)
    network = MLPClassifier(hidden_layer_sizes=(HIDDEN,), max_iter=400, random_state=seed)
    network.fit(x_train / PIXEL_MAX, y_train)
    # PyTorch's nn.Linear layout, weight [out, in]: what the worker and split_module use.
    np.savez(folder / PUBLIC_FILE, **{"hidden.weight": network.coefs_[0].T.astype(np.float32),
                                      "hidden.bias": network.intercepts_[0].astype(np.float32)})
    seal({"head.weight": network.coefs_[1].T.astype(np.float32),
          "head.bias": network.intercepts_[1].astype(np.float32)},
         folder / SEALED_FILE, kek=kek, artifact_id=ARTIFACT_ID, version=1)
    key = Ed25519PrivateKey.generate()
    fd = os.open(folder / PLATFORM_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(b64encode(key.private_bytes_raw()).decode() + "\n")
    return key


def _split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    x, y = DigitsClassifier.dataset()
    parts: list[np.ndarray] = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return parts[0], parts[1], parts[2], parts[3]


@dataclass
class PrivateHead:
    """``predict_proba`` as the demo classifier needs it: the public layer here, the sealed
    head in the worker. One request at a time on the worker's connection."""

    weight: np.ndarray
    bias: np.ndarray
    worker: LaunchedWorker
    client: WorkerClient
    security_level: str

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        features = np.maximum(x / PIXEL_MAX @ self.weight.T + self.bias, 0).astype("<f4")
        with self._lock:
            answer, data = self.client.call("infer", features.tobytes(), dtype="float32",
                                            shape=list(features.shape))
        return np.frombuffer(data, dtype="<f4").reshape(answer["shape"]).copy()  # writable

    def close(self) -> None:
        self.client.close()
        self.worker.stop()


def load(folder: Path, broker: RemoteBroker, *, seed: int = 0) -> DigitsClassifier:
    """Start the worker, have the broker release the head's key to it, and measure the
    model's accuracy through it (raises ``ReleaseRefused`` with the broker's reason)."""
    started = time.perf_counter()
    key = b64decode((folder / PLATFORM_KEY_FILE).read_text().strip(), validate=True)
    worker = launch(WORKER_CONFIG, folder / "run", SimPlatform(Ed25519PrivateKey.from_private_bytes(key)))
    client = WorkerClient(worker.socket_path)
    try:
        provision(client, broker, folder / SEALED_FILE)
        public = np.load(folder / PUBLIC_FILE)
        head = PrivateHead(public["hidden.weight"], public["hidden.bias"], worker, client,
                           broker.security_level)
        _, x_test, y_train, y_test = _split(seed)
        accuracy = float((head.predict_proba(x_test).argmax(axis=1) == y_test).mean())
    except BaseException:
        client.close()
        worker.stop()
        raise
    return DigitsClassifier(estimator=head, test_accuracy=accuracy, n_train=len(y_train),
                            n_test=len(y_test), seed=seed,
                            train_seconds=time.perf_counter() - started)


def broker_from_environment(wait_seconds: float = 900.0) -> RemoteBroker:
    """The gateway's key broker named by ``$MODELFENCE_BROKER_URL`` and ``..._TOKEN``; waits
    as long as the demo waits for its slowest model (the gateway starts after them)."""
    url, token = os.environ.get(BROKER_URL_ENV), os.environ.get(BROKER_TOKEN_ENV)
    if not url or not token:
        raise RuntimeError(f"set {BROKER_URL_ENV} and {BROKER_TOKEN_ENV} to the gateway's URL "
                           "and its confidential.token")
    return RemoteBroker(url, token, wait_seconds=wait_seconds)
