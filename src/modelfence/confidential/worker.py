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
``infer`` requests and answers may instead carry a fixed 20-byte binary header (a 4-byte
magic, then op or output, dtype, shape and payload size); errors are always JSON.
The output policy (labels only, top-k, or rounded probabilities) is part of the measured
configuration and is applied here, so the gateway cannot leak the protected part's full
output by mistake. The part served is a private slice: linear layers in PyTorch's
``nn.Linear`` layout (``weight [out, in]``, ``bias [out]``), ReLU between them and softmax
after the last, in the order they were sealed (``split_module(nn.Sequential, ...)`` order);
one layer is a privately trained head over a public backbone's features.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Mapping
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
MAX_HEADER = 1 << 20
# The hot path has a binary frame of its own: an ``infer`` request (op, dtype, rows, cols) and
# its answer (output, dtype, shape) as fixed big-endian fields after a 4-byte magic. Read as a
# JSON frame's length, each magic is over MAX_HEADER, so no JSON frame starts with one. The
# other operations, and every error, stay JSON.
INFER_MAGIC = b"MFi1"
ANSWER_MAGIC = b"MFa1"
_LENGTH = struct.Struct(">I")
_INFER = struct.Struct(">4sBBHIII")  # magic, op, dtype, 0, rows, cols, payload bytes: 20 bytes
_ANSWER = struct.Struct(">4sBBBBIII")  # magic, output, dtype, dimensions (1-2), 0, shape[0], shape[1] or 0,
#                                        payload bytes: 20 bytes
_BINARY_OPS = {1: "infer"}
_DTYPES = {1: "float32", 2: "int32", 3: "int32+float32"}
_OUTPUTS = {1: "labels", 2: "top_k", 3: "probabilities"}
_DTYPE_CODES = {name: code for code, name in _DTYPES.items()}
_OUTPUT_CODES = {name: code for code, name in _OUTPUTS.items()}
_U32 = 0xFFFFFFFF
_BUFFER = 1 << 17  # per connection: a request of up to 128 KiB usually comes in one recv
_COPY_BELOW = 1 << 16  # smaller payloads are copied behind the header; larger ones go by sendmsg
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


def send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes = b"", *,
               binary: bool = False) -> None:
    """Send ``header`` and ``payload`` as one frame: JSON, or, with ``binary``, the binary
    frame where ``header`` is an ``infer`` request or answer it can carry (JSON otherwise)."""
    head = _binary_header(header, len(payload)) if binary else None
    if head is None:
        encoded = json.dumps({**header, "payload_bytes": len(payload)}).encode()
        head = _LENGTH.pack(len(encoded)) + encoded
    if len(payload) < _COPY_BELOW:
        sock.sendall(head + payload)
        return
    buffers = [memoryview(head), memoryview(payload).cast("B")]
    while buffers:  # sendmsg may send part: go on from where it stopped
        sent = sock.sendmsg(buffers)
        while buffers and sent >= len(buffers[0]):
            sent -= len(buffers.pop(0))
        if buffers:
            buffers[0] = buffers[0][sent:]


def _binary_header(header: dict[str, Any], size: int) -> bytes | None:
    """The binary header for an ``infer`` request (op, dtype, shape) or its answer (output,
    dtype, shape), or None for any other header: it goes as JSON."""
    shape, dtype = header.get("shape"), header.get("dtype")
    if len(header) != 3 or type(shape) is not list or type(dtype) is not str or dtype not in _DTYPE_CODES \
            or size > _U32 or not all(type(d) is int and 0 <= d <= _U32 for d in shape):
        return None
    if len(shape) == 2 and header.get("op") == "infer":
        return _INFER.pack(INFER_MAGIC, 1, _DTYPE_CODES[dtype], 0, shape[0], shape[1], size)
    output = header.get("output")
    if type(output) is not str or output not in _OUTPUT_CODES or not 1 <= len(shape) <= 2:
        return None
    return _ANSWER.pack(ANSWER_MAGIC, _OUTPUT_CODES[output], _DTYPE_CODES[dtype], len(shape), 0, shape[0],
                        shape[1] if len(shape) == 2 else 0, size)


