"""The launcher: measures the worker, starts it, and is its (simulated) platform.

A real TEE measures what it launches in hardware and signs evidence with a key fused into
the chip. Here the launcher plays that part in software: it hashes the worker's code (the
``confidential`` package's modules) and its configuration, starts the worker with one end
of a socket pair, and signs evidence over the measurement it took for whatever report
data the worker sends on it. The worker never sees the platform key. Simulated: anyone
with the launcher's key, or able to change the code between measurement and start, could
forge evidence; the security level says ``simulated`` everywhere.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

from modelfence.confidential.attestation import REPORT_DATA_BYTES, Evidence, SimPlatform, measure
from modelfence.confidential.broker import ReleasedKey
from modelfence.confidential.sealing import SealedHeader, read_header
from modelfence.confidential.worker import (
    FrameError,
    FrameReader,
    WorkerConfig,
    recv_frame,
    send_frame,
)
from modelfence.errors import ModelFenceError

CODE = Path(__file__).resolve().parent
PACKAGE = CODE.parent
ROOT = PACKAGE.parent  # the folder holding ``modelfence``: the only place the worker imports it from
START_TIMEOUT = 30.0
# Run in an isolated interpreter (-I: no PYTHONPATH, no user site, not the current folder),
# importing modelfence from ROOT alone, and refusing to run if it got another copy.
_BOOT = (
    "import sys; root = sys.argv.pop(1); sys.path.insert(0, root); import modelfence, pathlib; "
    "sys.exit('worker: modelfence imported from elsewhere') "
    "if pathlib.Path(modelfence.__file__).resolve().parent.parent != pathlib.Path(root) else None; "
    "from modelfence.confidential.worker import main; main()"
)


def worker_code() -> list[Path]:
    """The files measured as the worker's code: every modelfence module it imports."""
    return sorted([*CODE.glob("*.py"), PACKAGE / "__init__.py", PACKAGE / "errors.py"])


def measurement(config: bytes) -> str:
    """What a worker started with ``config`` measures as: list it in the broker's policy
    (``confidential.measurements``; ``modelfence measure-worker`` prints it)."""
    return measure(ROOT, worker_code(), config)


class Broker(Protocol):
    """What provisioning needs of a key broker: a ``KeyBroker`` here, or a ``RemoteBroker``."""

    def challenge(self) -> bytes: ...

    def release(self, header: SealedHeader, evidence: Evidence, worker_public_key: bytes,
                nonce: bytes) -> ReleasedKey: ...


class WorkerError(ModelFenceError):
    """The worker refused an operation or could not be reached."""


@dataclass
class LaunchedWorker:
    process: subprocess.Popen[bytes]
    socket_path: Path
    measurement: str
    isolation: dict[str, Any]
    alive: int  # the write end of the liveness pipe: the worker exits when it closes

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        try:
            os.close(self.alive)
        except OSError:
            pass  # closed by an earlier stop()


def launch(config: bytes, folder: Path, platform: SimPlatform) -> LaunchedWorker:
    """Measure and start a worker serving on ``folder/worker.sock`` (``folder`` made 0700)."""
    WorkerConfig.parse(config)  # refuse a bad config here, not in the child
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    socket_path = folder / "worker.sock"
    socket_path.unlink(missing_ok=True)
    measured = measurement(config)
    ours, theirs = socket.socketpair()
    # The worker exits when this process closes ``alive`` (stop(), or its own death, in
    # whatever thread launched it); neither end is inherited by any other child.
    watched, alive = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-I", "-c", _BOOT, str(ROOT), "--socket", str(socket_path),
         "--platform-fd", str(theirs.fileno()), "--alive-fd", str(watched)],
        pass_fds=[theirs.fileno(), watched],
    )
    theirs.close()
    os.close(watched)
    ours.settimeout(START_TIMEOUT)
    try:
        send_frame(ours, {"config": True}, config)  # the measured bytes themselves, not a file
        ready, _ = recv_frame(ours)
        if ready.get("ready") is not True:
            raise FrameError(f"unexpected first frame {ready!r}")
    except (OSError, FrameError, ConnectionError) as exc:
        ours.close()
        os.close(alive)
        process.kill()
        process.wait()
        raise WorkerError(f"the worker did not start: {exc}") from exc
    ours.settimeout(None)
    threading.Thread(target=_quote_for, args=(ours, platform, measured), daemon=True,
                     name="sim-platform").start()
    return LaunchedWorker(process, socket_path, measured,
                          {k: v for k, v in ready.items() if k not in ("ready", "payload_bytes")},
                          alive)


def _quote_for(channel: socket.socket, platform: SimPlatform, measurement: str) -> None:
    """Sign evidence over the launcher's own measurement for each report data received."""
    with channel:
        while True:
            try:
                request, _ = recv_frame(channel)
                data = bytes.fromhex(str(request.get("report_data", "")))
                if len(data) != REPORT_DATA_BYTES:
                    raise ValueError("report data must be 64 bytes")
                send_frame(channel, platform.quote(measurement, data, time.time()).to_dict())
            except (ConnectionError, OSError):
                return  # the worker exited
            except (ValueError, FrameError):
                return  # the channel is out of step: no more evidence for this worker


class WorkerClient:
    """One connection to a worker's socket. ``infer`` calls (float32 rows, a 2-d shape) go as
    binary frames and come back as such; the other operations, and errors, are JSON."""

    def __init__(self, socket_path: Path, *, timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(socket_path))
        except OSError as exc:
            self._sock.close()
            raise WorkerError(f"worker at {socket_path} unreachable: {exc}") from exc
        self._reader = FrameReader(self._sock)

    def call(self, op: str, payload: bytes = b"", **fields: Any) -> tuple[dict[str, Any], bytes]:
        try:
            send_frame(self._sock, {"op": op, **fields}, payload, binary=True)
            answer, data = self._reader.read()
        except (OSError, ConnectionError, FrameError) as exc:
            raise WorkerError(f"worker call {op!r} failed: {exc}") from exc
        if "error" in answer:
            raise WorkerError(str(answer["error"]))
        return answer, data

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def provision(client: WorkerClient, broker: Broker, sealed: Path) -> dict[str, Any]:
    """Attest the worker to ``broker`` for the part in ``sealed`` and hand it the released
    key: the whole exchange (raises ``ReleaseRefused`` or :class:`WorkerError`)."""
    header = read_header(sealed)
    nonce = broker.challenge()
    attested, _ = client.call("attest", nonce=nonce.hex(), digest=header.digest)
    released = broker.release(header, Evidence.from_dict(attested["evidence"]),
                              bytes.fromhex(attested["public_key"]), nonce)
    answer, _ = client.call("provision", sealed=str(sealed),
                            ephemeral_public_key=released.ephemeral_public_key.hex(),
                            nonce=released.nonce.hex(), ciphertext=released.ciphertext.hex(),
                            security_level=released.security_level)
    return answer
