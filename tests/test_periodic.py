"""The background-loop helper: errors counted and backed off, success resets, Done ends."""

from __future__ import annotations

import asyncio

import pytest

from modelfence.periodic import Done, Periodic


class Script:
    """A step that plays back outcomes: an exception to raise, or None to succeed."""

    def __init__(self, *outcomes: BaseException | None) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        outcome = self.outcomes.pop(0) if self.outcomes else Done()
        if outcome is not None:
            raise outcome


async def test_failures_back_off_to_the_cap_and_a_success_resets() -> None:
    waits: list[float] = []
    errors: list[str] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    fault = RuntimeError("boom")
    step = Script(fault, fault, fault, fault, fault, None, fault, None)
    loop = Periodic(
        "test-loop", step, interval=1.0, on_error=lambda name, exc: errors.append(name),
        min_backoff=0.5, max_backoff=5.0, sleep=sleep,
    )
    await loop.run()
    assert waits == [1.0, 1.0, 2.0, 4.0, 5.0, 5.0, 1.0, 1.0, 1.0]
    assert errors == ["test-loop"] * 6 and loop.errors == 6 and loop.failures == 0


async def test_cancellation_is_not_swallowed() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    loop = Periodic("test-loop", forever, interval=0.0)
    loop.start()
    await asyncio.wait_for(started.wait(), 5)
    await loop.stop()
    assert not loop.running and loop.errors == 0


def test_bad_intervals_are_refused() -> None:
    with pytest.raises(ValueError):
        Periodic("test-loop", Script(), interval=-1)
    with pytest.raises(ValueError):
        Periodic("test-loop", Script(), interval=1, min_backoff=5, max_backoff=1)
