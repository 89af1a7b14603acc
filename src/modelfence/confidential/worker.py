"""The isolated worker: the only process that holds a sealed model part in the clear.

It runs as its own process (``python -m modelfence.confidential.worker``, started by the
launcher, ``launcher.py``), answers on a Unix socket in a private folder (mode 0600, and
each peer's credentials checked: same user only), marks itself not dumpable (no core
files, no ptrace by other processes of the user) and, where the OS lets an unprivileged
process do so, drops into a network namespace of its own. It knows four operations:

    health     what it is and whether it holds a part
    attest     evidence (through the launcher's platform) binding a nonce, its key, an artifact
    provision  a released data key and a sealed file: opens the part
    infer      float32 rows in, the part's answer out, under the output policy

Frames are a 4-byte length, a JSON header, then raw little-endian tensor bytes: no pickle.
The output policy (labels only, top-k, or rounded probabilities) is part of the measured
configuration and is applied here, so the gateway cannot leak the protected part's full
output by mistake. The part served is a linear head (``weight [d, c]``, ``bias [c]``,
softmax): a privately trained classifier head over a public backbone's features.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from modelfence.confidential.attestation import report_data
from modelfence.confidential.broker import ReleasedKey, receive_key
from modelfence.confidential.sealing import open_sealed, read_header
from modelfence.errors import ModelFenceError

Output = Literal["labels", "top_k", "probabilities"]
MAX_FRAME = 64 << 20
MAX_ROWS = 65_536
MAX_CONNECTIONS = 32  # beyond it a connection is closed at once: threads and buffers stay bounded
IDLE_SECONDS = 30.0
_PR_SET_PDEATHSIG = 1
OPS = ("health", "attest", "provision", "infer")
_PR_SET_DUMPABLE = 4
_CLONE_NEWNET = getattr(os, "CLONE_NEWNET", 0x40000000)  # Linux values; os has them from 3.12
_CLONE_NEWUSER = getattr(os, "CLONE_NEWUSER", 0x10000000)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What the launcher measures with the code: change it and the key is not released."""

    output: Output = "labels"
    top_k: int = 1
    decimals: int = 2

    @classmethod
    def parse(cls, raw: bytes) -> WorkerConfig:
        problem = ModelFenceError("worker config: a JSON object with output labels|top_k|probabilities, "
                                  "top_k an integer 1-100, decimals an integer 0-6")
        try:
            doc = json.loads(raw)
            config = cls(**doc)
        except (ValueError, TypeError, RecursionError) as exc:
            raise problem from exc
        whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (config.top_k, config.decimals))
        if config.output not in ("labels", "top_k", "probabilities") or not whole \
                or not 1 <= config.top_k <= 100 or not 0 <= config.decimals <= 6:
            raise problem
        return config


class FrameError(ModelFenceError):
    """A frame the worker will not read: it answers with the reason and goes on."""


