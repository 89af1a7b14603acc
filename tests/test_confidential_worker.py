"""The isolated worker, end to end: launched and measured, attested to the broker, given the
key, serving a private head or slice under its output policy; hostile frames and parts
answered, not obeyed."""

from __future__ import annotations

import json
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

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
from modelfence.confidential.partition import split_module
from modelfence.confidential.sealing import new_key, seal
from modelfence.confidential.worker import (
    MAX_FRAME,
    MAX_LAYERS,
    MAX_PARAMETERS,
    FrameReader,
    PartError,
    read_slice,
    send_frame,
)

KEK = new_key()
RNG = np.random.default_rng(3)
WEIGHT = RNG.standard_normal((4, 8)).astype(np.float32)  # nn.Linear's layout: [out, in]
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
    np.testing.assert_array_equal(labels, (ROWS @ WEIGHT.T + BIAS).argmax(axis=1))
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
    # In float32, x = s * e_2 overflows once s * |W[j, 2]| passes FLT_MAX: the label then
    # flips at s = FLT_MAX / |W[j, 2]|, an oracle of the weight. The worker computes in float64.
    full = launch(json.dumps({"output": "probabilities", "decimals": 3}).encode(), tmp_path / "p", platform)
    try:
        client = provision(full, platform, tmp_path, clients, measurements=frozenset({full.measurement}))
        rows = np.zeros((2, 8), np.float32)
        rows[:, 2] = [1e38, 3e38]
        answer, data = client.call("infer", rows.tobytes(), dtype="float32", shape=[2, 8])
        probabilities = np.frombuffer(data, dtype="<f4").reshape(answer["shape"])
        assert np.isfinite(probabilities).all()
        expected = (rows.astype(np.float64) @ WEIGHT.T.astype(np.float64)).argmax(axis=1)
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


def _slice_model() -> torch.nn.Module:
    """A public backbone and a privately trained two-layer slice, named as PyTorch names them."""
    torch.manual_seed(5)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU())
            self.slice = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))

    return Net()


def _serve_slice(tmp_path: Path, platform: SimPlatform, clients: list[WorkerClient], config: dict[str, object],
                 private: dict[str, np.ndarray]) -> tuple[LaunchedWorker, WorkerClient, dict[str, object]]:
    launched = launch(json.dumps(config).encode(), tmp_path / "slice-run", platform)
    sealed = tmp_path / "slice.sealed"
    seal(private, sealed, kek=KEK, artifact_id="digits-slice", version=2)
    policy = ReleasePolicy("development", frozenset({"sim"}), frozenset({launched.measurement}))
    broker = KeyBroker(KEK, policy, {"sim": SimVerifier(platform.public_key)}, AuditLog())
    client = connect(launched, clients)
    try:
        answer = provision_part(client, broker, sealed)
    except BaseException:
        launched.stop()
        raise
    return launched, client, answer


@pytest.mark.parametrize("config", [{"output": "labels"}, {"output": "top_k", "top_k": 2, "decimals": 4},
                                    {"output": "probabilities", "decimals": 6}],
                         ids=["labels", "top_k", "probabilities"])
def test_a_slice_sealed_from_a_torch_sequential_answers_what_torch_computes(
    tmp_path: Path, platform: SimPlatform, clients: list[WorkerClient], config: dict[str, object]
) -> None:
    model = _slice_model()
    public, private = split_module(model, ["slice"])
    assert list(private) == ["slice.0.weight", "slice.0.bias", "slice.2.weight", "slice.2.bias"]
    assert sorted(public) == ["backbone.0.bias", "backbone.0.weight"]
    inputs = torch.from_numpy(np.random.default_rng(8).standard_normal((40, 8)).astype(np.float32))
    with torch.no_grad():
        features = model.backbone(inputs)  # the public part, computed by the caller
        expected = torch.softmax(model.slice.double()(features.double()), dim=1).numpy()
    rows = features.numpy()
    worker, client, provisioned = _serve_slice(tmp_path, platform, clients, config, private)
    try:
        assert provisioned["widths"] == [6, 5, 3] and provisioned["parameters"] == 6 * 5 + 5 + 5 * 3 + 3
        answer, data = client.call("infer", rows.tobytes(), dtype="float32", shape=list(rows.shape))
    finally:
        worker.stop()
    assert answer["output"] == config["output"]
    if config["output"] == "labels":
        np.testing.assert_array_equal(np.frombuffer(data, "<i4"), expected.argmax(axis=1))
    elif config["output"] == "top_k":
        top = np.frombuffer(data[: 40 * 2 * 4], "<i4").reshape(40, 2)
        scores = np.frombuffer(data[40 * 2 * 4:], "<f4").reshape(40, 2)
        np.testing.assert_array_equal(top, np.argsort(-expected, axis=1)[:, :2])
        np.testing.assert_array_equal(scores, np.round(np.take_along_axis(expected, top, axis=1), 4)
                                      .astype(np.float32))
    else:
        got = np.frombuffer(data, "<f4").reshape(answer["shape"])
        np.testing.assert_array_equal(got, np.round(expected, 6).astype(np.float32))
    assert len(set(expected.argmax(axis=1))) > 1  # the check compares answers that differ


