"""Real Redis and PostgreSQL for the tests: use the running ones, start them when down.

The commands are the ones the development and CI machines use; when a service cannot be
started the error says which command failed, so a missing service is never a silent skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelfence.testing.processes import free_port

REDIS_URL = os.environ.get("MODELFENCE_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("MODELFENCE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def _start(command: str, host: str, port: int, name: str) -> None:
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
    try:
        wait_for_port(host, port, timeout=30)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{name} is not running on {host}:{port} and `{command}` did not start it "
            f"(exit {result.returncode}): {result.stderr.strip()[-500:]}"
        ) from exc


def ensure_redis() -> str:
    if not port_open("127.0.0.1", 6379):
        Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
        Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
        _start(
            'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
            "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log",
            "127.0.0.1",
            6379,
            "Redis",
        )
    return REDIS_URL


def ensure_postgres() -> str:
    if not port_open("127.0.0.1", 5432):
        _start(
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
            "127.0.0.1",
            5432,
            "PostgreSQL",
        )
    return POSTGRES_URL


@contextmanager
def private_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A throw-away ``redis-server`` on a spare port, for tests that kill it mid-run."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port("127.0.0.1", port, timeout=10)
            yield f"redis://127.0.0.1:{port}/0", proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
