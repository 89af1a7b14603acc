"""Readiness verdicts: what a load balancer sees when parts of a replica's world are down."""

from __future__ import annotations

import logging

import pytest

from modelfence.errors import LimitBackendError, UpstreamError
from modelfence.gateway.endpoints import Dependency, Probe, Readiness

SECRET = "redis://10.1.2.3:6380 refused"


async def ok() -> None:
    return None


async def limits_down() -> None:
    raise LimitBackendError(SECRET)


async def upstream_down() -> None:
    raise UpstreamError("upstream 'b' at http://10.9.9.9:9000 is unreachable")


def upstreams(*probes: Probe) -> list[Dependency]:
    return [Dependency(f"upstream:{i}", p, pool="upstreams") for i, p in enumerate(probes)]


@pytest.mark.parametrize(
    ("dependencies", "status", "state"),
    [
        ([Dependency("limits", ok), *upstreams(ok, ok)], 200, "ready"),
        ([Dependency("limits", limits_down, required=False), *upstreams(ok)], 200, "degraded"),
        ([Dependency("limits", limits_down, required=True), *upstreams(ok)], 503, "not ready"),
        ([Dependency("limits", ok), *upstreams(ok, upstream_down)], 200, "degraded"),
        ([Dependency("limits", ok), *upstreams(upstream_down, upstream_down)], 503, "not ready"),
        ([Dependency("store", limits_down), *upstreams(ok)], 503, "not ready"),
    ],
    ids=["all-up", "limits-down-open", "limits-down-closed", "one-upstream-down",
         "all-upstreams-down", "store-down"],
)
async def test_verdicts(dependencies: list[Dependency], status: int, state: str) -> None:
    got, body = await Readiness(dependencies).check()
    assert (got, body["status"]) == (status, state)
    assert set(body["checks"].values()) <= {"ok", "down"}
    assert "10." not in repr(body) and "refused" not in repr(body)


async def test_reasons_go_to_the_log_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    readiness = Readiness([Dependency("limits", limits_down, required=False)])
    with caplog.at_level(logging.INFO, logger="modelfence.gateway"):
        await readiness.check()
        readiness._cached = None  # past the one-second cache
        await readiness.check()
    assert [r.getMessage() for r in caplog.records] == [f"readiness: limits is down: {SECRET}"]
