"""The isolated worker, end to end: launched and measured, attested to the broker, given the
key, serving a private head under its output policy; hostile frames answered, not obeyed."""

from __future__ import annotations

import json
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modelfence.confidential.attestation import SimPlatform, SimVerifier, measure
from modelfence.confidential.broker import AuditLog, KeyBroker, ReleasePolicy, ReleaseRefused
from modelfence.confidential.launcher import (
    ROOT,
    LaunchedWorker,
    WorkerClient,
    WorkerError,
    launch,
    worker_code,
)
from modelfence.confidential.launcher import provision as provision_part
from modelfence.confidential.sealing import new_key, seal

KEK = new_key()
RNG = np.random.default_rng(3)
WEIGHT = RNG.standard_normal((8, 4)).astype(np.float32)
BIAS = RNG.standard_normal(4).astype(np.float32)
ROWS = RNG.standard_normal((5, 8)).astype(np.float32)


@pytest.fixture
def platform() -> SimPlatform:
    return SimPlatform()


@pytest.fixture
def clients() -> Iterator[list[WorkerClient]]:
    opened: list[WorkerClient] = []
    yield opened
    for client in opened:
        client.close()


def connect(launched: LaunchedWorker, clients: list[WorkerClient]) -> WorkerClient:
    clients.append(WorkerClient(launched.socket_path))
    return clients[-1]


@pytest.fixture
def worker(tmp_path: Path, platform: SimPlatform) -> Iterator[LaunchedWorker]:
    launched = launch(json.dumps({"output": "labels"}).encode(), tmp_path / "run", platform)
    yield launched
    launched.stop()


def provision(launched: LaunchedWorker, platform: SimPlatform, tmp_path: Path, clients: list[WorkerClient],
              measurements: frozenset[str] | None = None) -> WorkerClient:
    sealed = tmp_path / "head.sealed"
    seal({"head.weight": WEIGHT, "head.bias": BIAS}, sealed, kek=KEK, artifact_id="digits-head", version=1)
    policy = ReleasePolicy("development", frozenset({"sim"}), measurements or frozenset({launched.measurement}))
    broker = KeyBroker(KEK, policy, {"sim": SimVerifier(platform.public_key)}, AuditLog())
    client = connect(launched, clients)
    assert provision_part(client, broker, sealed)["artifact"] == "digits-head v1"
    return client