def send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    encoded = json.dumps({**header, "payload_bytes": len(payload)}).encode()
    sock.sendall(struct.pack(">I", len(encoded)) + encoded + payload)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack(">I", _read_exactly(sock, 4))
    if length > 1 << 20:
        raise FrameError(f"frame header of {length} bytes; at most 1 MiB")
    try:
        header = json.loads(_read_exactly(sock, length))
    except (ValueError, RecursionError) as exc:
        raise FrameError("frame header is not JSON") from exc
    size = header.get("payload_bytes", 0) if isinstance(header, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FRAME:
        raise FrameError(f"payload_bytes must be an integer from 0 to {MAX_FRAME}")
    return header, _read_exactly(sock, size)


class Worker:
    """The operations, without the socket (what the tests and the server loop call)."""

    def __init__(self, config: WorkerConfig, platform: socket.socket | None) -> None:
        self.config = config
        self._platform = platform  # the launcher's end: report data out, evidence back
        self._secret = X25519PrivateKey.generate()
        self.public_key = self._secret.public_key().public_bytes_raw()
        self._part: tuple[np.ndarray, np.ndarray] | None = None
        self.artifact = ""
        self._attested: str | None = None  # the digest of the last attest: the only one provisioned
        self.isolation = harden()

    def handle(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        op = header.get("op")
        if op not in OPS:
            raise FrameError(f"op must be one of {', '.join(OPS)}")
        if op == "health":
            return {"ok": True, "provisioned": self._part is not None, "artifact": self.artifact,
                    "output": self.config.output, "security_level": "simulated", **self.isolation}, b""
        if op == "attest":
            return self._attest(header), b""
        if op == "provision":
            return self._provision(header), b""
        return self._infer(header, payload)

    def _attest(self, header: dict[str, Any]) -> dict[str, Any]:
        nonce, digest = _hex(header, "nonce", 32), _hex(header, "digest", 32)
        if self._platform is None:
            raise FrameError("this worker has no platform to attest with")
        self._attested = digest.hex()
        send_frame(self._platform, {"report_data": report_data(nonce, self.public_key, digest.hex()).hex()})
        evidence, _ = recv_frame(self._platform)
        return {"evidence": evidence, "public_key": self.public_key.hex()}

    def _provision(self, header: dict[str, Any]) -> dict[str, Any]:
        if self._part is not None:
            raise FrameError(f"this worker already serves {self.artifact}; start another for another part")
        path = Path(str(header.get("sealed", "")))
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block every operation
            raise FrameError(f"{path} is not a regular file")
        released = ReleasedKey(_hex(header, "ephemeral_public_key", 32), _hex(header, "nonce", 12),
                               _hex(header, "ciphertext", 48), str(header.get("security_level", "")))
        sealed = read_header(path)
        if sealed.digest != self._attested:  # an old release replayed: the broker did not see it
            raise FrameError("provision the artifact this worker last attested for")
        _, tensors = open_sealed(path, receive_key(self._secret, released, sealed.digest))
        # ``weight`` and ``bias``, or one module's (``head.weight``, ``head.bias``, as split).
        weight = next((t for n, t in tensors.items() if n.rpartition(".")[2] == "weight"), None)
        bias = next((t for n, t in tensors.items() if n.rpartition(".")[2] == "bias"), None)
        if len(tensors) != 2:
            weight = None
        if weight is None or bias is None or weight.ndim != 2 or bias.shape != (weight.shape[1],):
            raise FrameError("the part must hold weight [d, c] and bias [c] (of one module) only")
        # float64: finite float32 inputs cannot overflow it, and an overflow would turn an answer
        # into an oracle of the weights' scale.
        self._part = (weight.astype(np.float64), bias.astype(np.float64))
        self.artifact = f"{sealed.artifact_id} v{sealed.version}"
        return {"ok": True, "artifact": self.artifact, "inputs": int(weight.shape[0]),
                "classes": int(weight.shape[1])}

    def _infer(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        if self._part is None:
            raise FrameError("no part provisioned")
        weight, bias = self._part
        shape = header.get("shape")
        if (header.get("dtype") != "float32" or not isinstance(shape, list) or len(shape) != 2
                or shape[1] != weight.shape[0] or not all(isinstance(d, int) and not isinstance(d, bool)
                                                          for d in shape)
                or not 1 <= shape[0] <= MAX_ROWS or len(payload) != shape[0] * shape[1] * 4):
            raise FrameError(f"input must be float32 [rows 1-{MAX_ROWS}, {weight.shape[0]}], "
                             "its bytes matching the shape")
        rows = np.frombuffer(payload, dtype="<f4").reshape(shape)
        if not np.isfinite(rows).all():
            raise FrameError("input holds NaN or infinity")
        logits = rows.astype(np.float64) @ weight + bias
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        labels = probabilities.argmax(axis=1).astype("<i4")
        if self.config.output == "labels":
            return {"output": "labels", "dtype": "int32", "shape": [len(labels)]}, labels.tobytes()
        if self.config.output == "top_k":
            k = min(self.config.top_k, probabilities.shape[1])
            top = np.argsort(-probabilities, axis=1)[:, :k].astype("<i4")
            scores = np.round(np.take_along_axis(probabilities, top, axis=1), self.config.decimals)
            return ({"output": "top_k", "dtype": "int32+float32", "shape": [len(top), k]},
                    top.tobytes() + scores.astype("<f4").tobytes())
        rounded = np.round(probabilities, self.config.decimals).astype("<f4")
        return {"output": "probabilities", "dtype": "float32", "shape": list(rounded.shape)}, rounded.tobytes()


def _hex(header: dict[str, Any], field: str, size: int) -> bytes:
    value = header.get(field)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise FrameError(f"{field} must be {size} bytes as hex")
    return raw


def harden() -> dict[str, Any]:
    """A network namespace of its own where the OS allows, then not dumpable, and killed with
    the launcher. Reports what held; exits if half of a namespace change held."""
    network = "shared"
    unshare = getattr(os, "unshare", None)
    uid = os.getuid()
    if unshare is not None:
        try:
            unshare(_CLONE_NEWNET if uid == 0 else _CLONE_NEWUSER | _CLONE_NEWNET)
        except OSError:
            pass
        else:
            if uid != 0:  # before PR_SET_DUMPABLE, which makes /proc/self/uid_map unwritable
                try:
                    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1\n")  # peer checks stay exact
                except OSError:
                    sys.exit("worker: in a user namespace without its uid mapped; refusing to serve")
            network = "isolated"
    dumpable = True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        dumpable = libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    return {"dumpable": dumpable, "network": network}


def serve(path: Path, platform: socket.socket) -> None:
    """Read the configuration from the launcher, then answer frames on ``path``."""
    _, config = recv_frame(platform)  # the bytes the launcher measured, not a file
    worker = Worker(WorkerConfig.parse(config), platform)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(8)
    send_frame(platform, {"ready": True, **worker.isolation})
    lock = threading.Lock()  # one operation at a time: the platform channel and the part are shared
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:  # out of descriptors for a moment: the connections open are still served
            time.sleep(0.1)
            continue
        uid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))[1]
        if uid != os.getuid() or not slots.acquire(blocking=False):
            connection.close()  # another user's process, or too many connections
            continue
        connection.settimeout(IDLE_SECONDS)
        threading.Thread(target=_answer, args=(worker, connection, lock, slots), daemon=True).start()


def _answer(worker: Worker, connection: socket.socket, lock: threading.Lock,
            slots: threading.BoundedSemaphore) -> None:
    try:
        with connection:
            _serve_connection(worker, connection, lock)
    except OSError:
        pass  # the peer went away or stalled past IDLE_SECONDS
    finally:
        slots.release()


def _serve_connection(worker: Worker, connection: socket.socket, lock: threading.Lock) -> None:
    while True:
        try:
            header, payload = recv_frame(connection)
        except (ConnectionError, struct.error):
            return
        except FrameError as exc:
            send_frame(connection, {"error": str(exc)})
            return  # the stream may be out of step: the client reconnects
        try:
            with lock:
                answer, data = worker.handle(header, payload)
        except (ModelFenceError, OSError, ValueError) as exc:  # a bad path or tensor: answered
            answer, data = {"error": str(exc)}, b""
        except Exception as exc:  # noqa: BLE001 -- answered, never a dead connection thread
            answer, data = {"error": f"internal error: {type(exc).__name__}"}, b""
        send_frame(connection, answer, data)


def main() -> None:
    parser = argparse.ArgumentParser(description="the isolated worker (started by the launcher)")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--platform-fd", type=int, required=True)
    args = parser.parse_args()
    serve(args.socket, socket.socket(fileno=args.platform_fd))


if __name__ == "__main__":
    main()
