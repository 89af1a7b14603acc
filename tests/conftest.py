"""Shared fixtures: real services (Redis, PostgreSQL), real gateway and upstream processes."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelfence.testing.processes import (
    GatewayProcess,
    ServiceProcess,
    free_port,
    modelfence_command,
)

from .services import LocalCluster, ensure_postgres, ensure_redis, redis_cluster

ADMIN_TOKEN = "test-admin-token-0123456789"
PROFILE = os.environ.get("MODELFENCE_TEST_PROFILE", "full")  # "ci" trims the slow tests


@pytest.fixture(scope="session")
def redis_url() -> str:
    return ensure_redis()


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """A real three-master Redis Cluster for the session (``cluster.url``: redis+cluster://)."""
    with redis_cluster() as started:
        yield started


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return ensure_postgres()


@pytest.fixture(scope="session")
def fake_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake") / "fake-upstream.log"
    with ServiceProcess(
        [*modelfence_command()[:2], "modelfence.testing.fake_upstream", "--port", str(port)],
        port=port,
        ready_path="/v2/health/ready",
        log_file=log,
    ) as proc:
        yield proc


@pytest.fixture(scope="session")
def demo_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The real demo models; loading them takes seconds (minutes on the very first run)."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "demo-upstream.log"
    with ServiceProcess(
        modelfence_command("demo-upstream", "--port", str(port)),
        port=port,
        ready_path="/healthz?ready=all",
        log_file=log,
        ready_timeout=600,
    ) as proc:
        yield proc


def base_config(upstream_url: str, workdir: Path) -> dict[str, Any]:
    return {
        "upstreams": [
            {"name": "fake", "url": upstream_url, "kind": "openai",
             "models": ["fake-chat", "fake-embed", "fake-*"], "timeout_seconds": 2},
            {"name": "fake-oip", "url": upstream_url, "kind": "oip", "models": ["digits-fake"]},
        ],
        "store": f"sqlite:///{workdir / 'state.db'}",
        "secret": "test-secret-0123456789abcdef",
        "admin_token": ADMIN_TOKEN,
        "server": {"max_body_bytes": 65536, "max_header_bytes": 8192},
        "limits": {
            "backend": "memory",
            "tiers": {
                "default": {"requests_per_minute": 6000, "tokens_per_minute": 10_000_000,
                            "concurrent_requests": 64, "usd_per_day": 1000},
                "tiny": {"requests_per_minute": 2, "tokens_per_minute": 1000,
                         "concurrent_requests": 1, "usd_per_day": 1000},
                "chat-only": {"models": ["fake-chat"]},
            },
        },
        "prices": {"fake-*": {"input_per_1k_tokens": 0.001, "output_per_1k_tokens": 0.002}},
    }


GatewayFactory = Callable[..., GatewayProcess]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# A test module that reads nothing of detection sets ``GATEWAY_DETECTION = False``: its
# gateways start without a detector child, about three seconds sooner each.
NO_DETECTION: dict[str, Any] = {"detection": {"enabled": False}}


def module_config(request: pytest.FixtureRequest, upstream_url: str, workdir: Path) -> dict[str, Any]:
    """``base_config``, without detection where the requesting module says so."""
    config = base_config(upstream_url, workdir)
    if not getattr(request.module, "GATEWAY_DETECTION", True):
        config = _merge(config, NO_DETECTION)
    return config


@pytest.fixture
def start_gateway(
    request: pytest.FixtureRequest, tmp_path: Path, fake_upstream: ServiceProcess
) -> Iterator[GatewayFactory]:
    """Start ``modelfence serve`` processes on the fake upstream; stopped after the test."""
    started: list[GatewayProcess] = []

    def start(name: str = "gateway", **overrides: Any) -> GatewayProcess:
        config = _merge(module_config(request, fake_upstream.url, tmp_path), overrides)
        gateway = GatewayProcess(config, tmp_path, name=name)
        started.append(gateway)
        return gateway.start()

    yield start
    for gateway in started:
        gateway.stop()