def test_an_attested_worker_serves_the_private_head_as_labels_only(
    worker: LaunchedWorker, platform: SimPlatform, tmp_path: Path, clients: list[WorkerClient]
) -> None:
    client = provision(worker, platform, tmp_path, clients)
    answer, data = client.call("infer", ROWS.tobytes(), dtype="float32", shape=[5, 8])
    assert answer["output"] == "labels"
    labels = np.frombuffer(data, dtype="<i4")
    np.testing.assert_array_equal(labels, (ROWS @ WEIGHT + BIAS).argmax(axis=1))
    health, _ = client.call("health")
    assert health["provisioned"] and health["security_level"] == "simulated"
    assert health["dumpable"] is False and health["network"] in ("isolated", "shared")
    assert stat.S_IMODE(worker.socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(worker.socket_path.parent.stat().st_mode) == 0o700


def test_a_worker_serves_one_part_and_takes_no_replayed_release(
    worker: LaunchedWorker, platform: SimPlatform, tmp_path: Path, clients: list[WorkerClient]
) -> None:
    client = provision(worker, platform, tmp_path, clients)
    with pytest.raises(WorkerError, match="already serves digits-head v1"):
        client.call("provision", sealed=str(tmp_path / "head.sealed"), ephemeral_public_key="00" * 32,
                    nonce="00" * 12, ciphertext="00" * 48)


def test_inputs_that_would_overflow_float32_leak_nothing(tmp_path: Path, platform: SimPlatform,
                                                         clients: list[WorkerClient]) -> None:
    # In float32, x = s * e_2 overflows once s * |W[2, j]| passes FLT_MAX: the label then
    # flips at s = FLT_MAX / |W[2, j]|, an oracle of the weight. The worker computes in float64.
    full = launch(json.dumps({"output": "probabilities", "decimals": 3}).encode(), tmp_path / "p", platform)
    try:
        client = provision(full, platform, tmp_path, clients, measurements=frozenset({full.measurement}))
        rows = np.zeros((2, 8), np.float32)
        rows[:, 2] = [1e38, 3e38]
        answer, data = client.call("infer", rows.tobytes(), dtype="float32", shape=[2, 8])
        probabilities = np.frombuffer(data, dtype="<f4").reshape(answer["shape"])
        assert np.isfinite(probabilities).all()
        expected = (rows.astype(np.float64) @ WEIGHT.astype(np.float64)).argmax(axis=1)
        np.testing.assert_array_equal(probabilities.argmax(axis=1), expected)
    finally:
        full.stop()


def test_a_worker_with_another_configuration_gets_no_key(
    tmp_path: Path, platform: SimPlatform, clients: list[WorkerClient]
) -> None:
    leaky = launch(json.dumps({"output": "probabilities", "decimals": 6}).encode(), tmp_path / "leaky", platform)
    try:
        labels_only = measure(ROOT, worker_code(), json.dumps({"output": "labels"}).encode())
        assert leaky.measurement != labels_only
        with pytest.raises(ReleaseRefused, match="measurement"):
            provision(leaky, platform, tmp_path, clients, measurements=frozenset({labels_only}))
        with pytest.raises(WorkerError, match="no part provisioned"):
            connect(leaky, clients).call("infer", ROWS.tobytes(), dtype="float32", shape=[5, 8])
    finally:
        leaky.stop()


def _frame(header: object) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack(">I", len(encoded)) + encoded


def _raw(path: Path, blob: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(blob)
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(1 << 16)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"op": "shell"}, "op must be one of"),
        ({"op": "infer", "dtype": "float32", "shape": [5, 8]}, "no part provisioned"),
        ({"op": "attest", "nonce": "zz", "digest": "00"}, "nonce must be 32 bytes"),
        ({"op": "provision", "sealed": "/etc/passwd", "ephemeral_public_key": "00" * 32, "nonce": "00" * 12,
          "ciphertext": "00" * 48}, "bad magic"),
        ({"op": "provision", "sealed": "/nonexistent/part", "ephemeral_public_key": "00" * 32,
          "nonce": "00" * 12, "ciphertext": "00" * 48}, "No such file"),
        ({"op": "provision", "sealed": "/tmp", "ephemeral_public_key": "00" * 32, "nonce": "00" * 12,
          "ciphertext": "00" * 48}, "not a regular file"),
    ],
)
def test_hostile_calls_are_answered_with_the_reason(
    worker: LaunchedWorker, clients: list[WorkerClient], call: dict, message: str
) -> None:
    client = connect(worker, clients)
    op = call.pop("op")
    with pytest.raises(WorkerError, match=message):
        client.call(op, **call)
    assert client.call("health")[0]["ok"]  # the same connection still serves


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (struct.pack(">I", 5) + b"{nope", b"not JSON"),
        (struct.pack(">I", 2**31), b"at most 1 MiB"),
        (_frame({"op": "infer", "payload_bytes": 2**40}), b"payload_bytes must be"),
        (_frame({"op": "health", "payload_bytes": True}), b"payload_bytes must be"),
        (_frame({"op": "infer", "payload_bytes": -1}), b"payload_bytes must be"),
        (_frame([1, 2]), b"payload_bytes must be"),
    ],
)
def test_malformed_frames_get_an_error_and_the_worker_lives_on(
    worker: LaunchedWorker, clients: list[WorkerClient], blob: bytes, message: bytes
) -> None:
    assert message in _raw(worker.socket_path, blob)
    assert connect(worker, clients).call("health")[0]["ok"]
    assert worker.process.poll() is None