class FrameReader:
    """Frames from one stream, read into a buffer reused frame after frame (a request and its
    payload usually come in one ``recv_into``). Bytes past a frame stay for the next, so a
    socket has one reader for its life; ``binary`` says whether the last frame was binary."""

    def __init__(self, sock: socket.socket, buffer: int = _BUFFER) -> None:
        self._sock = sock
        self._buffer = bytearray(buffer)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0
        self.binary = False

    def read(self) -> tuple[dict[str, Any], bytes]:
        prefix = self._take(4)
        self.binary = prefix in (INFER_MAGIC, ANSWER_MAGIC)
        if prefix == INFER_MAGIC:
            _, op, dtype, zero, rows, cols, size = _INFER.unpack(prefix + self._take(_INFER.size - 4))
            if op not in _BINARY_OPS or dtype not in _DTYPES or zero:
                raise FrameError(f"binary infer frame: op code {op} (1: infer), dtype code {dtype} "
                                 f"(1: float32) and reserved {zero} (0) not understood")
            header: Any = {"op": _BINARY_OPS[op], "dtype": _DTYPES[dtype], "shape": [rows, cols],
                           "payload_bytes": size}
        elif prefix == ANSWER_MAGIC:
            fields = _ANSWER.unpack(prefix + self._take(_ANSWER.size - 4))
            _, output, dtype, dims, zero, first, second, size = fields
            if output not in _OUTPUTS or dtype not in _DTYPES or dims not in (1, 2) or zero \
                    or (dims == 1 and second):
                raise FrameError("binary answer frame: output, dtype or shape not understood")
            header = {"output": _OUTPUTS[output], "dtype": _DTYPES[dtype], "shape": [first, second][:dims],
                      "payload_bytes": size}
        else:
            (length,) = _LENGTH.unpack(prefix)
            if length > MAX_HEADER:
                raise FrameError(f"frame header of {length} bytes; at most 1 MiB")
            try:
                header = json.loads(self._take(length))
            except (ValueError, RecursionError) as exc:
                raise FrameError("frame header is not JSON") from exc
        size = header.get("payload_bytes", 0) if isinstance(header, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FRAME:
            raise FrameError(f"payload_bytes must be an integer from 0 to {MAX_FRAME}")
        return header, self._take(size)

    def _take(self, size: int) -> bytes:
        if self._end - self._start < size:
            if self._start == self._end:
                self._start = self._end = 0
            if size > len(self._buffer):  # over the buffer: read into one of its own
                return _read_exactly(self._sock, size, self._drain())
            if self._start + size > len(self._buffer):  # move what is held to the front
                held = self._drain()
                self._buffer[:len(held)] = held  # as long as it replaces: the buffer keeps its size
                self._end = len(held)
            while self._end - self._start < size:
                got = self._sock.recv_into(self._view[self._end:])
                if not got:
                    raise ConnectionError("peer closed the connection")
                self._end += got
        self._start += size
        return bytes(self._view[self._start - size:self._start])

    def _drain(self) -> bytes:
        held = bytes(self._view[self._start:self._end])
        self._start = self._end = 0
        return held


def _read_exactly(sock: socket.socket, size: int, held: bytes = b"") -> bytes:
    """``size`` bytes, ``held`` first, then read straight into one buffer (no chunks joined)."""
    buffer = bytearray(size)
    buffer[:len(held)] = held
    view, got = memoryview(buffer), len(held)
    while got < size:
        read = sock.recv_into(view[got:])
        if not read:
            raise ConnectionError("peer closed the connection")
        got += read
    return bytes(buffer)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """One frame, reading nothing past it (for a socket without a :class:`FrameReader`)."""
    return FrameReader(sock, 0).read()


class Worker:
    """The operations, without the socket (what the tests and the server loop call)."""

    def __init__(self, config: WorkerConfig, platform: socket.socket | None) -> None:
        self.config = config
        self._platform = platform  # the launcher's end: report data out, evidence back
        self._secret = X25519PrivateKey.generate()
        self.public_key = self._secret.public_key().public_bytes_raw()
        self._part: Slice | None = None
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
        # Layers in the manifest's order, widened to float64 (read_slice refuses weights with
        # which a finite float32 input could overflow it: an overflow would be an oracle).
        part = read_slice(tensors)
        self._part = part
        self.artifact = f"{sealed.artifact_id} v{sealed.version}"
        return {"ok": True, "artifact": self.artifact, "inputs": part.inputs, "classes": part.classes,
                "widths": [part.inputs, *(int(weight.shape[0]) for weight, _ in part.layers)],
                "parameters": part.parameters}

    def _infer(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        if self._part is None:
            raise FrameError("no part provisioned")
        part = self._part
        shape = header.get("shape")
        if (header.get("dtype") != "float32" or not isinstance(shape, list) or len(shape) != 2
                or shape[1] != part.inputs or not all(isinstance(d, int) and not isinstance(d, bool)
                                                      for d in shape)
                or not 1 <= shape[0] <= MAX_ROWS or len(payload) != shape[0] * shape[1] * 4):
            raise FrameError(f"input must be float32 [rows 1-{MAX_ROWS}, {part.inputs}], "
                             "its bytes matching the shape")
        answer_bytes = shape[0] * {"labels": 4, "top_k": 8 * min(self.config.top_k, part.classes),
                                   "probabilities": 4 * part.classes}[self.config.output]
        if answer_bytes > MAX_FRAME:
            raise FrameError(f"the answer for {shape[0]} rows would pass {MAX_FRAME} bytes; send fewer")
        rows = np.frombuffer(payload, dtype="<f4").reshape(shape)
        if not np.isfinite(rows).all():
            raise FrameError("input holds NaN or infinity")
        probabilities = part.probabilities(rows)
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


MAX_LAYERS = 64
MAX_PARAMETERS = 1 << 26  # 64M: 512 MiB once widened to float64, next to the sealed copy
_BLOCK_ELEMENTS = 1 << 22  # activations per block of rows (32 MiB of float64), however wide a layer
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT64_SAFE = 1e300  # below float64's largest finite value, with room for a sum's rounding


class PartError(ModelFenceError):
    """A sealed part the worker will not serve: the reason says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Slice:
    """Linear layers (``weight [out, in]``, ``bias [out]``, float64), ReLU between, softmax after."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]

    @property
    def inputs(self) -> int:
        return int(self.layers[0][0].shape[1])

    @property
    def classes(self) -> int:
        return int(self.layers[-1][0].shape[0])

    @property
    def parameters(self) -> int:
        return sum(weight.size + bias.size for weight, bias in self.layers)

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        """Softmax of the slice's logits for ``rows [n, inputs]``, in float64, in blocks of rows
        so that a wide layer's activations stay bounded."""
        widest = max(weight.shape[0] for weight, _ in self.layers)
        step = max(1, _BLOCK_ELEMENTS // widest)
        out = np.empty((rows.shape[0], self.classes), np.float64)
        for start in range(0, rows.shape[0], step):
            h = rows[start:start + step].astype(np.float64)
            for index, (weight, bias) in enumerate(self.layers):
                if index:
                    np.maximum(h, 0.0, out=h)  # ReLU between layers, not after the last
                h = h @ weight.T + bias
            h -= h.max(axis=1, keepdims=True)
            np.exp(h, out=h)
            h /= h.sum(axis=1, keepdims=True)
            out[start:start + step] = h
        return out


def read_slice(tensors: Mapping[str, np.ndarray]) -> Slice:
    """The layers of a sealed part, in the order their tensors were sealed: each module's
    ``weight [out, in]`` and ``bias [out]`` (``head.weight``, ``head.bias``; ``slice.0.weight``,
    ``slice.0.bias``, ``slice.2.weight`` ... as ``split_module`` gives an ``nn.Sequential``),
    or a bare ``weight`` and ``bias``. Anything else is a :class:`PartError` naming the problem."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    last = None
    for name, tensor in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind not in ("weight", "bias"):
            raise PartError(f"{name}: a slice holds only linear layers' weight and bias tensors")
        if module in modules and module != last:
            raise PartError(f"{name}: the tensors of layer {module or '(unnamed)'} are not sealed "
                            "together, so the layer order is ambiguous")
        modules.setdefault(module, {})[kind] = tensor
        last = module
    if not modules:
        raise PartError("the part holds no tensors")
    if len(modules) > MAX_LAYERS:
        raise PartError(f"the part has {len(modules)} layers; at most {MAX_LAYERS}")
    total = sum(t.size for t in tensors.values())
    if total > MAX_PARAMETERS:
        raise PartError(f"the part has {total:,} parameters; at most {MAX_PARAMETERS:,}")
    layers: list[tuple[np.ndarray, np.ndarray]] = []
    bound = _FLOAT32_MAX  # the largest |activation| a finite float32 input can lead to
    for module, pair in modules.items():
        label = module or "(unnamed)"
        weight, bias = pair.get("weight"), pair.get("bias")
        if weight is None or bias is None:
            raise PartError(f"layer {label} needs both weight [out, in] and bias [out]")
        if weight.ndim != 2 or 0 in weight.shape or bias.shape != (weight.shape[0],):
            raise PartError(f"layer {label}: weight {list(weight.shape)} and bias {list(bias.shape)} "
                            "are not weight [out, in] and bias [out]")
        if layers and weight.shape[1] != layers[-1][0].shape[0]:
            raise PartError(f"layer {label} takes {weight.shape[1]} inputs but the layer before "
                            f"gives {layers[-1][0].shape[0]}")
        if not (np.issubdtype(weight.dtype, np.floating) and np.issubdtype(bias.dtype, np.floating)):
            raise PartError(f"layer {label} is {weight.dtype}/{bias.dtype}; a slice is floating point")
        wide, offset = weight.astype(np.float64), bias.astype(np.float64)
        if not (np.isfinite(wide).all() and np.isfinite(offset).all()):
            raise PartError(f"layer {label} holds NaN or infinity")
        # |h_out| <= in * max|W| * |h_in| + max|b|: if no finite float32 input can overflow
        # float64, an overflow cannot turn an answer into an oracle of the weights' scale.
        bound = weight.shape[1] * float(np.abs(wide).max()) * bound + float(np.abs(offset).max())
        if not bound < _FLOAT64_SAFE:
            raise PartError(f"layer {label}: weights so large that a finite float32 input could "
                            "overflow float64")
        layers.append((wide, offset))
    return Slice(tuple(layers))


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
    """A network namespace of its own where the OS allows, then not dumpable. Reports what
    held; exits if half of a namespace change held."""
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
    reader = FrameReader(connection)
    while True:
        try:
            header, payload = reader.read()
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
        send_frame(connection, answer, data, binary=reader.binary)  # binary asked, binary answered


def _exit_with_launcher(fd: int) -> None:
    """Exit once the launcher's end of the liveness pipe closes: the launcher stopped the
    worker or died, whatever thread started it (PR_SET_PDEATHSIG follows the thread)."""
    while True:
        try:
            if not os.read(fd, 1):
                os._exit(0)
        except InterruptedError:
            continue
        except OSError:
            os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description="the isolated worker (started by the launcher)")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--platform-fd", type=int, required=True)
    parser.add_argument("--alive-fd", type=int, required=True)
    args = parser.parse_args()
    threading.Thread(target=_exit_with_launcher, args=(args.alive_fd,), daemon=True,
                     name="launcher-alive").start()
    serve(args.socket, socket.socket(fileno=args.platform_fd))


if __name__ == "__main__":
    main()
