"""Start ModelFence services as child processes and wait until they answer.

Used by ``modelfence demo``, the red-team harness, the benchmarks and the tests, so that
all of them run the real ``modelfence serve`` / ``demo-upstream`` commands the same way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import orjson
import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_json(
    method: str,
    url: str,
    body: Any = None,
    *,
    token: str | None = None,
    timeout: float = 10.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """A tiny synchronous JSON client for set-up steps and scripted demos (not for load)."""
    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return status, raw.decode(errors="replace")


class ServiceProcess:
    """A child process serving HTTP on ``port``; ready once ``ready_path`` answers 200."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        port: int,
        ready_path: str = "/healthz",
        env: dict[str, str] | None = None,
        log_file: Path | None = None,
        ready_timeout: float = 120.0,
    ) -> None:
        self.args = list(args)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        self.env = {**os.environ, **(env or {})}
        self.log_file = log_file
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Self:
        self._log = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self._log else subprocess.DEVNULL,
            start_new_session=True,
        )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{' '.join(self.args)} exited with {self.proc.returncode}"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            try:
                status, _ = http_json("GET", self.url + self.ready_path, timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{' '.join(self.args)} not ready after {self.ready_timeout:.0f}s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def modelfence_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "modelfence", *args]


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


class GatewayProcess(ServiceProcess):
    """``modelfence serve`` with a given config mapping, plus admin helpers."""

    def __init__(
        self, config: dict[str, Any], workdir: Path, *, port: int | None = None, name: str = "gateway"
    ) -> None:
        port = port or free_port()
        self.config = config
        self.admin_token = str(config["admin_token"])
        config_path = write_config(workdir / f"{name}.yaml", config)
        super().__init__(
            modelfence_command("--config", str(config_path), "serve", "--port", str(port)),
            port=port,
            log_file=workdir / f"{name}.log",
            env={"PYTHONUNBUFFERED": "1"},
        )

    def create_key(
        self,
        client: str,
        tier: str = "default",
        *,
        account: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        request: dict[str, Any] = {"client": client, "tier": tier}
        if account is not None:
            request["account"] = account
        if metadata is not None:
            request["metadata"] = metadata
        status, body = http_json(
            "POST", self.url + "/admin/v1/keys", request, token=self.admin_token
        )
        if status != 201:
            raise RuntimeError(f"creating a key failed: {status} {body}")
        return str(body["api_key"])

    def revoke_key(self, key_id: str) -> None:
        status, body = http_json(
            "DELETE", f"{self.url}/admin/v1/keys/{key_id}", token=self.admin_token
        )
        if status != 200:
            raise RuntimeError(f"revoking {key_id} failed: {status} {body}")
