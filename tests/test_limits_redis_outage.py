"""When Redis fails: each ``on_backend_error`` mode as configured, counted, logged, recovered.

The Redis tests kill a private ``redis-server`` mid-run and start it again on the same
port; the rest drive :class:`GuardedBackend` with a primary that fails on demand.
"""

from __future__ import annotations

import logging
import subprocess
import uuid
from urllib.parse import urlsplit

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from modelfence.errors import LimitBackendError
from modelfence.limits import (
    AdmissionRequest,
    Decision,
    GuardedBackend,
    Lease,
    MemoryBackend,
    Quota,
)
from modelfence.limits.guard import FallbackMode
from modelfence.limits.redis import RedisBackend
from tests.services import free_port, private_redis, wait_for_port

# What three admissions of one key with 4 requests per minute get while Redis is down.
DURING_OUTAGE: dict[str, list[tuple[bool, str, str | None]]] = {
    "open": [(True, "fail_open", None)] * 3,
    "closed": [(False, "fail_closed", "backend")] * 3,
    # degraded_share 0.5: this replica alone admits 2 of the 4
    "degraded": [(True, "degraded", None)] * 2 + [(False, "degraded", "requests")],
}


def summary(decision: Decision) -> tuple[bool, str, str | None]:
    return decision.allowed, decision.source, decision.denied_by


@pytest.mark.redis
@pytest.mark.parametrize("mode", ["open", "closed", "degraded"])
async def test_outage_is_handled_as_configured_then_redis_takes_over_again(
    mode: FallbackMode,
) -> None:
    fallbacks: list[str] = []
    request = AdmissionRequest(uuid.uuid4().hex, Quota(requests_per_minute=4))
    with private_redis() as (url, server):
        guarded = GuardedBackend(
            RedisBackend.from_url(url, timeout_seconds=1.0),
            mode=mode,
            share=0.5,
            on_fallback=fallbacks.append,
            on_release=lambda event: None,
            probe_interval_seconds=0,  # try Redis on every admission
        )
        before = await guarded.admit(request)
        assert summary(before) == (True, "backend", None) and before.lease is not None

        server.kill()
        server.wait()
        during = [await guarded.admit(request) for _ in range(3)]
        assert [summary(d) for d in during] == DURING_OUTAGE[mode]
        assert fallbacks == [mode] * 3
        await guarded.settle(before.lease, 0, 0.0)  # counted, not raised
        assert guarded.settle_errors == 1

        restarted = subprocess.Popen(
            server.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            port = urlsplit(url).port
            assert port is not None
            wait_for_port("127.0.0.1", port, timeout=10)
            after = await guarded.admit(request)  # stale connection and script cache: unseen
            assert summary(after) == (True, "backend", None)
            assert fallbacks == [mode] * 3
            await guarded.close()
        finally:
            restarted.kill()
            restarted.wait(timeout=10)


@pytest.mark.parametrize("call", ["admit", "ping"])
async def test_redis_errors_surface_as_limit_backend_errors(call: str) -> None:
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    with pytest.raises(LimitBackendError) as raised:
        if call == "admit":
            await backend.admit(AdmissionRequest("k", Quota(requests_per_minute=1)))
        else:
            await backend.ping()
    assert isinstance(raised.value.__cause__, RedisConnectionError)
    await backend.close()


# --- the guard alone ----------------------------------------------------------------------


class FlakyBackend(MemoryBackend):
    """A primary that raises :class:`LimitBackendError` while ``down``, and counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.calls = 0

    async def admit(self, request: AdmissionRequest) -> Decision:
        self._call()
        return await super().admit(request)

    async def settle(self, lease: Lease, tokens_used: int, usd_used: float) -> None:
        self._call()
        await super().settle(lease, tokens_used, usd_used)

    def _call(self) -> None:
        self.calls += 1
        if self.down:
            raise LimitBackendError("primary is down")


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def guard(
    primary: FlakyBackend, clock: ManualClock, fallbacks: list[str], mode: FallbackMode
) -> GuardedBackend:
    return GuardedBackend(
        primary,
        mode=mode,
        share=0.5,
        on_fallback=fallbacks.append,
        on_release=lambda event: None,
        clock=clock,
        probe_interval_seconds=1.0,
        log_interval_seconds=5.0,
    )


async def test_degraded_leases_settle_locally() -> None:
    primary, fallbacks = FlakyBackend(), list[str]()
    guarded = guard(primary, ManualClock(), fallbacks, "degraded")
    request = AdmissionRequest("k", Quota(concurrent_requests=2))  # 1 on this replica
    first, second = [await guarded.admit(request) for _ in range(2)]
    assert first.source == "degraded" and first.lease is not None
    assert second.denied_by == "concurrency"
    calls = primary.calls
    await guarded.settle(first.lease, 0, 0.0)
    assert primary.calls == calls  # the primary never saw that lease
    assert (await guarded.admit(request)).allowed
    assert guarded.settle_errors == 0


async def test_primary_is_probed_once_per_interval_and_used_once_back() -> None:
    primary, clock, fallbacks = FlakyBackend(), ManualClock(), list[str]()
    guarded = guard(primary, clock, fallbacks, "open")
    request = AdmissionRequest("k", Quota(requests_per_minute=100))
    for _ in range(5):
        assert (await guarded.admit(request)).source == "fail_open"
    assert primary.calls == 1  # the others did not wait on a dead primary
    primary.down = False
    assert (await guarded.admit(request)).source == "fail_open"  # still within the interval
    clock.now += 1.0
    assert (await guarded.admit(request)).source == "backend"
    assert fallbacks == ["open"] * 6


async def test_fallback_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    clock, fallbacks = ManualClock(), list[str]()
    guarded = guard(FlakyBackend(), clock, fallbacks, "closed")
    request = AdmissionRequest("k", Quota())
    with caplog.at_level(logging.WARNING, logger="modelfence.limits.guard"):
        for _ in range(10):
            await guarded.admit(request)
        clock.now += 5.0
        await guarded.admit(request)
    assert len(fallbacks) == 11
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "primary is down" in messages[0] and "closed" in messages[0]
    assert "9 similar lines held back" in messages[1]