def _linear(out: int, inputs: int, value: float = 0.5, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    return np.full((out, inputs), value, dtype), np.zeros(out, dtype)


def _layers(*shapes: tuple[int, int]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for index, (out, inputs) in enumerate(shapes):
        tensors[f"slice.{index}.weight"], tensors[f"slice.{index}.bias"] = _linear(out, inputs)
    return tensors


_UNCHAINED = _layers((5, 6), (3, 4))
_HUGE = {"a.weight": np.full((1, 1), 1e200), "a.bias": np.zeros(1), "b.weight": np.full((1, 1), 1e200),
         "b.bias": np.zeros(1)}


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (_UNCHAINED, "layer slice.1 takes 4 inputs but the layer before gives 5"),
        ({**_layers((5, 6)), "slice.0.bias": np.zeros(6, np.float32)}, r"weight \[5, 6\] and bias \[6\] are not"),
        ({"head.weight": np.ones((8, 4), np.float32), "head.bias": np.zeros(4, np.float32)},
         r"are not weight \[out, in\]"),  # the old [d, c] layout
        ({"slice.0.weight": np.ones((3, 4), np.float32)}, "needs both weight"),
        ({"slice.0.weight": np.ones((3, 4, 1), np.float32), "slice.0.bias": np.zeros(3, np.float32)}, "are not"),
        ({"slice.0.weight": np.ones((0, 4), np.float32), "slice.0.bias": np.zeros(0, np.float32)}, "are not"),
        ({**_layers((3, 4)), "norm.running_mean": np.zeros(3, np.float32)}, "only linear layers"),
        ({"a.weight": _linear(3, 4)[0], "b.weight": _linear(2, 3)[0], "a.bias": np.zeros(3, np.float32),
          "b.bias": np.zeros(2, np.float32)}, "not sealed together"),
        ({"a.weight": np.ones((3, 4), np.int32), "a.bias": np.zeros(3, np.int32)}, "floating point"),
        ({"a.weight": np.full((3, 4), np.nan, np.float32), "a.bias": np.zeros(3, np.float32)}, "NaN or infinity"),
        (_HUGE, "could overflow float64"),
        (_layers(*[(1, 1)] * (MAX_LAYERS + 1)), f"at most {MAX_LAYERS}"),
        ({"a.weight": np.broadcast_to(np.float32(0), (4096, MAX_PARAMETERS // 4096 + 1)),
          "a.bias": np.zeros(4096, np.float32)}, "parameters; at most"),
        ({}, "no tensors"),
    ],
    ids=["unchained", "bias-shape", "old-d-c-layout", "no-bias", "3-d", "empty-layer", "other-tensor",
         "interleaved", "integers", "nan", "overflow", "too-deep", "too-large", "empty"],
)
def test_a_part_that_is_not_a_chain_of_linear_layers_is_refused_with_the_reason(
    tensors: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(PartError, match=message):
        read_slice(tensors)


def test_a_launched_worker_refuses_an_unchained_slice_with_the_reason(
    tmp_path: Path, platform: SimPlatform, clients: list[WorkerClient]
) -> None:
    with pytest.raises(WorkerError, match="takes 4 inputs but the layer before gives 5"):
        _serve_slice(tmp_path, platform, clients, {"output": "labels"}, _UNCHAINED)
    assert read_slice(_layers((5, 6), (3, 5))).inputs == 6  # the same layers, chained, are a slice


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


def _infer(rows: int, cols: int, size: int | None = None, *, op: int = 1, dtype: int = 1,
           reserved: int = 0) -> bytes:
    """A binary infer header: magic, op, dtype, reserved, rows, cols, payload bytes (big-endian)."""
    return struct.pack(">4sBBHIII", b"MFi1", op, dtype, reserved, rows, cols,
                       rows * cols * 4 if size is None else size)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (_infer(5, 8, op=2), b"op code 2"),
        (_infer(5, 8, dtype=9), b"dtype code 9"),
        (_infer(5, 8, reserved=1), b"reserved 1"),
        (_infer(5, 8, size=MAX_FRAME + 1), b"payload_bytes must be"),
        (_infer(2**31, 2**31, size=2**32 - 1), b"payload_bytes must be"),
        (struct.pack(">4sBBBBIII", b"MFa1", 1, 2, 3, 0, 5, 0, 20), b"not understood"),  # 3-d answer
        (b"MFi1\x01\x01\x00", None),  # cut short: the connection closes, unanswered
    ],
    ids=["op", "dtype", "reserved", "payload-over-64-MiB", "payload-4-GiB", "answer-3-d", "truncated"],
)
def test_malformed_binary_frames_get_an_error_and_the_worker_lives_on(
    worker: LaunchedWorker, clients: list[WorkerClient], blob: bytes, message: bytes | None
) -> None:
    answer = _raw(worker.socket_path, blob)
    if message is None:
        assert answer == b""
    else:
        assert message in answer and answer[4:5] == b"{"  # a reason, as a JSON frame
    assert connect(worker, clients).call("health")[0]["ok"]
    assert worker.process.poll() is None


def test_binary_and_json_frames_keep_the_stream_in_step(
    worker: LaunchedWorker, platform: SimPlatform, tmp_path: Path, clients: list[WorkerClient]
) -> None:
    provision(worker, platform, tmp_path, clients)
    good = _infer(5, 8) + ROWS.tobytes()
    frames = [
        good,
        _infer(5, 7, size=ROWS.nbytes) + ROWS.tobytes(),  # bytes that do not match the shape
        _infer(5, 8, dtype=2) + ROWS.tobytes(),  # int32 rows
        struct.pack(">4sBBBBIII", b"MFa1", 1, 2, 1, 0, 5, 0, 0),  # an answer is no request
        _frame({"op": "infer", "dtype": "float32", "shape": [5, 8], "payload_bytes": ROWS.nbytes})
        + ROWS.tobytes(),
        good,
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(worker.socket_path))
        sock.sendall(b"".join(frames))  # pipelined: one write, six frames
        reader = FrameReader(sock)
        answers = []
        for _ in frames:
            header, data = reader.read()
            answers.append((header, data, reader.binary))
    expected = (ROWS @ WEIGHT.T + BIAS).argmax(axis=1)
    for index in (0, 4, 5):
        header, data, binary = answers[index]
        assert header == {"output": "labels", "dtype": "int32", "shape": [5], "payload_bytes": 20}
        np.testing.assert_array_equal(np.frombuffer(data, "<i4"), expected)
        assert binary is (index != 4)  # asked in binary, answered in binary; JSON for JSON
    assert "its bytes matching the shape" in answers[1][0]["error"]
    assert "input must be float32" in answers[2][0]["error"]
    assert "op must be one of" in answers[3][0]["error"]
    assert not any(binary for _, _, binary in answers[1:4])  # errors are JSON


def test_a_request_over_the_read_buffer_is_answered_whole(
    worker: LaunchedWorker, platform: SimPlatform, tmp_path: Path, clients: list[WorkerClient]
) -> None:
    client = provision(worker, platform, tmp_path, clients)
    rows = np.random.default_rng(4).standard_normal((20_000, 8)).astype(np.float32)  # 640 KB in, 80 KB out
    answer, data = client.call("infer", rows.tobytes(), dtype="float32", shape=list(rows.shape))
    expected = (rows.astype(np.float64) @ WEIGHT.T.astype(np.float64) + BIAS).argmax(axis=1)
    assert answer["shape"] == [20_000]
    np.testing.assert_array_equal(np.frombuffer(data, "<i4"), expected)
    assert client.call("infer", ROWS.tobytes(), dtype="float32", shape=[5, 8])[0]["shape"] == [5]


def test_frames_of_every_size_cross_a_socket_whole() -> None:
    # sendmsg may send part of a large frame on a socket with a timeout: the rest must follow.
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    theirs.settimeout(10)
    payloads = [b"", b"x", bytes(range(256)) * 256, np.arange(1 << 20, dtype="<f4").tobytes()]
    headers = [{"op": "health"}, {"op": "infer", "dtype": "float32", "shape": [1, 1]},
               {"output": "top_k", "dtype": "int32+float32", "shape": [4096, 2]},
               {"output": "probabilities", "dtype": "float32", "shape": [1024, 1024]}]

    def send() -> None:
        for header, payload in zip(headers, payloads, strict=True):
            send_frame(ours, header, payload, binary=True)

    sender = threading.Thread(target=send)
    with ours, theirs:
        sender.start()
        reader = FrameReader(theirs, 1024)  # a small buffer: most frames go past it
        received = [reader.read() for _ in payloads]
        sender.join()
    for (header, data), sent, payload in zip(received, headers, payloads, strict=True):
        assert data == payload
        assert header == {**sent, "payload_bytes": len(payload)}


class _Wire:
    """A socket stand-in: keeps what is sent, hands it back ``step`` bytes per recv_into."""

    def __init__(self, step: int) -> None:
        self.sent, self.step, self.at = bytearray(), step, 0

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def recv_into(self, view: memoryview) -> int:
        chunk = self.sent[self.at:self.at + min(self.step, len(view))]
        view[:len(chunk)] = chunk
        self.at += len(chunk)
        return len(chunk)


@pytest.mark.parametrize("step", [1, 7, 1 << 20], ids=["byte-by-byte", "7-bytes", "all-at-once"])
def test_a_reader_splits_pipelined_frames_exactly_whatever_its_buffer(step: int) -> None:
    sent = []
    for index in range(60):
        payload = bytes([index]) * (index * 7 % 90)
        header = ({"op": "infer", "dtype": "float32", "shape": [1, index]} if index % 3
                  else {"op": "health", "n": index})
        sent.append(({**header, "payload_bytes": len(payload)}, payload))
    for buffer in (0, 24, 64, 1 << 17):  # smaller than some frames, or than a binary header
        wire = _Wire(step)
        for header, payload in sent:
            send_frame(wire, {k: v for k, v in header.items() if k != "payload_bytes"}, payload, binary=True)
        reader = FrameReader(wire, buffer)
        assert [reader.read() for _ in sent] == sent
        with pytest.raises(ConnectionError):
            reader.read()


def test_the_worker_outlives_the_thread_that_launched_it_not_the_launcher(
    tmp_path: Path, platform: SimPlatform
) -> None:
    started: list[LaunchedWorker] = []
    thread = threading.Thread(target=lambda: started.append(
        launch(json.dumps({"output": "labels"}).encode(), tmp_path / "run", platform)))
    thread.start()
    thread.join()
    launched = started[0]
    try:
        time.sleep(0.5)  # PR_SET_PDEATHSIG would have killed it when the thread ended
        assert launched.process.poll() is None
        with WorkerClient(launched.socket_path) as client:
            assert client.call("health")[0]["ok"] is True
    finally:
        launched.stop()
    assert launched.process.poll() is not None


def test_the_worker_exits_when_its_launcher_process_dies(tmp_path: Path) -> None:
    script = (
        "import json, pathlib, sys, time\n"
        "from modelfence.confidential.attestation import SimPlatform\n"
        "from modelfence.confidential.launcher import launch\n"
        "w = launch(json.dumps({'output': 'labels'}).encode(), pathlib.Path(sys.argv[1]), SimPlatform())\n"
        "print(w.process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run")],
                          stdout=subprocess.PIPE, text=True) as launcher:
        assert launcher.stdout is not None
        pid = int(launcher.stdout.readline())
        assert Path(f"/proc/{pid}").exists()
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
