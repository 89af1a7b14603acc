"""The detector child of ``serve`` (``detection.feed: process``) killed, and ``serve`` killed.

A killed detector must be started again, and ``/readyz`` must say it is down until then;
a ``serve`` killed with SIGKILL must not leave its detector running on its own.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psutil

from modelfence.testing.processes import GatewayProcess, http_json

from .conftest import GatewayFactory
from .services import metric_sum, scrape_metrics

DETECTION = {"enabled": True, "feed": "process", "embedder": "hashing", "shadow": True}
RESTART_BOUND_SECONDS = 15.0


def detector_children(gateway: GatewayProcess) -> list[psutil.Process]:
    """The spawned detector process(es) of ``gateway`` (not multiprocessing's helpers)."""
    assert gateway.proc is not None
    found = []
    for child in psutil.Process(gateway.proc.pid).children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmdline and child.is_running() and child.status() != "zombie":
            found.append(child)
    return found


def wait_for_detector(gateway: GatewayProcess, not_pid: int | None = None) -> psutil.Process:
    deadline = time.monotonic() + RESTART_BOUND_SECONDS
    while time.monotonic() < deadline:
        children = [c for c in detector_children(gateway) if c.pid != not_pid]
        if children:
            return children[0]
        time.sleep(0.1)
    raise AssertionError(f"no detector child within {RESTART_BOUND_SECONDS:g}s")


def detector_checks(body: Any) -> dict[str, str]:
    checks = body.get("checks", {}) if isinstance(body, dict) else {}
    return {name: str(value) for name, value in checks.items() if "detect" in name}


def test_a_killed_detector_is_restarted_and_readiness_says_so(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(detection=DETECTION)
    first = wait_for_detector(gateway)
    status, body = http_json("GET", gateway.url + "/readyz")
    assert status == 200 and set(detector_checks(body).values()) == {"ok"}, body

    os.kill(first.pid, signal.SIGKILL)
    seen_down: list[tuple[int, Any]] = []
    deadline = time.monotonic() + RESTART_BOUND_SECONDS
    replacement = None
    while time.monotonic() < deadline:
        status, body = http_json("GET", gateway.url + "/readyz")
        if status != 200 or set(detector_checks(body).values()) != {"ok"}:
            seen_down.append((status, body))
        replacement = next((c for c in detector_children(gateway) if c.pid != first.pid), None)
        back = status == 200 and set(detector_checks(body).values()) == {"ok"}
        if replacement is not None and seen_down and back:
            break
        time.sleep(0.1)
    assert replacement is not None, f"not restarted within {RESTART_BOUND_SECONDS:g}s"
    assert metric_sum(scrape_metrics(gateway.url), "modelfence_detector_restarts_total") == 1
    status, body = http_json("GET", gateway.url + "/readyz")
    assert status == 200 and set(detector_checks(body).values()) == {"ok"}, body
    # Down means until the new child runs its detector, not only until it is spawned.
    assert seen_down, "/readyz never reported the dead detector"


def test_a_killed_serve_takes_its_detector_with_it(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(detection=DETECTION)
    child = wait_for_detector(gateway)
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(timeout=10)
    try:
        gone, _ = psutil.wait_procs([child], timeout=10)
        assert gone, f"detector {child.pid} still running 10s after serve was killed"
    finally:
        if child.is_running():
            child.kill()
