"""Real Redis and PostgreSQL for the tests: use the running ones, start them when down.

The commands are the ones the development and CI machines use; when a service cannot be
started the error says which command failed, so a missing service is never a silent skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    result = subprocess.run(
        command, shell=True, capture_output=True, text=True, timeout=60, check=False
    )
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
def private_redis(*options: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A throw-away ``redis-server`` on a spare port, for tests that kill it mid-run;
    ``options`` are more of its command-line arguments (``"--requirepass", "s3cret"``)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir, *options],
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


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a spare port, for tests that stop it mid-run.

    ``initdb`` refuses to run as root, so every cluster command runs as the ``postgres``
    user when the tests run as root. ``stop()`` and ``start()`` keep the port and data.
    """

    def __init__(self, workdir: Path) -> None:
        """``workdir`` must be reachable by the ``postgres`` user (see :func:`private_postgres`)."""
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not bins:
            raise RuntimeError("PostgreSQL server binaries are missing (apt-get install postgresql)")
        self.bin = bins[-1].parent
        self.data = workdir / "data"
        self.socket_dir = workdir / "socket"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_owner = os.geteuid() == 0
        for path in (workdir, self.socket_dir):
            path.mkdir(parents=True, exist_ok=True)
            if self._as_owner:
                shutil.chown(path, "postgres", "postgres")

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_owner:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed: {result.stderr.strip()[-500:]}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync")

    def start(self) -> None:
        # fsync off is safe here: a crash of the server process (not of the machine) keeps
        # every commit. synchronous_commit stays on, or a crash would lose acknowledged rows.
        options = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-w", "-t", "30",
                  "-l", str(self.data.parent / "postgres.log"), "start")
        wait_for_port("127.0.0.1", self.port, timeout=30)

    def stop(self, mode: str = "fast") -> None:
        """``fast`` closes sessions cleanly; ``immediate`` is what a crash looks like."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists() and port_open("127.0.0.1", self.port)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A fresh cluster in a temporary directory, stopped and removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="mf-pg-") as workdir:
        if os.geteuid() == 0:
            shutil.chown(workdir, "postgres", "postgres")
        cluster = PrivatePostgres(Path(workdir) / "pg")
        cluster.init()
        cluster.start()
        try:
            yield cluster
        finally:
            if (cluster.data / "postmaster.pid").exists():
                cluster.stop("immediate")


def scrape_metrics(base_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/metrics`` of a gateway as {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    from modelfence.testing.processes import http_json

    status, text = http_json("GET", base_url + "/metrics")
    if status != 200 or not isinstance(text, str):
        raise RuntimeError(f"/metrics answered {status}")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric_sum(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
               **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def dropped_events(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> float:
    """Every request event the gateway counted as lost, whatever the fate's name."""
    return sum(
        value for (name, labels), value in samples.items()
        if name == "modelfence_telemetry_events_total"
        and dict(labels).get("fate", "").startswith("dropped")
    )


@contextmanager
def background_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop in a thread of its own: requests run on it while a test stops services."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@dataclass(frozen=True)
class LocalCluster:
    """A three-master Redis Cluster of :func:`redis_cluster`; ``ports[i]`` is master ``i``."""

    url: str
    ports: tuple[int, ...]
    procs: tuple[subprocess.Popen[bytes], ...]


def _distinct_free_ports(count: int) -> list[int]:
    """``count`` distinct ports the kernel just handed out as free (each bound, then let go)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _cluster_failure(what: str, workdir: str) -> RuntimeError:
    logs = "; ".join(
        f"{log.name}: {log.read_text(errors='replace').strip()[-300:]}"
        for log in sorted(Path(workdir).glob("*.log"))
    )
    return RuntimeError(f"the test Redis Cluster did not start: {what} (logs: {logs})")


@contextmanager
def redis_cluster(
    masters: int = 3, timeout: float = 20.0, *, full_coverage: bool = True
) -> Iterator[LocalCluster]:
    """A throw-away Redis Cluster: ``masters`` ``redis-server`` processes with
    ``--cluster-enabled yes``, joined by ``redis-cli --cluster create``.

    Client and bus ports (``--cluster-port``) all come from the kernel, so none is taken
    or in use by another test; a start that loses a port to a race anyway is tried once
    more on fresh ones. ``full_coverage=False`` lets the live masters keep serving their
    slots once a master is marked failed (``cluster-require-full-coverage no``). Ready once every node reports ``cluster_state:ok``; killed, files
    and all, on exit.
    """
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise RuntimeError("redis-server and redis-cli are needed (apt-get install redis-server)")
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as workdir:
            ports = _distinct_free_ports(2 * masters)
            procs = tuple(
                subprocess.Popen(
                    [server, "--port", str(port), "--cluster-port", str(bus), "--bind",
                     "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir,
                     "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                     "--cluster-node-timeout", "2000", "--logfile", f"{workdir}/{port}.log",
                     "--cluster-require-full-coverage", "yes" if full_coverage else "no"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for port, bus in zip(ports[:masters], ports[masters:], strict=True)
            )
            try:
                try:
                    _join_cluster(cli, tuple(ports[:masters]), timeout, workdir)
                except RuntimeError:
                    if attempt == 2:
                        raise
                    continue
                url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports[:masters])
                yield LocalCluster(url, tuple(ports[:masters]), procs)
                return
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
                for proc in procs:
                    proc.wait(timeout=10)


def _join_cluster(cli: str, ports: tuple[int, ...], timeout: float, workdir: str) -> None:
    """Join the started nodes on ``ports`` and wait until each reports ``cluster_state:ok``."""
    for port in ports:
        try:
            wait_for_port("127.0.0.1", port, timeout=10)
        except RuntimeError as exc:
            raise _cluster_failure(str(exc), workdir) from exc
    created = subprocess.run(
        [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
         "--cluster-replicas", "0", "--cluster-yes"],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if created.returncode != 0:
        raise _cluster_failure(
            f"redis-cli --cluster create exited {created.returncode}: "
            f"{(created.stdout + created.stderr).strip()[-500:]}",
            workdir,
        )
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        info = subprocess.run(
            [cli, "-p", str(pending[0]), "cluster", "info"],
            capture_output=True, text=True, timeout=5, check=False,
        )
        if "cluster_state:ok" in info.stdout:
            pending.pop(0)
        elif time.monotonic() > deadline:
            raise _cluster_failure(
                f"node {pending[0]} not cluster_state:ok after {timeout:.0f}s", workdir
            )
        else:
            time.sleep(0.05)
